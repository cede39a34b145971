"""A timer shared by the bench scripts that time a function over rows (imported from bench/)."""

from __future__ import annotations

import time


def best(fn, rows, passes: int = 5) -> float:
    """The fastest of `passes` passes of fn over every row, in seconds: the least disturbed by a shared machine."""
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for row in rows:
            fn(row)
        times.append(time.perf_counter() - start)
    return min(times)
