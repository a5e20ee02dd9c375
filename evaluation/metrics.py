"""Exact, vectorised evaluation metrics (definitions in docs/evaluation.md).

- image_auroc / pixel_auroc: tie-correct ROC AUC (equal to sklearn.metrics.roc_auc_score).
- official_loco_image_auroc: the MVTec LOCO script's ROC, whose tie rule is optimistic (kept for cross-checks).
- spro / loco_spro: MVTec LOCO AU-sPRO, one region per ground-truth PNG, saturation from defects_config.json.
- aupro: MVTec AD AU-PRO, 8-connected ground-truth components.
- f1_max: the best F1 over all thresholds of the image scores.

sPRO and AU-PRO are computed on the exact curve (every distinct score is a threshold). Only two kinds of pixels
move the curve: defect-free pixels (FPR) and "weighted" defect pixels (sPRO/PRO). The defect-free scores are sorted
once; the weighted scores are sorted once; the curve vertices follow from cumulative sums and searchsorted, so the
cost is one sort of the pixels and no loop over thresholds.
"""
from __future__ import annotations

from common.errors import UserError

from typing import Iterable, Mapping, Sequence

import numpy as np

SPRO_LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)  # the official LOCO integration limits
SPRO_HEADLINE_LIMIT = 0.05
AUPRO_LIMIT = 0.3


