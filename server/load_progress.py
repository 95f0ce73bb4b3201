"""A progress bar on the terminal while the server loads at start-up (stderr a TTY only; otherwise the
loader's log lines at each quarter say it), fed by /health's `loading`: tensors and bytes done."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

POLL_S = 0.1


class LoadProgressBar:
    """One tqdm bar per load, in source bytes, with the tensors done as its postfix."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._bar: tqdm | None = None
        self._key: tuple[str, str] | None = None

    def update(self, loading: dict | None) -> None:
        """Show `loading` (a registry's `loading` snapshot, or None once no load runs)."""
        key = (loading["model"], loading["dtype"]) if loading else None
        if key != self._key:
            self.close()
            self._key = key
            if loading:
                self._bar = tqdm(total=None, desc=f"loading {key[0]}/{key[1]}", unit="B", unit_scale=True,
                                 unit_divisor=1024, file=self.stream, leave=True, dynamic_ncols=True)
        if self._bar is not None and loading:
            self._bar.total = loading.get("bytes") or None
            self._bar.n = loading.get("bytes_done", 0)
            self._bar.set_postfix_str(f"{loading['tensors_done']}/{loading['tensors']} tensors", refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


async def show_load_progress(health: Callable[[], dict], stream: TextIO) -> None:
    """Until cancelled: the loads `health()` reports, as bars on `stream`."""
    bar = LoadProgressBar(stream)
    try:
        with logging_redirect_tqdm():  # the root logger's lines print above the bar, not through it
            while True:
                bar.update(health().get("loading"))
                await asyncio.sleep(POLL_S)
    finally:
        bar.close()
