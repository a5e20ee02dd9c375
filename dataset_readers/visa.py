"""VisA through the official 1cls split CSV (columns object, split, label, image, mask)."""
from __future__ import annotations

import csv
from pathlib import Path

from .base import GOOD, CategoryData, DatasetError, Sample, image_size

VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                   "pcb3", "pcb4", "pipe_fryum")


def read_visa(root: Path, category: str, dataset: str = "visa", check_sizes: bool = True) -> CategoryData:
    root = Path(root)
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file not found: {csv_path} (download split_csv/1cls.csv from amazon-science/spot-diff)")
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(f"{csv_path} lacks the column(s) {sorted(missing)}; download split_csv/1cls.csv "
                                   "again from amazon-science/spot-diff")
            rows = [r for r in reader if r["object"] == category]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {csv_path} ({exc}); download split_csv/1cls.csv again") from None
    if not rows:
        raise DatasetError(f"category '{category}' has no rows in {csv_path}")
    train, test = [], []
    for r in sorted(rows, key=lambda r: (r["split"], r["label"] != "normal", r["image"])):
        img = root / r["image"]
        if not img.is_file():
            raise DatasetError(f"image listed in {csv_path} not found: {img}")
        if r["split"] == "train":
            if r["label"] == "normal":
                train.append(Sample(str(img), "train"))
            continue
        if r["label"] == "normal":
            test.append(Sample(str(img), "test"))
        else:
            mask = root / r["mask"]
            if not mask.is_file():
                raise DatasetError(f"mask listed in {csv_path} not found: {mask}")
            if check_sizes and image_size(mask) != image_size(img):
                raise DatasetError(f"mask {mask} is {image_size(mask)} but image {img} is {image_size(img)}")
            test.append(Sample(str(img), "test", "anomaly", (str(mask),)))
    test.sort(key=lambda s: (s.defect_type, s.path))
    return CategoryData(dataset, category, root / category, train, [], test)