class MetricError(UserError, ValueError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# ROC AUC and F1
# ----------------------------------------------------------------------------------------------------------------

def _split_by_label(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise MetricError(f"{len(scores)} scores for {len(labels)} labels")
    if not np.isfinite(scores).all():
        raise MetricError("NaN or inf in the scores; re-run the method that wrote them")
    return scores[~labels], scores[labels]


def auroc_from_groups(neg_scores, pos_scores) -> float:
    """P(pos > neg) + 0.5 P(pos == neg): the Mann-Whitney form of the ROC AUC, exact with ties (= sklearn)."""
    neg = np.sort(np.asarray(neg_scores).reshape(-1))
    pos = np.asarray(pos_scores).reshape(-1)
    if len(neg) == 0 or len(pos) == 0:
        raise MetricError(f"AUROC needs both classes; got {len(neg)} normal and {len(pos)} anomalous samples")
    below = np.searchsorted(neg, pos, side="left").astype(np.float64)
    below_or_equal = np.searchsorted(neg, pos, side="right").astype(np.float64)
    return float((below.sum() + 0.5 * (below_or_equal - below).sum()) / (len(neg) * len(pos)))


def image_auroc(scores, labels) -> float:
    """Tie-correct image AUROC in [0, 1], equal to sklearn.metrics.roc_auc_score(labels, scores)."""
    return auroc_from_groups(*_split_by_label(scores, labels))


def group_aurocs(data, scores_by_group: dict) -> dict[str, float]:
    """Image AUROC in [0, 1] of each score group (logi / struc / test) that holds both good and anomalous images."""
    out = {}
    for g, samples in data.score_groups().items():
        labels = [s.label for s in samples]
        if g in scores_by_group and 0 < sum(labels) < len(labels):
            out[g] = image_auroc(scores_by_group[g], labels)
    return out


def pixel_auroc(maps, masks) -> float:
    """Pixel AUROC over all pixels of all images (good images count fully). maps/masks: (N, H, W) or lists."""
    neg, pos = [], []
    for m, g in zip(maps, masks, strict=True):
        m = np.asarray(m)
        g = np.asarray(g) > 0
        if m.shape != g.shape:
            raise MetricError(f"map of shape {m.shape} for a mask of shape {g.shape}; maps must be at mask size")
        neg.append(m[~g].reshape(-1))
        pos.append(m[g].reshape(-1))
    return auroc_from_groups(np.concatenate(neg), np.concatenate(pos))


def official_loco_image_auroc(scores, labels) -> float:
    """AUROC with the tie rule of the official MVTec LOCO script (`src/metrics.py` of the MVTec LOCO evaluation code); equals image_auroc without ties.

    The official ROC walks the (score, label) pairs upwards, normal samples first inside a tie, and adds a vertex
    after the FIRST element of each tie group, which overstates the AUROC when anomalous and normal scores tie.
    """
    neg, pos = _split_by_label(scores, labels)
    if len(neg) == 0 or len(pos) == 0:
        raise MetricError(f"AUROC needs both classes; got {len(neg)} normal and {len(pos)} anomalous samples")
    s = np.concatenate([neg, pos])
    is_pos = np.concatenate([np.zeros(len(neg), bool), np.ones(len(pos), bool)])
    order = np.argsort(s, kind="stable")  # stable: normal samples stay first inside a tie, as in the official sort
    s, is_pos = s[order], is_pos[order]
    fp = len(neg) - np.cumsum(~is_pos)
    tp = len(pos) - np.cumsum(is_pos)
    n = len(s)
    keep = np.ones(n, bool)
    keep[1:] = s[1:] != s[:-1]  # first element of each tie group ...
    keep[-1] = True  # ... and the last element overall
    fpr = np.concatenate([[1.0], fp[keep] / len(neg)])[::-1]
    tpr = np.concatenate([[1.0], tp[keep] / len(pos)])[::-1]
    return float(trapezoid_to_limit(fpr, tpr, None))


def f1_max(scores, labels) -> float:
    """max over thresholds t of F1 for the prediction score >= t (every distinct score is a threshold)."""
    neg, pos = _split_by_label(scores, labels)
    if len(pos) == 0:
        raise MetricError("F1-max needs at least one anomalous sample")
    s = np.concatenate([neg, pos])
    y = np.concatenate([np.zeros(len(neg)), np.ones(len(pos))])
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.append(s[1:] != s[:-1], True)
    tp = np.cumsum(y)[last_of_tie]
    predicted = (np.arange(len(s)) + 1)[last_of_tie]
    return float(np.max(2 * tp / (predicted + len(pos))))  # F1 = 2TP / (predicted positives + actual positives)


# ----------------------------------------------------------------------------------------------------------------
# Curves and integration
# ----------------------------------------------------------------------------------------------------------------

def trapezoid_to_limit(x: np.ndarray, y: np.ndarray, x_max: float | None) -> float:
    """Trapezoid area under (x, y) up to x_max, as the official MVTec scripts integrate.

    x ascending (duplicates allowed, in curve order). If x_max is not a sample point, one last trapezoid is added
    with y linearly interpolated between the last point <= x_max and the next one.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if not np.any(x == x_max):
            ins = int(np.searchsorted(x, x_max, side="right"))
            if not 0 < ins < len(x):
                raise MetricError(f"integration limit {x_max} outside the curve's range [{x[0]}, {x[-1]}]")
            y_lim = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_lim + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def weighted_overlap_curve(neg_scores: np.ndarray, pos_scores: np.ndarray, pos_weights: np.ndarray,
                           total_weight: float, sort_in_place: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, overlap) curve for the rule "positive iff score > t", over every threshold t.

    neg_scores: scores of the defect-free pixels (FPR = fraction of them above t).
    pos_scores/pos_weights: the pixels that raise the overlap curve by their weight when they turn positive.
    Between two distinct weighted scores only the FPR moves, so the curve is a straight horizontal run there; the
    returned vertices are (0, 0), for each distinct weighted score w (descending) the point just above w and the
    point at w, and (1, 1). Trapezoid areas and the interpolation at any limit equal those over all thresholds.
    """
    neg = np.asarray(neg_scores).reshape(-1)
    if sort_in_place:  # callers that pass a fresh array save one copy of the largest array
        neg.sort()
    else:
        neg = np.sort(neg)
    n_neg = len(neg)
    if n_neg == 0:
        raise MetricError("no defect-free pixel in the evaluated images; the FPR is undefined")
    pos = np.asarray(pos_scores).reshape(-1)
    w = np.asarray(pos_weights, dtype=np.float64).reshape(-1)
    order = np.argsort(pos, kind="stable")
    pos, w = pos[order], w[order]
    # Distinct weighted scores, ascending, and the weight at or above each one.
    starts = np.flatnonzero(np.concatenate([[True], pos[1:] != pos[:-1]]))
    values = pos[starts]
    w_at_or_above = np.cumsum(w[::-1])[::-1][starts] if len(w) else np.zeros(0)
    w_above = np.append(w_at_or_above[1:], 0.0)
    fp_at_or_above = n_neg - np.searchsorted(neg, values, side="left")
    fp_above = n_neg - np.searchsorted(neg, values, side="right")
    # Interleave (above w, at w) and order by descending threshold.
    fp = np.stack([fp_above, fp_at_or_above], axis=1)[::-1].reshape(-1)
    ov = np.stack([w_above, w_at_or_above], axis=1)[::-1].reshape(-1)
    fpr = np.concatenate([[0.0], fp / n_neg, [1.0]])
    overlap = np.concatenate([[0.0], np.minimum(ov / total_weight, 1.0), [1.0]])
    return fpr, overlap


def area_by_limits(fpr: np.ndarray, overlap: np.ndarray, limits: Iterable[float]) -> dict[float, float]:
    """Area up to each FPR limit, divided by the limit (in [0, 1])."""
    return {float(lim): trapezoid_to_limit(fpr, overlap, lim) / lim for lim in limits}


# ----------------------------------------------------------------------------------------------------------------
# sPRO (MVTec LOCO)
# ----------------------------------------------------------------------------------------------------------------

def saturation_area(defect_area: int, threshold: float, relative: bool) -> int:
    """s_c: absolute min(S, A) or relative int(rho * A) as the official code; at least 1 (guards rho*A < 1)."""
    s = int(float(threshold) * defect_area) if relative else min(int(threshold), int(defect_area))
    return max(s, 1)


def spro_curve(maps: Sequence[np.ndarray], channels: Sequence[Sequence[np.ndarray]],
               saturations: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, mean sPRO) curve.

    maps: one 2-D map per image. channels[i]: the boolean defect masks of image i, one per ground-truth PNG
    (empty for good images). saturations[i][c]: the saturation area of channel c of image i.
    A pixel is a false positive only if it lies outside every channel of its image.
    """
    n_channels = sum(len(c) for c in channels)
    if n_channels == 0:
        raise MetricError("sPRO needs at least one anomalous image with a ground-truth channel")
    neg, pos, weights = [], [], []
    for i, (m, chans, sats) in enumerate(zip(maps, channels, saturations, strict=True)):
        m = np.asarray(m)
        if len(chans) != len(sats):
            raise MetricError(f"image {i}: {len(chans)} channels but {len(sats)} saturation areas")
        if not chans:
            neg.append(m.reshape(-1))
            continue
        defect = np.zeros(m.shape, bool)
        for c, s in zip(chans, sats):
            c = np.asarray(c, bool)
            if c.shape != m.shape:
                raise MetricError(f"image {i}: map of shape {m.shape} for a mask of shape {c.shape}; "
                                  "maps must be at the ground-truth (original image) size")
            defect |= c
            # Only the s highest-scoring pixels of a channel can raise its min(TP / s, 1).
            vals = m[c]
            s = int(min(s, len(vals)))
            if s < len(vals):
                vals = np.partition(vals, len(vals) - s)[len(vals) - s:]
            pos.append(vals)
            weights.append(np.full(len(vals), 1.0 / (s * n_channels)))
        neg.append(m[~defect])
    return weighted_overlap_curve(np.concatenate(neg), np.concatenate(pos), np.concatenate(weights), 1.0,
                                  sort_in_place=True)


def spro(maps, channels, saturations, limits: Iterable[float] = SPRO_LIMITS) -> dict[float, float]:
    """AU-sPRO up to each FPR limit, divided by the limit."""
    return area_by_limits(*spro_curve(maps, channels, saturations), limits)


def load_loco_channels(sample, defects_config: Sequence[Mapping]) -> tuple[list[np.ndarray], list[int]]:
    """One boolean mask per ground-truth PNG of a LOCO sample and its saturation area from defects_config.json."""
    from dataset_readers import load_sample_masks

    by_value = {int(e["pixel_value"]): e for e in defects_config}
    masks, sats = [], []
    for path, mask in zip(sample.mask_paths, load_sample_masks(sample)):
        values = np.unique(mask[mask > 0])
        if len(values) != 1:
            raise MetricError(f"{path}: a LOCO ground-truth PNG must hold exactly one defect value, found "
                              f"{values.tolist()}; do not merge or binarise the official masks")
        entry = by_value.get(int(values[0]))
        if entry is None:
            raise MetricError(f"{path}: pixel value {int(values[0])} is not in defects_config.json")
        c = mask > 0
        masks.append(c)
        sats.append(saturation_area(int(c.sum()), entry["saturation_threshold"], bool(entry["relative_saturation"])))
    return masks, sats


def loco_spro(maps_by_path: Mapping[str, np.ndarray], test_samples, defects_config,
              limits: Iterable[float] = SPRO_LIMITS) -> dict[str, dict[float, float]]:
    """Official LOCO layout of AU-sPRO: {"logical_anomalies", "structural_anomalies", "mean"} -> {limit: value}.

    Each subset holds its anomalous images plus all good test images; "mean" averages the two per limit.
    Subsets without images are left out (and so is "mean").
    """
    limits = tuple(limits)
    good = [s for s in test_samples if s.label == 0]
    out: dict[str, dict[float, float]] = {}
    for kind in ("logical_anomalies", "structural_anomalies"):
        anomalous = [s for s in test_samples if s.defect_type == kind]
        if not anomalous:
            continue
        maps, chans, sats = [], [], []
        for s in good + anomalous:
            maps.append(maps_by_path[s.path])
            c, sat = load_loco_channels(s, defects_config) if s.label else ([], [])
            chans.append(c)
            sats.append(sat)
        out[kind] = spro(maps, chans, sats, limits)
    if len(out) == 2:
        out["mean"] = {lim: 0.5 * (out["logical_anomalies"][lim] + out["structural_anomalies"][lim]) for lim in limits}
    return out


# ----------------------------------------------------------------------------------------------------------------
# AU-PRO (MVTec AD)
# ----------------------------------------------------------------------------------------------------------------

def pro_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) curve of the official MVTec AD evaluation: 8-connected ground-truth regions, each pixel of
    region k weighted 1/|k|, PRO = weighted positives / number of regions; good images count in the FPR."""
    from scipy import ndimage

    structure = np.ones((3, 3), dtype=int)
    neg, pos, weights = [], [], []
    n_regions = 0
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        m = np.asarray(m)
        g = np.asarray(g) > 0
        if m.shape != g.shape:
            raise MetricError(f"image {i}: map of shape {m.shape} for a mask of shape {g.shape}")
        neg.append(m[~g])
        if not g.any():
            continue
        labels, k = ndimage.label(g, structure=structure)
        sizes = np.bincount(labels.reshape(-1))
        lab = labels[g]
        pos.append(m[g])
        weights.append(1.0 / sizes[lab])
        n_regions += k
    if n_regions == 0:
        raise MetricError("AU-PRO needs at least one anomalous ground-truth region")
    return weighted_overlap_curve(np.concatenate(neg), np.concatenate(pos), np.concatenate(weights), n_regions,
                                  sort_in_place=True)


def aupro(maps, masks, limit: float = AUPRO_LIMIT) -> float:
    """MVTec AD AU-PRO up to FPR `limit` (default 0.3), divided by the limit."""
    return area_by_limits(*pro_curve(maps, masks), [limit])[float(limit)]
