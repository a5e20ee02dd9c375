"""MVTec AD layout, shared by MPDD, WFDD, MAD-man, MAD-sys and CAD-SD (or any folder laid out alike)."""
from __future__ import annotations

from pathlib import Path

from .base import GOOD, CategoryData, DatasetError, Ignored, Sample, image_size, require_dir, take_images

MVTEC_AD_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                       "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
WFDD_CATEGORIES = ("grey_cloth", "grid_cloth", "yellow_cloth", "pink_flower")
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")


def _find_mask(gt_dir: Path, stem: str) -> Path:
    for cand in (gt_dir / f"{stem}_mask.png", gt_dir / f"{stem}.png"):
        if cand.is_file():
            return cand
    raise DatasetError(f"no ground-truth mask for test image '{stem}' in {gt_dir} (expected {stem}_mask.png)")


def read_mvtec_ad(root: Path, category: str, *, dataset: str = "mvtec_ad", require_train: bool = True,
                  check_sizes: bool = True, require_masks: bool = True, numbered: bool = False) -> CategoryData:
    """require_masks=False: a defect type without a ground_truth/<defect> folder gets no masks (image-level data
    such as CAD-SD); a folder that exists must still hold every mask. numbered: take only all-digit image stems
    (MVTec AD's 000.png). Entries the layout does not name go to CategoryData.extra["ignored"]."""
    cat_dir = require_dir(Path(root) / category, f"category folder '{category}'")
    ignored = Ignored(cat_dir)
    train_dir = cat_dir / "train" / GOOD
    if require_train:
        require_dir(train_dir, "split train/good")
    ignored.extra_entries(cat_dir / "train", {GOOD})
    train = [Sample(str(p), "train") for p in take_images(train_dir, ignored, numbered)] if train_dir.is_dir() else []
    test_root = require_dir(cat_dir / "test", "split test")
    test_dirs = sorted(d for d in test_root.iterdir() if d.is_dir())
    ignored.extra_entries(test_root, {d.name for d in test_dirs})
    test: list[Sample] = []
    for defect_dir in (d for d in test_dirs if not d.name.startswith(".")):
        defect = defect_dir.name
        for p in take_images(defect_dir, ignored, numbered):
            masks: tuple[str, ...] = ()
            if defect != GOOD and (require_masks or (cat_dir / "ground_truth" / defect).is_dir()):
                m = _find_mask(cat_dir / "ground_truth" / defect, p.stem)
                if check_sizes and image_size(m) != image_size(p):
                    raise DatasetError(f"mask {m} is {image_size(m)} but image {p} is {image_size(p)}; masks must have the image's size")
                masks = (str(m),)
            test.append(Sample(str(p), "test", defect, masks))
    val_dir = cat_dir / "validation" / GOOD
    ignored.extra_entries(cat_dir / "validation", {GOOD})
    validation = [Sample(str(p), "validation") for p in take_images(val_dir, ignored, numbered)] if val_dir.is_dir() else []
    return CategoryData(dataset, category, cat_dir, train, validation, test, extra={"ignored": ignored.items})
