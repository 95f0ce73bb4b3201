"""The engine: one worker thread owns every MLX call (load, cast, generate).

HTTP handlers talk to it through `MLXEngine`'s async methods and receive plain Python values.
Requests for the same variant decode together in an mlx-lm `BatchGenerator` (continuous
batching); variants take turns, one decode step each.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from models.api import (
    Finished,
    GenerationParams,
    Started,
    TextDelta,
    Tokenized,
    TokenizeParams,
    TokenLogprob,
    Usage,
)
from models.decode.cpu_fusion import fused_kernels_state
from models.decode.prefill import shapes_cost
from models.decode.sampling import make_request_sampler
from models.decode.single_stream import SingleStream
from models.decode.warmup import warm_shapes, warm_variant
from models.errors import (
    DtypeRefusedError,
    EngineError,
    EngineUnavailableError,
    GenerationFailedError,
    InvalidRequestError,
    MemoryBudgetError,
    QueueFullError,
)
from models.mlx_lm_ext.batch_generator import LeanBatchGenerator
from models.mlx_lm_ext.contract import check_contract
from models.mlx_lm_ext.internals import no_stop_sequences
from models.platform.blas import blas_info
from models.report.fidelity import DEFAULT_DTYPES, FidelityJob
from models.text.detokenizer import streaming_detokenizer
from models.text.prompt_encoding import encode_text, prompt_text
from models.text.prompts import PromptEncoder
from models.text.stop_strings import StopStringMatcher
from models.weights.catalog import ModelCatalog
from models.weights.checkpoint import read_config
from models.weights.dtypes import AUTO, DEFAULT_FIT_ORDER, FIT, KV_FLOAT, normalize_dtype, split_kv
from models.weights.estimate import estimate_all, estimate_variant, with_kv_estimate
from models.weights.loader import context_length
from models.weights.memory import device_info, parse_budget, process_memory
from models.weights.registry import Variant, VariantRegistry

log = logging.getLogger(__name__)
_STOP = object()
CHECK_EVERY = 4  # decode steps between non-finite checks under the `warn` policy
# A request that wakes the idle worker while more are likely on their way (requests overlapped in the
# last CONCURRENT_RECENTLY_S) waits for them: until none arrived for GATHER_GAP_S, at most `gather_s`
# in all, so that the burst is prefilled together rather than its first request alone.
GATHER_GAP_S = 0.005
LOAD_STEP_S = 0.02  # while a model loads, the serving variants decode a step at least this often
CONCURRENT_RECENTLY_S = 10.0
# While no request decodes, a report runs its steps for up to this long per worker iteration (while
# requests decode, one step per decode step).
REPORT_SLICE_S = 0.02
REPORT_START_WINDOW_S = 3600.0  # report_starts_per_hour counts the starts within this window


@dataclass(eq=False)
class _Job:
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    tokens: list[int] | None = None  # the prompt's tokens, when encoded before reaching the worker
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False
    variant: Variant | None = None
    uid: int = -1
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int = 0
    first_token_at: float | None = None
    detokenizer: Any = None
    matcher: StopStringMatcher | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    sampler: Any = None
    processors: list = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    outbox: list | None = None  # the engine's: events go out once per worker iteration
    text_sent: bool = False  # its first text went out (later deltas may wait for the stream interval)

    def emit(self, event: Any) -> None:
        self.outbox.append((self, event))


class MLXEngine:
    def __init__(self, catalog: ModelCatalog, default_model: str, default_dtype: str = AUTO, *,
                 max_batch_size: int = 16, warmup: bool = True, trust_remote_code: bool = False,
                 memory_budget: str | None = None, idle_unload_s: float | None = None,
                 pin_default: bool = True, max_queue: int = 64, default_max_tokens: int = 256,
                 nonfinite_policy: str = "warn", single_stream: bool = True,
                 prompt_cache_bytes: str | None = "0", stream_interval_s: float = 0.0,
                 stream_events_per_s: float = 0.0, gather_s: float = 0.03,
                 pad_prefill: bool | None = None, show_paths: bool = False,
                 report_starts_per_hour: int | None = None, fit_order: tuple[str, ...] | None = None,
                 kv_dtype: str = KV_FLOAT) -> None:
        self.catalog = catalog
        self.show_paths = show_paths  # /memory and reports name files by path (else by name only)
        self.default_model = default_model
        self.default_dtype = normalize_dtype(default_dtype)
        self.max_batch_size = max_batch_size
        self.warmup = warmup
        self.pin_default = pin_default
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self.nonfinite_policy = nonfinite_policy
        self.single_stream = single_stream  # a lone request decodes outside the batch (faster)
        # prefill in a few fixed shapes where new shapes cost set-up time (CUDA), warmed at start-up
        self.pad_prefill = shapes_cost() if pad_prefill is None else pad_prefill
        self._single_uids = itertools.count(-1, -1)
        self._pulled: list = []  # commands the worker took off the queue and has not handled yet
        self.handoffs = 0  # lone sequences moved into a batch
        self._open_jobs = 0  # admitted and not finished; only the event loop thread changes it
        self.gather_s = gather_s
        self.gather_waits = 0  # times an idle worker waited for a burst's other requests
        self.bursts_gathered = 0  # ...and the waits that brought in at least one more
        self._overlap_at = float("-inf")  # when two or more requests were last open at once
        self._busy_peak = 0  # most requests open at once since the engine was last without any
        self._last_busy_peak = 0  # ...and that figure for the busy spell before (event loop thread)
        self.registry = VariantRegistry(catalog, self.default_dtype, parse_budget(memory_budget),
                                        trust_remote_code=trust_remote_code, idle_unload_s=idle_unload_s,
                                        prompt_cache_bytes=parse_budget(prompt_cache_bytes, allow_zero=True),
                                        kv_sequences=max_batch_size, kv_dtype=kv_dtype, warm=self._warm_loaded,
                                        fit_order=fit_order or DEFAULT_FIT_ORDER)
        self._variants = self.registry.variants
        # Per model name, its tokenizer and context, once loaded: requests are tokenized and checked on
        # the `_tokenizing` threads, off the MLX worker (written by the worker, read by the event loop).
        self._encoders: dict[str, PromptEncoder] = {}
        self._tokenizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._reports: dict[tuple, FidelityJob] = {}  # fidelity reports, cached per (model, dtypes, prompts)
        self.report_starts_per_hour = report_starts_per_hour  # new reports allowed per hour (None: any)
        self._report_starts: list[float] = []  # when reports were started, within the last window
        self._commands: queue.Queue = queue.Queue()
        self._outbox: list[tuple[_Job, Any]] = []
        # Text deltas wait up to this long and go out merged: one event-loop wake-up (and one SSE
        # chunk) per stream per interval instead of per token, so HTTP work stays off the decode loop.
        self.stream_interval_s = stream_interval_s
        # ...and with many streams the interval grows so that all of them together get at most this
        # many text events per second: the event loop's work per event competes with the decode
        # loop for the GIL (0: no cap)
        self.stream_events_per_s = stream_events_per_s
        self._last_flush = 0.0
        # worker time by phase: idle, admit (requests joining), decode (device steps, waits included),
        # emit (checks, detokenizing, events), flush (hand-off to the event loops), report (fidelity)
        self.worker_seconds = dict.fromkeys(("idle", "admit", "decode", "emit", "flush", "report"), 0.0)
        self.decode_steps = 0
        self.steps_during_loads = 0  # decode steps run between the tensors of a load
        self._load_step_at = 0.0
        self.registry.between_tensors = self._serve_during_load
        self.unmasked_steps = 0  # batch decode steps without an attention mask (models.mlx_lm_ext.decode_mask)
        self._lap_start = time.perf_counter()
        self._state = "created"
        self._failure: str | None = None
        self._thread: threading.Thread | None = None
        self.mlx_lm = check_contract()  # the private mlx-lm names the batch relies on, present or not

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker, load the default variant and warm it up; then report ready."""
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        self._state = "starting"
        if self.mlx_lm.missing:
            log.warning("mlx-lm %s (dtype-serve expects %s) lacks %s: those paths fall back to mlx-lm's own",
                        self.mlx_lm.version, self.mlx_lm.pinned, ", ".join(self.mlx_lm.missing))
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)
        self._thread.start()
        try:
            default = await self.load(self.default_model, self.default_dtype)
            if self.pin_default:
                await self._call(lambda: self.registry.pinned.add((default["model"], default["dtype"])))
            if self.warmup:
                await self._warm_up()
        except Exception as e:
            self._state, self._failure = "failed", str(e) or type(e).__name__
            raise
        self._state = "ready"

    async def _warm_up(self) -> None:
        """Compile the kernels real traffic needs before reporting ready: a lone request with a
        prompt of typical length, then overlapping ones (the batch path, short and long prompts)."""

        async def run(prompt: str, tokens: int, chat: bool = False) -> None:
            messages = ({"role": "user", "content": prompt},) if chat else None
            try:
                async for _ in self.generate(GenerationParams(prompt=None if chat else prompt, messages=messages,
                                                              max_tokens=tokens, ignore_eos=True)):
                    pass
            except InvalidRequestError:  # a model with a very short context: skip that shape
                pass
            except GenerationFailedError:  # chat on a tokenizer without a template: fails for requests too
                if not chat:
                    raise

        text = "The quick brown fox jumps over the lazy dog. " * 3
        await run(text, 8)
        await run(text, 4, chat=True)  # the chat template compiles on first use
        await asyncio.gather(run(text, 16), run("1+1=", 8), run(text[:40], 8))
        self._overlap_at = float("-inf")  # the warm-up's overlap says nothing about the traffic to come
        self._last_busy_peak = 0
        if self.pad_prefill:
            shapes = await self._call(self._warm_shapes)
            log.info("warm-up: %d prefill and decode shapes set up", shapes)

    def _warm_loaded(self, loaded: Any) -> None:
        """A variant loaded at run time runs the shapes requests use before it serves (the start-up
        variant gets the full warm-up instead)."""
        if self._state == "ready" and self.warmup:
            warm_variant(loaded.model, loaded.context_length, self.max_batch_size, self.pad_prefill,
                         between=self._serve_during_load)

    def _warm_shapes(self) -> int:
        variant = self.registry.get(self.default_model, self.default_dtype)
        return warm_shapes(variant.loaded.model, variant.loaded.context_length, self.max_batch_size)

    async def stop(self) -> None:
        if self._thread and self._thread.is_alive():
            self._state = "stopping"
            self._commands.put(_STOP)
            await asyncio.to_thread(self._thread.join, 30)
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        self._state = "stopped"

    def health(self) -> dict:
        alive = bool(self._thread and self._thread.is_alive())
        state = self._state if alive or self._state in ("created", "stopped") else "failed"
        report = {"status": state, "ready": state == "ready" and alive, "worker_alive": alive,
                  "default_model": self.default_model, "default_dtype": self.default_dtype}
        fit = self.registry.fits.get(self.default_model) if self.default_dtype == FIT else None
        if fit is not None:  # what `fit` chose for the default model, and why
            report["fit"] = {"chosen": fit["chosen"], "reason": fit["reason"]}
        if (loading := self.registry.loading) is not None:  # set by the worker; readable while it loads
            report["loading"] = loading
        if self._failure:
            report["error"] = self._failure
        return report

    @property
    def open_requests(self) -> int:
        return self._open_jobs

    def model_names(self) -> list[str]:
        return self.catalog.names()

    # ---- requests ---------------------------------------------------------------------------
    async def generate(self, params: GenerationParams) -> AsyncIterator[Started | TextDelta | Finished]:
        """Stream the events of one generation; leaving early cancels it within one step."""
        self._ensure_alive()
        if self._open_jobs >= self.max_batch_size + self.max_queue:
            raise QueueFullError(f"the server is at capacity ({self.max_batch_size} running, "
                                 f"{self.max_queue} queued); retry shortly")
        job = _Job(params, asyncio.get_running_loop(), asyncio.Queue(), outbox=self._outbox)
        self._open_jobs += 1  # counted from here: requests still being tokenized take their place too
        self._busy_peak = max(self._busy_peak, self._open_jobs)
        if self._open_jobs > 1:
            self._overlap_at = time.monotonic()
        held = None  # an event read ahead while merging deltas
        try:
            job.tokens = await self._encode_off_worker(params)
            self._commands.put(("generate", job))
            while True:
                event, held = held or await job.events.get(), None
                # A slow reader gets the deltas that piled up as one event, not one per token.
                while isinstance(event, TextDelta) and not job.events.empty():
                    following = job.events.get_nowait()
                    if not isinstance(following, TextDelta):
                        held = following
                        break
                    event = event.then(following)
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self._open_jobs -= 1
            if self._open_jobs == 0:
                self._last_busy_peak, self._busy_peak = self._busy_peak, 0
            if not job.done:
                job.cancelled = True
                self._commands.put(("wake", None))

    async def _encode_off_worker(self, params: GenerationParams) -> list[int] | None:
        """The prompt's tokens, encoded on a tokenizing thread, once its model's tokenizer is known (else
        None: the worker encodes it after loading). A text too long for the context is refused unread."""
        encoder = self._encoders.get(params.model or self.default_model)
        if encoder is None:
            return None
        encoder.check_size(params)
        return await self._on_tokenizing_thread(encoder.encode, params)

    async def load(self, model: str | None, dtype: str | None) -> dict:
        return await self._call(lambda: self.registry.get(model or self.default_model, dtype).describe())

    async def unload(self, model: str, dtype: str) -> dict:
        return await self._call(lambda: self.registry.unload(model, dtype))

    async def estimate(self, model: str | None, dtype: str | None, include_quantized: bool = False) -> list[dict]:
        """Bytes a variant would hold, from the safetensors headers (no weights read): one precision,
        or the float dtypes (and with `include_quantized` the standard quantizations)."""
        name = self.catalog.canonical(model or self.default_model)

        def run() -> list[dict]:
            folder = self.catalog.resolve(name)
            if not dtype:
                return [{"model": name, **self._with_kv(folder, e, None)}
                        for e in estimate_all(folder, include_quantized)]
            wanted, kv = split_kv(normalize_dtype(dtype))
            if wanted == FIT:
                wanted = self.registry.fit(name)["chosen"]
            return [{"model": name, **self._with_kv(folder, estimate_variant(folder, wanted), kv)}]

        return await self._call(run)

    def _with_kv(self, folder: Any, entry: dict, kv: str | None) -> dict:
        """An estimate with its KV cache at `kv` (None: the server's KV precision) for max_batch_size
        sequences at the model's context."""
        config = read_config(folder)
        return with_kv_estimate(entry, config, kv or self.registry.kv_dtype, self.max_batch_size,
                                context_length(config))

    async def memory(self) -> dict:
        return await self._call(self._memory_report)

    async def tokenize(self, params: TokenizeParams) -> Tokenized:
        """A prompt's token ids exactly as generation would encode it (on a tokenizing thread: a long text
        never holds the MLX worker)."""
        variant = await self._call(lambda: self._tokenizer_variant(params.model, params.dtype))
        return await self._on_tokenizing_thread(self._tokenize, variant, params)

    async def detokenize(self, model: str | None, tokens: tuple[int, ...]) -> str:
        """The text of token ids (special tokens included); ids outside the vocabulary are a 400."""
        variant = await self._call(lambda: self._tokenizer_variant(model, None))
        return await self._on_tokenizing_thread(self._detokenize, variant, tokens)

    async def _on_tokenizing_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on a tokenizing thread; an unexpected failure fails this request only."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)
        except EngineError:
            raise
        except Exception as e:  # e.g. a chat to a tokenizer without a template, as on the worker
            log.exception("tokenizing failed")
            raise GenerationFailedError(f"internal error: {type(e).__name__}") from None

    def _tokenizer_variant(self, model: str | None, dtype: str | None) -> Variant:
        """A resident variant of the model (any dtype: they share the tokenizer), else `dtype`'s, loaded."""
        name = self.catalog.canonical(model or self.default_model)
        resident = [v for v in self._variants.values() if v.loaded.name == name]
        return next((v for v in resident if v.loaded.dtype == dtype), resident[0]) if resident \
            else self.registry.get(name, dtype)

    @staticmethod
    def _tokenize(variant: Variant, params: TokenizeParams) -> Tokenized:
        tokenizer = variant.loaded.tokenizer
        text = prompt_text(tokenizer, params.prompt, params.messages, params.tools,
                           add_generation_prompt=params.add_generation_prompt,
                           continue_final_message=params.continue_final_message)
        tokens = encode_text(tokenizer, text, params.add_special_tokens)
        return Tokenized(variant.loaded.name, tuple(tokens), tuple(tokenizer.convert_ids_to_tokens(tokens)),
                         variant.loaded.context_length)

    @staticmethod
    def _detokenize(variant: Variant, tokens: tuple[int, ...]) -> str:
        tokenizer = variant.loaded.tokenizer
        vocab = len(tokenizer.get_vocab())
        if any(not 0 <= t < vocab for t in tokens):
            raise InvalidRequestError(f"tokens: ids must be in [0, {vocab})")
        return tokenizer.decode(list(tokens))

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread and await its result."""
        self._ensure_alive()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._commands.put(("call", (fn, loop, future)))
        return await future

    def _ensure_alive(self) -> None:
        if not (self._thread and self._thread.is_alive()) or self._state in ("stopping", "stopped", "failed"):
            raise EngineUnavailableError("the engine is not running")

    # ---- worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                busy = any(v.jobs for v in self._variants.values()) or self._running_report() is not None
                try:
                    command = self._commands.get(block=not busy, timeout=None if busy else 1.0)
                except queue.Empty:
                    command = None
                self._lap("idle")
                commands = self._pulled  # taken off the queue, not yet handled
                while command is not None:
                    commands.append(command)
                    if command is _STOP:  # what follows stays queued: _fail_all answers it
                        break
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        command = None
                if not busy and self._expect_more(commands):
                    self._gather(commands)
                # Requests that arrived together start together in the batch: one prefill for all
                burst = _generates(commands) > 1
                while commands:
                    command = commands.pop(0)
                    if command is _STOP:
                        self._fail_all(EngineUnavailableError("the engine stopped"))
                        return
                    self._handle(command, burst)
                self._lap("admit")
                self._step_all()
                self._step_report()
                self._lap("report")
                self._flush(force=not busy)
                self._lap("flush")
                if not busy:
                    self.registry.unload_idle(time.time())
        except BaseException as e:  # the worker must never die silently: health turns 503
            log.exception("MLX worker died")
            self._state = "failed"
            self._fail_all(EngineUnavailableError(f"the engine worker failed: {type(e).__name__}"))
        finally:
            self._flush(force=True)

    def _expect_more(self, commands: list) -> bool:
        """Requests overlapped lately, and the engine's last busy spell was not a lone request's: a
        client that sends one request after another does not wait before each of them."""
        return (self.gather_s > 0 and 0 < _generates(commands) < self.max_batch_size and _STOP not in commands
                and time.monotonic() - self._overlap_at < CONCURRENT_RECENTLY_S and self._last_busy_peak != 1)

    def _gather(self, commands: list) -> None:
        """Take the requests that follow within GATHER_GAP_S of each other (at most gather_s)."""
        deadline = time.monotonic() + self.gather_s
        taken = len(commands)
        while (wait := min(GATHER_GAP_S, deadline - time.monotonic())) > 0:
            try:
                command = self._commands.get(timeout=wait)
            except queue.Empty:
                break
            commands.append(command)
            if command is _STOP or _generates(commands) >= self.max_batch_size:
                break
        self.gather_waits += 1
        self.bursts_gathered += len(commands) > taken

    def _flush(self, force: bool = False) -> None:
        """Hand the pending events to their event loops: one wake-up per loop, deltas of one job
        merged. Only deltas after a job's first text may wait, for the stream interval."""
        if not self._outbox:
            return
        now = time.perf_counter()
        if not force and now - self._last_flush < self._stream_interval() and all(
                isinstance(event, TextDelta) and job.text_sent for job, event in self._outbox):
            return
        self._last_flush = now
        merged: dict[_Job, list] = {}
        for job, event in self._outbox:
            events = merged.setdefault(job, [])
            if events and isinstance(event, TextDelta) and isinstance(events[-1], TextDelta):
                events[-1] = events[-1].then(event)
            else:
                events.append(event)
            job.text_sent = job.text_sent or isinstance(event, TextDelta)
        self._outbox.clear()
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, events in merged.items():
            by_loop.setdefault(job.loop, []).extend((job.events, event) for event in events)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is waiting
                pass

    def _stream_interval(self) -> float:
        """The stream interval, lengthened where the running requests would exceed the event cap."""
        if self.stream_events_per_s <= 0:
            return self.stream_interval_s
        running = sum(len(v.jobs) for v in self._variants.values())
        return max(self.stream_interval_s, running / self.stream_events_per_s)

    def _handle(self, command: tuple, burst: bool = False) -> None:
        kind, payload = command
        if kind == "generate":
            try:
                self._admit(payload, burst)
            except EngineError as e:
                payload.done = True
                payload.emit(e)
            except Exception as e:  # a load that failed in an unexpected way: this request only
                log.exception("admitting a request failed")
                payload.done = True
                payload.emit(GenerationFailedError(f"internal error: {type(e).__name__}"))
        elif kind == "call":
            fn, loop, future = payload
            try:
                result, error = fn(), None
            except EngineError as e:
                result, error = None, e
            except Exception as e:
                log.exception("engine call failed")
                result, error = None, GenerationFailedError(f"internal error: {type(e).__name__}")
            except BaseException:  # the worker is going down: answer the caller first
                loop.call_soon_threadsafe(_settle, future, None, EngineUnavailableError("the engine worker failed"))
                raise
            loop.call_soon_threadsafe(_settle, future, result, error)

    def _encoder(self, variant: Variant) -> PromptEncoder:
        """The variant's model's encoder, made known to the event loop for the requests that follow (one per
        model: its dtype variants, and its later reloads, read the same tokenizer files)."""
        name = variant.loaded.name
        encoder = self._encoders.get(name)
        if encoder is None:
            encoder = self._encoders[name] = PromptEncoder.of(variant.loaded.tokenizer,
                                                              variant.loaded.context_length)
        return encoder

    def _admit(self, job: _Job, burst: bool = False) -> None:
        """Start a request: alone (the lone-stream path) unless others decode or start with it (`burst`)."""
        if job.cancelled:
            job.done = True
            return
        params = job.params
        variant = self.registry.get(params.model or self.default_model, params.dtype)
        encoder = self._encoder(variant)
        tokens = job.tokens if job.tokens is not None else encoder.encode(params)
        context = variant.loaded.context_length
        max_tokens = params.max_tokens or min(self.default_max_tokens, context - len(tokens))
        encoder.check_fits(tokens, max_tokens)
        vocab = variant.loaded.config.get("vocab_size") or len(variant.loaded.tokenizer.get_vocab())
        if any(not 0 <= token < vocab for token, _ in params.logit_bias):
            raise InvalidRequestError(f"logit_bias: token ids must be in [0, {vocab})")
        job.sampler = make_request_sampler(params.temperature, params.top_p, params.seed)
        job.processors = make_logits_processors(
            logit_bias=dict(params.logit_bias) or None,
            presence_penalty=params.presence_penalty or None,
            frequency_penalty=params.frequency_penalty or None)
        job.variant = variant
        job.prompt_tokens = len(tokens)
        job.detokenizer = streaming_detokenizer(variant.loaded.tokenizer)
        job.matcher = StopStringMatcher(params.stop)
        cache, job.cached_tokens = variant.prefix.fetch(tokens, params.cache_scope)
        if not variant.jobs and self.single_stream and not burst:
            stop_ids = set() if params.ignore_eos else set(variant.loaded.tokenizer.eos_token_ids)
            job.uid = next(self._single_uids)
            variant.single = SingleStream(variant.loaded.model, tokens, max_tokens, job.sampler, job.processors,
                                          stop_ids, job.uid, cache=cache, cached=job.cached_tokens,
                                          pad_prefill=self.pad_prefill, logprobs=_reads_logprobs(job),
                                          check_every=self._check_every, kv=variant.kv)
        else:
            if variant.single is not None and len(variant.jobs) >= self.max_batch_size:
                self._handoff(variant)  # no room for both: the lone stream takes its batch slot first
            job.uid = self._insert(variant, job, tokens[job.cached_tokens:], max_tokens, cache,
                                   tokens[:job.cached_tokens])
            if variant.single is not None:  # the lone stream joins the batch once this one decodes
                variant.joining.add(job.uid)
        variant.jobs[job.uid] = job
        job.emit(Started(variant.loaded.name, variant.loaded.dtype, len(tokens), variant.loaded.float_dtype))

    def _insert(self, variant: Variant, job: _Job, prompt: list[int], max_tokens: int, cache: list | None,
                context: list[int]) -> int:
        """Add a sequence to the variant's batch: `cache` holds the keys and values of `context`."""
        return self._batch(variant).insert(
            [prompt], max_tokens=[max_tokens], caches=[cache], all_tokens=[context], samplers=[job.sampler],
            logits_processors=[job.processors],
            stop_sequences=no_stop_sequences() if job.params.ignore_eos else None)[0]

    def _batch(self, variant: Variant) -> LeanBatchGenerator:
        if variant.generator is None:
            tokenizer = variant.loaded.tokenizer
            variant.generator = LeanBatchGenerator(
                variant.loaded.model, reads_logprobs=lambda uid: _reads_logprobs(variant.jobs.get(uid)),
                check_every=self._check_every, kv=variant.kv,
                stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
                completion_batch_size=self.max_batch_size,
                prefill_batch_size=min(8, self.max_batch_size))
        return variant.generator

    def _handoff(self, variant: Variant) -> None:
        """Move the lone sequence, KV cache and all, into the batch: once the requests that arrived
        after it have been prefilled there and decode (a decoding sequence prefilled together with
        new prompts would slow that prefill down: its long cache pads theirs)."""
        single, variant.single = variant.single, None
        variant.joining.clear()
        self.handoffs += 1
        job = variant.jobs[single.uid]
        step, cache, context, left = single.handoff()
        self._check_finite(variant, [step])
        if single.uid in variant.jobs:
            self._on_token(variant, job, step)
        if job.done or single.uid not in variant.jobs:
            return
        del variant.jobs[single.uid]
        job.uid = self._insert(variant, job, [step.token], left, cache, context)
        variant.jobs[job.uid] = job

    def _drop_sequence(self, variant: Variant, uid: int) -> None:
        """Stop decoding one sequence, wherever it is decoded; keep its KV cache for reuse."""
        variant.joining.discard(uid)
        scope = variant.jobs[uid].params.cache_scope
        if variant.single is not None and variant.single.uid == uid:
            self._retire_single(variant, scope)
        elif variant.generator is not None:
            for cache, tokens in variant.generator.remove([uid], return_prompt_caches=True).values():
                variant.prefix.store(tokens, cache, scope)

    @staticmethod
    def _retire_single(variant: Variant, scope: str) -> None:
        single, variant.single = variant.single, None
        variant.joining.clear()
        variant.prefix.store(*single.cached_context(), scope)

    def _step_all(self) -> None:
        for variant in list(self._variants.values()):
            if not variant.jobs:
                continue
            for uid in [uid for uid, job in variant.jobs.items() if job.cancelled]:
                self._drop_sequence(variant, uid)
                variant.jobs.pop(uid).done = True
            if not variant.jobs:
                continue
            joined: list = []  # batch responses while the lone stream still decodes on its own
            try:
                if variant.single is not None:
                    responses = [variant.single.step()]
                    if variant.joining:  # newcomers are prefilled in the batch meanwhile
                        _, joined = variant.generator.next()
                        responses += joined
                else:
                    unmasked = variant.generator.unmasked_steps
                    _, responses = variant.generator.next()
                    self.unmasked_steps += variant.generator.unmasked_steps - unmasked
            except Exception as e:  # e.g. out of memory: fail this batch, keep the engine
                log.exception("generation failed on %s/%s", *variant.key)
                self._fail_variant(variant, GenerationFailedError(f"generation failed: {type(e).__name__}"))
                continue
            self._lap("decode")
            self.decode_steps += 1
            self._check_finite(variant, responses)  # a refusal comes before any of this step's text
            for response in responses:
                job = variant.jobs.get(response.uid)
                if job is not None:
                    self._on_token(variant, job, response)
                    if getattr(response, "prompt_cache", None):  # a finished batch sequence
                        variant.prefix.store(response.all_tokens, response.prompt_cache, job.params.cache_scope)
            variant.joining.difference_update(r.uid for r in joined)
            if variant.single is not None and not variant.joining and len(variant.jobs) > 1:
                self._handoff(variant)  # the others (all in the batch) decode: the lone stream joins them
            variant.last_used = time.time()
            self._lap("emit")

    def _serve_during_load(self) -> None:
        """Between two tensors of a load: one decode step for the variants already serving (at most every
        LOAD_STEP_S), so that loading a large model does not stall their streams for its whole length."""
        now = time.perf_counter()
        if now - self._load_step_at < LOAD_STEP_S or not any(v.jobs for v in self._variants.values()):
            return
        self._lap("admit")
        steps = self.decode_steps
        self._step_all()
        self.steps_during_loads += self.decode_steps - steps
        self._flush()
        self._load_step_at = time.perf_counter()

    def _lap(self, phase: str) -> None:
        """Charge the worker's time since the last lap to `phase` (where a decode loop spends it)."""
        now = time.perf_counter()
        self.worker_seconds[phase] += now - self._lap_start
        self._lap_start = now

    @property
    def _check_every(self) -> int:
        """Decode steps between non-finite checks: each op costs the decode loop ~15 us on CUDA, so
        under the `warn` policy every CHECK_EVERY-th step, each request's first, and its last by length
        (an overflow persists in the KV cache, so it is caught within a few tokens)."""
        return 1 if self.nonfinite_policy == "refuse" else CHECK_EVERY

    def _check_finite(self, variant: Variant, responses: list) -> None:
        """Non-finite scores (float16 overflow), checked on the device with the step (`finite` on a
        response; unchecked steps say True): warn the request, or refuse the dtype by policy."""
        bad = [r.uid for r in responses if not getattr(r, "finite", True)]
        if not bad:
            return
        name, dtype = variant.key
        message = f"{dtype} produced non-finite logits for {name}; its output is unreliable"
        jobs = [job for job in (variant.jobs.get(uid) for uid in bad) if job is not None]
        for job in jobs:
            if message not in job.warnings:
                job.warnings.append(message)
        if self.nonfinite_policy == "refuse":
            self.registry.refuse(variant.key, message + " (refused by the server's non-finite policy)")
            for job in jobs:
                self._drop_sequence(variant, job.uid)
                variant.jobs.pop(job.uid, None)
                job.done = True
                job.emit(DtypeRefusedError(self.registry.refused[variant.key]))

    def _on_token(self, variant: Variant, job: _Job, response: Any) -> None:
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
        job.completion_tokens += 1
        variant.tokens_generated += 1
        finish = response.finish_reason
        if finish != "stop":  # "stop" from the batch means an end-of-sequence token: no text
            job.detokenizer.add_token(response.token)
            if job.params.logprobs is not None:
                job.pending_logprobs.append(self._token_logprob(variant, response, job.params.logprobs))
        if finish:
            job.detokenizer.finalize()
        text, hit = job.matcher.feed(job.detokenizer.last_segment)
        if hit and finish is None:
            self._drop_sequence(variant, job.uid)
        if hit:
            finish = "stop"
        elif finish:
            text += job.matcher.flush()
        if text or (finish and job.pending_logprobs):
            job.emit(TextDelta(text, tuple(job.pending_logprobs)))
            job.pending_logprobs.clear()
        if finish:
            self._finish(variant, job, finish, now)

    @staticmethod
    def _token_logprob(variant: Variant, response: Any, top: int) -> TokenLogprob:
        tokenizer = variant.loaded.tokenizer
        logprobs = response.logprobs.astype(mx.float32).reshape(-1)  # a lone stream's is (1, vocab)
        best: tuple[tuple[str, float], ...] = ()
        if top > 0:
            ids = mx.argsort(-logprobs)[:top].tolist()
            values = logprobs[mx.array(ids)].tolist()
            best = tuple((tokenizer.decode([i]), _finite_or_none(v)) for i, v in zip(ids, values, strict=True))
        return TokenLogprob(tokenizer.decode([response.token]), _finite_or_none(logprobs[response.token].item()),
                            best)

    def _finish(self, variant: Variant, job: _Job, reason: str, now: float) -> None:
        variant.jobs.pop(job.uid, None)
        if variant.single is not None and variant.single.uid == job.uid:
            self._retire_single(variant, job.params.cache_scope)
        variant.requests_served += 1
        job.done = True
        first = job.first_token_at or now
        decode_s = now - first
        rate = (job.completion_tokens - 1) / decode_s if decode_s > 0 and job.completion_tokens > 1 else 0.0
        job.emit(Finished(
            model=variant.loaded.name, dtype=variant.loaded.dtype, finish_reason=reason,
            usage=Usage(job.prompt_tokens, job.completion_tokens, job.cached_tokens),
            time_to_first_token_s=first - job.arrival, total_s=now - job.arrival,
            decode_tokens_per_second=rate, warnings=tuple(job.warnings), stop_sequence=job.matcher.hit,
            float_dtype=variant.loaded.float_dtype))

    @staticmethod
    def _fail_jobs(variant: Variant, error: EngineError) -> None:
        for job in variant.jobs.values():
            job.done = True
            job.emit(error)
        variant.jobs.clear()

    def _fail_variant(self, variant: Variant, error: EngineError) -> None:
        self._fail_jobs(variant, error)
        variant.generator = variant.single = None
        variant.joining.clear()
        gc.collect()
        mx.clear_cache()

    def _fail_all(self, error: EngineError) -> None:
        """The worker is going down: answer every request without touching MLX again."""
        for variant in self._variants.values():
            self._fail_jobs(variant, error)
        while True:
            try:
                command = self._pulled.pop(0) if self._pulled else self._commands.get_nowait()
            except queue.Empty:
                return
            if command is _STOP:
                continue
            kind, payload = command
            if kind == "generate":
                payload.done = True
                payload.emit(error)
            elif kind == "call":
                _, loop, future = payload
                loop.call_soon_threadsafe(_settle, future, None, error)

    # ---- fidelity reports (worker thread, one unit of work between decode steps) ------------
    async def report(self, model: str | None, dtypes: tuple[str, ...] | None,
                     prompts: tuple[str, ...] | None, retry: bool = False, scope: str = "") -> dict:
        """Start (or look up) the fidelity report of a model; its status, with the result when done.
        A failed report stays failed, with its reason, until `retry` asks for it again. Reports over
        given prompts are kept per `scope` (a tenant), so no one learns which prompts others sent."""
        return await self._call(lambda: self._report_status(self._get_report(model, dtypes, prompts, retry,
                                                                             scope)))

    def _get_report(self, model: str | None, dtypes: tuple[str, ...] | None,
                    prompts: tuple[str, ...] | None, retry: bool = False, scope: str = "") -> FidelityJob:
        name = self.catalog.canonical(model or self.default_model)
        folder = self.catalog.resolve(name)
        wanted = tuple(sorted({normalize_dtype(d) for d in (dtypes or DEFAULT_DTYPES)}))
        key = (name, wanted, hashlib.sha256("\n".join(prompts or ()).encode()).hexdigest(), scope if prompts else "")
        job = self._reports.get(key)
        if job is not None and not (retry and job.error is not None):
            return job
        self._check_report_start()
        # Its own float32 copy plus one other variant at a time must fit beside what is resident.
        sizes = [estimate_variant(folder, d)["total_bytes"] for d in {"float32", *wanted}]
        need = estimate_variant(folder, "float32")["total_bytes"] + max(sizes)
        self.registry.make_room_in_prompt_caches(need)
        free = self.registry.budget_bytes - self.registry.used_bytes()
        if need > free:
            raise MemoryBudgetError(f"the report needs {need} bytes beside the resident variants; {free} are free",
                                    required_bytes=need, available_bytes=free, dtype="float32", retry=False)
        try:
            job = FidelityJob(name, folder, wanted, list(prompts) if prompts else None,
                              trust_remote_code=self.registry.trust_remote_code, show_paths=self.show_paths)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        while len(self._reports) >= 8:  # keep the newest reports only
            self._reports.pop(next(iter(self._reports))).close()
        self._reports[key] = job
        self._report_starts.append(time.monotonic())
        return job

    def _check_report_start(self) -> None:
        """Refuse a new report (429) once report_starts_per_hour have started within the last hour."""
        if self.report_starts_per_hour is None:
            return
        now = time.monotonic()
        self._report_starts = [t for t in self._report_starts if now - t < REPORT_START_WINDOW_S]
        if len(self._report_starts) >= self.report_starts_per_hour:
            wait = REPORT_START_WINDOW_S - (now - self._report_starts[0]) if self._report_starts else None
            raise QueueFullError(f"the server starts at most {self.report_starts_per_hour} new dtype reports "
                                 "an hour" + (f"; the next may start in {wait:.0f} s" if wait else "")
                                 + " (reports already computed are still served)")

    def _running_report(self) -> FidelityJob | None:
        return next((j for j in self._reports.values() if not j.done and j.error is None), None)

    def _step_report(self) -> None:
        job = self._running_report()
        if job is None:
            return
        serving = any(v.jobs for v in self._variants.values())
        deadline = time.perf_counter() + (0.0 if serving else REPORT_SLICE_S)
        try:
            done = job.step()
            while not done and time.perf_counter() < deadline:
                done = job.step()
            if done and self.nonfinite_policy == "refuse":
                for dtype, entry in job.result["dtypes"].items():
                    if entry.get("nonfinite_share"):
                        self.registry.refuse((job.name, dtype), f"{dtype} produced non-finite logits for "
                                             f"{job.name} in its fidelity report (refused by policy)")
        except Exception:
            log.exception("fidelity report of %s failed", job.name)

    @staticmethod
    def _report_status(job: FidelityJob) -> dict:
        state = "failed" if job.error else "done" if job.done else "running"
        report = {**job.status(), "state": state, "dtypes": job.dtypes}
        if job.done:
            report["result"] = job.result
        return report

    # ---- reports (worker thread) ------------------------------------------------------------
    def _memory_report(self) -> dict:
        return {
            "variants": [v.describe() for v in self._variants.values()],
            "process": process_memory(),
            "device": {**device_info(), "blas": blas_info().as_dict(paths=self.show_paths),
                       "cpu_kernels": fused_kernels_state(), "mlx_lm": self.mlx_lm.as_dict()},
            "budget": self.registry.report(),
            "worker": {"seconds": {k: round(v, 6) for k, v in self.worker_seconds.items()},
                       "decode_steps": self.decode_steps, "unmasked_steps": self.unmasked_steps,
                       "steps_during_loads": self.steps_during_loads,
                       "gather_waits": self.gather_waits,
                       "bursts_gathered": self.bursts_gathered, "handoffs": self.handoffs},
        }


def _finite_or_none(value: float) -> float | None:
    """A logprob as JSON can carry it: NaN and infinities (non-finite logits) become None."""
    return value if math.isfinite(value) else None


def _generates(commands: list) -> int:
    """How many of the worker's pulled commands are requests to generate."""
    return sum(c is not _STOP and c[0] == "generate" for c in commands)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for events, event in items:
        events.put_nowait(event)


def _reads_logprobs(job: _Job | None) -> bool:
    """Its rows' logits must be normalized (models.decode.step_rules)."""
    return job is not None and job.params.logprobs is not None


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
