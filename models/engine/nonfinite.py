"""The non-finite policy: how often decode steps check their scores, and what a non-finite one means."""

from __future__ import annotations

from typing import Any


class NonFinitePolicy:
    """`warn`: the requests that saw non-finite scores (a float16 overflow) get a warning; `refuse`:
    the dtype is refused from then on and those requests fail."""

    def __init__(self, policy: str, check_every: int) -> None:
        if policy not in ("warn", "refuse"):
            raise ValueError(f"nonfinite_policy: warn or refuse, not {policy!r}")
        self.refuses = policy == "refuse"
        # Each check costs the decode loop ~15 us on CUDA, so under `warn` every check_every-th step, each
        # request's first and its last by length (an overflow persists in the KV cache: caught within a few).
        self.check_every = 1 if self.refuses else check_every

    @staticmethod
    def non_finite(responses: list) -> list[int]:
        """The uids whose step scores were not finite (`finite` on a response; unchecked steps say True)."""
        return [r.uid for r in responses if not getattr(r, "finite", True)]

    @staticmethod
    def warning(key: tuple[str, str]) -> str:
        name, dtype = key
        return f"{dtype} produced non-finite logits for {name}; its output is unreliable"

    @staticmethod
    def refusal(warning: str) -> str:
        return warning + " (refused by the server's non-finite policy)"

    def refused_by_report(self, name: str, result: dict[str, Any]) -> dict[str, str]:
        """The dtypes a finished fidelity report refuses under this policy, with the reason."""
        if not self.refuses:
            return {}
        return {dtype: f"{dtype} produced non-finite logits for {name} in its fidelity report (refused by policy)"
                for dtype, entry in result["dtypes"].items() if entry.get("nonfinite_share")}
