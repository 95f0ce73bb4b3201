"""What may be served and what is resident: GET /models, GET /memory."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from models.weights.dtypes import DTYPE_NAMES, FIT, quantization_names
from server.deps import ReadyEngine, memory_report
from server.schemas import ERROR_RESPONSES, Dtype

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)


@router.get("/models", summary="Models a request may name, the dtypes, and the resident variants")
async def list_models(engine: ReadyEngine) -> dict:
    memory = await memory_report(engine)
    default = {"model": engine.default_model, "dtype": engine.default_dtype}
    if (fit := memory["budget"]["fit"].get(engine.default_model)) and engine.default_dtype == FIT:
        default["fit"] = fit  # what `fit` chose and why
    return {"default": default, "models": engine.model_names(),
            "dtypes": [*DTYPE_NAMES, FIT, *quantization_names()],
            "report_dtypes": await engine.report_dtypes(),  # what the report measures unless told (the default model's)
            "resident": [{"model": v["model"], "dtype": v["dtype"], "float_dtype": v["float_dtype"],
                          "quantization": v["quantization"], "total_bytes": v["total_bytes"],
                          "in_flight": v["in_flight"]} for v in memory["variants"]],
            # the load in progress (model, dtype, tensors_done/tensors, bytes_done/bytes), or None
            "loading": memory["budget"]["loading"], "budget": memory["budget"]}


@router.get("/memory/estimate", summary="Bytes a variant would hold, from the safetensors headers alone")
async def estimate(engine: ReadyEngine, model: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
                   dtype: Dtype | None = None, include_quantized: bool = False,
                   ranks: Annotated[int | None, Query(ge=1, le=1024)] = None) -> dict:
    """One precision (`dtype`), or the float dtypes, and with `include_quantized` the standard quantizations.
    `ranks` (default: the group's size when served distributed) adds what one tensor-parallel rank holds."""
    return {"estimates": await engine.estimate(model, dtype, include_quantized, ranks)}


@router.get("/memory", summary="Exact bytes of each resident variant by parameter dtype; process and device")
async def memory(engine: ReadyEngine) -> dict:
    return await memory_report(engine)
