"""Our readers against the official codes' readings of the same files (tiny layouts generated here).

Each `official_*` function below re-implements one official loader's listing rule (the file it mirrors is named
with it). Where the official order comes from os.listdir or glob (arbitrary on Linux), the reference uses sorted
order, which is what the authors' platforms returned; docs/datasets.md lists where our order differs and why.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.cli import REPO_ROOT, SHARED_DIR
from dataset_readers import read_category
from dataset_readers.base import GOOD

# The official split file: the copy beside the checkout, else the one a VisA download puts in datasets/ (README).
VISA_CSV = next((p for p in (SHARED_DIR / "data" / "visa_split" / "1cls.csv",
                             REPO_ROOT / "datasets" / "VisA_20220922" / "split_csv" / "1cls.csv") if p.is_file()),
                SHARED_DIR / "data" / "visa_split" / "1cls.csv")
SIZE = (6, 4)  # W x H of every generated image and mask


def _bytes(fmt: str, value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("L" if fmt == "PNG" else "RGB", SIZE, value).save(buf, fmt)
    return buf.getvalue()


JPG, PNG, MASK = _bytes("JPEG", 90), _bytes("PNG", 90), _bytes("PNG", 255)


def _touch(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _paths(samples) -> list[str]:
    return [s.path for s in samples]


# ------------------------------------------------------------------------------------------------ VisA
def official_visa(root: Path, category: str) -> dict:
    """GLASS datasets/visa.py VisADataset.get_image_data: rows of the CSV in file order; train = split train,
    label normal; test = sorted label keys ('anomaly' < 'normal'), each in CSV order; the masks of the anomaly
    images are the mask column of the rows with that object and label anomaly, paired by position."""
    with open(root / "split_csv" / "1cls.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pick = lambda split, label: [str(root / r["image"]) for r in rows  # noqa: E731
                                 if r["object"] == category and r["split"] == split and r["label"] == label]
    masks = [str(root / r["mask"]) for r in rows if r["object"] == category and r["label"] == "anomaly"]
    anomalies = pick("test", "anomaly")
    return {"train": pick("train", "normal"), "test_normal": pick("test", "normal"), "test_anomaly": anomalies,
            "mask_of": dict(zip(anomalies, masks))}


def _make_visa(root: Path, csv_text: str, categories: tuple[str, ...]) -> None:
    _touch(root / "split_csv" / "1cls.csv", csv_text.encode())
    for r in csv.DictReader(io.StringIO(csv_text)):
        if r["object"] in categories:
            _touch(root / r["image"], JPG)
            if r["mask"]:
                _touch(root / r["mask"], MASK)


def _check_visa(root: Path, category: str) -> tuple[int, int, int]:
    ref = official_visa(root, category)
    data = read_category("visa", category, root)
    normal = [s for s in data.test if s.defect_type == GOOD]
    anomaly = [s for s in data.test if s.defect_type != GOOD]
    # the same lists as the official reader, each sorted (official: CSV order)
    assert _paths(data.train) == sorted(ref["train"])
    assert _paths(normal) == sorted(ref["test_normal"])
    assert _paths(anomaly) == sorted(ref["test_anomaly"])
    assert data.validation == []
    # anomalies first, then normals: the official label order ('anomaly' < 'normal')
    assert [s.defect_type != GOOD for s in data.test] == [True] * len(anomaly) + [False] * len(normal)
    # every anomaly carries exactly its official mask; normal images carry none
    assert {s.path: s.mask_paths for s in anomaly} == {k: (v,) for k, v in ref["mask_of"].items()}
    assert all(s.mask_paths == () for s in normal)
    return len(data.train), len(normal), len(anomaly)


def test_visa_reader_on_a_generated_split_csv(tmp_path):
    """Same format as the official 1cls.csv, rows deliberately out of order and two classes interleaved."""
    rows = ["object,split,label,image,mask"]
    order = [3, 0, 7, 5, 1, 6, 2, 4]
    for i in order:
        rows.append(f"candle,train,normal,candle/Data/Images/Normal/{i:04d}.JPG,")
        rows.append(f"capsules,train,normal,capsules/Data/Images/Normal/{i:03d}.JPG,")
    for i in (12, 10, 11):
        rows.append(f"candle,test,normal,candle/Data/Images/Normal/{i:04d}.JPG,")
    for i in (2, 0, 1, 3):
        rows.append(f"candle,test,anomaly,candle/Data/Images/Anomaly/{i:03d}.JPG,candle/Data/Masks/Anomaly/{i:03d}.png")
    _make_visa(tmp_path, "\n".join(rows) + "\n", ("candle", "capsules"))
    assert _check_visa(tmp_path, "candle") == (8, 3, 4)
    assert _check_visa(tmp_path, "capsules") == (8, 0, 0)


OFFICIAL_VISA_COUNTS = {"candle": (900, 100, 100), "capsules": (542, 60, 100), "cashew": (450, 50, 100),
                        "chewinggum": (453, 50, 100), "fryum": (450, 50, 100), "macaroni1": (900, 100, 100),
                        "macaroni2": (900, 100, 100), "pcb1": (904, 100, 100), "pcb2": (901, 100, 100),
                        "pcb3": (905, 101, 100), "pcb4": (904, 101, 100), "pipe_fryum": (450, 50, 100)}


@pytest.mark.skipif(not VISA_CSV.is_file(), reason=f"official VisA split file missing: {VISA_CSV} (set AD_SHARED_DIR, or download "
                           "split_csv/1cls.csv into datasets/VisA_20220922/ as the README shows)")
def test_visa_reader_on_the_official_1cls_csv(tmp_path):
    text = VISA_CSV.read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 10821
    counts = Counter((r["object"], r["split"], r["label"]) for r in rows)
    for cat, (n_train, n_normal, n_anomaly) in OFFICIAL_VISA_COUNTS.items():
        assert (counts[cat, "train", "normal"], counts[cat, "test", "normal"], counts[cat, "test", "anomaly"]) == \
            (n_train, n_normal, n_anomaly), cat
    assert sum(counts.values()) == sum(map(sum, OFFICIAL_VISA_COUNTS.values()))  # no other kind of row
    _make_visa(tmp_path, text, ("candle", "capsules"))
    assert _check_visa(tmp_path, "candle") == OFFICIAL_VISA_COUNTS["candle"]
    assert _check_visa(tmp_path, "capsules") == OFFICIAL_VISA_COUNTS["capsules"]


# ------------------------------------------------------------------------------------------------ MVTec AD layout
def official_mvtec(cat_dir: Path, split: str) -> list[tuple[str, str, str | None]]:
    """patchcore-inspection src/patchcore/datasets/mvtec.py and GLASS datasets/mvtec.py (MVTecDataset, used for
    MVTec AD, MPDD, WFDD and MAD): defect folders from os.listdir, iterated in sorted order; files sorted(os.listdir);
    masks sorted(os.listdir(ground_truth/<defect>)) paired by position (masks[i] for image i, as the official
    `data_to_iterate` loop does). Returns (defect, image, mask)."""
    out = []
    classpath = cat_dir / split
    for anomaly in sorted(os.listdir(classpath)):
        files = [str(classpath / anomaly / x) for x in sorted(os.listdir(classpath / anomaly))]
        masks = [None] * len(files)
        if split == "test" and anomaly != "good":
            masks = [str(cat_dir / "ground_truth" / anomaly / x)
                     for x in sorted(os.listdir(cat_dir / "ground_truth" / anomaly))]
        out += [(anomaly, f, masks[i]) for i, f in enumerate(files)]
    return out


def _make_mvtec(cat_dir: Path, defects: dict[str, int], n_train: int = 5, n_good: int = 3) -> None:
    for i in range(n_train):
        _touch(cat_dir / "train" / "good" / f"{i:03d}.png", PNG)
    for i in range(n_good):
        _touch(cat_dir / "test" / "good" / f"{i:03d}.png", PNG)
    for defect, n in defects.items():
        for i in range(n):
            _touch(cat_dir / "test" / defect / f"{i:03d}.png", PNG)
            _touch(cat_dir / "ground_truth" / defect / f"{i:03d}_mask.png", MASK)


@pytest.mark.parametrize("dataset,category", [("mvtec_ad", "bottle"), ("mpdd", "tubes"), ("wfdd", "grey_cloth")])
def test_mvtec_layout_readers_equal_the_official_mvtec_dataset(tmp_path, dataset, category):
    # 'good' sorts between the defect types here, as in MVTec AD's bottle (broken_large, broken_small, contamination)
    defects = {"scratch": 4, "broken_large": 2, "hole": 11}  # 11: file names 000..010 (string order = numeric)
    _make_mvtec(tmp_path / category, defects)
    data = read_category(dataset, category, tmp_path)
    ref_test = official_mvtec(tmp_path / category, "test")
    assert [(s.defect_type, s.path, s.mask_paths[0] if s.mask_paths else None) for s in data.test] == ref_test
    assert _paths(data.train) == [f for _, f, _ in official_mvtec(tmp_path / category, "train")]
    assert [d for d, _, _ in ref_test][:2] == ["broken_large", "broken_large"] and len(ref_test) == 3 + 17
    # masks are paired by name (<stem>_mask.png) here and by sorted position officially: equal on these names
    assert all(Path(s.mask_paths[0]).name == Path(s.path).stem + "_mask.png" for s in data.test if s.mask_paths)


def test_mvtec_layout_where_the_official_pairing_by_position_breaks(tmp_path):
    """The official reader pairs masks by position: an extra file in ground_truth/<defect> silently shifts the
    masks of the later images, a missing mask crashes it (IndexError). Ours pairs by name: the right mask, or a
    one-line error naming the missing one."""
    from dataset_readers import DatasetError

    cat = tmp_path / "bottle"
    _make_mvtec(cat, {"crack": 3})
    _touch(cat / "ground_truth" / "crack" / "000_mask_old.png", MASK)  # a stray extra mask
    ref = [(Path(f).name, Path(m).name) for d, f, m in official_mvtec(cat, "test") if d == "crack"]
    assert ref == [("000.png", "000_mask.png"), ("001.png", "000_mask_old.png"), ("002.png", "001_mask.png")]
    ours = [(Path(s.path).name, Path(s.mask_paths[0]).name) for s in read_category("mvtec_ad", "bottle", tmp_path).test
            if s.defect_type == "crack"]
    assert ours == [("000.png", "000_mask.png"), ("001.png", "001_mask.png"), ("002.png", "002_mask.png")]
    (cat / "ground_truth" / "crack" / "001_mask.png").unlink()
    (cat / "ground_truth" / "crack" / "000_mask_old.png").unlink()
    with pytest.raises(IndexError):
        official_mvtec(cat, "test")
    with pytest.raises(DatasetError, match="001"):
        read_category("mvtec_ad", "bottle", tmp_path)


# ------------------------------------------------------------------------------------------------ MVTec LOCO
def official_sinbad_loco(cat_dir: Path) -> dict[str, list[str]]:
    """SINBAD load_mvtec_loco.py: torchvision ImageFolder per split (classes sorted: good, logical_anomalies,
    structural_anomalies; files sorted inside each class); the `_loco` test set is test/good + logical, `_struct`
    test/good + structural."""
    def folder(split: str, classes: list[str]) -> list[str]:
        return [str(cat_dir / split / c / f) for c in sorted(classes) for f in sorted(os.listdir(cat_dir / split / c))]

    return {"train": folder("train", ["good"]), "validation": folder("validation", ["good"]),
            "loco": folder("test", ["good", "logical_anomalies"]),
            "struct": folder("test", ["good", "structural_anomalies"])}


def official_csad_loco(cat_dir: Path) -> list[tuple[str, str, str | None]]:
    """CSAD data_loader.py MVTecLOCODataset (phase test): defect folders in os.listdir order; good images in glob
    order (not sorted); anomaly images sorted, paired by position with the sorted ground_truth/<type>/* folders.
    The os.listdir / glob orders are replaced by sorted order here (the authors' Windows order)."""
    out = []
    for defect in sorted(os.listdir(cat_dir / "test")):
        imgs = sorted(str(p) for p in (cat_dir / "test" / defect).glob("*.png"))
        if defect == "good":
            out += [(defect, p, None) for p in imgs]
            continue
        gts = sorted(str(g) for g in (cat_dir / "ground_truth" / defect).glob("*") if g.is_dir())
        out += list(zip([defect] * len(imgs), imgs, gts))
    return out


def _make_loco(cat_dir: Path) -> None:
    for split, n in (("train", 6), ("validation", 3)):
        for i in range(n):
            _touch(cat_dir / split / "good" / f"{i:03d}.png", PNG)
    for defect, n in (("good", 4), ("logical_anomalies", 3), ("structural_anomalies", 2)):
        for i in range(n):
            _touch(cat_dir / "test" / defect / f"{i:03d}.png", PNG)
            if defect != "good":
                for j in range(1 + i % 2):  # one or two defect PNGs per image
                    _touch(cat_dir / "ground_truth" / defect / f"{i:03d}" / f"{j:03d}.png", MASK)
    (cat_dir / "defects_config.json").write_text(json.dumps(
        [{"defect_name": "d", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True}]))


def test_loco_reader_equals_sinbad_and_csad_readings(tmp_path):
    cat = tmp_path / "juice_bottle"
    _make_loco(cat)
    data = read_category("mvtec_loco", "juice_bottle", tmp_path)
    ref = official_sinbad_loco(cat)
    assert _paths(data.train) == ref["train"] and _paths(data.validation) == ref["validation"]
    groups = data.score_groups()
    assert _paths(groups["logi"]) == ref["loco"] and _paths(groups["struc"]) == ref["struct"]
    assert _paths(groups["val"]) == ref["validation"]
    # CSAD: the same (image, ground-truth folder) pairs; our masks are the PNGs inside that folder, sorted
    csad = official_csad_loco(cat)
    assert [(s.defect_type, s.path) for s in data.test] == [(d, p) for d, p, _ in csad]
    for s, (_, _, gt) in zip(data.test, csad):
        want = () if gt is None else tuple(sorted(str(m) for m in Path(gt).glob("*.png")))
        assert s.mask_paths == want
    assert [len(s.mask_paths) for s in data.test if s.defect_type != GOOD] == [1, 2, 1, 1, 2]


def test_real_juice_bottle_subset_matches_the_official_readings(juice_root):
    cat = juice_root / "juice_bottle"
    data = read_category("mvtec_loco", "juice_bottle", juice_root)
    ref = official_sinbad_loco_subset(cat)
    assert (len(data.train), len(data.validation)) == (335, 27)
    assert _paths(data.train) == ref["train"] and _paths(data.validation) == ref["validation"]
    assert _paths(data.score_groups()["logi"]) == ref["loco"]
    csad = official_csad_loco(cat)
    assert [(s.defect_type, s.path) for s in data.test] == [(d, p) for d, p, _ in csad]
    assert all(Path(s.mask_paths[0]).parent == Path(gt) for s, (_, _, gt) in zip(data.test, csad) if gt)


def official_sinbad_loco_subset(cat_dir: Path) -> dict[str, list[str]]:
    """official_sinbad_loco for a copy without test/structural_anomalies (the shared subset)."""
    def folder(split: str, classes: list[str]) -> list[str]:
        return [str(cat_dir / split / c / f) for c in sorted(classes) for f in sorted(os.listdir(cat_dir / split / c))
                if f.endswith(".png")]

    return {"train": folder("train", ["good"]), "validation": folder("validation", ["good"]),
            "loco": folder("test", ["good", "logical_anomalies"])}


def test_generated_images_are_real_images():
    # the fixtures above must be decodable files of the stated size, or the readers' size checks prove nothing
    for data in (JPG, PNG, MASK):
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == SIZE
    assert np.asarray(Image.open(io.BytesIO(MASK))).max() == 255
