"""create_app(settings): the FastAPI application, its routes, error handlers and lifespan."""

from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import asynccontextmanager
from dataclasses import fields

from fastapi import FastAPI

from models.api import Engine
from models.engine.config import EngineConfig  # plain values: no MLX imported
from server.errors import install_error_handlers
from server.load_progress import show_load_progress
from server.middleware import OPEN_PATHS, ApiKeyMiddleware, BodyLimitMiddleware, JsonCORSMiddleware
from server.observe import GenerationObserver
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
from server.serving_metrics import ServingMetrics
from server.settings import Settings
from server.warmup import warm_http

log = logging.getLogger("dtype_serve")


def build_engine(settings: Settings) -> Engine:
    """The MLX engine for these settings. The BLAS is chosen before MLX is first imported."""
    from models.platform.allocator import allocator_info
    from models.platform.compat import prepare_mlx

    blas = prepare_mlx(settings.blas, settings.blas_threads)
    log.info("BLAS: %s (%s, threads=%s) %s", blas.library, blas.vendor, blas.threads, blas.note)
    allocator = allocator_info(settings.allocator)
    log.info("allocator: %s %s", allocator.library, allocator.note)
    from models.engine.engine import MLXEngine
    from models.weights.catalog import ModelCatalog, resolve_startup_model

    name, folder = resolve_startup_model(settings.model)
    catalog = ModelCatalog({name: folder}, settings.model_dirs, aliases={settings.model: name})
    return MLXEngine(catalog, engine_config(settings, name))


def follow_if_not_rank_0(settings: Settings) -> int | None:
    """With --distributed: join the group; on a rank other than 0, replay rank 0's work until it stops and
    return the exit code (no HTTP here); on rank 0, None (it goes on to serve)."""
    from models.platform.compat import prepare_mlx

    prepare_mlx(settings.blas, settings.blas_threads)
    from models.distributed.follower import follow
    from models.distributed.group import join_group
    from models.weights.catalog import ModelCatalog, resolve_startup_model

    if join_group(settings.distributed_backend).rank() == 0:
        return None
    name, folder = resolve_startup_model(settings.model)
    catalog = ModelCatalog({name: folder}, settings.model_dirs, aliases={settings.model: name})
    return follow(catalog, engine_config(settings, name))


def engine_config(settings: Settings, default_model: str) -> EngineConfig:
    """The engine's configuration: each EngineConfig field that Settings has by the same name, and the
    few it spells otherwise; the tuning constants keep their defaults."""
    named = {f.name: getattr(settings, f.name) for f in fields(EngineConfig) if f.name in Settings.model_fields}
    return EngineConfig(**{**named, "default_model": default_model, "default_dtype": settings.dtype,
                           "gather_s": settings.gather_ms / 1000,
                           "default_max_tokens": min(settings.default_max_tokens, settings.max_tokens_limit),
                           # distributed: the other ranks cannot replay prompt-cache hits (docs/distributed.md)
                           **({"prompt_cache_bytes": "0"} if settings.distributed != "off" else {})})


async def _start_engine(engine: Engine, settings: Settings) -> None:
    # a progress bar for the start-up load on a terminal; elsewhere the loader's log lines say it
    bar = asyncio.create_task(show_load_progress(engine.health, sys.stderr)) if sys.stderr.isatty() else None
    try:
        await engine.start()
    except Exception as e:
        log.error("the default model could not be loaded: %s", e)
        return
    finally:
        if bar is not None:
            bar.cancel()
            await asyncio.gather(bar, return_exceptions=True)
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
    app.state.serving_metrics = ServingMetrics()
    app.state.generation_observer = GenerationObserver(app.state.serving_metrics, engine.default_model,
                                                       engine.default_dtype, settings.log_prompts)
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
