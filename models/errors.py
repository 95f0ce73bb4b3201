"""Domain errors raised by models/ and mapped to HTTP statuses by server/errors.py."""

from __future__ import annotations

__all__ = [
    "EngineError", "ModelNotFoundError", "ModelLoadError", "InvalidRequestError",
    "EngineUnavailableError", "GenerationFailedError", "UnknownDtypeError", "MemoryBudgetError",
    "QueueFullError", "KVBudgetError",
    "DtypeRefusedError", "VariantPinnedError", "PrecisionUnavailableError",
]


class EngineError(Exception):
    """Base of errors the engine reports to clients; the message is safe to show."""


class ModelNotFoundError(EngineError):
    """A model name outside the allow-list, or one whose folder does not exist."""


class ModelLoadError(EngineError):
    """A checkpoint that cannot be read: missing, corrupt or truncated files."""


class InvalidRequestError(EngineError):
    """A request the engine refuses before doing any work (e.g. prompt longer than the context)."""


class EngineUnavailableError(EngineError):
    """The engine is not running (starting, stopping, or its worker died)."""


class GenerationFailedError(EngineError):
    """An error inside generation; the request fails, the engine goes on."""


class UnknownDtypeError(EngineError, ValueError):
    """A dtype name that is neither a valid name nor a documented alias."""


class DtypeRefusedError(EngineError):
    """A dtype refused for a model by the non-finite policy (e.g. float16 overflowing)."""


class VariantPinnedError(EngineError):
    """An unload of the pinned default variant, which stays resident while the server runs."""


class PrecisionUnavailableError(EngineError):
    """A valid precision this model or backend cannot have: another quantization of a quantized
    checkpoint, a recipe the architecture lacks layers for, a mode MLX has no kernels for here."""


class QueueFullError(EngineError):
    """More requests than capacity + queue: refused at once, the client may retry."""


class MemoryBudgetError(EngineError):
    """A variant that does not fit the memory budget; refused before anything is allocated."""

    def __init__(self, message: str, *, required_bytes: int, available_bytes: int, dtype: str,
                 retry: bool) -> None:
        super().__init__(message)
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes
        self.dtype = dtype
        self.retry = retry  # True when idle-able variants are busy now and it may fit later

    def details(self) -> dict:
        return {"required_bytes": self.required_bytes, "available_bytes": self.available_bytes,
                "dtype": self.dtype}


class KVBudgetError(InvalidRequestError):
    """A request whose KV cache, grown to prompt + max_tokens tokens, could not fit the memory budget even
    with nothing else running: refused at once (fewer tokens would fit)."""

    def __init__(self, message: str, *, required_bytes: int, available_bytes: int, max_tokens_fitting: int
                 ) -> None:
        super().__init__(message)
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes
        self.max_tokens_fitting = max_tokens_fitting  # the largest max_tokens that would fit (0: none)

    def details(self) -> dict:
        return {"required_bytes": self.required_bytes, "available_bytes": self.available_bytes,
                "max_tokens_fitting": self.max_tokens_fitting}


def unexpected_failure(e: BaseException, variant: str, what: str = "internal error") -> EngineError:
    """The error a request gets for an unexpected exception while its variant ran: MLX's "no implementation"
    (a kernel this backend lacks for a shape the request made) is the precision's limit here, a 422 that
    says so; anything else `what` and the exception's type, without details."""
    if "No implementation for" in str(e):
        return PrecisionUnavailableError(f"{variant}: this backend has no kernel for this request's shapes "
                                         f"({str(e).splitlines()[0][:200]})")
    return GenerationFailedError(f"{what}: {type(e).__name__}")
