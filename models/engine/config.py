"""EngineConfig: every setting of the engine and its tuning constants, frozen, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from models.weights.dtypes import AUTO, KV_FLOAT


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is told (server/app.py builds it from `Settings`) and how it is tuned (the
    defaults below; tests and benchmarks may replace them). Sizes are strings as settings write them."""

    default_model: str
    default_dtype: str = AUTO
    max_batch_size: int = 16  # requests decoded together per variant
    max_queue: int = 64  # requests waiting beyond max_batch_size before QueueFullError
    default_max_tokens: int = 256
    warmup: bool = True
    pin_default: bool = True
    trust_remote_code: bool = False
    memory_budget: str | None = None
    idle_unload_s: float | None = None
    prompt_cache_bytes: str | None = "0"
    fit_order: tuple[str, ...] | None = None  # None: models.weights.dtypes.DEFAULT_FIT_ORDER
    nonfinite_policy: str = "warn"  # "warn" or "refuse"
    single_stream: bool = True  # a lone request decodes outside the batch (faster)
    stream_interval_s: float = 0.0
    stream_events_per_s: float = 0.0
    gather_s: float = 0.03
    pad_prefill: bool | None = None  # None: where new shapes cost set-up time (models.decode.prefill.shapes_cost)
    show_paths: bool = False  # /memory and reports name files by path (else by name only)
    report_starts_per_hour: int | None = None  # new dtype reports allowed per hour (None: any)
    kv_dtype: str = KV_FLOAT  # the KV cache's precision where a variant's name gives none
    # Tensor-parallel over the ranks mlx.launch started (models.distributed): "off" or "tensor"
    distributed: str = "off"
    distributed_backend: str = "any"  # mx.distributed.init's backend: any, ring, nccl, jaccl, mpi
    distributed_timeout_s: float = 10.0  # a wait on the other ranks this long means one is gone
    distributed_step_timeout_s: float | None = None  # a decoder step this long too (None: STEP_TIMEOUTS waits)

    # ---- tuning -----------------------------------------------------------------------------
    check_every: int = 4  # decode steps between non-finite checks under the `warn` policy
    # A request that wakes the idle worker while more are likely on their way (requests overlapped in the
    # last concurrent_recently_s) waits for them: until none arrived for gather_gap_s, at most `gather_s`
    # in all, so that the burst is prefilled together rather than its first request alone.
    gather_gap_s: float = 0.005
    concurrent_recently_s: float = 10.0
    load_step_s: float = 0.02  # while a model loads, the serving variants decode a step at least this often
    # While no request decodes, a report runs its steps for up to this long per worker iteration (while
    # requests decode, one step per decode step).
    report_slice_s: float = 0.02
    report_start_window_s: float = 3600.0  # report_starts_per_hour counts the starts within this window
    idle_poll_s: float = 1.0  # an idle worker wakes this often (idle unloads)
