"""Stage 1 for one category: segmentation -> descriptors -> clustering -> label files (methods.csad.label_layout).

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

from dataset_readers import CategoryData, load_image
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
    masks_root: Path | None = None
    seed: int = 0
    overwrite: bool = False       # recompute segmentation and descriptors
    recluster: bool = False       # re-run clustering on an already complete category
    bandwidth: float | None = None  # overrides the config's MeanShift bandwidth
    n_jobs: int | None = None
    bandwidth_retries: int = 0    # --fast: random-model descriptors have no calibrated scale; double the
                                  # bandwidth up to this many times when no cluster / class survives


def _read_rgb(path: str) -> np.ndarray:
    return np.asarray(load_image(path), dtype=np.uint8)


def _segmentation_done(d: Path) -> bool:
    return all((d / f).is_file() for f in SEGMENTATION_FILES)


def run_category(data: CategoryData, cfg: CategoryConfig, opts: Options, make_segmenter: Callable,
                 make_descriptor: Callable, descriptor_meta: dict, log) -> dict:
    """make_segmenter() -> segment.Segmenter and make_descriptor() -> descriptors.ComponentDescriptor are called
    only when needed (models load lazily). Returns a summary dict (K, counts, seconds per image per stage)."""
    cat, root = data.category, opts.masks_root
    samples = data.train
    if not samples:
        raise PseudoLabelError(f"{data.root}/train/good has no images; stage 1 needs the training images")
    stems = [s.stem for s in samples]
    if len(set(stems)) != len(stems):
        raise PseudoLabelError(f"duplicate image stems in {data.root}/train/good; label folders are keyed by stem")
    out = L.masks_dir(cat, root)
    if not opts.overwrite and not opts.recluster:
        try:
            L.check_layout(cat, root, stems=stems, check_values=False)
            log.info("%s: pseudo-labels already complete in %s (use --overwrite or --recluster to redo)", cat, out)
            return {"category": cat, "skipped": True}
        except (L.LayoutError, FileNotFoundError):
            pass
    n = len(samples)
    timing: dict[str, float] = {}

    # 1. segmentation (Grounded-SAM + SAM AMG), resumable per image
    todo = [s for s in samples if opts.overwrite or not _segmentation_done(L.image_dir(cat, s.stem, root))]
    if todo:
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
        timing["segmentation"] = (time.perf_counter() - t0) / len(todo)
        log.info("%s: segmented %d images (%.2f s/image, %.1f boxes/image)", cat, len(todo),
                 timing["segmentation"], boxes / len(todo))

    # 2. descriptors of the clustering instances (grounding_mask if no_sam, else refined_masks; > 0.1 % area)
    source = L.GROUNDING if cfg.no_sam else L.REFINED
    id_maps = [L.read_label_map(cat, s, root, source) for s in stems]
    min_frac = cfg.common.get("min_instance_fraction", 0.001)
    inst_ids, inst_img, inst_area = [], [], []
    for i, m in enumerate(id_maps):
        ids, counts = np.unique(m, return_counts=True)
        ok = (ids > 0) & (counts > min_frac * m.size)
        inst_ids.append(ids[ok])
        inst_img.append(np.full(ok.sum(), i))
        inst_area.append(counts[ok] / m.size)
    instance_id, image_index, areas = (np.concatenate(a) if a else np.zeros(0) for a in (inst_ids, inst_img, inst_area))
    instance_id, image_index = instance_id.astype(np.int64), image_index.astype(np.int64)
    cache_path = L.masks_dir(cat, root) / L.INFO / FEATS_CACHE
    signature = instances_signature(id_maps, {**descriptor_meta, "source": source, "min_frac": min_frac})
    cached = None if opts.overwrite else load_cache(cache_path, signature)
    if cached is not None:
        feats = cached["feats"]
        log.info("%s: reusing cached descriptors %s (%d components)", cat, cache_path, len(feats))
    else:
        descriptor = make_descriptor()
        t0 = time.perf_counter()
        chunks = []
        for i, s in enumerate(tqdm(samples, desc=f"{cat}: descriptors", leave=False)):
            inst = id_maps[i][None] == inst_ids[i][:, None, None] if len(inst_ids[i]) else M.empty_stack(id_maps[i].shape)
            chunks.append(descriptor(_read_rgb(s.path), inst))
        feats = np.concatenate(chunks) if chunks else np.zeros((0, descriptor.dim), np.float32)
        timing["descriptors"] = (time.perf_counter() - t0) / n
        save_cache(cache_path, signature, feats=feats, image_index=image_index, instance_id=instance_id,
                   area=areas, stems=np.asarray(stems))
        log.info("%s: %d component descriptors (%.2f s/image) cached in %s", cat, len(feats),
                 timing["descriptors"], cache_path)

    # 3. clustering and image selection
    t0 = time.perf_counter()
    bandwidth = opts.bandwidth if opts.bandwidth is not None else cfg.bandwidth
    c = cfg.common
    for attempt in range(opts.bandwidth_retries + 1):
        try:
            res = cluster_components(feats, image_index, areas, n, bandwidth, cfg.filter_hist,
                                     proj_dim=c.get("proj_dim", 512), reduce_dim=c.get("reduce_dim", True),
                                     seed=opts.seed, small_fraction=c.get("small_cluster_fraction", 0.5),
                                     hdbscan_fraction=c.get("hdbscan_min_fraction", 0.1),
                                     select_fraction=c.get("select_fraction", 0.5),
                                     min_class_area=c.get("min_class_area", 0.001), n_jobs=opts.n_jobs, log=log)
            break
        except PseudoLabelError as exc:
            if attempt == opts.bandwidth_retries or "--bandwidth" not in str(exc):  # only bandwidth can fix it
                raise
            log.warning("%s: %s -> retrying with bandwidth %.3g (--fast)", cat, exc, bandwidth * 2)
            bandwidth *= 2
    timing["clustering"] = (time.perf_counter() - t0) / n
    k = res["class_hist"].shape[1]

    # 4. label maps: paint each instance with its cluster (cluster_map) and its final class (filtered_cluster_map)
    for i, stem in enumerate(stems):
        sel = image_index == i
        lut_cluster = np.zeros(256, np.uint8)
        lut_class = np.zeros(256, np.uint8)
        lut_cluster[instance_id[sel]] = np.clip(res["component_cluster"][sel] + 1, 0, 255)
        lut_class[instance_id[sel]] = res["component_class"][sel]
        d = L.image_dir(cat, stem, root)
        L.write_png(d / CLUSTER_MAP, lut_cluster[id_maps[i]])
        L.write_png(d / L.LABEL_MAP, lut_class[id_maps[i]])
    per_image = np.bincount(image_index, minlength=n)
    mode = np.bincount(per_image).argmax() if n else 0
    text = (f"category: {cat}\nimages: {n}\ncomponents: {len(feats)}\nbandwidth: {bandwidth}\n"
            f"meanshift clusters: {len(np.unique(res['meanshift_labels']))}\n"
            f"clusters kept (>= half the images): {res['raw_hist'].shape[1]}\nK (classes without background): {k}\n"
            f"main HDBSCAN mode: {len(res['main_mode'])} images\nsupervised images: {len(res['good_indices'])}\n"
            f"seconds per image: {', '.join(f'{s} {v:.3f}' for s, v in timing.items())}\n")
    L.write_info(cat, root, stems, good_indices=res["good_indices"], class_hist=res["class_hist"],
                 extra={L.RAW_HIST: res["raw_hist"], L.COMPONENT_NUM_MODE: np.asarray(mode),
                        "hdbscan_labels": res["modes"]}, text=text)
    L.check_layout(cat, root, stems=stems)
    log.info("%s: K=%d classes, %d supervised images of %d; wrote %s (seconds/image: %s)", cat, k,
             len(res["good_indices"]), n, out, ", ".join(f"{s} {v:.3f}" for s, v in timing.items()))
    return {"category": cat, "K": k, "components": int(len(feats)), "good": int(len(res["good_indices"])),
            "images": n, "seconds_per_image": timing}
