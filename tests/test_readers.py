"""Dataset readers: the real juice_bottle subset, tiny MVTec AD / VisA / LOCO layouts, and every error path."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_readers import (DatasetError, list_categories, load_image, load_mask, load_sample_masks, read_category,
                             union_mask)
from dataset_readers.mvtec_ad import read_mvtec_ad
from dataset_readers.mvtec_loco import read_mvtec_loco
from dataset_readers.visa import read_visa


def _png(path: Path, size=(16, 12), value: int | None = None, seed: int = 0) -> Path:
    """A small RGB image (or an L mask with one positive value) at `size` = (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)
    else:
        arr = np.zeros((size[1], size[0]), np.uint8)
        arr[2:6, 3:9] = value
        Image.fromarray(arr, mode="L").save(path)
    return path


def _loco(root: Path, category: str = "toy", mask_size=(16, 12), with_validation: bool = True) -> Path:
    """A tiny LOCO category: 3 train, 2 validation, 2 good, 2 logical (the second with two masks), 1 structural."""
    cat = root / category
    for i in range(3):
        _png(cat / "train" / "good" / f"{i:03d}.png", seed=i)
    if with_validation:
        for i in range(2):
            _png(cat / "validation" / "good" / f"{i:03d}.png", seed=10 + i)
    for i in range(2):
        _png(cat / "test" / "good" / f"{i:03d}.png", seed=20 + i)
    for i, n_masks in enumerate((1, 2)):
        _png(cat / "test" / "logical_anomalies" / f"{i:03d}.png", seed=30 + i)
        for k in range(n_masks):
            _png(cat / "ground_truth" / "logical_anomalies" / f"{i:03d}" / f"{k:03d}.png", mask_size, value=255 - k)
    _png(cat / "test" / "structural_anomalies" / "000.png", seed=40)
    _png(cat / "ground_truth" / "structural_anomalies" / "000" / "000.png", mask_size, value=200)
    (cat / "defects_config.json").write_text(json.dumps([
        {"defect_name": "a", "pixel_value": 255, "saturation_threshold": 30, "relative_saturation": False},
        {"defect_name": "b", "pixel_value": 254, "saturation_threshold": 1.0, "relative_saturation": True},
        {"defect_name": "c", "pixel_value": 200, "saturation_threshold": 0.5, "relative_saturation": True}]))
    return root


# ------------------------------------------------------------------------------------ real juice_bottle subset
def test_loco_reader_on_real_juice_bottle(juice_root):
    data = read_category("mvtec_loco", "juice_bottle", juice_root)
    assert data.is_loco and data.category == "juice_bottle"
    assert (len(data.train), len(data.validation)) == (335, 27)
    good = [s for s in data.test if s.defect_type == "good"]
    logical = [s for s in data.test if s.defect_type == "logical_anomalies"]
    assert (len(good), len(logical), len(data.test)) == (27, 142, 169)
    # one defined order: each split sorted, test = good then logical
    for split in (data.train, data.validation, good, logical):
        assert [s.path for s in split] == sorted(s.path for s in split)
    assert data.test == good + logical
    assert [Path(s.path).name for s in data.train[:3]] == ["000.png", "001.png", "002.png"]
    assert {s.split for s in data.train} == {"train"} and {s.split for s in data.test} == {"test"}
    assert [s.label for s in data.test] == [0] * 27 + [1] * 142
    # masks: none for good images, at least one existing PNG for every anomaly, named after the image stem
    assert all(not s.mask_paths for s in good + data.train + data.validation)
    for s in logical:
        assert s.mask_paths and all(Path(m).is_file() and Path(m).parent.name == s.stem for m in s.mask_paths)
    masks = load_sample_masks(logical[0])
    assert masks[0].shape == (640, 320) and masks[0].dtype == np.uint8 and masks[0].max() == 255
    assert union_mask(logical[5]).any() and not union_mask(good[0]).any()
    assert union_mask(good[0]).shape == (640, 320)
    groups = data.score_groups()
    assert set(groups) == {"logi", "val"}  # no structural split in this subset
    assert len(groups["logi"]) == 169 and groups["logi"][:27] == good and len(groups["val"]) == 27
    assert data.defects_config == [{"defect_name": "logical_anomaly", "pixel_value": 255,
                                    "saturation_threshold": 1.0, "relative_saturation": True}]


