"""The worker's serving work: a request admitted to its variant, a decode step for every variant, each
token handed to its sequence (non-finite policy first), and a variant's failure kept to that variant."""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from models.api import GenerationParams, Started, TokenLogprob, WorkerStats
from models.decode.constraints import compile_constraint
from models.decode.sampling import make_request_sampler
from models.engine.config import EngineConfig
from models.engine.decoder import MLXDecoder
from models.engine.kv_admission import NEVER, WAIT, KVAdmission, Verdict
from models.engine.kv_ledger import RegistryLedger, refusal
from models.engine.nonfinite import NonFinitePolicy
from models.engine.reports import ReportHost
from models.engine.scheduler import HAND_OFF, StepOutput, VariantScheduler
from models.engine.sequence import Sequence
from models.errors import DtypeRefusedError, EngineError, InvalidRequestError, unexpected_failure
from models.text.detokenizer import streaming_detokenizer
from models.text.prompts import PromptEncoder
from models.text.stop_strings import StopStringMatcher
from models.weights.registry import Variant, VariantRegistry

log = logging.getLogger(__name__)


class Serving:
    """models.engine.worker.Host: everything the worker does for requests, on the worker thread."""

    def __init__(self, config: EngineConfig, registry: VariantRegistry, reports: ReportHost,
                 policy: NonFinitePolicy, stats: WorkerStats, lap: Any, pad_prefill: bool) -> None:
        self.config = config
        self.registry = registry
        self.variants = registry.variants
        self.reports = reports
        self.policy = policy
        self.stats = stats
        self.lap = lap  # models.engine.worker.PhaseClock.lap
        self.pad_prefill = pad_prefill
        self._lone_uids = itertools.count(-1, -1)
        # Per model name, its tokenizer and context, once loaded: requests are tokenized and checked on
        # the tokenizing threads, off the MLX worker (written here, read by the event loop).
        self.encoders: dict[str, PromptEncoder] = {}
        self.decoder_class: Any = MLXDecoder  # distributed: one that first tells the other ranks each call
        self.on_idle: Any = None  # called when the worker is idle (distributed: the heartbeat to the other ranks)
        self.ledger = RegistryLedger(registry)
        self.kv: KVAdmission[Sequence] = KVAdmission(self.ledger)  # requests waiting for KV room
        self._waited_at: tuple | None = None  # _budget_state() when the head last did not fit

    # ---- the worker's questions ---------------------------------------------------------------
    def serving(self) -> bool:
        return any(v.jobs for v in self.variants.values())

    def busy(self) -> bool:
        return self.serving() or bool(self.kv.waiting) or self.reports.running() is not None

    def running(self) -> int:
        return sum(len(v.jobs) for v in self.variants.values())

    def idle(self, now: float) -> None:
        self.registry.unload_idle(now)
        if self.on_idle is not None:
            self.on_idle()

    def step_report(self) -> None:
        self.reports.step(serving=self.serving())

    # ---- admission ----------------------------------------------------------------------------
    def encoder(self, variant: Variant) -> PromptEncoder:
        """The variant's model's encoder, made known to the event loop for the requests that follow (one per
        model: its dtype variants, and its later reloads, read the same tokenizer files)."""
        name = variant.loaded.name
        encoder = self.encoders.get(name)
        if encoder is None:
            encoder = self.encoders[name] = PromptEncoder.of(variant.loaded.tokenizer, variant.loaded.context_length)
        return encoder

    def admit(self, seq: Sequence, burst: bool = False) -> None:
        """Start a request on its variant (loaded if need be): alone unless others decode or start with it;
        or queue it until its KV cache fits the budget (refused at once if it never could)."""
        if seq.cancelled:
            seq.done = True
            return
        self._prepare(seq)
        verdict = self.kv.offer(seq)
        if verdict.decision == NEVER:
            raise refusal(seq, verdict)
        if verdict.decision == WAIT:
            seq.variant.waiting += 1
            if self.kv.waiting[0] is seq:  # judged just now: looked at again once something changes
                self._waited_at = self._budget_state()
            return
        self._start(seq, burst)

    def admit_waiting(self) -> None:
        """Start the requests waiting for KV room that fit now, first come first served (looked at again once
        a sequence ended or a variant left); drop those whose clients left."""
        if not self.kv.waiting:
            return
        for seq in self.kv.drop(lambda s: s.cancelled):
            seq.variant.waiting -= 1
            seq.done = True
        state = self._budget_state()
        if not self.kv.waiting or state == self._waited_at or self.registry.loading is not None:
            return
        self.kv.ready(self._start_waiting, self._refuse_waiting)
        self._waited_at = self._budget_state() if self.kv.waiting else None

    def _start_waiting(self, seq: Sequence) -> None:
        seq.variant.waiting -= 1
        try:
            self._start(seq, burst=False)
        except EngineError as e:
            seq.fail(e)
        except Exception as e:  # as the worker answers a failed admission: this request only
            log.exception("admitting a request failed")
            seq.fail(unexpected_failure(e, ":".join(seq.variant.key)))

    def _refuse_waiting(self, seq: Sequence, verdict: Verdict) -> None:
        seq.variant.waiting -= 1
        seq.fail(refusal(seq, verdict))

    def _budget_state(self) -> tuple[int, int, int]:
        """What must change for the waiting head to fit: a sequence ends, a variant leaves, the head leaves."""
        return self.running(), len(self.variants), id(self.kv.waiting[0]) if self.kv.waiting else 0

    def _prepare(self, seq: Sequence) -> None:
        """Its variant (loaded if need be), tokens, limits, sampler and text state; nothing allocated for it."""
        params = seq.params
        variant = self.registry.get(params.model or self.config.default_model, params.dtype)
        encoder = self.encoder(variant)
        tokens = seq.tokens if seq.tokens is not None else encoder.encode(params)
        context = variant.loaded.context_length
        # unasked, the default within the context and within the KV room the budget could ever give it
        max_tokens = params.max_tokens or min(self.config.default_max_tokens, context - len(tokens),
                                              max(self.ledger.most_tokens(variant) - len(tokens), 1))
        encoder.check_fits(tokens, max_tokens)
        vocab = variant.loaded.config.get("vocab_size") or len(variant.loaded.tokenizer.get_vocab())
        if any(not 0 <= token < vocab for token, _ in params.logit_bias):
            raise InvalidRequestError(f"logit_bias: token ids must be in [0, {vocab})")
        seq.sampler, seq.processors = request_sampling(params)
        if params.constraint is not None:  # the mask comes last: it sees the biased, penalized logits
            seq.processors.append(seq.grammar or compile_constraint(variant.loaded.tokenizer, params.constraint))
        seq.variant = variant
        seq.tokens = tokens
        seq.max_tokens = max_tokens
        seq.prompt_tokens = len(tokens)
        seq.detokenizer = streaming_detokenizer(variant.loaded.tokenizer)
        seq.matcher = StopStringMatcher(params.stop)

    def _start(self, seq: Sequence, burst: bool) -> None:
        """Its KV room is granted: the prompt cache's prefix, then the scheduler (lone stream or batch)."""
        variant = seq.variant
        seq.admitted_at = time.perf_counter()  # queue time ends here: prefill follows
        seq.prompt_cache, seq.cached_tokens = variant.prefix.fetch(seq.tokens, seq.params.cache_scope)
        scheduler = self.scheduler(variant)
        self._run_outputs(variant, scheduler, scheduler.admit(seq, burst))
        seq.emit(Started(variant.loaded.name, variant.loaded.dtype, len(seq.tokens), variant.loaded.float_dtype))

    def scheduler(self, variant: Variant) -> VariantScheduler:
        if variant.scheduler is None:
            decoder = self.decoder_class(variant, self._lone_uids, max_batch_size=self.config.max_batch_size,
                                         pad_prefill=self.pad_prefill, check_every=self.policy.check_every,
                                         stats=self.stats)
            variant.scheduler = VariantScheduler(decoder, variant.jobs, self.config.max_batch_size,
                                                 self.config.single_stream)
        return variant.scheduler

    # ---- decoding -----------------------------------------------------------------------------
    def step_all(self) -> None:
        """One decode step for every variant with requests, each token to its sequence."""
        for variant in list(self.variants.values()):
            if not variant.jobs:
                continue
            scheduler = variant.scheduler
            output = scheduler.step()
            if output is None:
                continue
            if output.error is not None:
                log.error("generation failed on %s/%s", *variant.key, exc_info=output.error)
                error = unexpected_failure(output.error, ":".join(variant.key), "generation failed")
                for seq in output.failed:
                    seq.fail(error)
                continue
            self.lap("decode")
            self.stats.decode_steps += 1
            self._run_outputs(variant, scheduler, output)
            variant.last_used = time.time()
            self.lap("emit")

    def start_held(self) -> None:
        """After the step's tokens went out: the decode steps held until then (first tokens) start."""
        for variant in self.variants.values():
            if variant.scheduler is not None:
                variant.scheduler.start_held()

    def _run_outputs(self, variant: Variant, scheduler: VariantScheduler, output: StepOutput | None) -> None:
        """Hand each output's tokens to their sequences, then what the scheduler says follows (a hand-off)."""
        while output is not None:
            if output.kind == HAND_OFF:
                self.stats.handoffs += 1
            self._consume(variant, scheduler, output.responses)
            output = scheduler.update_from_output(output)

    def _consume(self, variant: Variant, scheduler: VariantScheduler, responses: list) -> None:
        self._check_finite(variant, scheduler, responses)  # a refusal comes before any of this step's text
        jobs = variant.jobs
        for response in responses:
            seq = jobs.get(response.uid)
            if seq is not None:
                self._on_token(variant, scheduler, seq, response)
                if getattr(response, "prompt_cache", None):  # a finished batch sequence
                    variant.prefix.store(response.all_tokens, response.prompt_cache, seq.params.cache_scope)

    def _check_finite(self, variant: Variant, scheduler: VariantScheduler, responses: list) -> None:
        """Non-finite scores (float16 overflow), checked on the device with the step: warn the request,
        or refuse the dtype by policy."""
        bad = self.policy.non_finite(responses)
        if not bad:
            return
        message = self.policy.warning(variant.key)
        seqs = scheduler.sequences(bad)
        for seq in seqs:
            seq.warn(message)
        if self.policy.refuses:
            self.registry.refuse(variant.key, self.policy.refusal(message))
            for seq in seqs:
                scheduler.remove(seq)
                seq.fail(DtypeRefusedError(self.registry.refused[variant.key]))

    def _on_token(self, variant: Variant, scheduler: VariantScheduler, seq: Sequence, response: Any) -> None:
        now = time.perf_counter()
        variant.tokens_generated += 1
        finish = response.finish_reason
        logprob = None
        # an end-of-sequence token has no text; its logprob is listed only where asked (echo: lm-eval reads it)
        if seq.params.logprobs is not None and (finish != "stop" or seq.params.eos_logprob):
            logprob = _token_logprob(variant, response, seq.params.logprobs)
        reason = seq.add_token(response.token, finish, logprob, now)
        if reason and finish is None:
            scheduler.remove(seq)  # a stop string ended it before the decoder did
        if reason:
            scheduler.finish(seq)
            variant.requests_served += 1
            seq.finish(reason, now)

    # ---- failures -----------------------------------------------------------------------------
    def fail_all(self, error: EngineError) -> None:
        """The worker is going down: answer every request without touching MLX again."""
        for variant in self.variants.values():
            for seq in variant.jobs.values():
                seq.fail(error)
            variant.jobs.clear()
            variant.waiting = 0
        while self.kv.waiting:
            self.kv.waiting.popleft().fail(error)


