"""The tools' one clock: medians of repeated calls, and a memcpy of the same bytes."""

from __future__ import annotations

import statistics
import time
from typing import Callable, List

import torch


def timeit(fn: Callable[[], object], min_time: float = 0.5, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median seconds per call of ``fn`` after one warm-up call."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memcpy_seconds(nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    return timeit(lambda: dst.copy_(src))