# ------------------------------------------------------------------------------------------- tiny layouts
def test_loco_reader_tiny_layout_several_masks(tmp_path):
    data = read_category("mvtec_loco", "juice_bottle", _loco(tmp_path, "juice_bottle"))
    assert [s.defect_type for s in data.test] == ["good", "good", "logical_anomalies", "logical_anomalies",
                                                  "structural_anomalies"]
    assert [len(s.mask_paths) for s in data.test] == [0, 0, 1, 2, 1]
    two = load_sample_masks(data.test[3])
    assert [np.unique(m).tolist() for m in two] == [[0, 255], [0, 254]]
    groups = data.score_groups()
    assert [len(groups[k]) for k in ("logi", "struc", "val")] == [4, 3, 2]
    assert groups["struc"][-1].defect_type == "structural_anomalies"


def test_mvtec_ad_reader_tiny_layout(tmp_path):
    cat = tmp_path / "bottle"
    for i in (2, 0, 1):  # created out of order: the reader must sort
        _png(cat / "train" / "good" / f"{i:03d}.png", seed=i)
    _png(cat / "test" / "good" / "000.png", seed=5)
    for defect in ("contamination", "broken_large"):
        for i in range(2):
            _png(cat / "test" / defect / f"{i:03d}.png", seed=6 + i)
            _png(cat / "ground_truth" / defect / f"{i:03d}_mask.png", value=255)
    data = read_category("mvtec_ad", "bottle", tmp_path)
    assert not data.is_loco and [Path(s.path).name for s in data.train] == ["000.png", "001.png", "002.png"]
    assert [s.defect_type for s in data.test] == ["broken_large"] * 2 + ["contamination"] * 2 + ["good"]
    assert [s.label for s in data.test] == [1, 1, 1, 1, 0]
    assert data.test[1].mask_paths == (str(cat / "ground_truth" / "broken_large" / "001_mask.png"),)
    assert union_mask(data.test[0]).sum() == 24 and not union_mask(data.test[4]).any()
    assert set(data.score_groups()) == {"test"} and len(data.score_groups()["test"]) == 5
    # the generic folder dataset (CAD-SD, MPDD, ...) uses the same reader and discovers its categories
    assert list_categories("folder", tmp_path) == ["bottle"]
    assert read_category("folder", "bottle", tmp_path).test == data.test


def test_visa_reader_tiny_csv(tmp_path):
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/0002.JPG", ""),
            ("candle", "train", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
            ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/0001.JPG", "candle/Data/Masks/Anomaly/0001.png"),
            ("candle", "test", "normal", "candle/Data/Images/Normal/0003.JPG", ""),
            ("capsules", "train", "normal", "capsules/Data/Images/Normal/0001.JPG", "")]
    for obj, _split, label, image, mask in rows:
        _png(tmp_path / image)
        if mask:
            _png(tmp_path / mask, value=255)
    (tmp_path / "split_csv").mkdir()
    with open(tmp_path / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    data = read_category("visa", "candle", tmp_path)
    assert [Path(s.path).name for s in data.train] == ["0001.JPG", "0002.JPG"]
    assert [(s.defect_type, Path(s.path).name) for s in data.test] == [("anomaly", "0001.JPG"), ("good", "0003.JPG")]
    assert data.test[0].mask_paths == (str(tmp_path / "candle/Data/Masks/Anomaly/0001.png"),)
    assert data.validation == [] and set(data.score_groups()) == {"test"}


# ----------------------------------------------------------------------------------------------- errors
def test_missing_root_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere"):
        read_category("mvtec_ad", "bottle", missing)
    with pytest.raises(DatasetError, match="nowhere"):
        read_category("folder", "x", missing)


def test_missing_split_names_path(tmp_path):
    _loco(tmp_path, "juice_bottle", with_validation=False)
    with pytest.raises(DatasetError, match=r"validation/good.*") as exc:
        read_category("mvtec_loco", "juice_bottle", tmp_path)
    assert str(tmp_path / "juice_bottle" / "validation" / "good") in str(exc.value)
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="split test") as exc:
        read_category("mvtec_ad", "bottle", tmp_path)
    assert str(tmp_path / "bottle" / "test") in str(exc.value)


