"""Request-scoped access to the settings and the engine. Async, although none of them waits: FastAPI runs
a plain `def` dependency on a worker thread, a thread hop per request for nothing."""

from __future__ import annotations

import hashlib
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
    if not health.ready:
        if health.status in ("starting", "created"):
            raise EngineUnavailableError("the server is starting: the default model is loading")
        raise EngineUnavailableError("the engine is not available")
    return engine


def bearer_token(request: Request) -> str:
    """The request's `Authorization: Bearer` token, or "" (the API key middleware has checked it)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def tenant(request: Request) -> str:
    """Who is asking, as far as shared state goes: a digest of the API key (never the key itself), or ""
    when the server has no keys (then every client is one tenant; `cache_salt` separates them)."""
    settings: Settings = request.app.state.settings
    if not settings.api_key:
        return ""
    return hashlib.sha256(b"tenant\0" + bearer_token(request).encode()).hexdigest()


def cache_scope(tenant_id: str, salt: str | None) -> str:
    """The prompt cache scope of a request: its tenant and its `cache_salt` (vLLM's name)."""
    return hashlib.sha256(f"{tenant_id}\0{salt or ''}".encode()).hexdigest()[:32]


async def memory_report(engine: Engine) -> dict:
    """The engine's memory report; while a load holds the worker, the one taken at its first tensor with
    the load's progress now, so that /models, /memory and /metrics answer during a load."""
    return (engine.memory_during_load() or await engine.memory()).as_dict()


EngineDep = Annotated[Engine, Depends(get_engine)]
ReadyEngine = Annotated[Engine, Depends(ready_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
Tenant = Annotated[str, Depends(tenant)]
