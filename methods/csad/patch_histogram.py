"""CSAD Patch Histogram (`Tokichan/CSAD models/segmentation/patch_histogram.py`): class-fraction vectors of a segmentation map, Mahalanobis distance to the
training vectors, trimmed z-normalisation with validation scores, global + patch detectors summed."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from common import atomic_path
from common.checkpoints import check_meta
from common.errors import CheckpointError
from common.io import MissingCheckpointError
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

    def _params(self, target: str) -> dict[str, np.ndarray]:
        arrays = {k: getattr(self, k) for k in PARAM_KEYS}
        bad = [k for k, v in arrays.items() if v is None or not np.isfinite(v).all()]
        if bad:  # NaN here would become NaN patchhist scores for every image
            raise CheckpointError(f"patch-histogram {bad[0]} is missing or not finite; not writing {target}: check "
                                  "the segmentor's predictions (was its training finite?)")
        return arrays

    def state(self) -> dict:
        """Checkpoint form (loadable with weights_only): the params as float64 tensors, num_classes, patch_grid."""
        arrays = self._params("the checkpoint")
        return {"num_classes": int(self.num_classes), "patch_grid": int(self.patch_grid),
                **{k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in arrays.items()}}

    @classmethod
    def from_state(cls, state: Mapping, *, fix: str) -> "PatchHistogram":
        """Inverse of state(); missing or non-finite params are one CheckpointError line ending in `fix`."""
        missing = [k for k in (*PARAM_KEYS, "num_classes", "patch_grid") if k not in state]
        if missing:
            raise CheckpointError(f"the patch histogram lacks {', '.join(missing)}; {fix}")
        arrays = {k: state[k].numpy().astype(np.float64) for k in PARAM_KEYS}
        bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"patch-histogram {bad[0]} holds NaN or Inf; {fix}")
        return cls(int(state["num_classes"]), int(state["patch_grid"]), *(arrays[k] for k in PARAM_KEYS))

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> None:
        """The official params file: hist_mean, hist_invcov, patch_hist_mean, patch_hist_invcov, *_val_score;
        plus `meta` (common.checkpoints.checkpoint_meta) as a JSON string, when given."""
        arrays = self._params(str(path))
        extra = {"meta": np.array(json.dumps(meta))} if meta is not None else {}
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays, num_classes=self.num_classes, patch_grid=self.patch_grid, **extra)

    @classmethod
    def load(cls, path: str | os.PathLike, expected: dict | None = None) -> "PatchHistogram":
        """`expected`: a checkpoint_meta record of the current run to check the file's record against."""
        fix = "re-run train_segmentor.py for this category"
        if not os.path.isfile(path):
            raise MissingCheckpointError(f"patch-histogram params not found: {path} ({fix})")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in PARAM_KEYS}
                num_classes, grid = int(z["num_classes"]), int(z["patch_grid"])
                meta = json.loads(str(z["meta"])) if "meta" in z.files else None
        except Exception as exc:  # truncated, not an npz, pickled arrays, missing keys
            raise CheckpointError(f"cannot read patch-histogram params {path} ({str(exc).splitlines()[0]}); "
                                  f"{fix}") from None
        bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"patch-histogram params {path}: {bad[0]} holds NaN or Inf; {fix}")
        if expected is not None:
            check_meta(path, {"meta": meta} if meta is not None else {}, expected, fix=fix)
        return cls(num_classes, grid, *(arrays[k] for k in PARAM_KEYS))


PARAM_KEYS = ("hist_mean", "hist_invcov", "patch_hist_mean", "patch_hist_invcov", "hist_val_score",
              "patch_hist_val_score")


def params_path(score_dir: str | os.PathLike, category: str) -> str:
    return os.path.join(str(score_dir), f"{category.replace('/', '__')}_{METHOD}_params.npz")
