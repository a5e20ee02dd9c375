"""Stage 1 for one category: segment -> load instances -> describe -> cluster -> write (methods.csad.label_layout).

Each step is one function with its inputs and outputs named; `run_category` chains them, each inside
`common.memory.stage(name, category=...)` (per-step time and peak memory; a no-op unless enabled).

Re-runs are cheap: per-image segmentation files that exist are reused (unless overwrite), descriptors are cached in
info/all_component_feats.npz keyed by a hash of the instance maps and settings, so re-clustering with another
bandwidth (--recluster --bandwidth B) recomputes only the clustering.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from common.memory import stage
from dataset_readers import CategoryData, Sample, load_image
from methods.csad import label_layout as L

from . import masks as M
from .clustering import cluster_components
from .config import CategoryConfig, PseudoLabelError
from .descriptors import instances_signature, load_cache, save_cache

GROUNDING_BACKGROUND = "grounding_background.png"
CLUSTER_MAP = "cluster_map.png"
FEATS_CACHE = "all_component_feats.npz"
SEGMENTATION_FILES = (L.GROUNDING, GROUNDING_BACKGROUND, L.ALL_MASKS, L.REFINED, L.BACKGROUND)


@dataclass
class Options:
    """How to run (not what to compute: that is the CategoryConfig)."""
    masks_root: Path | None
    seed: int                     # random projection seed
    overwrite: bool = False       # recompute segmentation and descriptors
    recluster: bool = False       # re-run clustering on an already complete category
    n_jobs: int | None = None     # MeanShift workers


@dataclass
class Instances:
    """The components that are clustered: per image the instance-id map and its kept ids, and per instance (all
    images, in image order) its id, image index and area share."""
    source: str                   # grounding_mask.png (no_sam) or refined_masks.png
    id_maps: list[np.ndarray]
    ids: list[np.ndarray]
    instance_id: np.ndarray
    image_index: np.ndarray
    area: np.ndarray

    def masks(self, i: int) -> np.ndarray:
        """(n_i, H, W) bool masks of image i's kept instances."""
        m, ids = self.id_maps[i], self.ids[i]
        return m[None] == ids[:, None, None] if len(ids) else M.empty_stack(m.shape)


def _read_rgb(path: str) -> np.ndarray:
    return np.asarray(load_image(path), dtype=np.uint8)


def _segmentation_done(d: Path) -> bool:
    return all((d / f).is_file() for f in SEGMENTATION_FILES)


def check_samples(data: CategoryData) -> list[str]:
    """The training images' stems (label folders are keyed by them); refuses an empty or ambiguous list."""
    if not data.train:
        raise PseudoLabelError(f"{data.root}/train/good has no images; stage 1 needs the training images")
    stems = [s.stem for s in data.train]
    if len(set(stems)) != len(stems):
        raise PseudoLabelError(f"duplicate image stems in {data.root}/train/good; label folders are keyed by stem")
    return stems


def is_complete(category: str, root: Path | None, stems: list[str]) -> bool:
    try:
        L.check_layout(category, root, stems=stems, check_values=False)
        return True
    except (L.LayoutError, FileNotFoundError):
        return False


def segment_images(samples: list[Sample], cfg: CategoryConfig, *, root: Path | None, overwrite: bool,
                   make_segmenter: Callable, log) -> float | None:
    """Grounded-SAM + SAM AMG for every image without complete segmentation files (all with overwrite); writes
    them. Returns seconds per segmented image (None if none needed it; the segmenter is then never built)."""
    cat = cfg.category
    todo = [s for s in samples if overwrite or not _segmentation_done(L.image_dir(cat, s.stem, root))]
    if not todo:
        return None
    segmenter = make_segmenter()
    t0 = time.perf_counter()
    boxes = 0
    for s in tqdm(todo, desc=f"{cat}: segmentation", leave=False):
        res = segmenter.segment(_read_rgb(s.path), cfg)
        boxes += res.n_boxes
        d = L.image_dir(cat, s.stem, root)
        L.write_png(d / L.GROUNDING, res.grounding_mask)
        L.write_png(d / GROUNDING_BACKGROUND, res.grounding_background.astype(np.uint8) * 255)
        L.write_png(d / L.ALL_MASKS, res.all_masks)
        L.write_png(d / L.REFINED, res.refined_masks)
        L.write_background(d / L.BACKGROUND, res.background)
    seconds = (time.perf_counter() - t0) / len(todo)
    log.info("%s: segmented %d images (%.2f s/image, %.1f boxes/image)", cat, len(todo), seconds, boxes / len(todo))
    return seconds