def request_sampling(params: GenerationParams) -> tuple[Any, list]:
    """A request's sampler and logits processors (bias, penalties), as every rank builds them."""
    processors = make_logits_processors(logit_bias=dict(params.logit_bias) or None,
                                        presence_penalty=params.presence_penalty or None,
                                        frequency_penalty=params.frequency_penalty or None)
    return make_request_sampler(params.temperature, params.top_p, params.seed), processors


def _token_logprob(variant: Variant, response: Any, top: int) -> TokenLogprob:
    tokenizer = variant.loaded.tokenizer
    logprobs = response.logprobs.astype(mx.float32).reshape(-1)  # a lone stream's is (1, vocab)
    best: tuple[tuple[str, float], ...] = ()
    if top > 0:
        ids = mx.argsort(-logprobs)[:top].tolist()
        values = logprobs[mx.array(ids)].tolist()
        best = tuple((tokenizer.decode([i]), _finite_or_none(v)) for i, v in zip(ids, values, strict=True))
    return TokenLogprob(tokenizer.decode([response.token]), _finite_or_none(logprobs[response.token].item()), best)


def _finite_or_none(value: float) -> float | None:
    """A logprob as JSON can carry it: NaN and infinities (non-finite logits) become None."""
    return value if math.isfinite(value) else None
