"""The dtype report: fidelity and speed of each precision against float32, computed as a job."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from server.deps import ReadyEngine, Tenant
from server.schemas import ERROR_RESPONSES, ReportDtype, json_number


class ReportStatus(BaseModel):
    model: str
    state: Literal["running", "done", "failed"]
    stage: str
    progress: float
    done: bool
    error: str | None = None
    dtypes: list[str]
    result: dict | None = Field(None, description="the report, once done")


RUNNING = {202: {"model": ReportStatus, "description": "still computing: poll again (Retry-After)"}}
router = APIRouter(prefix="/v1/dtypes", tags=["report"], responses={**ERROR_RESPONSES, **RUNNING})
ModelQuery = Annotated[str | None, Query(min_length=1, max_length=256)]
RetryQuery = Annotated[bool, Query(description="run a failed report again (else its failure is shown)")]
DtypesQuery = Annotated[list[ReportDtype] | None,
                        Query(max_length=8, description="repeat: dtypes=bfloat16&dtypes=q4 (default: the float dtypes "
                                                    "and the quantizations this device runs); q4%2Bkv8 for q4+kv8 "
                                                    "(a + in a query string is a space)")]
# Each context is prefilled twice per quantized KV precision (float and quantized cache), 2,048 tokens per
# worker step: bounded at the largest of the report's defaults (models.report.fidelity.DEFAULT_KV_CONTEXTS).
MAX_KV_CONTEXT = 4096
MAX_KV_CONTEXTS = 4
KV_CONTEXTS_HELP = (f"context lengths (1 to {MAX_KV_CONTEXT} tokens, at most {MAX_KV_CONTEXTS}) at which a quantized "
                    "KV precision is scored against the float KV cache (default 256, 1024, 4096; one beyond the "
                    "model's context is scored at its longest and listed in beyond_model_context)")
KVContextsQuery = Annotated[list[Annotated[int, Field(ge=1, le=MAX_KV_CONTEXT)]] | None,
                            Query(min_length=1, max_length=MAX_KV_CONTEXTS, description=KV_CONTEXTS_HELP)]
KVContext = Annotated[int, Field(ge=1, le=MAX_KV_CONTEXT), BeforeValidator(json_number)]  # 2.0 yes, true no


class ReportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, min_length=1, max_length=256)
    dtypes: list[ReportDtype] | None = Field(None, max_length=8, description="float32 is always measured; "
                                                  "float dtypes and quantizations (not fit), each with an "
                                                  "optional KV cache precision (q4+kv8, float32+kv4)")
    kv_contexts: list[KVContext] | None = Field(None, min_length=1, max_length=MAX_KV_CONTEXTS,
                                                description=KV_CONTEXTS_HELP)
    prompts: list[Annotated[str, Field(min_length=1, max_length=2000)]] | None = Field(
        None, max_length=256, description="probe prompts used instead of the bundled ones")
    retry: StrictBool = Field(False, description="run a failed report again (else its failure is shown)")


def _contexts(kv_contexts: list[int] | None) -> tuple[int, ...] | None:
    return tuple(kv_contexts) if kv_contexts else None  # the engine sorts them and drops repeats


def _answer(status: dict) -> JSONResponse:
    """200 with the report when done; 202 with progress while it runs (poll again)."""
    if status["state"] == "running":
        return JSONResponse(status, status_code=202, headers={"Retry-After": "1"})
    return JSONResponse(status)


@router.get("/report", summary="Fidelity and speed of each dtype vs float32 (202 while computing, then 200)")
async def get_report(engine: ReadyEngine, model: ModelQuery = None, dtypes: DtypesQuery = None,
                     kv_contexts: KVContextsQuery = None, retry: RetryQuery = False) -> JSONResponse:
    return _answer(await engine.report(model, tuple(dtypes) if dtypes else None, None, retry,
                                       kv_contexts=_contexts(kv_contexts)))


@router.post("/report", summary="The same report over your own probe prompts")
async def post_report(body: ReportRequest, engine: ReadyEngine, tenant: Tenant) -> JSONResponse:
    prompts = tuple(body.prompts) if body.prompts else None
    return _answer(await engine.report(body.model, tuple(body.dtypes) if body.dtypes else None, prompts,
                                       body.retry, scope=tenant, kv_contexts=_contexts(body.kv_contexts)))


@router.get("/report/chart", summary="The report as a chart (memory vs speed vs fidelity per dtype)",
            responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}})
async def chart(engine: ReadyEngine, model: ModelQuery = None, dtypes: DtypesQuery = None,
                kv_contexts: KVContextsQuery = None, format: Literal["png", "svg"] = "svg") -> Response:
    status = await engine.report(model, tuple(dtypes) if dtypes else None, None, kv_contexts=_contexts(kv_contexts))
    if status["state"] != "done":
        return _answer(status)
    from models.report.chart import render_bytes  # matplotlib, not MLX: fine off the worker

    data = await asyncio.to_thread(render_bytes, status["result"], format)
    return Response(data, media_type="image/png" if format == "png" else "image/svg+xml")
