"""Liveness (/health) and readiness (/health/ready)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.deps import EngineDep

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: 200 while the process and its MLX worker are alive")
async def health(engine: EngineDep) -> JSONResponse:
    report = engine.health()
    return JSONResponse(report.as_dict(), status_code=503 if report.status == "failed" else 200)


@router.get("/health/ready", summary="Readiness: 503 until the default variant is loaded and warm")
async def ready(engine: EngineDep) -> JSONResponse:
    report = engine.health()
    return JSONResponse(report.as_dict(), status_code=200 if report.ready else 503)
