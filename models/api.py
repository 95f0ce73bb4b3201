"""The one interface between server/ and the engine: plain Python values, no MLX arrays."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from models.text.tool_calls import ToolCallSyntax


@dataclass(frozen=True)
class OutputConstraint:
    """Structured output: what the generated text must match. `kind` is `json_object` (any JSON object),
    `json_schema` (`spec`: the schema as JSON text), `regex`, `choice` (`spec`: a JSON list of strings) or
    `grammar` (`spec`: a Lark grammar, llguidance's dialect). A spec that cannot compile is an
    InvalidRequestError; the text then parses (or the generation ends with `length`)."""

    kind: str
    spec: str = ""


@dataclass(frozen=True)
class GenerationParams:
    prompt: str | None = None
    prompt_tokens: tuple[int, ...] | None = None  # the prompt as token ids (instead of `prompt`)
    messages: tuple[dict, ...] | None = None  # chat: rendered with the tokenizer's template
    tools: tuple[dict, ...] | None = None  # chat: tool definitions the template renders (never parsed back)
    model: str | None = None
    dtype: str | None = None  # canonical name or None for the startup default
    max_tokens: int | None = None  # None: the server default, capped by the context left
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    prompt_logprobs: int = 0  # Engine.score: the top k listed at each prompt position
    eos_logprob: bool = False  # logprobs list the end-of-sequence token that ends a generation (vLLM's way)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False  # generate max_tokens even past end-of-sequence (benchmarks, load tests)
    # Requests reuse cached prompt prefixes only within one scope (the server derives it from the
    # tenant and the request's cache_salt): an opaque string, never shown to anyone.
    cache_scope: str = ""
    constraint: OutputConstraint | None = None  # structured output (models.decode.constraints)


@dataclass(frozen=True)
class Started:
    """The first event: the request was admitted to this variant (dtype resolved)."""

    model: str
    dtype: str
    prompt_tokens: int
    float_dtype: str = ""  # the dtype of the variant's unquantized rest (its only dtype if unquantized)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and its `top` alternatives; None where the logits were not finite
    (a float16 overflow gives NaN), since JSON has no NaN or infinity."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float | None], ...] = ()
    token_id: int | None = None  # prompt scores (Engine.score) carry ids and ranks too
    rank: int | None = None  # 1: the most likely token
    top_ids: tuple[int, ...] = ()  # the ids of `top`, in its order


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text, with the logprobs of the tokens behind it when asked for."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()

    def then(self, following: TextDelta) -> TextDelta:
        """This delta and the following one as one."""
        return TextDelta(self.text + following.text, self.logprobs + following.logprobs)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled again)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Finished:
    """The last event of a generation."""

    model: str
    dtype: str
    finish_reason: str  # "stop" or "length"
    usage: Usage
    time_to_first_token_s: float
    total_s: float
    decode_tokens_per_second: float
    warnings: tuple[str, ...] = field(default=())
    float_dtype: str = ""  # the dtype of the variant's unquantized rest (its only dtype if unquantized)
    stop_sequence: str | None = None  # the stop string that ended it, when one did
    queue_s: float = 0.0  # arrival to admission to its variant (tokenizing, waiting for the worker or a load)


@dataclass(frozen=True)
class PromptScores:
    """Engine.score's answer: every prompt token with its logprob given the tokens before it (the first
    token's is None: it has no context), in the variant the request resolved to."""

    model: str
    dtype: str
    float_dtype: str
    tokens: tuple[TokenLogprob, ...]
    cached_tokens: int = 0  # prompt tokens whose scores and KV came from earlier requests of the same scope


@dataclass(frozen=True)
class TokenizeParams:
    """A prompt to tokenize as generation would: `prompt`, or `messages` (and `tools`) through the chat template."""

    model: str | None = None
    dtype: str | None = None  # loaded only if no variant of the model is resident (all share the tokenizer)
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    tools: tuple[dict, ...] | None = None
    add_special_tokens: bool | None = None  # None: as generation does (BOS unless the text starts with it)
    add_generation_prompt: bool = True
    continue_final_message: bool = False


@dataclass(frozen=True)
class Tokenized:
    model: str  # the canonical model name
    tokens: tuple[int, ...]
    token_strs: tuple[str, ...]  # each token's text as the tokenizer spells it
    max_model_len: int


WORKER_PHASES = ("idle", "admit", "decode", "emit", "flush", "report")


@dataclass
class WorkerStats:
    """The MLX worker's counters. `seconds`: its time by phase: idle, admit (requests joining), decode
    (device steps, waits included), emit (checks, detokenizing, events), flush (hand-off to the event
    loops), report (the dtype report)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WORKER_PHASES, 0.0))
    decode_steps: int = 0
    unmasked_steps: int = 0  # batch decode steps without an attention mask (models.mlx_lm_ext.decode_mask)
    steps_during_loads: int = 0  # decode steps run between the tensors of a load
    gather_waits: int = 0  # times an idle worker waited for a burst's other requests
    bursts_gathered: int = 0  # ...and the waits that brought in at least one more
    handoffs: int = 0  # lone sequences moved into a batch

    def snapshot(self) -> WorkerStats:
        """A copy that later counting leaves alone."""
        return WorkerStats(dict(self.seconds), self.decode_steps, self.unmasked_steps, self.steps_during_loads,
                           self.gather_waits, self.bursts_gathered, self.handoffs)

    def as_dict(self) -> dict:
        return {"seconds": {k: round(v, 6) for k, v in self.seconds.items()},
                "decode_steps": self.decode_steps, "unmasked_steps": self.unmasked_steps,
                "steps_during_loads": self.steps_during_loads, "gather_waits": self.gather_waits,
                "bursts_gathered": self.bursts_gathered, "handoffs": self.handoffs}


@dataclass(frozen=True)
class MemoryReport:
    """What /memory shows: each resident variant, the process's and device's memory, the budget, the worker."""

    variants: list[dict]
    process: dict
    device: dict
    budget: dict
    worker: WorkerStats
    distributed: dict | None = None  # tensor parallel: each rank's memory and weight bytes, and their sums

    def as_dict(self) -> dict:
        report = {"variants": self.variants, "process": self.process, "device": self.device, "budget": self.budget,
                  "worker": self.worker.as_dict()}
        if self.distributed is not None:
            report["distributed"] = self.distributed
        return report


@dataclass(frozen=True)
class Health:
    """The engine's state: created, starting, ready, stopping, stopped or failed."""

    status: str
    ready: bool
    worker_alive: bool
    default_model: str
    default_dtype: str
    fit: dict | None = None  # what `fit` chose for the default model, and why (default dtype `fit` only)
    loading: dict | None = None  # the load in progress
    error: str | None = None  # why the start failed

    def as_dict(self) -> dict:
        report = {"status": self.status, "ready": self.ready, "worker_alive": self.worker_alive,
                  "default_model": self.default_model, "default_dtype": self.default_dtype}
        if self.fit is not None:
            report["fit"] = self.fit
        if self.loading is not None:
            report["loading"] = self.loading
        if self.error:
            report["error"] = self.error
        return report


class Engine(Protocol):
    default_model: str
    default_dtype: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def generate(self, params: GenerationParams) -> AsyncIterator[Started | TextDelta | Finished]: ...
    async def score(self, params: GenerationParams) -> PromptScores: ...
    async def load(self, model: str | None, dtype: str | None) -> dict: ...
    async def unload(self, model: str, dtype: str) -> dict: ...
    async def estimate(self, model: str | None, dtype: str | None, include_quantized: bool = False,
                       ranks: int | None = None) -> list[dict]: ...
    async def report(self, model: str | None, dtypes: tuple[str, ...] | None,
                     prompts: tuple[str, ...] | None, retry: bool = False, scope: str = "",
                     kv_contexts: tuple[int, ...] | None = None) -> dict: ...
    async def report_dtypes(self, model: str | None = None) -> list[str]: ...
    async def memory(self) -> MemoryReport: ...
    def memory_during_load(self) -> MemoryReport | None: ...
    def health(self) -> Health: ...
    def model_names(self) -> list[str]: ...
    async def tokenize(self, params: TokenizeParams) -> Tokenized: ...
    async def detokenize(self, model: str | None, tokens: tuple[int, ...]) -> str: ...
    def tool_syntax(self, model: str) -> ToolCallSyntax | None: ...
