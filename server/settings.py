"""One frozen Settings object. Precedence: CLI flags > DTYPE_SERVE_* environment > config file
(TOML, `--config` or DTYPE_SERVE_CONFIG) > defaults."""

from __future__ import annotations

import argparse
import contextvars
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from models.catalog import default_model_ref
from models.dtypes import ALIASES, DEFAULT_FIT_ORDER, DTYPE_NAMES, FIT, normalize_dtype

ENV_PREFIX = "DTYPE_SERVE_"
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_file", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    model: str = Field(default_factory=default_model_ref,
                       description="model folder (mlx-lm layout) or Hugging Face id; default: the bundled model")
    dtype: str = Field("auto", description=f"default precision: {', '.join(DTYPE_NAMES)} (aliases "
                       f"{', '.join(ALIASES)}), q8..q2 (q4g32: group size 32), mxfp8, mxfp4, nvfp4, mixed_3_6, "
                       "q4:float16 (the rest in float16), or fit (the best that fits the memory budget); "
                       "auto keeps the checkpoint's")
    fit_order: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_FIT_ORDER, description="precisions `fit` tries, best first (comma-separated)")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    model_dirs: tuple[Path, ...] = Field((), description="folders whose model subfolders requests may load")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request names none")
    max_batch_size: int = Field(16, ge=1, le=512, description="requests decoded together per variant")
    stream_interval_s: float = Field(0.02, ge=0, le=1, description="streamed text goes out at most this often "
                                     "per request, merged (the first text at once); 0: every token")
    stream_events_per_s: float = Field(400, ge=0, description="about this many streamed text events per second "
                                       "at most, all requests together (first texts and ends go out at once): "
                                       "with many streams each one's text is merged for longer; 0: no cap")
    gather_ms: float = Field(30, ge=0, le=1000, description="when requests have overlapped lately, one that "
                             "finds the worker idle waits up to this long for others arriving with it, so "
                             "that they are prefilled together; 0: start at once")
    max_queue: int = Field(64, ge=0, description="requests waiting beyond max_batch_size before 429s")
    memory_budget: str | None = Field(None, description="bytes resident variants may hold: 12GiB, 500MB, "
                                      "a byte count, or a fraction of device memory (0.5); default 0.75")
    prompt_cache_bytes: str = Field("0.05", description="per variant, KV cache kept to reuse shared prompt "
                                    "prefixes: 1GiB, 500MB, a fraction of device memory (0.05), or 0 for none")
    idle_unload_s: float | None = Field(None, gt=0, description="unload variants unused this long (seconds)")
    pin_default: bool = Field(True, description="never evict the default variant")
    blas: str = Field("auto", description="BLAS under MLX on Linux: auto | none | PATH to a CBLAS library")
    blas_threads: int | None = Field(None, ge=1, description="BLAS thread count (default: the library's)")
    api_key: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="API key(s) every route but /health needs (Bearer); several: comma-separated")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field((), description="origins allowed by CORS (off if none)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body; larger is a 413")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="largest request head (all headers)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    nonfinite_policy: Literal["warn", "refuse"] = Field(
        "warn", description="when a dtype yields non-finite logits: warn in the response, or refuse that dtype")
    trust_remote_code: bool = Field(False, description="allow model folders that ship Python code")
    warmup: bool = Field(True, description="run one short generation after loading the default variant")
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("dtype")
    @classmethod
    def _canonical_dtype(cls, value: str) -> str:
        return normalize_dtype(value)

    @field_validator("fit_order", mode="before")
    @classmethod
    def _fit_order(cls, value: object) -> object:
        names = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value
        if not names or any(normalize_dtype(n) == FIT for n in names):
            raise ValueError("fit_order: one or more precisions, not fit itself")
        return tuple(normalize_dtype(n) for n in names)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        config_file = _config_file.get() or os.environ.get(f"{ENV_PREFIX}CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def check_max_tokens(max_tokens: int | None, settings: Settings) -> int | None:
    """`max_tokens` if within the configured cap (None: the server's default), else a 422."""
    from fastapi import HTTPException

    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise HTTPException(422, f"max_tokens: must be at most {settings.max_tokens_limit}")
    return max_tokens


def _cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dtype-serve",
        description="Serve MLX language models in the dtype each request asks for.",
        epilog=f"Every setting can also come from the environment ({ENV_PREFIX}<NAME>, e.g. "
               f"{ENV_PREFIX}DTYPE=bfloat16) or a TOML config file (--config or {ENV_PREFIX}CONFIG). "
               "Precedence: flags > environment > config file > defaults.")
    parser.add_argument("--config", type=Path,
                        help="TOML file with settings (keys as below, e.g. dtype = \"bfloat16\")")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        elif name in ("model_dirs", "api_key", "cors_origins"):
            parser.add_argument(flag, nargs="+", default=None, help=field.description)
        else:
            parser.add_argument(flag, default=None, help=field.description)
    return parser


def load_settings(argv: list[str] | None = None) -> Settings:
    """Build Settings from CLI arguments, the environment and an optional config file."""
    args = vars(_cli_parser().parse_args(argv))
    config = args.pop("config")
    cli: dict[str, Any] = {k: v for k, v in args.items() if v is not None}
    token = _config_file.set(config)
    try:
        return Settings(**cli)
    finally:
        _config_file.reset(token)