def load_instances(cfg: CategoryConfig, stems: list[str], root: Path | None) -> Instances:
    """The clustering instances: grounding_mask.png if no_sam, else refined_masks.png; instances covering more
    than min_instance_fraction of the image."""
    source = L.GROUNDING if cfg.no_sam else L.REFINED
    id_maps = [L.read_label_map(cfg.category, s, root, source) for s in stems]
    min_frac = cfg.settings.min_instance_fraction
    ids, image, area = [], [], []
    for i, m in enumerate(id_maps):
        values, counts = np.unique(m, return_counts=True)
        ok = (values > 0) & (counts > min_frac * m.size)
        ids.append(values[ok])
        image.append(np.full(ok.sum(), i))
        area.append(counts[ok] / m.size)
    instance_id, image_index, areas = (np.concatenate(a) if a else np.zeros(0) for a in (ids, image, area))
    return Instances(source, id_maps, ids, instance_id.astype(np.int64), image_index.astype(np.int64), areas)


def describe_instances(samples: list[Sample], inst: Instances, cfg: CategoryConfig, *, root: Path | None,
                       overwrite: bool, make_descriptor: Callable, descriptor_meta: dict,
                       log) -> tuple[np.ndarray, float | None]:
    """(n_instances, dim) descriptors, from info/all_component_feats.npz when its signature (instance maps +
    descriptor settings) matches, else computed and cached. Also returns seconds per image (None if cached)."""
    cat = cfg.category
    cache_path = L.masks_dir(cat, root) / L.INFO / FEATS_CACHE
    signature = instances_signature(inst.id_maps, {**descriptor_meta, "source": inst.source,
                                                   "min_frac": cfg.settings.min_instance_fraction})
    cached = None if overwrite else load_cache(cache_path, signature)
    if cached is not None:
        log.info("%s: reusing cached descriptors %s (%d components)", cat, cache_path, len(cached["feats"]))
        return cached["feats"], None
    descriptor = make_descriptor()
    t0 = time.perf_counter()
    chunks = [descriptor(_read_rgb(s.path), inst.masks(i))
              for i, s in enumerate(tqdm(samples, desc=f"{cat}: descriptors", leave=False))]
    feats = np.concatenate(chunks) if chunks else np.zeros((0, descriptor.dim), np.float32)
    seconds = (time.perf_counter() - t0) / len(samples)
    save_cache(cache_path, signature, feats=feats, image_index=inst.image_index, instance_id=inst.instance_id,
               area=inst.area, stems=np.asarray([s.stem for s in samples]))
    log.info("%s: %d component descriptors (%.2f s/image) cached in %s", cat, len(feats), seconds, cache_path)
    return feats, seconds


def cluster(feats: np.ndarray, inst: Instances, cfg: CategoryConfig, *, n_images: int, seed: int,
            n_jobs: int | None, log) -> tuple[dict, float]:
    """cluster_components with the category's bandwidth; with bandwidth_retries > 0 (--fast) the bandwidth is
    doubled while the only problem is that no cluster / class survives. Returns the result and the bandwidth."""
    s = cfg.settings
    bandwidth, attempt = s.bandwidth, 0
    while True:
        try:
            res = cluster_components(feats, inst.image_index, inst.area, n_images=n_images, bandwidth=bandwidth,
                                     filter_hist=cfg.filter_hist, settings=s, seed=seed, n_jobs=n_jobs, log=log)
            return res, bandwidth
        except PseudoLabelError as exc:
            if attempt == s.bandwidth_retries or "--bandwidth" not in str(exc):  # only bandwidth can fix it
                raise
            log.warning("%s: %s -> retrying with bandwidth %.3g (--fast)", cfg.category, exc, bandwidth * 2)
            bandwidth, attempt = bandwidth * 2, attempt + 1


