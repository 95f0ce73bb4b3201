"""One frozen Settings object. Precedence: CLI flags > DTYPE_SERVE_* environment > config file
(TOML, `--config` or DTYPE_SERVE_CONFIG) > defaults."""

from __future__ import annotations

import argparse
import contextvars
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from models.weights.catalog import default_model_ref
from models.weights.dtypes import ALIASES, DEFAULT_FIT_ORDER, DTYPE_NAMES, FIT, normalize_dtype, normalize_kv
from models.weights.sizes import parse_size

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
    kv_dtype: str = Field("float", description="KV cache precision of a variant whose name gives none: float "
                          "(the model's float dtype), kv8 or kv4 (mlx-lm's quantized KV cache, 8 or 4 bits); a "
                          "variant's name may give its own (q4+kv8, bfloat16+float)")
    fit_order: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_FIT_ORDER, description="precisions `fit` tries, best first (comma-separated)")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    model_dirs: Annotated[tuple[Path, ...], NoDecode] = Field(
        (), description=f"folders whose model subfolders requests may load (in the environment: "
        f"separated by {os.pathsep!r})")
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
    memory_budget: str | None = Field(None, description="bytes resident variants, their prompt caches and "
                                      "the running requests' KV caches may hold: 12GiB, 500MB, "
                                      "a byte count, or a fraction of device memory (0.5); default 0.75")
    prompt_cache_bytes: str = Field("0.05", description="per variant, KV cache kept to reuse shared prompt "
                                    "prefixes: 1GiB, 500MB, a fraction of device memory (0.05), or 0 for none")
    idle_unload_s: float | None = Field(None, gt=0, description="unload variants unused this long (seconds)")
    pin_default: bool = Field(True, description="never evict or unload the default variant; off: it may be "
                              "unloaded and loads again on demand (readiness stays 200)")
    blas: str = Field("auto", description="BLAS under MLX on Linux: auto | none | PATH to a CBLAS library")
    blas_threads: int | None = Field(None, ge=1, description="BLAS thread count (default: the library's)")
    allocator: str = Field("auto", description="C allocator on Linux: auto (tcmalloc or jemalloc where "
                           "installed, preloaded) | system (glibc's) | PATH of one to preload")
    api_key: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="API key(s) every route but /health needs (Bearer); several: comma-separated")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field((), description="origins allowed by CORS (off if none)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body; larger is a 413")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="largest request head (request line and "
                                  "headers); larger is a 431")
    max_headers: int = Field(100, ge=8, le=10_000, description="most request headers; more is a 431")
    header_timeout_s: float = Field(10.0, gt=0, le=3600, description="a request's headers must arrive within this "
                                    "(from the connection's opening or the request's first byte); else 408 and close")
    body_timeout_s: float = Field(60.0, gt=0, le=3600, description="a request's body must arrive within this "
                                  "after its headers; else 408 and close")
    keep_alive_s: float = Field(5.0, gt=0, le=3600, description="an idle connection between requests is closed "
                                "after this")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    nonfinite_policy: Literal["warn", "refuse"] = Field(
        "warn", description="when a dtype yields non-finite logits: warn in the response, or refuse that dtype")
    trust_remote_code: bool = Field(False, description="allow model folders that ship Python code")
    report_starts_per_hour: int = Field(12, ge=0, description="new dtype reports (not yet computed) that may "
                                        "start per hour, all clients together; beyond it: 429; 0: none")
    show_paths: bool = Field(False, description="/memory and the dtype report show file paths on the host "
                             "(e.g. the BLAS library); default: file names only")
    warmup: bool = Field(True, description="run one short generation after loading the default variant")
    distributed: Literal["off", "tensor"] = Field(
        "off", description="tensor: this process is one rank of a tensor-parallel group started by mlx.launch "
        "(or `dtype-serve launch`); rank 0 serves HTTP, the others follow it (docs/distributed.md)")
    distributed_backend: Literal["any", "ring", "nccl", "jaccl", "mpi"] = Field(
        "any", description="MLX distributed backend the ranks join (any: the one mlx.launch set up)")
    distributed_timeout_s: float = Field(10.0, gt=0, description="a rank that waits this long for the others "
                                         "declares the group lost: rank 0's /health turns 503, a follower exits")
    distributed_step_timeout_s: float | None = Field(
        None, gt=0, description="a decoder step (a prefill included) that lasts this long means a rank is gone "
        "(its collectives never complete); default: 10 times --distributed-timeout-s")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="debug, info, warning, error or critical")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: plain log lines; json: one JSON object per line (the request lines' "
        "fields as keys)")
    log_prompts: bool = Field(False, description="request log lines carry the prompt text (or the chat "
                              "messages); default: never")

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _path_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(v for v in value.split(os.pathsep) if v.strip())
        return value

    @field_validator("dtype")
    @classmethod
    def _canonical_dtype(cls, value: str) -> str:
        return normalize_dtype(value)

    @field_validator("kv_dtype")
    @classmethod
    def _canonical_kv(cls, value: str) -> str:
        return normalize_kv(value)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("memory_budget")
    @classmethod
    def _budget_size(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_size(value)
        return value

    @field_validator("prompt_cache_bytes")
    @classmethod
    def _cache_size(cls, value: str) -> str:
        parse_size(value, allow_zero=True)
        return value

    @field_validator("model_dirs")
    @classmethod
    def _existing_folders(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        for folder in value:
            if not folder.is_dir():
                raise ValueError(f"{os.fspath(folder)!r} is not a folder")
        return value

    @field_validator("blas")
    @classmethod
    def _blas_choice(cls, value: str) -> str:
        if value not in ("auto", "none") and not Path(value).expanduser().is_file():
            raise ValueError(f"must be auto, none or the path of a BLAS library; {value!r} is no file")
        return value

    @field_validator("allocator")
    @classmethod
    def _allocator_choice(cls, value: str) -> str:
        if value in ("auto", "system"):
            return value
        if not Path(value).expanduser().is_file():
            raise ValueError(f"must be auto, system or the path of an allocator library; {value!r} is no file")
        path = os.fspath(Path(value).expanduser().resolve())
        if any(c in path for c in " :"):  # LD_PRELOAD separates its libraries by both
            raise ValueError(f"an allocator's path cannot hold spaces or colons: {value!r}")
        return path

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


def check_max_tokens(max_tokens: int | None, settings: Settings, field: str = "max_tokens") -> int | None:
    """`max_tokens` if within the configured cap (None: the server's default), else a 422 naming `field`."""
    from fastapi import HTTPException

    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise HTTPException(422, f"{field}: must be at most {settings.max_tokens_limit}")
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
        help_text = field.description
        if not any(m in help_text for m in ("default:", "; default", "(default")):  # some say what theirs means
            help_text += f" (default: {default_text(field)})"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name in ("model_dirs", "api_key", "cors_origins"):
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)
    return parser


def default_text(field: Any) -> str:
    """A setting's default as --help shows it. The parser's own defaults stay None, so that only the
    flags given override the environment and the config file."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value).replace("%", "%%")  # argparse formats help with %


class ConfigFileError(ValueError):
    """A config file that is missing or not valid TOML, or a value no source could decode."""


def load_settings(argv: list[str] | None = None) -> Settings:
    """Build Settings from CLI arguments, the environment and an optional config file.

    Raises pydantic's ValidationError for bad values, ConfigFileError for an unreadable file."""
    args = vars(_cli_parser().parse_args(argv))
    config = args.pop("config") or os.environ.get(f"{ENV_PREFIX}CONFIG")
    if config and not Path(config).is_file():
        raise ConfigFileError(f"config file {os.fspath(config)!r} is not a file")
    cli: dict[str, Any] = {k: v for k, v in args.items() if v is not None}
    token = _config_file.set(Path(config) if config else None)
    try:
        return Settings(**cli)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"config file {os.fspath(config)!r} is not valid TOML: {e}") from None
    except SettingsError as e:
        raise ConfigFileError(str(e)) from None
    finally:
        _config_file.reset(token)
