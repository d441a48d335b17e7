"""Row-wise numpy work of a decoding step split over two host threads.

Between two decoder steps the graph's threads are idle and the host works alone on one core: with
a batch of beams (8 chunks x 5 beams = 40 rows of base) its float64 log-softmax terms over the
vocabulary and the moves of the beams' caches took ~13 ms a step, a third of the step's own time.
numpy releases the GIL inside those loops, so the other core can do half of the rows. Each row is
computed by the same numpy calls either way (its reductions do not depend on the other rows), so
the result is the same to the bit; only who computes which rows changes.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

_helper: Optional[ThreadPoolExecutor] = None
_single_cpu = False  # this process may use one CPU: no helper (decided once, as the helper is)
_lock = threading.Lock()


def _forget_helper() -> None:
    global _helper, _single_cpu, _lock
    _helper, _single_cpu, _lock = None, False, threading.Lock()  # a forked child starts its own helper


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helper)


def _other_thread() -> Optional[ThreadPoolExecutor]:
    """The one helper thread, or None where this process may use a single CPU (--threads 1 pins it)."""
    global _helper, _single_cpu
    if _helper is None and not _single_cpu:
        with _lock:
            if _helper is None and not _single_cpu:
                usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
                if usable < 2:
                    _single_cpu = True
                else:
                    _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime-host")
    return _helper


def in_halves(n: int, part: Callable[[int, int], None], min_n: int = 4) -> None:
    """Calls part(start, stop) over [0, n): the second half on the helper thread, the first on this one,
    and returns when both are done (the helper's exception, if any, is raised here). Fewer than min_n
    items, or a single usable CPU: part(0, n) on this thread."""
    helper = _other_thread() if n >= min_n else None
    if helper is None:
        part(0, n)
        return
    half = (n + 1) // 2
    future = helper.submit(part, half, n)
    try:
        part(0, half)
    finally:
        future.result()
