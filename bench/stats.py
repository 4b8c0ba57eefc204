"""Small statistics helpers (median, min-max, percentiles, a compact CDF)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of one figure's repetitions (and the values themselves)."""
    vals = [float(v) for v in values]
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "values": vals,
    }


def percentiles(samples: np.ndarray, qs: Sequence[float]) -> list[float]:
    """The qs-th percentiles of `samples` (linear interpolation)."""
    if samples.size == 0:
        return [float("nan")] * len(qs)
    return [float(v) for v in np.percentile(samples, qs)]


# Quantiles at which a latency distribution is kept for the chart: dense in the tail.
CDF_QS = [
    *np.linspace(0, 90, 91).tolist(),
    *np.linspace(90.1, 99, 90).tolist(),
    *np.linspace(99.01, 99.99, 99).tolist(),
    100.0,
]


def cdf(samples: np.ndarray) -> dict[str, list[float]]:
    """A compact CDF of `samples`: values at fixed quantiles (for charts, in the JSON)."""
    return {"q": [round(q, 4) for q in CDF_QS], "v": percentiles(samples, CDF_QS)}