def test_missing_category_folder_and_unknown_category(tmp_path):
    (tmp_path / "screw").mkdir()
    with pytest.raises(DatasetError, match="choose from: .*breakfast_box"):
        read_category("mvtec_loco", "pizza", tmp_path)
    with pytest.raises(DatasetError) as exc:  # a known category whose folder is absent
        read_category("mvtec_ad", "bottle", tmp_path)
    assert str(tmp_path / "bottle") in str(exc.value)
    with pytest.raises(DatasetError, match="unknown dataset"):
        read_category("imagenet", "x", tmp_path)
    with pytest.raises(DatasetError, match="1cls.csv"):
        read_visa(tmp_path, "candle")


def test_corrupt_image_names_path(tmp_path):
    bad = tmp_path / "bottle" / "test" / "broken" / "000.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DatasetError, match="cannot read image") as exc:
        load_image(bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(DatasetError, match="not found"):
        load_image(tmp_path / "missing.png")
    # the reader itself hits the corrupt file when it checks the mask size
    _png(tmp_path / "bottle" / "train" / "good" / "000.png")
    _png(tmp_path / "bottle" / "ground_truth" / "broken" / "000_mask.png", value=255)
    with pytest.raises(DatasetError, match=str(bad).replace("\\", "\\\\")):
        read_mvtec_ad(tmp_path, "bottle")


def test_mask_of_wrong_size_names_path(tmp_path):
    _loco(tmp_path, "juice_bottle", mask_size=(8, 8))
    with pytest.raises(DatasetError, match="masks must have the image's size") as exc:
        read_category("mvtec_loco", "juice_bottle", tmp_path)
    assert str(tmp_path / "juice_bottle" / "ground_truth") in str(exc.value)
    # without the reader's check, loading the mask against its image still fails with its path
    data = read_mvtec_loco(tmp_path, "juice_bottle", check_sizes=False)
    with pytest.raises(DatasetError, match="000.png is 8x8 but its image is 16x12"):
        load_sample_masks(data.test[2])
    good = _png(tmp_path / "m.png", (16, 12), value=3)
    assert load_mask(good, (16, 12)).max() == 3
    # MVTec AD layout
    cat = tmp_path / "ad" / "bottle"
    _png(cat / "train" / "good" / "000.png")
    _png(cat / "test" / "crack" / "000.png")
    _png(cat / "ground_truth" / "crack" / "000_mask.png", (9, 9), value=255)
    with pytest.raises(DatasetError, match="000_mask.png"):
        read_category("mvtec_ad", "bottle", tmp_path / "ad")


def test_missing_mask_and_bad_defects_config(tmp_path):
    _loco(tmp_path, "juice_bottle")
    cfg = tmp_path / "juice_bottle" / "defects_config.json"
    cfg.write_text(json.dumps([{"defect_name": "a", "pixel_value": 300, "saturation_threshold": 1.0,
                                "relative_saturation": True}]))
    with pytest.raises(DatasetError, match="pixel_value 300"):
        read_category("mvtec_loco", "juice_bottle", tmp_path)
    cfg.unlink()
    with pytest.raises(DatasetError, match="defects_config.json not found"):
        read_category("mvtec_loco", "juice_bottle", tmp_path)
    cat = tmp_path / "ad" / "bottle"
    _png(cat / "train" / "good" / "000.png")
    _png(cat / "test" / "crack" / "003.png")
    (cat / "ground_truth" / "crack").mkdir(parents=True)
    with pytest.raises(DatasetError, match="003_mask.png"):
        read_category("mvtec_ad", "bottle", tmp_path / "ad")


def test_folder_dataset_without_masks_cad_sd_style(tmp_path):
    """CAD-SD laid out as MVTec AD has no ground_truth: the folder dataset reads it image-level, mvtec_ad refuses."""
    cat = tmp_path / "screw"
    for i in range(2):
        _png(cat / "train" / "good" / f"{i:03d}.png", seed=i)
    for defect in ("good", "over-coupling", "scratch"):
        _png(cat / "test" / defect / "000.png", seed=9)
    data = read_category("folder", "screw", tmp_path)
    assert [(s.defect_type, s.label, s.mask_paths) for s in data.test] == [
        ("good", 0, ()), ("over-coupling", 1, ()), ("scratch", 1, ())]
    with pytest.raises(DatasetError, match="000_mask.png"):
        read_mvtec_ad(tmp_path, "screw")
    # a ground_truth folder that exists must be complete, even for the folder dataset
    (cat / "ground_truth" / "scratch").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no ground-truth mask"):
        read_category("folder", "screw", tmp_path)
