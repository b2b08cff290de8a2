"""Helpers for the side-by-side benchmarks: every figure is a ratio against a baseline timed in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def alternate(rounds: int, **candidates: Callable[[], object]) -> dict[str, float]:
    """Median wall time of each candidate, run in alternation so load changes hit both alike."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, func in candidates.items():
            samples[name].append(timed(func))
    return {name: statistics.median(values) for name, values in samples.items()}


def report(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
