"""Component clustering and image selection (`Tokichan/CSAD pseudo_label.py`, `ClassHistogram`). Pure numpy / scikit-learn on descriptors and areas."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .config import PseudoLabelConfig, PseudoLabelError

PROJECTION_STD = 0.01  # official: projector.weight.data.normal_(mean=0.0, std=0.01), bias zero


def random_projection(feats: np.ndarray, out_dim: int, seed: int) -> np.ndarray:
    """x W^T with W ~ N(0, PROJECTION_STD^2) of shape (out_dim, in_dim), bias 0. Seeded (the official layer is
    not)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, PROJECTION_STD, size=(out_dim, feats.shape[1]))
    return feats.astype(np.float64) @ w.T


def meanshift_labels(x: np.ndarray, bandwidth: float, n_jobs: int | None = None) -> np.ndarray:
    from sklearn.cluster import MeanShift

    if len(x) == 0:
        raise PseudoLabelError("no components to cluster: segmentation found no instances in any training image "
                               "(check the text prompts / thresholds in configs/csad_pseudo_label.json)")
    if len(x) == 1:
        return np.zeros(1, np.int64)
    return MeanShift(bandwidth=bandwidth, cluster_all=True, n_jobs=n_jobs).fit(x).labels_.astype(np.int64)


def drop_small_clusters(labels: np.ndarray, n_images: int, fraction: float) -> np.ndarray:
    """Clusters with fewer than floor(fraction * n_images) members -> -1; the rest are re-indexed 0..C-1 in order
    of their original label."""
    ids, counts = np.unique(labels, return_counts=True)
    kept = ids[counts >= int(fraction * n_images)]
    remap = np.full(labels.max(initial=-1) + 2, -1, np.int64)
    remap[kept] = np.arange(len(kept))
    return remap[labels]


def area_histograms(labels: np.ndarray, image_index: np.ndarray, areas: np.ndarray, n_images: int,
                    n_clusters: int) -> np.ndarray:
    """(n_images, n_clusters): summed area fraction of each surviving cluster per image (np.add.at, no loops)."""
    hist = np.zeros((n_images, n_clusters), np.float64)
    ok = labels >= 0
    np.add.at(hist, (image_index[ok], labels[ok]), areas[ok])
    return hist


def hdbscan_modes(hist: np.ndarray, min_fraction: float, log=None) -> np.ndarray:
    """HDBSCAN image clusters on the histograms with min_cluster_size = floor(min_fraction * N), decremented while
    only noise is found. Degenerate input (fewer than 2 usable images or all noise) -> every image in mode 0."""
    from sklearn.cluster import HDBSCAN

    n = len(hist)
    size = max(2, int(min_fraction * n))
    while n >= 2 and size >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels = HDBSCAN(min_cluster_size=size).fit(hist).labels_
        if (labels >= 0).any():
            return labels.astype(np.int64)
        size -= 1
    if log is not None:
        log.warning("HDBSCAN found only noise among %d image histograms; using all images as one mode", n)
    return np.zeros(n, np.int64)


@dataclass
class Selection:
    good_indices: np.ndarray   # sorted indices of the supervised images (duplicates possible, as official)
    main_mode: np.ndarray      # indices of the largest HDBSCAN cluster
    kept_clusters: np.ndarray  # surviving cluster labels kept as classes 1..K (in this order)


