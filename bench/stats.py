"""Percentiles and summaries of measured samples.

Percentiles use linear interpolation between the closest ranks (the method of
``numpy.percentile``'s default and of ``statistics.quantiles(method="inclusive")``),
so a p99 of 20 samples is an interpolated value, not the largest sample.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """Return the q-th percentile (0 <= q <= 100) of the samples."""
    if not samples:
        raise ValueError("cannot take a percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples: Sequence[float], *, digits: int = 4) -> dict[str, Any]:
    """Return count, min, p50, p90, p99, max and mean of the samples, rounded."""
    if not samples:
        return {"count": 0}
    return {
        "count": len(samples),
        "min": round(min(samples), digits),
        "p50": round(percentile(samples, 50), digits),
        "p90": round(percentile(samples, 90), digits),
        "p99": round(percentile(samples, 99), digits),
        "max": round(max(samples), digits),
        "mean": round(statistics.fmean(samples), digits),
    }


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50)
