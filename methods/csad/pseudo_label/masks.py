"""Mask post-processing of CSAD stage 1 (`Tokichan/CSAD pseudo_label.py`, `grounding_segmentation` and
`segmentation`), on (n, H, W) bool stacks. Loops run over masks (at most a few hundred),
never over pixels."""
from __future__ import annotations

import cv2
import numpy as np

MAX_INSTANCES = 255  # ids must fit a uint8 PNG


def empty_stack(shape: tuple[int, int]) -> np.ndarray:
    return np.zeros((0, *shape), dtype=bool)


def as_stack(masks, shape: tuple[int, int]) -> np.ndarray:
    masks = [np.asarray(m, dtype=bool) for m in masks]
    return np.stack(masks) if masks else empty_stack(shape)


def intersect_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / min(|A|, |B|); 0 when either is empty."""
    small = min(int(a.sum()), int(b.sum()))
    return float(np.logical_and(a, b).sum()) / small if small else 0.0


def ratios_to(masks: np.ndarray, ref: np.ndarray, mode: str = "min") -> np.ndarray:
    """Per mask: |M ∩ R| / min(|M|, |R|) (mode "min") or / |M| (mode "self"), vectorised over the stack."""
    if len(masks) == 0:
        return np.zeros(0)
    flat = masks.reshape(len(masks), -1)
    inter = flat[:, ref.ravel()].sum(1).astype(np.float64)
    area = flat.sum(1).astype(np.float64)
    denom = np.minimum(area, ref.sum()) if mode == "min" else area
    return np.divide(inter, denom, out=np.zeros_like(inter), where=denom > 0)


def split_components(masks: np.ndarray, connectivity: int = 4, max_bbox_fraction: float = 0.95,
                     min_area: int = 50, max_count: int = MAX_INSTANCES) -> np.ndarray:
    """Every mask -> its connected components; keep those with bbox area < max_bbox_fraction of the image and
    pixel area > min_area; sort by area descending; keep at most max_count (`segmentation`, first filter)."""
    h, w = masks.shape[1:]
    comps, areas = [], []
    for m in masks:
        n, lab, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=connectivity)
        box_area = stats[1:, cv2.CC_STAT_WIDTH] * stats[1:, cv2.CC_STAT_HEIGHT]
        ok = np.flatnonzero((box_area < max_bbox_fraction * h * w) & (stats[1:, cv2.CC_STAT_AREA] > min_area)) + 1
        for j in ok:
            comps.append(lab == j)
            areas.append(stats[j, cv2.CC_STAT_AREA])
    if not comps:
        return empty_stack((h, w))
    order = np.argsort(-np.asarray(areas), kind="stable")[:max_count]
    return np.stack([comps[i] for i in order])


def grounding_filter(comps: np.ndarray, grounding_union: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """Keep a component if intersect_ratio(grounding union, component) > threshold (`segmentation`, use_grounding_filter)."""
    return comps[ratios_to(comps, grounding_union) > threshold]


def remove_background(comps: np.ndarray, background: np.ndarray, threshold: float = 0.95) -> np.ndarray:
    """Drop components with intersect_ratio(component, background) >= threshold (`segmentation`, SAM background)."""
    if not background.any():
        return comps
    return comps[ratios_to(comps, background) < threshold]


def filter_by_combine(masks: np.ndarray, min_fraction: float, threshold: float = 0.9) -> np.ndarray:
    """De-overlap (`segmentation`, filter_by_combine): drop masks <= min_fraction of the image; visit the rest by ascending area and
    accept a mask when intersect_ratio(union of accepted, mask) < threshold (the first is always accepted);
    then a second pass accepts deferred masks whose |mask ∩ union| / |mask| < threshold."""
    if len(masks) == 0:
        return masks
    h, w = masks.shape[1:]
    areas = masks.reshape(len(masks), -1).sum(1)
    keep = np.flatnonzero(areas > min_fraction * h * w)
    order = keep[np.argsort(areas[keep], kind="stable")]
    union = np.zeros((h, w), bool)
    accepted, deferred = [], []
    for i in order:
        if not accepted or intersect_ratio(union, masks[i]) < threshold:
            accepted.append(i)
            union |= masks[i]
        else:
            deferred.append(i)
    for i in deferred:
        if np.logical_and(masks[i], union).sum() / areas[i] < threshold:
            accepted.append(i)
            union |= masks[i]
    return masks[np.asarray(accepted, dtype=np.int64)]


def merge_masks(masks: np.ndarray, min_fraction: float) -> np.ndarray:
    """Instance-id map (`grounding_segmentation`'s merge_masks): drop masks <= min_fraction, paint by descending area with ids 1..n, so
    smaller masks overwrite larger ones. At most 255 instances (the largest are kept)."""
    if len(masks) == 0:
        return np.zeros((0, 0), np.uint8) if masks.ndim < 3 else np.zeros(masks.shape[1:], np.uint8)
    h, w = masks.shape[1:]
    areas = masks.reshape(len(masks), -1).sum(1)
    keep = np.flatnonzero(areas > min_fraction * h * w)
    order = keep[np.argsort(-areas[keep], kind="stable")][:MAX_INSTANCES]
    out = np.zeros((h, w), np.uint8)
    for new_id, i in enumerate(order, start=1):
        out[masks[i]] = new_id
    return out


def id_map_to_stack(id_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, W) bool masks of the non-zero ids, and the ids, in ascending id order."""
    ids = np.unique(id_map)
    ids = ids[ids > 0]
    return (id_map[None] == ids[:, None, None]) if len(ids) else empty_stack(id_map.shape), ids


def instances_from_id_map(id_map: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Split an instance map into instances, then into connected components (no_sam path of `segmentation`)."""
    stack, _ = id_map_to_stack(id_map)
    return split_components(stack, connectivity=connectivity, max_bbox_fraction=1.01, min_area=0)


def sam_background_points(h: int, w: int, inset: int = 10) -> np.ndarray:
    """The 8 positive point prompts (x, y) of `segmentation`'s SAM background, as Tokichan/CSAD pseudo_label.py
    gives them: the corners inset by `inset`, then the exact corners, with the image extent (w, h) as the far
    corner (SAM's continuous coordinates: pixel i spans [i, i + 1])."""
    return np.array([[inset, inset], [inset, h - inset], [w - inset, inset], [w - inset, h - inset],
                     [0, 0], [0, h], [w, 0], [w, h]], dtype=np.float32)