def select_images(hist: np.ndarray, modes: np.ndarray, filter_hist: bool, fraction: float,
                  min_class_area: float) -> Selection:
    """For each HDBSCAN cluster: rank all images by the L-inf distance to its mean histogram and take the first
    floor(fraction * size). filter_hist keeps only the largest cluster's list, else all lists are concatenated.
    Classes: clusters whose mean area over the largest HDBSCAN cluster's images exceeds min_class_area."""
    ids, sizes = np.unique(modes[modes >= 0], return_counts=True)
    if len(ids) == 0:
        raise PseudoLabelError("no HDBSCAN image cluster; cannot select the supervised images")
    # A cluster of images without any component says nothing about the class layout (official: it can become the
    # main mode and leave K = 0, so stage 2 cannot run); it is skipped, with a warning by the caller.
    informative = np.array([hist[modes == i].sum() > 0 for i in ids])
    if not informative.any():
        empty = int((hist.sum(1) == 0).sum())
        raise PseudoLabelError(
            f"every HDBSCAN image cluster consists of images without any clustered component ({empty} of "
            f"{len(hist)} images have none); check the segmentation (refined_masks.png / grounding_mask.png) and "
            "the prompts and thresholds in configs/csad_pseudo_label.json")
    ids, sizes = ids[informative], sizes[informative]
    main = ids[np.argmax(sizes)]  # ties -> lowest id
    lists = []
    for i, size in zip(ids, sizes):
        mean = hist[modes == i].mean(0)
        dist = np.abs(hist - mean).max(1) if hist.shape[1] else np.zeros(len(hist))
        ranked = np.argsort(dist, kind="stable")[: max(1, int(fraction * size))]
        if not filter_hist or i == main:
            lists.append(ranked)
    good = np.sort(np.concatenate(lists))
    main_idx = np.flatnonzero(modes == main)
    kept = np.flatnonzero(hist[main_idx].mean(0) > min_class_area) if hist.shape[1] else np.zeros(0, np.int64)
    return Selection(good, main_idx, kept)


def cluster_components(feats: np.ndarray, image_index: np.ndarray, areas: np.ndarray, *, n_images: int,
                       bandwidth: float, filter_hist: bool, settings: PseudoLabelConfig, seed: int,
                       n_jobs: int | None = None, log=None) -> dict:
    """The whole clustering chain of `ClassHistogram` with the fractions of `settings`. Returns component class ids
    (0 = unassigned, 1..K), the raw surviving labels (-1 = dropped), the raw (N, C) and filtered (N, K)
    histograms, the good indices and the HDBSCAN modes."""
    s = settings
    x = random_projection(feats, s.proj_dim, seed) if s.reduce_dim else feats.astype(np.float64)
    raw = meanshift_labels(x, bandwidth, n_jobs)
    labels = drop_small_clusters(raw, n_images, s.small_cluster_fraction)
    n_clusters = int(labels.max(initial=-1)) + 1
    if n_clusters == 0:
        raise PseudoLabelError(
            f"MeanShift (bandwidth {bandwidth}) found {len(np.unique(raw))} clusters of {len(raw)} components, none "
            f"present in at least {int(s.small_cluster_fraction * n_images)} of {n_images} images; raise --bandwidth "
            "(or the category's 'bandwidth' in configs/csad_pseudo_label.json)")
    hist = area_histograms(labels, image_index, areas, n_images, n_clusters)
    modes = hdbscan_modes(hist, s.hdbscan_min_fraction, log)
    sel = select_images(hist, modes, filter_hist, s.select_fraction, s.min_class_area)
    skipped = [m for m in np.unique(modes[modes >= 0]) if hist[modes == m].sum() == 0]
    if skipped and log is not None:
        log.warning("skipped %d HDBSCAN image cluster(s) made of images without any component", len(skipped))
    if len(sel.kept_clusters) == 0:
        raise PseudoLabelError(f"no component class covers more than {s.min_class_area:.2%} of the typical images; "
                               "check the segmentation (refined_masks.png) or lower --bandwidth")
    to_class = np.zeros(n_clusters + 1, np.int64)  # index -1 (dropped) -> 0
    to_class[sel.kept_clusters] = np.arange(1, len(sel.kept_clusters) + 1)
    classes = np.where(labels >= 0, to_class[labels], 0)
    return {"component_class": classes, "component_cluster": labels, "meanshift_labels": raw,
            "raw_hist": hist, "class_hist": hist[:, sel.kept_clusters], "good_indices": sel.good_indices,
            "modes": modes, "main_mode": sel.main_mode}