def write_label_maps(category: str, stems: list[str], inst: Instances, res: dict, root: Path | None) -> None:
    """Paints each instance with its cluster + 1 (cluster_map.png) and its class (filtered_cluster_map.png)."""
    for i, stem in enumerate(stems):
        sel = inst.image_index == i
        lut_cluster = np.zeros(256, np.uint8)
        lut_class = np.zeros(256, np.uint8)
        lut_cluster[inst.instance_id[sel]] = np.clip(res["component_cluster"][sel] + 1, 0, 255)
        lut_class[inst.instance_id[sel]] = res["component_class"][sel]
        d = L.image_dir(category, stem, root)
        L.write_png(d / CLUSTER_MAP, lut_cluster[inst.id_maps[i]])
        L.write_png(d / L.LABEL_MAP, lut_class[inst.id_maps[i]])


def write_info(category: str, stems: list[str], inst: Instances, res: dict, *, root: Path | None,
               bandwidth: float, timing: dict[str, float]) -> None:
    """info/*.npy, info.txt and image_stems.txt; then the whole layout is checked."""
    n = len(stems)
    per_image = np.bincount(inst.image_index, minlength=n)
    mode = np.bincount(per_image).argmax() if n else 0
    k = res["class_hist"].shape[1]
    text = (f"category: {category}\nimages: {n}\ncomponents: {len(inst.instance_id)}\nbandwidth: {bandwidth}\n"
            f"meanshift clusters: {len(np.unique(res['meanshift_labels']))}\n"
            f"clusters kept (>= half the images): {res['raw_hist'].shape[1]}\nK (classes without background): {k}\n"
            f"main HDBSCAN mode: {len(res['main_mode'])} images\nsupervised images: {len(res['good_indices'])}\n"
            f"seconds per image: {', '.join(f'{s} {v:.3f}' for s, v in timing.items())}\n")
    L.write_info(category, root, stems, good_indices=res["good_indices"], class_hist=res["class_hist"],
                 extra={L.RAW_HIST: res["raw_hist"], L.COMPONENT_NUM_MODE: np.asarray(mode),
                        "hdbscan_labels": res["modes"]}, text=text)
    L.check_layout(category, root, stems=stems)


def run_category(data: CategoryData, cfg: CategoryConfig, opts: Options, *, make_segmenter: Callable,
                 make_descriptor: Callable, descriptor_meta: dict, log) -> dict:
    """make_segmenter() -> segment.Segmenter and make_descriptor() -> descriptors.ComponentDescriptor are called
    only when needed (models load lazily). Returns a summary dict (K, counts, seconds per image per stage)."""
    cat, root = data.category, opts.masks_root
    samples = data.train
    stems = check_samples(data)
    out = L.masks_dir(cat, root)
    if not opts.overwrite and not opts.recluster and is_complete(cat, root, stems):
        log.info("%s: pseudo-labels already complete in %s (use --overwrite or --recluster to redo)", cat, out)
        return {"category": cat, "skipped": True}
    n = len(samples)
    timing: dict[str, float] = {}
    with stage("segment", category=cat):
        seconds = segment_images(samples, cfg, root=root, overwrite=opts.overwrite, make_segmenter=make_segmenter,
                                 log=log)
    if seconds is not None:
        timing["segmentation"] = seconds
    with stage("load", category=cat):
        inst = load_instances(cfg, stems, root)
    with stage("describe", category=cat):
        feats, seconds = describe_instances(samples, inst, cfg, root=root, overwrite=opts.overwrite,
                                            make_descriptor=make_descriptor, descriptor_meta=descriptor_meta,
                                            log=log)
    if seconds is not None:
        timing["descriptors"] = seconds
    with stage("cluster", category=cat):
        t0 = time.perf_counter()
        res, bandwidth = cluster(feats, inst, cfg, n_images=n, seed=opts.seed, n_jobs=opts.n_jobs, log=log)
        timing["clustering"] = (time.perf_counter() - t0) / n
    with stage("write", category=cat):
        write_label_maps(cat, stems, inst, res, root)
        write_info(cat, stems, inst, res, root=root, bandwidth=bandwidth, timing=timing)
    k = res["class_hist"].shape[1]
    log.info("%s: K=%d classes, %d supervised images of %d; wrote %s (seconds/image: %s)", cat, k,
             len(res["good_indices"]), n, out, ", ".join(f"{s} {v:.3f}" for s, v in timing.items()))
    return {"category": cat, "K": k, "components": int(len(feats)), "good": int(len(res["good_indices"])),
            "images": n, "seconds_per_image": timing}
