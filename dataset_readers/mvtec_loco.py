"""MVTec LOCO AD layout (also used by the built-in synthetic dataset)."""
from __future__ import annotations

import json
from pathlib import Path

from .base import GOOD, CategoryData, DatasetError, Ignored, Sample, image_size, require_dir, take_images

LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
TEST_TYPES = (GOOD, "logical_anomalies", "structural_anomalies")


def read_defects_config(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"defects_config.json not found: {path} (every MVTec LOCO category ships one)")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot parse {path}: {exc}; restore the file from the dataset archive") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc.strerror}); fix its permissions") from None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path} must be a non-empty JSON list of defect entries; restore it from the dataset archive")
    for e in entries:
        if not isinstance(e, dict):
            raise DatasetError(f"{path}: entry {e!r} is not a JSON object; restore the file from the dataset archive")
        missing = {"defect_name", "pixel_value", "saturation_threshold", "relative_saturation"} - set(e)
        if missing:
            raise DatasetError(f"{path}: entry {e} lacks {sorted(missing)}")
        try:
            value, threshold = int(e["pixel_value"]), float(e["saturation_threshold"])
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: entry {e} has a non-numeric pixel_value or saturation_threshold") from None
        if not 1 <= value <= 255:
            raise DatasetError(f"{path}: pixel_value {e['pixel_value']} outside 1..255")
        if e["relative_saturation"] and not 0.0 < threshold <= 1.0:
            raise DatasetError(f"{path}: relative saturation_threshold {e['saturation_threshold']} outside (0, 1]")
    return entries


def read_mvtec_loco(root: Path, category: str, dataset: str = "mvtec_loco", check_sizes: bool = True) -> CategoryData:
    """Takes train/good, validation/good and test/{good, logical_anomalies, structural_anomalies}, numbered images
    only (NNN.png); anything else inside those splits is listed in CategoryData.extra["ignored"]."""
    cat_dir = require_dir(Path(root) / category, f"category folder '{category}'")
    ignored = Ignored(cat_dir)

    def split(name: str) -> list[Sample]:
        folder = require_dir(cat_dir / name / GOOD, f"split {name}/good")
        ignored.extra_entries(cat_dir / name, {GOOD})
        return [Sample(str(p), name) for p in take_images(folder, ignored, numbered=True)]

    train, validation = split("train"), split("validation")
    ignored.extra_entries(cat_dir / "test", set(TEST_TYPES))
    test: list[Sample] = []
    for defect in TEST_TYPES:
        folder = cat_dir / "test" / defect
        if not folder.is_dir():
            if defect == GOOD:
                require_dir(folder, "split test/good")
            continue
        for p in take_images(folder, ignored, numbered=True):
            masks: tuple[str, ...] = ()
            if defect != GOOD:
                gt_dir = require_dir(cat_dir / "ground_truth" / defect / p.stem, "ground-truth folder")
                masks = tuple(str(m) for m in sorted(gt_dir.glob("*.png")))
                if not masks:
                    raise DatasetError(f"no ground-truth PNG in {gt_dir}")
                if check_sizes:
                    size = image_size(p)
                    for m in masks:
                        if image_size(m) != size:
                            raise DatasetError(f"mask {m} is {image_size(m)} but image {p} is {size}; masks must have the image's size")
            test.append(Sample(str(p), "test", defect, masks))
    return CategoryData(dataset, category, cat_dir, train, validation, test,
                        defects_config=read_defects_config(cat_dir / "defects_config.json"),
                        extra={"ignored": ignored.items})
