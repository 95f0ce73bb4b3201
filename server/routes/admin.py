"""Administration of resident variants: load, unload."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from server.deps import ReadyEngine
from server.schemas import ERROR_RESPONSES, Dtype, ErrorBody

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, min_length=1, max_length=256,
                              description="a name from GET /models; default: the startup model")
    dtype: Dtype | None = Field(None, description="dtype to load; default: the startup dtype")


@router.post("/models/load", summary="Load a variant (model, dtype) under the memory budget",
)
async def load(body: LoadRequest, engine: ReadyEngine) -> dict:
    return await engine.load(body.model, body.dtype)


@router.delete("/models/{model:path}/{dtype}", summary="Unload a resident variant and free its memory",
               responses={409: {"model": ErrorBody, "description": "the pinned default variant stays resident"}})
async def unload(model: str, dtype: Dtype, engine: ReadyEngine) -> dict:
    return await engine.unload(model, dtype)
