"""MLXEngine: the async front end the server calls (models.api.Engine) and the engine's lifecycle.

Every MLX call runs on one worker thread (models.engine.worker); the front end sends it typed commands and
receives plain Python values. Requests for the same variant decode together (models.engine.scheduler: a
lone stream, then the batch); variants take turns, one decode step each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from models.api import (
    Finished,
    GenerationParams,
    Health,
    MemoryReport,
    PromptScores,
    Started,
    TextDelta,
    Tokenized,
    TokenizeParams,
    WorkerStats,
)
from models.decode.constraints import compile_constraint
from models.decode.cpu_fusion import fused_kernels_state
from models.decode.prefill import shapes_cost
from models.decode.warmup import warm_sampling, warm_shapes, warm_variant
from models.engine.config import EngineConfig
from models.engine.nonfinite import NonFinitePolicy
from models.engine.outbox import Outbox
from models.engine.reports import ReportHost
from models.engine.scoring import Scorer, prompt_scores
from models.engine.sequence import Sequence
from models.engine.serving import Serving
from models.engine.worker import Call, Generate, PhaseClock, Traffic, Wake, Worker
from models.errors import (
    EngineError,
    EngineUnavailableError,
    GenerationFailedError,
    InvalidRequestError,
    QueueFullError,
)
from models.mlx_lm_ext.contract import check_contract
from models.platform.allocator import allocator_info
from models.platform.blas import blas_info
from models.report.fidelity import default_report_dtypes
from models.text.prompt_encoding import encode_text, prompt_text
from models.text.tool_calls import ToolCallSyntax
from models.weights.catalog import ModelCatalog
from models.weights.checkpoint import read_config
from models.weights.dtypes import DEFAULT_FIT_ORDER, FIT, normalize_dtype, split_kv
from models.weights.estimate import estimate_all, estimate_variant, with_kv_estimate
from models.weights.loader import context_length
from models.weights.memory import device_info, parse_budget, process_memory
from models.weights.registry import Variant, VariantRegistry

log = logging.getLogger(__name__)


class MLXEngine:
    """models.api.Engine over MLX, for the models of `catalog`, as `config` says."""

    def __init__(self, catalog: ModelCatalog, config: EngineConfig) -> None:
        self.catalog = catalog
        self.config = config
        self.default_model = config.default_model
        self.default_dtype = normalize_dtype(config.default_dtype)
        # prefill in a few fixed shapes where new shapes cost set-up time (CUDA), warmed at start-up
        self.pad_prefill = shapes_cost() if config.pad_prefill is None else config.pad_prefill
        self.registry = VariantRegistry(
            catalog, self.default_dtype, parse_budget(config.memory_budget),
            trust_remote_code=config.trust_remote_code, idle_unload_s=config.idle_unload_s,
            prompt_cache_bytes=parse_budget(config.prompt_cache_bytes, allow_zero=True),
            kv_sequences=config.max_batch_size, kv_dtype=config.kv_dtype, warm=self._warm_loaded,
            fit_order=config.fit_order or DEFAULT_FIT_ORDER)
        self.policy = NonFinitePolicy(config.nonfinite_policy, config.check_every)
        self.stats = WorkerStats()
        self.reports = ReportHost(catalog, self.registry, config, self.policy)
        clock = PhaseClock(self.stats)
        self.serving = Serving(config, self.registry, self.reports, self.policy, self.stats, clock.lap,
                               self.pad_prefill)
        self.scorer = Scorer(self.registry, self.serving.encoder, config.default_model)
        self.outbox = Outbox(config.stream_interval_s, config.stream_events_per_s, self.serving.running)
        self.traffic = Traffic()
        self.worker = Worker(config, self.serving, self.outbox, self.stats, clock, self.traffic, self._worker_died)
        self.registry.between_tensors = self._between_tensors
        self._report_dtypes: dict[str, list[str]] = {}  # per model: what its report measures unless told
        self._report_during_load: MemoryReport | None = None  # the memory report at the current load's first tensor
        self._tokenizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._state = "created"
        self._failure: str | None = None
        self._open: set[Sequence] = set()  # generations in progress (a lost group answers them: _group_lost)
        self.mlx_lm = check_contract()  # the private mlx-lm names the batch relies on, present or not
        self.mirror = self._distribute() if config.distributed != "off" else None

    def _distribute(self) -> Any:
        """Rank 0 of a tensor-parallel group: each variant loads as this rank's shard, and every MLX step on a
        model is first sent to the other ranks (models.distributed). What they cannot replay is refused:
        variants derived from resident ones (always read from the checkpoint), loads that serve between
        tensors, the run-time warm-up of new variants and the prefix cache (off)."""
        from models.distributed.channel import Channel
        from models.distributed.group import join_group
        from models.distributed.mirror import Mirror, mirrored_decoder_class

        self.channel = Channel(join_group(self.config.distributed_backend))
        mirror = Mirror(self.channel)
        self.registry.shard_group = self.channel.group
        self.registry.mirror = mirror
        self.registry.warm = None
        self.registry.between_tensors = None
        self.registry.prompt_cache_bytes = 0
        self.serving.decoder_class = mirrored_decoder_class(self.channel)
        self.serving.on_idle = mirror.heartbeat
        log.info("distributed: rank 0 of %d (tensor parallel)", self.channel.size)
        return mirror

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker, load the default variant and warm it up; then report ready."""
        if self.worker.thread is not None:
            raise RuntimeError("the engine was already started")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        if self.mirror is not None:
            from models.distributed.watchdog import Watchdog

            Watchdog(self.channel, self.config.distributed_timeout_s, self._group_lost,
                     step_timeout_s=self.config.distributed_step_timeout_s).start()
        if self.mlx_lm.missing:
            log.warning("mlx-lm %s (dtype-serve expects %s) lacks %s: those paths fall back to mlx-lm's own",
                        self.mlx_lm.version, self.mlx_lm.pinned, ", ".join(self.mlx_lm.missing))
        self.worker.start()
        try:
            default = await self.load(self.default_model, self.default_dtype)
            if self.config.pin_default:
                await self._call(lambda: self.registry.pinned.add((default["model"], default["dtype"])))
            await self.report_dtypes()  # known before any load can hold the worker (/models reads it)
            if self.config.warmup:
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
        await self._call(warm_sampling)
        self.traffic.forget()  # the warm-up's overlap says nothing about the traffic to come
        if self.pad_prefill and self.mirror is None:  # distributed: the shapes compile on first use
            shapes = await self._call(self._warm_shapes)
            log.info("warm-up: %d prefill and decode shapes set up", shapes)

    def _warm_loaded(self, loaded: Any) -> None:
        """A variant loaded at run time runs the shapes requests use before it serves (the start-up
        variant gets the full warm-up instead)."""
        if self._state == "ready" and self.config.warmup:
            warm_variant(loaded.model, loaded.context_length, self.config.max_batch_size, self.pad_prefill,
                         between=self.worker.serve_during_load)

    def _warm_shapes(self) -> int:
        variant = self.registry.get(self.default_model, self.default_dtype)
        return warm_shapes(variant.loaded.model, variant.loaded.context_length, self.config.max_batch_size)

    def _worker_died(self, reason: str) -> None:
        # distributed, a dead worker cannot drive the other ranks: the group is lost whether or not the
        # watchdog saw it first (a collective that fails at once, e.g. a closed socket, ends the worker first)
        if self.mirror is not None:
            reason = f"distributed group lost: {self.channel.lost or reason}"
        self._state, self._failure = "failed", self._failure or reason

    def _group_lost(self, reason: str) -> None:
        """On the watchdog's thread: a rank is gone. The worker may be blocked in a collective for good, so
        every request it holds or has queued is answered from here (503), and /health turns 503."""
        self._state, self._failure = "failed", f"distributed group lost: {reason}"
        error = EngineUnavailableError(f"the engine is not running: {self._failure}")
        self._loop.call_soon_threadsafe(self._fail_open, error)
        self.worker.fail_calls(error)

    def _fail_open(self, error: EngineError) -> None:
        """On the event loop: end every generation in progress (queued, decoding, or holding events the
        worker never delivered) with `error`."""
        for seq in list(self._open):
            seq.done = True
            seq.events.put_nowait(error)

    async def stop(self) -> None:
        lost = self.mirror is not None and self.channel.lost is not None
        if self.worker.alive:
            self._state = "stopping"
            self.worker.stop_soon()
            # a worker blocked in a collective of a lost group never returns
            await asyncio.to_thread(self.worker.thread.join, 1 if lost else 30)
        if self.mirror is not None and not lost and not self.worker.alive:
            # the other ranks leave too; on a daemon thread, waited for at most the timeout: a rank that died
            # meanwhile would block the collective for good (and an executor thread would block the exit)
            sent = threading.Event()
            threading.Thread(target=lambda: (self.mirror.stop(), sent.set()), name="distributed-stop",
                             daemon=True).start()
            await asyncio.to_thread(sent.wait, self.config.distributed_timeout_s)
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        if self._state != "failed":
            self._state = "stopped"

    def health(self) -> Health:
        alive = self.worker.alive
        state = self._state if alive or self._state in ("created", "stopped") else "failed"
        fit = self.registry.fits.get(self.default_model) if self.default_dtype == FIT else None
        return Health(status=state, ready=state == "ready" and alive, worker_alive=alive,
                      default_model=self.default_model, default_dtype=self.default_dtype,
                      fit=None if fit is None else {"chosen": fit["chosen"], "reason": fit["reason"]},
                      loading=self.registry.loading,  # set by the worker; readable while it loads
                      error=self._failure)

    @property
    def open_requests(self) -> int:
        return self.traffic.open

    def model_names(self) -> list[str]:
        return self.catalog.names()

    # ---- requests ---------------------------------------------------------------------------
    async def generate(self, params: GenerationParams) -> AsyncIterator[Started | TextDelta | Finished]:
        """Stream the events of one generation; leaving early cancels it within one step."""
        self._ensure_alive()
        config = self.config
        if self.mirror is not None:
            params = self._distributable(params)
        if self.traffic.open >= config.max_batch_size + config.max_queue:
            raise QueueFullError(f"the server is at capacity ({config.max_batch_size} running, "
                                 f"{config.max_queue} queued); retry shortly")
        seq = Sequence(params, asyncio.get_running_loop(), asyncio.Queue(), self.outbox.items)
        self.traffic.opened()  # counted from here: requests still being tokenized take their place too
        self._open.add(seq)
        held = None  # an event read ahead while merging deltas
        try:
            seq.tokens = await self._encode_off_worker(params)
            seq.grammar = await self._compile_off_worker(params)
            self.worker.put(Generate(seq))
            while True:
                event, held = held or await seq.events.get(), None
                # A slow reader gets the deltas that piled up as one event, not one per token.
                while isinstance(event, TextDelta) and not seq.events.empty():
                    following = seq.events.get_nowait()
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
            self.traffic.closed()
            self._open.discard(seq)
            if not seq.done:
                seq.cancelled = True
                self.worker.put(Wake())

    @staticmethod
    def _distributable(params: GenerationParams) -> GenerationParams:
        """A request as every rank can replay it: structured output is refused (its grammar state lives on
        rank 0 only); a sampled request without a seed gets one, so that all ranks draw the same tokens."""
        if params.constraint is not None:
            raise InvalidRequestError(DISTRIBUTED_REFUSAL.format(what="structured output (response_format, "
                                                                       "tool_choice required or named)"))
        if params.temperature > 0 and params.seed is None:
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        return params

    async def _encode_off_worker(self, params: GenerationParams) -> list[int] | None:
        """The prompt's tokens, encoded on a tokenizing thread, once its model's tokenizer is known (else
        None: the worker encodes it after loading). A text too long for the context is refused unread."""
        encoder = self.serving.encoders.get(params.model or self.default_model)
        if encoder is None:
            return None
        encoder.check_size(params)
        return await self._on_tokenizing_thread(encoder.encode, params)

    async def _compile_off_worker(self, params: GenerationParams) -> Any:
        """The request's structured-output processor, compiled on a tokenizing thread once its model's
        tokenizer is known (else None: the worker compiles it when admitting the request)."""
        encoder = self.serving.encoders.get(params.model or self.default_model)
        if params.constraint is None or encoder is None:
            return None
        return await self._on_tokenizing_thread(compile_constraint, encoder.tokenizer, params.constraint)

    def tool_syntax(self, model: str) -> ToolCallSyntax | None:
        """A loaded model's own tool-call syntax (mlx-lm's parser for its family), None if none or not loaded."""
        encoder = self.serving.encoders.get(model)
        return ToolCallSyntax.of(encoder.tokenizer) if encoder is not None else None

    async def score(self, params: GenerationParams) -> PromptScores:
        """Each prompt token's logprob given the tokens before it, with its top `params.prompt_logprobs`
        alternatives (the first token's logprob is None). Requests that reach the worker together are
        scored in one padded forward pass per variant; the prompt fits the context with `max_tokens` more."""
        self._ensure_alive()
        if self.mirror is not None:
            raise InvalidRequestError(DISTRIBUTED_REFUSAL.format(what="prompt scoring (echo, prompt_logprobs, "
                                                                       "max_tokens 0)"))
        tokens = await self._encode_off_worker(params)
        variant, tokens, positions, cached = await self._call(self.scorer.call(params, tokens))
        return await self._on_tokenizing_thread(prompt_scores, variant, tokens, positions, cached)

    async def load(self, model: str | None, dtype: str | None) -> dict:
        return await self._call(lambda: self.registry.get(model or self.default_model, dtype).describe())

    async def unload(self, model: str, dtype: str) -> dict:
        return await self._call(lambda: self.registry.unload(model, dtype))

    async def estimate(self, model: str | None, dtype: str | None, include_quantized: bool = False,
                       ranks: int | None = None) -> list[dict]:
        """Bytes a variant would hold, from the safetensors headers (no weights read): one precision,
        or the float dtypes (and with `include_quantized` the standard quantizations). With `ranks` (default:
        this group's size when distributed), also what one tensor-parallel rank holds (`per_rank_bytes`)."""
        name = self.catalog.canonical(model or self.default_model)
        ranks = ranks or (self.channel.size if self.mirror is not None else 1)

        def run() -> list[dict]:
            folder = self.catalog.resolve(name)
            if not dtype:
                return [{"model": name, **self._with_kv(folder, e, None, ranks)}
                        for e in estimate_all(folder, include_quantized, ranks)]
            wanted, kv = split_kv(normalize_dtype(dtype))
            if wanted == FIT:
                wanted = self.registry.fit(name)["chosen"]
            return [{"model": name, **self._with_kv(folder, estimate_variant(folder, wanted, ranks), kv, ranks)}]

        return await self._call(run)

    def _with_kv(self, folder: Any, entry: dict, kv: str | None, ranks: int = 1) -> dict:
        """An estimate with its KV cache at `kv` (None: the server's KV precision) for max_batch_size
        sequences at the model's context (split by heads across `ranks`)."""
        config = read_config(folder)
        entry = with_kv_estimate(entry, config, kv or self.registry.kv_dtype, self.config.max_batch_size,
                                 context_length(config))
        if ranks > 1:
            entry["kv_cache"]["per_rank_bytes"] = entry["kv_cache"]["bytes"] // ranks
        return entry

    async def memory(self) -> MemoryReport:
        return await self._call(self._memory_report)

    async def report(self, model: str | None, dtypes: tuple[str, ...] | None,
                     prompts: tuple[str, ...] | None, retry: bool = False, scope: str = "",
                     kv_contexts: tuple[int, ...] | None = None) -> dict:
        """Start (or look up) the fidelity report of a model; its status, with the result when done.
        A failed report stays failed, with its reason, until `retry` asks for it again. Reports over
        given prompts are kept per `scope` (a tenant), so no one learns which prompts others sent.
        `kv_contexts`: where a quantized KV precision is scored (None: the report's default)."""
        if self.mirror is not None:
            raise InvalidRequestError(DISTRIBUTED_REFUSAL.format(what="the dtype report"))
        return await self._call(lambda: self.reports.status(
            self.reports.get(model, dtypes, prompts, retry, scope, kv_contexts)))

    async def report_dtypes(self, model: str | None = None) -> list[str]:
        """The precisions a model's report measures when asked for none (quantizations this device runs)."""
        name = self.catalog.canonical(model or self.config.default_model)
        if name not in self._report_dtypes:  # a device fact per checkpoint: asked once (start-up for the default)
            folder = self.catalog.resolve(name)
            self._report_dtypes[name] = await self._call(lambda: list(default_report_dtypes(folder)))
        return self._report_dtypes[name]

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
        resident = [v for v in self.registry.variants.values() if v.loaded.name == name]
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
        self.worker.put(Call(fn, loop, future))
        return await future

    def _ensure_alive(self) -> None:
        if not self.worker.alive or self._state in ("stopping", "stopped", "failed"):
            raise EngineUnavailableError("the engine is not running")

    def _between_tensors(self) -> None:
        """A load's hook between two tensors: at its first, keep a memory report for the routes that would
        otherwise wait for the load to end (memory_during_load); then serve the running variants."""
        loading = self.registry.loading
        if loading is not None and loading["tensors_done"] == 1:
            self._report_during_load = self._memory_report()
        self.worker.serve_during_load()

    def memory_during_load(self) -> MemoryReport | None:
        """While a load holds the worker: the memory report taken at its first tensor with the load's
        progress now (the resident set cannot change during a load); None otherwise (ask memory())."""
        loading, report = self.registry.loading, self._report_during_load
        taken_for = report and report.budget.get("loading")
        if loading is None or not taken_for or (taken_for["model"], taken_for["dtype"]) != (loading["model"],
                                                                                          loading["dtype"]):
            return None  # no load, or one before its first tensor (the report kept is an earlier load's)
        return dataclasses.replace(report, budget={**report.budget, "loading": loading})

    def _memory_report(self) -> MemoryReport:
        """On the worker: one consistent picture (distributed: with every rank's figures)."""
        show_paths = self.config.show_paths
        return MemoryReport(
            distributed=self._ranks_memory() if self.mirror is not None else None,
            variants=[v.describe() for v in self.registry.variants.values()],
            process=process_memory(),
            device={**device_info(), "blas": blas_info().as_dict(paths=show_paths),
                    "allocator": allocator_info().as_dict(paths=show_paths),
                    "cpu_kernels": fused_kernels_state(), "mlx_lm": self.mlx_lm.as_dict()},
            budget=self.registry.report(),
            worker=self.stats.snapshot())

    def _ranks_memory(self) -> dict:
        """Each rank's MLX memory and the weight bytes of each resident variant's shard on it, and their sums."""
        variants = list(self.registry.variants.values())
        ranks = self.mirror.memory([v.key for v in variants], [v.loaded.stats.final_bytes for v in variants])
        for rank in ranks:
            per_variant = rank.pop("weights_bytes")
            rank["variants"] = [{"model": v.key[0], "dtype": v.key[1], "weights_bytes": b}
                                for v, b in zip(variants, per_variant, strict=True)]
            rank["weights_bytes"] = sum(per_variant)
        return {"mode": self.config.distributed, "size": self.channel.size, "ranks": ranks,
                "weights_bytes_sum": sum(r["weights_bytes"] for r in ranks),
                "active_bytes_sum": sum(r["active_bytes"] for r in ranks)}


DISTRIBUTED_REFUSAL = "{what} is not available when the model is served distributed (--distributed)"
