"""Score fusion: trimmed z-normalisation with validation statistics, then summing branches (CSAD spec §5)."""
from __future__ import annotations

import numpy as np


def trimmed_stats(val_scores: np.ndarray, low: float = 20, high: float = 80) -> tuple[float, float]:
    """Mean and std of the validation scores strictly between their `low` and `high` percentiles."""
    v = np.asarray(val_scores, dtype=np.float64)
    lo, hi = np.percentile(v, low), np.percentile(v, high)
    kept = v[(v > lo) & (v < hi)]
    if len(kept) < 2:  # tiny validation sets: fall back to all values rather than divide by zero
        kept = v
    std = kept.std()
    return float(kept.mean()), float(std if std > 0 else 1.0)


def trimmed_z_normalize(scores: np.ndarray, val_scores: np.ndarray, low: float = 20, high: float = 80) -> np.ndarray:
    mean, std = trimmed_stats(val_scores, low, high)
    return (np.asarray(scores, dtype=np.float64) - mean) / std
