"""create_app(settings): the FastAPI application, its routes, error handlers and lifespan."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from models.api import Engine
from server.errors import install_error_handlers
from server.middleware import OPEN_PATHS, ApiKeyMiddleware, BodyLimitMiddleware, JsonCORSMiddleware
from server.request_id import RequestIdMiddleware
from server.routes import (
    admin,
    anthropic,
    console,
    generate,
    health,
    inventory,
    metrics,
    openai,
    report,
    responses,
    tokenize,
)
from server.settings import Settings
from server.warmup import warm_http

log = logging.getLogger("dtype_serve")


def build_engine(settings: Settings) -> Engine:
    """The MLX engine for these settings. The BLAS is chosen before MLX is first imported."""
    from models.platform.compat import prepare_mlx

    blas = prepare_mlx(settings.blas, settings.blas_threads)
    log.info("BLAS: %s (%s, threads=%s) %s", blas.library, blas.vendor, blas.threads, blas.note)
    from models.engine.core import MLXEngine
    from models.weights.catalog import ModelCatalog, resolve_startup_model

    name, folder = resolve_startup_model(settings.model)
    catalog = ModelCatalog({name: folder}, settings.model_dirs, aliases={settings.model: name})
    return MLXEngine(catalog, name, settings.dtype, max_batch_size=settings.max_batch_size,
                     warmup=settings.warmup, trust_remote_code=settings.trust_remote_code,
                     memory_budget=settings.memory_budget, idle_unload_s=settings.idle_unload_s,
                     pin_default=settings.pin_default, max_queue=settings.max_queue,
                     default_max_tokens=min(settings.default_max_tokens, settings.max_tokens_limit),
                     nonfinite_policy=settings.nonfinite_policy, prompt_cache_bytes=settings.prompt_cache_bytes,
                     stream_interval_s=settings.stream_interval_s,
                     stream_events_per_s=settings.stream_events_per_s, gather_s=settings.gather_ms / 1000,
                     show_paths=settings.show_paths, report_starts_per_hour=settings.report_starts_per_hour,
                     fit_order=settings.fit_order, kv_dtype=settings.kv_dtype)


async def _start_engine(engine: Engine, settings: Settings) -> None:
    try:
        await engine.start()
    except Exception as e:
        log.error("the default model could not be loaded: %s", e)
        return
    log.info("ready: %s (%s) on http://%s:%s", engine.default_model, engine.default_dtype,
             settings.host, settings.port)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    engine = engine or build_engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so /health answers at once and readiness turns 200 when loaded.
        app.state.start_task = asyncio.create_task(_start_engine(engine, settings))
        await warm_http(app, settings.api_key[0] if settings.api_key else None)
        yield
        app.state.start_task.cancel()
        await engine.stop()

    app = FastAPI(title="dtype-serve", version="0.1.0", lifespan=lifespan,
                  description="MLX models served in the dtype each request asks for.")
    app.state.settings = settings
    app.state.engine = engine
    install_error_handlers(app)
    # The last added runs first: the request id (every answer carries it), CORS (preflights carry no key),
    # then the key (the console's page holds no data and is open), then the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_key, open_paths=OPEN_PATHS | console.PUBLIC_PATHS)
    if settings.cors_origins:
        app.add_middleware(JsonCORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(inventory.router)
    app.include_router(admin.router)
    app.include_router(openai.router)
    app.include_router(tokenize.router)
    app.include_router(responses.router)
    app.include_router(anthropic.router)
    app.include_router(report.router)
    app.include_router(metrics.router)
    app.include_router(console.router)
    document_limits(app, settings)
    return app


def document_limits(app: FastAPI, settings: Settings) -> None:
    """Put the configured max_tokens cap into the OpenAPI schema, so clients see the real limit."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for component in schema.get("components", {}).get("schemas", {}).values():
                for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                    field = component.get("properties", {}).get(name)
                    for option in (field or {}).get("anyOf", [field] if field else []):
                        if option.get("type") == "integer":
                            option["maximum"] = settings.max_tokens_limit
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
