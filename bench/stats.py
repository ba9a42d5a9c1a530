"""Small, dependency-free statistics for the benchmark (the load generators import this too)."""

from __future__ import annotations

import math
from typing import Iterable


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of an already sorted list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(values_s: Iterable[float], censored: int = 0, censored_at_s: float | None = None) -> dict:
    """p50/p90/p99/max in milliseconds of latencies given in seconds.

    ``censored`` values never arrived before the measurement ended; they count as ``censored_at_s``
    (the time waited, a lower bound), and a percentile that falls on one is flagged as a lower bound.
    """
    vals = sorted(values_s)
    n_ok = len(vals)
    if censored:
        vals = vals + [censored_at_s if censored_at_s is not None else math.inf] * censored
    out: dict = {"n": len(vals), "censored": censored}
    for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
        v = percentile(vals, q)
        out[name] = None if v is None or math.isinf(v) else round(v * 1000, 3)
        out[name + "_lower_bound"] = bool(censored) and math.ceil(q * len(vals)) > n_ok
    out["max"] = None if not vals or math.isinf(vals[-1]) else round(vals[-1] * 1000, 3)
    out["mean"] = round(sum(vals[:n_ok]) / n_ok * 1000, 3) if n_ok else None
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b
