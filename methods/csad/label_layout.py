"""The on-disk contract between CSAD stage 1 (pseudo_label.py) and stage 2 (train_segmentor.py).

Layout (as the official `Tokichan/CSAD pseudo_label.py` writes `datasets/masks/<category>/`), one folder per training image, named by the image stem ("000", "001", ...):

    <masks_root>/<category>/<stem>/filtered_cluster_map.png   class ids 0 (background) .. K, uint8, full resolution
    <masks_root>/<category>/<stem>/refined_masks.png          instance ids 0 .. n (components used for clustering)
    <masks_root>/<category>/<stem>/all_masks.png              instance ids before de-overlap
    <masks_root>/<category>/<stem>/grounding_mask.png         Grounded-SAM instance ids
    <masks_root>/<category>/<stem>/background.jpg             SAM background mask, 0 / 255 (JPEG, threshold at 127)
    <masks_root>/<category>/info/filtered_histogram_indices.npy   indices (into the sorted train list) of the
                                                                  supervised "good" images
    <masks_root>/<category>/info/filtered_component_histogram.npy (N_train, K) class-area fractions; K+1 classes

The authors' published pseudo-labels use the same layout; `check_layout` verifies a dropped-in copy.
Index i in the info files always means the i-th training image in sorted order (the official code assumed the
Windows glob order, which is sorted).
"""
from __future__ import annotations

from common.errors import UserError

import os
from pathlib import Path

import cv2
import numpy as np

from common import atomic_path, atomic_save_npy, atomic_write_text, get_logger

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MASKS_ROOT = REPO_ROOT / "datasets" / "masks"
PUBLISHED_LABELS = "the CSAD authors' pseudo-labels (Google Drive file id 16C2C_Zitl04lnb07giXI30X0HK2TPKDA)"

LABEL_MAP = "filtered_cluster_map.png"
REFINED = "refined_masks.png"
ALL_MASKS = "all_masks.png"
GROUNDING = "grounding_mask.png"
BACKGROUND = "background.jpg"
PER_IMAGE_FILES = (LABEL_MAP, REFINED, ALL_MASKS, GROUNDING, BACKGROUND)

INFO = "info"
GOOD_INDICES = "filtered_histogram_indices.npy"
CLASS_HIST = "filtered_component_histogram.npy"
RAW_HIST = "raw_component_histogram.npy"
COMPONENT_NUM_MODE = "component_num_mode.npy"
INFO_FILES = (GOOD_INDICES, CLASS_HIST)  # the ones train_segmentor.py needs
STEMS_FILE = "image_stems.txt"  # ours, optional: the stems in index order (absent in the published labels)

log = get_logger("csad.label_layout")


class LayoutError(UserError, RuntimeError):
    """A missing or inconsistent pseudo-label file; the message names it and the fix."""


def masks_dir(category: str, root: str | os.PathLike | None = None) -> Path:
    """<root>/<category>; root defaults to datasets/masks."""
    return (Path(root) if root is not None else DEFAULT_MASKS_ROOT) / category


def image_dir(category: str, stem: str, root: str | os.PathLike | None = None) -> Path:
    return masks_dir(category, root) / stem


def list_stems(category: str, root: str | os.PathLike | None = None) -> list[str]:
    """Sorted per-image folder names (everything except info/ and our output folders)."""
    base = masks_dir(category, root)
    if not base.is_dir():
        raise LayoutError(f"pseudo-label folder not found: {base} (run pseudo_label.py, or extract "
                          f"{PUBLISHED_LABELS} into {base.parent})")
    stems_file = base / INFO / STEMS_FILE
    if stems_file.is_file():
        return [s for s in stems_file.read_text().split("\n") if s]
    skip = {INFO, "test_seg_output", "val_seg_output"}
    return sorted(d.name for d in base.iterdir() if d.is_dir() and d.name not in skip and not d.name.startswith("."))


def _read_png(path: Path) -> np.ndarray:
    if not path.is_file():
        raise LayoutError(f"pseudo-label file missing: {path} (re-run pseudo_label.py for this category, or "
                          f"re-extract {PUBLISHED_LABELS})")
    arr = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise LayoutError(f"cannot read {path} (corrupt file); delete the category folder and re-run pseudo_label.py")
    return arr


def read_label_map(category: str, stem: str, root: str | os.PathLike | None = None,
                   name: str = LABEL_MAP) -> np.ndarray:
    """uint8 (H, W) map at full image resolution: class ids for filtered_cluster_map.png, instance ids otherwise."""
    return _read_png(image_dir(category, stem, root) / name)


def read_background(category: str, stem: str, root: str | os.PathLike | None = None) -> np.ndarray:
    """bool (H, W) SAM background (JPEG, so thresholded at the mid value)."""
    return _read_png(image_dir(category, stem, root) / BACKGROUND) > 127


