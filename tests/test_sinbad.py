"""SINBAD: descriptor, density model and ensemble against NumPy/sklearn references; end-to-end runs on synthetic
LOCO data and on the real juice_bottle subset with EfficientNet-Lite0."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.covariance import ShrunkCovariance
from sklearn.metrics import roc_auc_score

from dataset_readers import read_category
from dataset_readers.base import CategoryData, Sample
from evaluation.score_files import load_scores
from methods.sinbad import (CanvasTransform, ShrunkWhitener, SinbadConfig, aspect_size, crop_grid, crops_to_sets,
                            ensemble, grid_mean_weights, nn_scores, normalize_by_val, percentiles, set_descriptor,
                            with_validation)

torch.set_num_threads(min(2, os.cpu_count() or 1))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run fastest on one thread


# ---------------------------------------------------------------------------------------------- descriptor
def numpy_descriptor(elements: np.ndarray, proj: np.ndarray, n_q: int, thresholds=None):
    z = elements @ proj  # (B, N, P)
    if thresholds is None:
        lo, hi = np.percentile(z.reshape(-1, z.shape[-1]), [1, 99], axis=0)
        thresholds = lo[:, None] + (hi - lo)[:, None] * np.arange(1, n_q + 1)[None] / (n_q + 1)
    f = (z[..., None] < thresholds[None, None]).mean(1)  # (B, P, Q)
    return f.reshape(len(elements), -1), thresholds


@pytest.mark.parametrize("mem_elems", [2 ** 25, 300])  # one chunk, and many projection chunks
def test_set_descriptor_equals_numpy(mem_elems):
    rng = np.random.default_rng(0)
    fit, other = rng.normal(size=(6, 41, 7)), rng.normal(size=(4, 23, 7)) * 1.5
    proj = rng.normal(size=(7, 13))
    d, t = set_descriptor(torch.from_numpy(fit), torch.from_numpy(proj), None, 5, mem_elems=mem_elems)
    ref_d, ref_t = numpy_descriptor(fit, proj, 5)
    np.testing.assert_allclose(t.numpy(), ref_t, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(d.numpy(), ref_d)
    assert d.shape == (6, 13 * 5) and 0 < d.mean() < 1
    # frozen thresholds reused on another set of another size
    d2, t2 = set_descriptor(torch.from_numpy(other), torch.from_numpy(proj), t, 5, mem_elems=mem_elems)
    np.testing.assert_array_equal(d2.numpy(), numpy_descriptor(other, proj, 5, ref_t)[0])
    assert torch.equal(t2, t)
    # a set descriptor ignores element order
    perm = torch.from_numpy(other[:, rng.permutation(23)])
    assert torch.equal(set_descriptor(perm, torch.from_numpy(proj), t, 5)[0], d2)


def test_percentiles_equal_numpy_with_ties():
    rng = np.random.default_rng(1)
    z = np.round(rng.normal(size=(1001, 9)), 1)  # many ties
    for m in (1001, 7, 2):
        np.testing.assert_allclose(percentiles(torch.from_numpy(z[:m]), (1.0, 99.0, 50.0)).numpy(),
                                   np.percentile(z[:m], [1, 99, 50], axis=0), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- density model
@pytest.mark.parametrize("n,d,alpha", [(20, 50, 0.1), (60, 8, 0.1), (15, 30, 1.0)])
def test_whitener_equals_sklearn_inverse(n, d, alpha):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
    cov = ShrunkCovariance(shrinkage=alpha).fit(x).covariance_
    q = rng.normal(size=(5, d))
    got = ShrunkWhitener(torch.from_numpy(x), alpha, -1.0)(torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(got, q @ np.linalg.inv(cov), rtol=1e-7, atol=1e-9)
    evals, evecs = np.linalg.eigh(cov)
    inv_sqrt = evecs @ np.diag(evals ** -0.5) @ evecs.T
    got = ShrunkWhitener(torch.from_numpy(x), alpha, -0.5)(torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(got, q @ inv_sqrt, rtol=1e-7, atol=1e-9)


def test_nn_scores_equal_brute_force():
    rng = np.random.default_rng(3)
    train, test = rng.random(size=(30, 40)), rng.random(size=(9, 40))
    test[0] = train[4]  # an exact match scores 0
    p = np.linalg.inv(ShrunkCovariance(shrinkage=0.1).fit(train).covariance_)
    a, b = train @ p, test @ p
    ref = ((b[:, None] - a[None]) ** 2).sum(-1).min(1)
    got = nn_scores(torch.from_numpy(train), [torch.from_numpy(test)], 0.1)[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * ref.max())
    assert got[0] < 1e-6 * ref.max()


# ------------------------------------------------------------------------------------------------ ensemble
def test_grid_weights_equal_per_image_bicubic():
    rng = np.random.default_rng(4)
    for k in (16, 9, 4, 1):
        w = grid_mean_weights(k)
        g = int(np.sqrt(k))
        scores = rng.random(size=(k, 6))
        ref = [cv2.resize(scores[:, i].reshape(g, g), (4, 4), interpolation=cv2.INTER_CUBIC).mean() for i in range(6)]
        np.testing.assert_allclose(w @ scores, ref, rtol=1e-12)
        assert abs(w.sum() - 1.0) < 1e-9  # bicubic keeps constants
    np.testing.assert_allclose(grid_mean_weights(16), np.full(16, 1 / 16))


def test_ensemble_normalisation_on_known_arrays():
    eps = 1e-5
    t, v = normalize_by_val(np.array([2.0, 4.0]), np.array([1.0, 3.0]), eps)
    np.testing.assert_allclose(t, [2 / (2 + eps) + eps, 4 / (2 + eps) + eps])
    np.testing.assert_allclose(v, [1 / (2 + eps) + eps, 3 / (2 + eps) + eps])
    cfg = SinbadConfig()
    units = {
        # level 7, 16 crops: every crop of test image i scores a_i; validation mean 2
        (7, 16): {"test": np.array([[[1.0, 4.0]] * 16]), "val": np.array([[[2.0, 2.0]] * 16])},
        (7, 1): {"test": np.array([[[3.0, 3.0]]]), "val": np.array([[[1.0, 5.0]]])},
        (14, 1): {"test": np.array([[[10.0, 30.0]]]), "val": np.array([[[10.0, 10.0]]])},
        # 3 pixel repeats; validation means 1, 2, 4
        (224, 1): {"test": np.array([[[1.0, 2.0]], [[4.0, 2.0]], [[2.0, 40.0]]]),
                   "val": np.array([[[1.0, 1.0]], [[2.0, 2.0]], [[4.0, 4.0]]])},
    }
    out = ensemble(units, cfg)
    n = lambda x, m: x / (m + eps) + eps  # noqa: E731
    l7 = [(n(1, 2) + n(3, 3)) / 2, (n(4, 2) + n(3, 3)) / 2]
    l14 = [n(10, 10), n(30, 10)]
    l224 = [np.median([n(1, 1), n(4, 2), n(2, 4)]), np.median([n(2, 1), n(2, 2), n(40, 4)])]
    np.testing.assert_allclose(out["sinbad_L7"][0], l7)
    np.testing.assert_allclose(out["sinbad_L14"][0], l14)
    np.testing.assert_allclose(out["sinbad_L224"][0], l224)
    np.testing.assert_allclose(out["sinbad"][0], (np.array(l7) + l14) / 2 + 0.1 * np.array(l224))
    np.testing.assert_allclose(out["sinbad_L14"][1], [n(10, 10), n(10, 10)])


# ----------------------------------------------------------------------------------------- preprocessing
def test_canvas_crops_and_quantisation():
    assert aspect_size(800, 1600, 1024) == (1024, 512)  # juice_bottle
    assert aspect_size(1600, 1280, 1024) == (819, 1024)  # breakfast_box
    assert aspect_size(1700, 1000, 1024) == (602, 1024)  # pushpins
    img = Image.fromarray(np.full((40, 20, 3), 200, np.uint8))  # W=20, H=40
    c = CanvasTransform(64)(img)
    assert c.shape == (3, 64, 64)
    assert torch.allclose(c[:, :, :32], torch.full((3, 64, 32), 200 / 255)) and c[:, :, 32:].abs().max() == 0
    grids = {r: crop_grid(1024, r) for r in (0.25, 0.5, 0.7, 0.99, 0.999)}
    assert [(s, len(p)) for s, p in grids.values()] == [(256, 16), (512, 9), (716, 4), (1013, 1), (1022, 1)]
    assert grids[0.5][1] == [(0, 0), (0, 256), (0, 512), (256, 0), (256, 256), (256, 512), (512, 0), (512, 256),
                             (512, 512)]
    assert [len(crop_grid(256, r)[1]) for r in (0.25, 0.5, 0.7, 0.99)] == [16, 9, 4, 1]  # --fast keeps the grids
    x = torch.full((1, 3, 8, 8), 0.5)
    sets = crops_to_sets(x, 0, 0, 8, 4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert sets.shape == (1, 3, 4, 4)
    assert torch.allclose(sets[0, :, 0, 0], (127 / 255 - mean) / std)  # ToPILImage truncates 127.5 -> 127


def test_validation_holdout_for_datasets_without_one():
    train = [Sample(f"/x/{i:03d}.png", "train") for i in range(20)]
    data = CategoryData("mvtec_ad", "bottle", Path("/x"), train, validation=[], test=[Sample("/x/t.png", "test")])
    held = with_validation(data, 0.1)
    assert len(held.validation) == 2 and len(held.train) == 18
    assert {s.path for s in held.validation}.isdisjoint(s.path for s in held.train)
    assert with_validation(held, 0.1) is held


# ------------------------------------------------------------------------------------------- end to end
def _run(args: list[str]):
    import sinbad

    return sinbad.main(args)


def test_synthetic_separates_logical_anomalies(synthetic_root, lite0_weights, tmp_path):
    """--fast end to end on the synthetic count/colour anomalies, then --ensemble-only from the unit files."""
    common = ["--dataset", "synthetic_loco", "--data-root", str(synthetic_root), "--fast",
              "--categories", "synth_bottle",
              "--backbone", "efficientnet_lite0", "--weights", str(lite0_weights), "--score-dir", str(tmp_path),
              "--ckpt-dir", str(tmp_path / "ckpt"), "--levels", "14", "224", "--crops", "4"]
    res = _run(common)["synth_bottle"]
    data = read_category("synthetic_loco", "synth_bottle", synthetic_root)
    groups = data.score_groups()
    for method in ("sinbad_L14", "sinbad_L224", "sinbad"):
        for g in ("logi", "struc", "val"):
            s = load_scores("synth_bottle", method, g, samples=groups[g], score_dir=tmp_path)  # verifies the image order
            assert np.isfinite(s).all() and s.min() > 0
    logi = load_scores("synth_bottle", "sinbad", "logi", samples=groups["logi"], score_dir=tmp_path)
    auroc = roc_auc_score([s.label for s in groups["logi"]], logi)
    assert auroc == pytest.approx(res["sinbad"]["logi"])
    assert auroc >= 0.85, f"logical AUROC {auroc:.3f}"  # measured 0.984 (chance 0.5): fill/label colour pairs
    assert res["sinbad_L14"]["logi"] >= 0.9, res  # measured 0.984
    # validation is normal: its normalised scores average ~1 per level by construction
    val = load_scores("synth_bottle", "sinbad_L14", "val", samples=groups["val"], score_dir=tmp_path)
    assert val.mean() == pytest.approx(1.0, abs=1e-3)
    # the ensemble alone, from the unit files, reproduces the scores
    res2 = _run(common + ["--ensemble-only"])["synth_bottle"]
    assert res2 == res
    np.testing.assert_array_equal(load_scores("synth_bottle", "sinbad", "logi", samples=groups["logi"], score_dir=tmp_path), logi)
    # the saved model (ckpt/sinbad/<dataset>/<category>.pth) re-scores every file bit for bit, without fitting
    assert (tmp_path / "ckpt" / "sinbad" / "synthetic_loco" / "synth_bottle.pth").is_file()
    assert _run(common + ["--test-only", "--score-dir", str(tmp_path / "t")])["synth_bottle"] == res
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.glob("*.npy"))
    assert len(files) == 3 * 3 and sorted(p.relative_to(tmp_path / "t") for p in (tmp_path / "t").glob("*.npy")) == files
    for f in files:
        np.testing.assert_array_equal(np.load(tmp_path / f), np.load(tmp_path / "t" / f), err_msg=str(f))
    for f in sorted((tmp_path / "sinbad_units").rglob("*.npz")):
        with np.load(f) as a, np.load(tmp_path / "t" / f.relative_to(tmp_path)) as b:
            np.testing.assert_array_equal(a["test"], b["test"])
            np.testing.assert_array_equal(a["val"], b["val"])


def test_clear_errors(synthetic_root, tmp_path):
    base = ["--dataset", "synthetic_loco", "--data-root", str(synthetic_root), "--score-dir", str(tmp_path), "--fast"]
    with pytest.raises(SystemExit, match=r"L14_c4\.npz"):  # main() turns a UserError into exit 1
        _run(base + ["--categories", "synth_box", "--levels", "14", "--crops", "4", "--ensemble-only"])
    with pytest.raises(SystemExit, match="unknown category"):
        _run(base + ["--categories", "nope", "--levels", "224"])
    with pytest.raises(SystemExit, match="fp16 needs a CUDA device"):  # before the fit, not after it
        _run(base + ["--categories", "synth_box", "--levels", "224", "--dtype", "fp16", "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"checkpoint not found: .*synth_box\.pth; re-create it"):
        _run(base + ["--categories", "synth_box", "--levels", "224", "--test-only", "--ckpt-dir", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="wide_resnet50_2-95faca4d.pth"):
        _run(base + ["--categories", "synth_box", "--levels", "7", "--crops", "1",
                     "--weights", str(tmp_path / "missing.pth")])


def _juice_subset(juice_root: Path, dst: Path, n_train: int, n_logical: int) -> Path:
    """Symlinked subset of the real juice_bottle copy (the dataset itself is never written)."""
    src, cat = juice_root / "juice_bottle", dst / "juice_bottle"
    picks = {"train/good": n_train, "validation/good": None, "test/good": None, "test/logical_anomalies": n_logical}
    for sub, n in picks.items():
        (cat / sub).mkdir(parents=True)
        for p in sorted((src / sub).glob("*.png"))[:n]:
            (cat / sub / p.name).symlink_to(p)
            gt = src / "ground_truth" / "logical_anomalies" / p.stem
            if sub == "test/logical_anomalies":
                (cat / "ground_truth" / "logical_anomalies").mkdir(parents=True, exist_ok=True)
                (cat / "ground_truth" / "logical_anomalies" / p.stem).symlink_to(gt)
    (cat / "defects_config.json").symlink_to(src / "defects_config.json")
    return dst


def test_juice_bottle_real_weights(juice_root, lite0_weights, tmp_path):
    root = _juice_subset(juice_root, tmp_path / "data", n_train=32, n_logical=20)
    res = _run(["--dataset", "mvtec_loco", "--data-root", str(root), "--categories", "juice_bottle", "--fast",
                "--backbone", "efficientnet_lite0", "--weights", str(lite0_weights), "--score-dir",
                str(tmp_path / "s"), "--levels", "14", "--crops", "1"])["juice_bottle"]
    assert res["sinbad_L14"]["logi"] >= 0.9, res  # measured 1.000 on this subset


def test_official_thresholds_flag_and_mixed_units(synthetic_root, tmp_path):
    """--official-thresholds re-fits on each split (other scores); units of mixed settings are refused."""
    base = ["--dataset", "synthetic_loco", "--data-root", str(synthetic_root), "--fast", "--categories", "synth_box",
            "--levels", "224", "--pixel-reps", "1"]
    _run(base + ["--score-dir", str(tmp_path / "a")])
    _run(base + ["--score-dir", str(tmp_path / "b"), "--official-thresholds"])
    groups = read_category("synthetic_loco", "synth_box", synthetic_root).score_groups()
    a, b = (load_scores("synth_box", "sinbad_L224", "logi", samples=groups["logi"], score_dir=tmp_path / d) for d in "ab")
    assert not np.allclose(a, b)
    import json
    with np.load(tmp_path / "b" / "sinbad_units" / "synth_box" / "L224_c1.npz") as z:
        assert json.loads(str(z["info"]))["config"]["official_thresholds"] is True
    # a level-14 unit from a default run next to the official level-224 unit must not be ensembled
    (tmp_path / "b" / "sinbad_units" / "synth_box" / "L14_c1.npz").write_bytes(
        (tmp_path / "a" / "sinbad_units" / "synth_box" / "L224_c1.npz").read_bytes())
    with pytest.raises(SystemExit, match="different settings"):
        _run(base[:-4] + ["--levels", "14", "224", "--crops", "1", "--ensemble-only", "--score-dir",
                          str(tmp_path / "b")])


def test_shared_backbone_pass_gives_each_levels_own_scores(synthetic_root):
    """Levels 7 and 14 of one crop count in one pass (sinbad.py's default) score exactly as their separate units."""
    from methods.sinbad import DEEP_LAYERS, run_unit, run_units
    from models.backbones import load_backbone
    from models.feature_extractor import FeatureExtractor

    from dataclasses import replace

    data = read_category("synthetic_loco", "synth_box", synthetic_root)
    data = replace(data, train=data.train[:6], validation=data.validation[:3], test=data.test[::4])
    cfg = SinbadConfig.fast_config(canvas=128, set_res=64, projections=8, batch_size=4)  # 2 batches of train
    bb = load_backbone("efficientnet_lite0", "random")
    both = FeatureExtractor(bb, [DEEP_LAYERS[14], DEEP_LAYERS[7]])
    shared = run_units(data, [7, 14], 4, cfg, both, device=torch.device("cpu"))
    for lv in (7, 14):
        alone = run_unit(data, lv, n_crops=4, cfg=cfg, extractor=FeatureExtractor(bb, [DEEP_LAYERS[lv]]), device=torch.device("cpu"))
        np.testing.assert_array_equal(shared[lv]["test"], alone["test"])
        np.testing.assert_array_equal(shared[lv]["val"], alone["val"])
        assert shared[lv]["test"].shape == (1, 4, len(data.test)) and np.ptp(alone["test"]) > 0


def test_fast_then_explicit_flags_even_when_equal_to_the_full_default():
    """--fast --projections 1000 used to become 64: a flag equal to the full default was dropped."""
    import sinbad
    from methods.sinbad import SinbadConfig

    full, fast = SinbadConfig(), SinbadConfig.fast_config()
    cfg = sinbad.make_config(sinbad.parse_args(["--fast", "--projections", str(full.projections)]))
    assert cfg.projections == full.projections != fast.projections
    assert cfg.canvas == fast.canvas and cfg.pixel_reps == fast.pixel_reps  # the rest of the preset stays
    cfg = sinbad.make_config(sinbad.parse_args(["--fast", "--pixel-reps", "100", "--crop-res", "224", "--seed", "3"]))
    assert (cfg.pixel_reps, cfg.set_res, cfg.seed, cfg.canvas) == (100, 224, 3, fast.canvas)
    assert sinbad.make_config(sinbad.parse_args([])) == SinbadConfig(seed=0)
    help_text = " ".join(sinbad.build_parser().format_help().split())  # argparse wraps lines
    assert "--projections" in help_text and "default 1000; --fast 64" in help_text
