"""Progress of long work: a tqdm bar (counts, rate, ETA) on a terminal, a few log lines elsewhere.

Snakemake and Slurm send stderr to files, where a carriage-return bar becomes thousands of lines;
there, :func:`progress` logs ``desc: n/total (elapsed, ETA)`` at most about every tenth of the way
and never twice within :data:`LOG_SECONDS` (so fast inner loops, one WUDI optimisation per tensor,
stay silent), and :func:`quiet_foreign_bars` turns off the bars that transformers, huggingface_hub and
compressed-tensors draw with tqdm (tqdm reads ``TQDM_DISABLE`` from the environment).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("epmq.progress")
#: at most this many log lines per loop when stderr is not a terminal ...
LOG_LINES = 10
#: ... and none sooner than this many seconds after the loop's start or its previous line
LOG_SECONDS = 5.0


def interactive() -> bool:
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``iterable``, showing progress: a tqdm bar on a terminal, else a few log lines (module docstring)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if interactive():
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    every = max(1, (total or 0) // LOG_LINES) if total else None
    start = last = time.perf_counter()
    count = 0
    for item in iterable:
        yield item
        count += 1
        if every and (count % every == 0 or count == total):
            now = time.perf_counter()
            if now - last >= LOG_SECONDS:
                elapsed = now - start
                log.info("%s: %d/%d %s (%.1f s, ETA %.1f s)", desc, count, total, unit, elapsed,
                         elapsed / count * (total - count))
                last = now


#: what turns other libraries' bars off; they read it when they are imported
FOREIGN_BARS_OFF = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_foreign_bars() -> None:
    """Without a terminal, silence other libraries' tqdm bars (they would fill log files)."""
    if not interactive():
        for name, value in FOREIGN_BARS_OFF.items():
            os.environ.setdefault(name, value)