def read_info(category: str, root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The info/*.npy arrays by file stem, e.g. info["filtered_histogram_indices"]; both required ones must exist."""
    info_dir = masks_dir(category, root) / INFO
    out: dict[str, np.ndarray] = {}
    for name in INFO_FILES:
        path = info_dir / name
        if not path.is_file():
            raise LayoutError(f"pseudo-label file missing: {path} (re-run pseudo_label.py, or re-extract "
                              f"{PUBLISHED_LABELS})")
    for path in sorted(info_dir.glob("*.npy")):
        out[path.stem] = np.load(path, allow_pickle=False)
    return out


def num_classes(category: str, root: str | os.PathLike | None = None) -> int:
    """K + 1: the segmentor's class count (background included)."""
    return int(read_info(category, root)["filtered_component_histogram"].shape[1]) + 1


def check_layout(category: str, root: str | os.PathLike | None = None,
                 stems: list[str] | None = None, check_values: bool = True) -> list[str]:
    """Verify a complete layout; returns the sorted stems. One-line LayoutError naming the first problem.

    stems: the expected training-image stems (e.g. from the dataset reader); default: the folders present.
    check_values: also read every label map and check its ids against K (reads all PNGs).
    """
    base = masks_dir(category, root)
    found = list_stems(category, root)
    stems = sorted(stems) if stems is not None else found
    if not stems:
        raise LayoutError(f"no per-image folders in {base} (re-run pseudo_label.py)")
    for stem in stems:
        for name in PER_IMAGE_FILES:
            if not (base / stem / name).is_file():
                raise LayoutError(f"pseudo-label file missing: {base / stem / name} (re-run pseudo_label.py for "
                                  f"{category}, or re-extract {PUBLISHED_LABELS})")
    info = read_info(category, root)
    hist, idx = info["filtered_component_histogram"], info["filtered_histogram_indices"]
    n = len(stems)
    if hist.ndim != 2 or hist.shape[0] != n:
        raise LayoutError(f"{base / INFO / CLASS_HIST} has shape {hist.shape}, expected ({n}, K) for {n} training "
                          "images; the labels belong to another image set, re-run pseudo_label.py")
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
        raise LayoutError(f"{base / INFO / GOOD_INDICES} holds indices outside 0..{n - 1} (or none); re-run "
                          "pseudo_label.py")
    if check_values:
        k = hist.shape[1]
        for stem in stems:
            lab = read_label_map(category, stem, root)
            if lab.max() > k:
                raise LayoutError(f"{base / stem / LABEL_MAP} has class id {lab.max()} > K={k} of {CLASS_HIST}; "
                                  "re-run pseudo_label.py")
            for name in (REFINED, BACKGROUND):
                other = read_label_map(category, stem, root, name)
                if other.shape != lab.shape:
                    raise LayoutError(f"{base / stem / name} is {other.shape[1]}x{other.shape[0]} but {LABEL_MAP} is "
                                      f"{lab.shape[1]}x{lab.shape[0]}; re-run pseudo_label.py")
    return stems


# --- writers (atomic, never touch the dataset) -------------------------------------------------------------------

def write_png(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(arr)):
            raise OSError(f"cannot write {path}")


def write_background(path: Path, mask: np.ndarray) -> None:
    with atomic_path(path, suffix=".jpg") as tmp:
        if not cv2.imwrite(str(tmp), (mask > 0).astype(np.uint8) * 255):
            raise OSError(f"cannot write {path}")


def write_image_labels(category: str, stem: str, root: str | os.PathLike | None, *, label_map: np.ndarray,
                       refined: np.ndarray, all_masks: np.ndarray, grounding: np.ndarray,
                       background: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write the five per-image files (plus optional extra PNGs such as cluster_map.png)."""
    d = image_dir(category, stem, root)
    for name, arr in ((LABEL_MAP, label_map), (REFINED, refined), (ALL_MASKS, all_masks), (GROUNDING, grounding),
                      *((extra or {}).items())):
        if arr.max(initial=0) > 255:
            raise ValueError(f"{d / name}: id {arr.max()} does not fit a uint8 PNG (at most 255 instances)")
        write_png(d / name, arr.astype(np.uint8))
    write_background(d / BACKGROUND, background)
    return d


def write_info(category: str, root: str | os.PathLike | None, stems: list[str], *, good_indices: np.ndarray,
               class_hist: np.ndarray, extra: dict[str, np.ndarray] | None = None, text: str = "") -> Path:
    info_dir = masks_dir(category, root) / INFO
    atomic_save_npy(info_dir / GOOD_INDICES, np.sort(np.asarray(good_indices, dtype=np.int64)))
    atomic_save_npy(info_dir / CLASS_HIST, np.asarray(class_hist, dtype=np.float64))
    for name, arr in (extra or {}).items():
        atomic_save_npy(info_dir / (name if name.endswith(".npy") else name + ".npy"), arr)
    atomic_write_text(info_dir / STEMS_FILE, "\n".join(stems) + "\n")
    if text:
        atomic_write_text(info_dir / "info.txt", text)
    return info_dir


def instance_map(class_map: np.ndarray) -> np.ndarray:
    """Instance ids from a class map: 8-connected components of every class, numbered by area descending
    (ties by class id, then by position) so the numbering is deterministic. At most 255 instances."""
    comps: list[tuple[int, int, int, np.ndarray]] = []
    for c in np.unique(class_map):
        if c == 0:
            continue
        n, lab, stats, _ = cv2.connectedComponentsWithStats((class_map == c).astype(np.uint8), connectivity=8)
        for j in range(1, n):
            comps.append((-int(stats[j, cv2.CC_STAT_AREA]), int(c), j, lab))
    comps.sort(key=lambda t: t[:3])
    out = np.zeros(class_map.shape, np.uint8)
    for i, (_, _, j, lab) in enumerate(comps[:255], start=1):
        out[lab == j] = i
    return out


def class_histogram(class_maps: list[np.ndarray], k: int) -> np.ndarray:
    """(N, K) area fraction of classes 1..K per map (bincount, no loop over pixels)."""
    out = np.zeros((len(class_maps), k), np.float64)
    for i, m in enumerate(class_maps):
        counts = np.bincount(m.ravel(), minlength=k + 1)[: k + 1]
        out[i] = counts[1:] / m.size
    return out


def component_maps_dir(data_root: str | os.PathLike, category: str) -> Path:
    return Path(data_root) / category / "component_maps" / "train" / "good"


def write_from_component_maps(data_root: str | os.PathLike, category: str,
                              masks_root: str | os.PathLike | None = None, *, num_classes: int | None = None,
                              good_fraction: float = 1.0, overwrite: bool = False) -> Path:
    """True labels -> the stage-1 layout, so the segmentor can be trained and tested on exact components.

    Reads <data_root>/<category>/component_maps/train/good/<stem>.png (uint8 class ids 0..K, written by
    dataset_readers.synthetic_loco.generate(..., component_maps=True)). Every instance file gets the connected
    components of the class map; background.jpg is class 0. good_fraction < 1 keeps the first fraction of the
    sorted images as the supervised set (1.0: all images are "good", they are true labels).
    Returns the category's masks folder.
    """
    src = component_maps_dir(data_root, category)
    if not src.is_dir():
        raise LayoutError(f"component maps not found: {src} (generate the dataset with "
                          "dataset_readers.synthetic_loco.generate(..., component_maps=True))")
    files = sorted(p for p in src.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
    if not files:
        raise LayoutError(f"no component maps (*.png) in {src}")
    train_dir = Path(data_root) / category / "train" / "good"
    out = masks_dir(category, masks_root)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LayoutError(f"{out} already exists; delete it or pass overwrite=True (--overwrite) to rewrite it")
    maps = []
    for f in files:
        m = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if m is None or m.ndim != 2:
            raise LayoutError(f"cannot read {f} as a single-channel class-id PNG; regenerate the dataset")
        img = next(iter(sorted(train_dir.glob(f.stem + ".*"))), None) if train_dir.is_dir() else None
        if img is not None:
            from dataset_readers import image_size

            w, h = image_size(img)
            if (w, h) != (m.shape[1], m.shape[0]):
                raise LayoutError(f"component map {f} is {m.shape[1]}x{m.shape[0]} but {img} is {w}x{h}; "
                                  "regenerate the dataset")
        maps.append(m.astype(np.uint8))
    k = int(num_classes) if num_classes is not None else int(max(m.max() for m in maps))
    if k < 1:
        raise LayoutError(f"the component maps in {src} contain only background (class 0); nothing to learn")
    stems = [f.stem for f in files]
    for stem, m in zip(stems, maps):
        inst = instance_map(m)
        write_image_labels(category, stem, masks_root, label_map=m, refined=inst, all_masks=inst, grounding=inst,
                           background=m == 0)
    hist = class_histogram(maps, k)
    n_good = max(1, int(round(good_fraction * len(stems))))
    write_info(category, masks_root, stems, good_indices=np.arange(n_good), class_hist=hist,
               extra={RAW_HIST: hist},
               text=f"source: true component maps {src}\nimages: {len(stems)}\nK: {k}\n")
    log.info("%s: wrote true-component labels for %d images (K=%d) to %s", category, len(stems), k, out)
    return out
