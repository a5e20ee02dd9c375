"""The built-in synthetic LOCO dataset: layout, masks, defects_config, determinism, real anomalies, class maps."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dataset_readers import SYNTHETIC_CATEGORIES, DatasetError, load_image, load_sample_masks, read_category
from dataset_readers.synthetic_loco import BOX_KINDS, CLASS_NAMES, DEFECTS, FILLS, LOG, generate, main


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_readers_load_it(synthetic_root, category):
    data = read_category("synthetic_loco", category, synthetic_root)
    assert data.is_loco and data.dataset == "synthetic_loco"
    assert (len(data.train), len(data.validation), len(data.test)) == (24, 8, 24)
    assert [s.defect_type for s in data.test] == ["good"] * 8 + ["logical_anomalies"] * 8 + ["structural_anomalies"] * 8
    assert [Path(s.path).name for s in data.train[:2]] == ["000.png", "001.png"]
    groups = data.score_groups()
    assert [len(groups[k]) for k in ("logi", "struc", "val")] == [16, 16, 8]
    im = load_image(data.train[0].path)
    assert im.size == (128, 128) and im.mode == "RGB"
    # good images have no ground-truth folder
    assert not (data.root / "ground_truth" / "good").exists()
    assert sorted(p.name for p in (data.root / "ground_truth").iterdir()) == ["logical_anomalies", "structural_anomalies"]


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_masks_exactly_for_anomalies_and_config_covers_them(synthetic_root, category):
    data = read_category("synthetic_loco", category, synthetic_root)
    config = data.defects_config
    values = [e["pixel_value"] for e in config]
    assert len(set(values)) == len(values) == sum(len(v) for v in DEFECTS[category].values())
    assert {e["relative_saturation"] for e in config} == {True, False}  # both sPRO saturation kinds occur
    for e in config:
        if e["relative_saturation"]:
            assert 0 < e["saturation_threshold"] <= 1
        else:  # absolute thresholds are pixel counts between a dot and a label at 128 px
            assert isinstance(e["saturation_threshold"], int) and 10 <= e["saturation_threshold"] <= 0.1 * 128 * 128
    seen, n_masks = set(), []
    for s in data.test:
        masks = load_sample_masks(s)
        n_masks.append(len(masks))
        if s.label == 0:
            assert masks == []
            continue
        assert masks, s.path
        for m, path in zip(masks, s.mask_paths):
            positive = np.unique(m[m > 0])
            assert positive.size == 1, f"{path}: one positive value per defect PNG"
            assert int(positive[0]) in values
            seen.add(int(positive[0]))
            # logical defects cover a whole component region, visible at low resolution
            min_area = 0.002 if s.defect_type == "logical_anomalies" else 0.0003
            assert (m > 0).mean() >= min_area, path
    assert seen == set(values)  # every defect type of the config occurs
    assert max(n_masks) >= 2  # images with several defects exist


def test_deterministic_from_seed(tmp_path):
    kw = dict(size=48, n_train=2, n_val=1, n_test=4, categories=["synth_box"], component_maps=True)
    a, b, c = (generate(tmp_path / n, seed=s, **kw) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb and len(fa) > 20
    assert set(fa) == set(fc)  # the same layout ...
    images = [k for k in fa if k.endswith(".png") and "/ground_truth/" not in k]
    assert all(fa[k] != fc[k] for k in images if "component_maps" not in k)  # ... but other images


def _hue_hist(path: str) -> np.ndarray:
    """Hue histogram of the saturated pixels (lighting-insensitive), as a fraction of the image."""
    hsv = cv2.cvtColor(np.asarray(load_image(path)), cv2.COLOR_RGB2HSV).reshape(-1, 3)
    keep = (hsv[:, 1] >= 100) & (hsv[:, 2] >= 60)
    return np.bincount(hsv[keep, 0].astype(int) * 18 // 180, minlength=18) / len(hsv)


def test_colour_histogram_separates_logical_anomalies(tmp_path):
    """The logical anomalies are real: a trivial histogram distance beats chance by far.

    Measured (seeds 0-2, 64 and 128 px): box mean-histogram AUROC 0.84-0.93, nearest-histogram 0.91-0.96 (box),
    0.90-0.98 (bottle). The bottle's mean histogram mixes three allowed colour pairs, so only the nearest
    training histogram works there (AUROC ~0.5 with the mean).
    """
    root = generate(tmp_path, size=64, n_train=30, n_val=1, n_test=20, seed=0)
    for category in SYNTHETIC_CATEGORIES:
        data = read_category("synthetic_loco", category, root)
        train = np.stack([_hue_hist(s.path) for s in data.train])
        group = data.score_groups()["logi"]
        test = np.stack([_hue_hist(s.path) for s in group])
        labels = [s.label for s in group]
        nearest = np.abs(test[:, None] - train[None]).sum(-1).min(1)
        assert roc_auc_score(labels, nearest) > 0.8, category
        if category == "synth_box":
            assert roc_auc_score(labels, np.abs(test - train.mean(0)).sum(-1)) > 0.75


def test_component_maps(tmp_path):
    root = generate(tmp_path, size=96, n_train=4, n_val=2, n_test=5, seed=1, component_maps=True)
    for category in SYNTHETIC_CATEGORIES:
        data = read_category("synthetic_loco", category, root)
        info = json.loads((data.root / "synthetic_info.json").read_text())
        assert {int(k): v for k, v in info["class_names"].items()} == CLASS_NAMES[category]
        for s in data.train + data.validation + data.test:
            cmap_path = data.root / "component_maps" / s.split / s.defect_type / f"{s.stem}.png"
            cmap = cv2.imread(str(cmap_path), cv2.IMREAD_UNCHANGED)
            assert cmap.dtype == np.uint8 and cmap.shape == (96, 96), cmap_path
            assert set(np.unique(cmap)) <= set(CLASS_NAMES[category]), cmap_path
            if s.label == 0:
                assert set(np.unique(cmap)) == set(CLASS_NAMES[category]), cmap_path  # every kind present
        # the same id means the same kind in every image: its pixels have the kind's colour
        img = np.stack([np.asarray(load_image(s.path)) for s in data.train]).astype(float)
        maps = np.stack([cv2.imread(str(data.root / "component_maps/train/good" / f"{s.stem}.png"), 0)
                         for s in data.train])
        inner = np.stack([cv2.erode((m == c).astype(np.uint8), np.ones((3, 3))) > 0
                          for m in maps for c in range(5)]).reshape(len(maps), 5, 96, 96)
        if category == "synth_box":
            for kind, (cid, colour) in BOX_KINDS.items():
                mean = img[inner[:, cid]].mean(0)
                assert np.abs(mean - colour).max() < 30, (kind, mean)
        else:
            for i in range(len(maps)):  # the liquid has one of the allowed fill colours
                mean = img[i][inner[i, 2]].mean(0)
                assert min(np.abs(mean - np.array(f)).max() for f in FILLS) < 30, mean
            assert img[inner[:, 0]].mean() < img[inner[:, 1]].mean()  # glass is brighter than the background


def test_never_overwrites_and_force(tmp_path, caplog):
    kw = dict(size=40, n_train=2, n_val=1, n_test=2, categories=["synth_bottle"])
    caplog.set_level(logging.INFO, logger=LOG.name)
    generate(tmp_path, **kw)
    img = tmp_path / "synth_bottle" / "train" / "good" / "000.png"
    before = img.stat().st_mtime_ns
    generate(tmp_path, **kw)  # complete: skipped
    assert img.stat().st_mtime_ns == before
    assert "exists and is complete, skipping" in caplog.text
    # asking for component maps later adds them (same images) instead of failing or rewriting the images
    generate(tmp_path, component_maps=True, **kw)
    assert img.stat().st_mtime_ns == before
    maps = tmp_path / "synth_bottle" / "component_maps"
    reference = generate(tmp_path / "ref", component_maps=True, **kw) / "synth_bottle" / "component_maps"
    assert _files(maps) == _files(reference) and len(_files(maps)) == 2 + 1 + 3 * 2
    info = json.loads((tmp_path / "synth_bottle" / "synthetic_info.json").read_text())
    assert info["component_maps"] is True
    img.write_bytes(img.read_bytes() + b"x")  # an image that the generator would not write
    (tmp_path / "synth_bottle" / "synthetic_info.json").write_text(json.dumps(dict(info, component_maps=False)))
    shutil.rmtree(maps)
    with pytest.raises(DatasetError, match="differs"):
        generate(tmp_path, component_maps=True, **kw)
    assert not maps.exists()
    img.unlink()  # now incomplete
    with pytest.raises(DatasetError, match=r"synth_bottle exists but is incomplete; delete it or pass --force"):
        generate(tmp_path, **kw)
    generate(tmp_path, force=True, **kw)
    assert img.is_file() and read_category("synthetic_loco", "synth_bottle", tmp_path).train[0].path == str(img)
    assert not list(tmp_path.glob(".*partial*"))  # no temporary folder left behind
    with pytest.raises(DatasetError, match="unknown synthetic category"):
        generate(tmp_path, categories=["synth_car"])


def test_cli(tmp_path, capsys):
    main(["--root", str(tmp_path), "--size", "40", "--n-train", "2", "--n-val", "1", "--n-test", "1",
          "--categories", "synth_box", "--component-maps", "--seed", "5"])
    out = capsys.readouterr().out
    assert str(tmp_path.resolve()) in out and " s" in out
    info = json.loads((tmp_path / "synth_box" / "synthetic_info.json").read_text())
    assert (info["size"], info["n_train"], info["seed"], info["component_maps"]) == (40, 2, 5, True)
    assert len(list((tmp_path / "synth_box" / "test").rglob("*.png"))) == 3
    (tmp_path / "synth_box" / "defects_config.json").unlink()
    with pytest.raises(SystemExit, match="incomplete"):
        main(["--root", str(tmp_path), "--size", "40", "--categories", "synth_box"])
