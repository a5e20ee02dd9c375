"""CSAD Patch Histogram (`Tokichan/CSAD models/segmentation/patch_histogram.py`): class-fraction vectors of a segmentation map, Mahalanobis distance to the
training vectors, trimmed z-normalisation with validation scores, global + patch detectors summed."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from common import atomic_path
from evaluation.fusion import trimmed_stats

METHOD = "patchhist"


def class_histograms(label_maps: torch.Tensor, num_classes: int, grid: int = 1,
                     keep_background: bool = False) -> torch.Tensor:
    """(B, H, W) integer maps -> (B, grid*grid*num_classes) pixel fractions per class and patch, on the maps' device.

    Patches are the grid x grid non-overlapping cells, in column-major order (x offset outer, y offset inner, as
    EMPatches iterates): for grid=2 top-left, bottom-left, top-right, bottom-right. Bin 0 (background) is 0 unless
    `keep_background` (the official training code keeps it constant 0; the pseudo-inverse ignores it either way).
    """
    if label_maps.ndim != 3:
        raise ValueError(f"expected (B, H, W) label maps, got shape {tuple(label_maps.shape)}")
    b, h, w = label_maps.shape
    if h % grid or w % grid:
        raise ValueError(f"map size {h}x{w} is not divisible by the patch grid {grid}")
    ph, pw = h // grid, w // grid
    dev = label_maps.device
    rows = torch.arange(h, device=dev) // ph
    cols = torch.arange(w, device=dev) // pw
    cell = cols[None, :] * grid + rows[:, None]  # (H, W) column-major patch index
    labels = label_maps.long().clamp_(0, num_classes - 1)
    key = (torch.arange(b, device=dev)[:, None, None] * (grid * grid) + cell[None]) * num_classes + labels
    counts = torch.bincount(key.reshape(-1), minlength=b * grid * grid * num_classes).float()
    hist = counts.reshape(b, grid * grid, num_classes) / float(ph * pw)
    if not keep_background:
        hist[:, :, 0] = 0
    return hist.reshape(b, grid * grid * num_classes)


def fit_gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and pseudo-inverse of np.cov (N-1 normalisation) of (N, D) training vectors."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 training histograms to fit the covariance, got shape {x.shape}")
    return x.mean(axis=0), np.linalg.pinv(np.cov(x, rowvar=False))


def mahalanobis(x: np.ndarray, mean: np.ndarray, inv_cov: np.ndarray) -> np.ndarray:
    """sqrt((x-mu)^T S+ (x-mu)) per row; rows where it is NaN (negative rounding) fall back to Euclidean."""
    d = np.asarray(x, dtype=np.float64) - mean
    sq = np.einsum("nd,de,ne->n", d, inv_cov, d)
    with np.errstate(invalid="ignore"):
        out = np.sqrt(sq)
    bad = ~np.isfinite(out)
    if bad.any():
        out[bad] = np.linalg.norm(d[bad], axis=1)
    return out


@dataclass
class PatchHistogram:
    """Global (grid 1) and patch (grid 2, quadrants) Mahalanobis detectors with validation normalisation."""

    num_classes: int
    patch_grid: int = 2
    hist_mean: np.ndarray | None = None
    hist_invcov: np.ndarray | None = None
    patch_hist_mean: np.ndarray | None = None
    patch_hist_invcov: np.ndarray | None = None
    hist_val_score: np.ndarray | None = None  # raw validation distances of each detector
    patch_hist_val_score: np.ndarray | None = None

    def features(self, label_maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        g = class_histograms(label_maps, self.num_classes, 1)
        p = class_histograms(label_maps, self.num_classes, self.patch_grid)
        return g.cpu().numpy().astype(np.float64), p.cpu().numpy().astype(np.float64)

    def fit(self, train_maps: torch.Tensor) -> "PatchHistogram":
        g, p = self.features(train_maps)
        self.hist_mean, self.hist_invcov = fit_gaussian(g)
        self.patch_hist_mean, self.patch_hist_invcov = fit_gaussian(p)
        return self

    def distances(self, label_maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.hist_mean is None:
            raise RuntimeError("PatchHistogram.fit must be called first")
        g, p = self.features(label_maps)
        return (mahalanobis(g, self.hist_mean, self.hist_invcov),
                mahalanobis(p, self.patch_hist_mean, self.patch_hist_invcov))

    def set_validation(self, val_maps: torch.Tensor) -> np.ndarray:
        """Store the raw validation distances; returns the saved val score (each column z-normalised by itself)."""
        self.hist_val_score, self.patch_hist_val_score = self.distances(val_maps)
        return self.normalise(self.hist_val_score, self.patch_hist_val_score)

    def normalise(self, dg: np.ndarray, dp: np.ndarray) -> np.ndarray:
        """z_global + z_patch with trimmed (q20-q80) validation statistics of each detector."""
        if self.hist_val_score is None:
            raise RuntimeError("PatchHistogram.set_validation must be called first")
        mg, sg = trimmed_stats(self.hist_val_score)
        mp, sp = trimmed_stats(self.patch_hist_val_score)
        return (np.asarray(dg) - mg) / sg + (np.asarray(dp) - mp) / sp

    def score(self, label_maps: torch.Tensor) -> np.ndarray:
        return self.normalise(*self.distances(label_maps))

    def save(self, path: str | os.PathLike) -> None:
        """The official params file: hist_mean, hist_invcov, patch_hist_mean, patch_hist_invcov, *_val_score."""
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, hist_mean=self.hist_mean, hist_invcov=self.hist_invcov,
                     patch_hist_mean=self.patch_hist_mean, patch_hist_invcov=self.patch_hist_invcov,
                     hist_val_score=self.hist_val_score, patch_hist_val_score=self.patch_hist_val_score,
                     num_classes=self.num_classes, patch_grid=self.patch_grid)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PatchHistogram":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"patch-histogram params not found: {path} (run train_segmentor.py first)")
        with np.load(path, allow_pickle=False) as z:
            return cls(int(z["num_classes"]), int(z["patch_grid"]), *(z[k] for k in (
                "hist_mean", "hist_invcov", "patch_hist_mean", "patch_hist_invcov", "hist_val_score",
                "patch_hist_val_score")))


def params_path(score_dir: str | os.PathLike, category: str) -> str:
    return os.path.join(str(score_dir), f"{category.replace('/', '__')}_{METHOD}_params.npz")
