"""Shared measuring helpers for the benchmarks: resident memory and the median time of a build."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

MiB = 1024 * 1024


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(make: Callable[[], Any], new_tensor_bytes: Callable[[Any], int], repeats: int) -> dict[str, float]:
    """RSS held by one live result of ``make()`` and its ``new_tensor_bytes``, then the median seconds of ``repeats`` calls.

    Memory is measured first, before freed results can hand their pages to the next one.
    """
    gc.collect()
    before = rss_bytes()
    result = make()
    rss = rss_bytes() - before
    tensors = new_tensor_bytes(result)
    del result
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = make()
        times.append(time.perf_counter() - start)
        del result
    gc.collect()
    return {"seconds": statistics.median(times), "rss": rss, "tensors": tensors}
