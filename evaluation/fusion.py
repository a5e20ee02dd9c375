"""Score fusion: trimmed z-normalisation with validation statistics, then summing branches (as `Tokichan/CSAD benchmark_performance.py`)."""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

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


def fuse(test_scores: Mapping[str, np.ndarray], val_scores: Mapping[str, np.ndarray],
         low: float = 20, high: float = 80) -> np.ndarray:
    """Sum of the branches' test scores, each trimmed-z-normalised with its own validation scores."""
    if not test_scores:
        raise ValueError("fuse() needs at least one branch")
    missing = set(test_scores) - set(val_scores)
    if missing:
        raise ValueError(f"no validation scores for branches {sorted(missing)}; fusion needs the val score files")
    return np.sum([trimmed_z_normalize(test_scores[b], val_scores[b], low, high) for b in test_scores], axis=0)


def subsets(branches: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset, by size then in the given order: (a,), (b,), (a, b) as the CSAD benchmark."""
    return [c for r in range(1, len(branches) + 1) for c in itertools.combinations(branches, r)]
