"""What may be served and what is resident: GET /models, GET /memory."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from models.api import Engine
from models.dtypes import DTYPE_NAMES
from server.deps import ready_engine

router = APIRouter(tags=["models"])


@router.get("/models", summary="Models a request may name, the dtypes, and the resident variants")
async def list_models(engine: Engine = Depends(ready_engine)) -> dict:
    memory = await engine.memory()
    return {"default": {"model": engine.default_model, "dtype": engine.default_dtype},
            "models": engine.model_names(), "dtypes": list(DTYPE_NAMES),
            "resident": [{"model": v["model"], "dtype": v["dtype"]} for v in memory["variants"]]}


@router.get("/memory", summary="Exact bytes of each resident variant by parameter dtype; process and device")
async def memory(engine: Engine = Depends(ready_engine)) -> dict:
    return await engine.memory()
