"""Request-scoped access to the settings and the engine. Async, although none of them waits: FastAPI runs
a plain `def` dependency on a worker thread, a thread hop per request for nothing."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from models.api import Engine
from models.errors import EngineUnavailableError
from server.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def ready_engine(request: Request) -> Engine:
    """The engine, or a 503 while the default model is still loading."""
    engine: Engine = request.app.state.engine
    health = engine.health()
    if not health["ready"]:
        if health["status"] in ("starting", "created"):
            raise EngineUnavailableError("the server is starting: the default model is loading")
        raise EngineUnavailableError("the engine is not available")
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]
ReadyEngine = Annotated[Engine, Depends(ready_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
