"""Trust in models: NaN/Inf never becomes a number, checkpoints and banks know where they came from, identical
runs give identical bytes, and GLASS does not depend on --workers. Tiny synthetic data and --fast throughout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.checkpoints import META_KEY, check_meta, checkpoint_meta
from common.errors import CheckpointError, UserError
from common.io import load_checkpoint, save_checkpoint
from methods.knn import NonFiniteError, check_features, knn

REPO = Path(__file__).resolve().parent.parent
LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """Two synthetic LOCO categories, 64 px, 6 training images each."""
    from dataset_readers.synthetic_loco import generate

    root = tmp_path_factory.mktemp("tiny_loco")
    generate(root, size=64, n_train=6, n_val=2, n_test=4, seed=0, categories=["synth_box", "synth_bottle"])
    return root


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


# ------------------------------------------------------------------------------------------ checkpoint files
def test_identical_objects_give_identical_checkpoint_bytes(tmp_path):
    obj = {"w": torch.arange(12.0).reshape(3, 4), "config": {"lr": 1e-4, "layers": ["layer2"]}, "epoch": 3}
    save_checkpoint(tmp_path / "a.pth", obj)
    save_checkpoint(tmp_path / "sub" / "b.pth", obj)  # other name, other folder: same bytes
    a, b = (tmp_path / "a.pth").read_bytes(), (tmp_path / "sub" / "b.pth").read_bytes()
    assert a == b
    # the record name inside the archive is fixed, not the random temp file name
    assert {n.split("/")[0] for n in zipfile.ZipFile(tmp_path / "a.pth").namelist()} == {"archive"}
    assert list(tmp_path.glob(".a.pth*")) == []  # no temp file left behind
    back = load_checkpoint(tmp_path / "a.pth")
    assert torch.equal(back["w"], obj["w"]) and back["config"] == obj["config"]


def test_truncated_checkpoint_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"w": torch.zeros(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, hint="re-run glass.py for this category")
    msg = str(exc.value)
    assert str(path) in msg and "truncated or corrupt" in msg and "re-run glass.py" in msg and "\n" not in msg


def _marker_payload(marker: Path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))
    return Payload()


def test_pickled_checkpoint_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "EXECUTED"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _marker_payload(marker)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert not marker.exists()
    assert str(path) in msg and "not a plain checkpoint" in msg and "must not be loaded unsafely" in msg
    assert "weights_only=False" not in msg


def test_missing_checkpoint_names_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:  # MissingCheckpointError is both a CheckpointError and this
        load_checkpoint(tmp_path / "none.pth", hint="train it first: python CSAD.py")
    assert isinstance(exc.value, CheckpointError) and "none.pth" in str(exc.value) and "python CSAD.py" in str(exc.value)


def test_check_meta_refuses_record_less_foreign_and_unfinished(tmp_path, caplog):
    meta = checkpoint_meta(method="glass", dataset="synthetic_loco", category="synth_box",
                           weights={"backbone": LITE0, "weights": "w.pth", "sha256": "ab" * 32},
                           config={"lr": 1e-4, "imagesize": 64}, finished=False, progress="epoch 2 of 20")
    here = dict(meta, finished=True)
    p = tmp_path / "c.pth"
    with pytest.raises(CheckpointError, match="no provenance record.*re-train"):
        check_meta(p, {"discriminator": {}}, here, fix="re-train")
    other = dict(here, category="synth_bottle", config={"lr": 1e-3, "imagesize": 64})
    with pytest.raises(CheckpointError) as exc:
        check_meta(p, {META_KEY: dict(meta, finished=True)}, other, fix="re-train")
    msg = str(exc.value)
    assert str(p) in msg and "category synth_box (this run: synth_bottle)" in msg and "lr=0.0001 (this run: 0.001)" in msg
    rand = dict(here, weights_sha256="RANDOM")
    with pytest.raises(CheckpointError, match=r"weights_sha256 abababababab… \(this run: RANDOM\)"):
        check_meta(p, {META_KEY: dict(meta, finished=True)}, rand, fix="re-train")
    with pytest.raises(CheckpointError, match=r"unfinished run \(last saved: epoch 2 of 20\).*--allow-unfinished"):
        check_meta(p, {META_KEY: meta}, here, fix="re-train")
    with caplog.at_level("WARNING"):
        check_meta(p, {META_KEY: meta}, here, fix="re-train", allow_unfinished=True)
    assert "unfinished" in caplog.text and "--allow-unfinished" in caplog.text


# ------------------------------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("where", ["query", "bank"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_knn_refuses_non_finite_inputs(backend, where, value):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(5, 8, generator=g), torch.randn(20, 8, generator=g)
    (q if where == "query" else bank)[2, 3] = value
    with pytest.raises(NonFiniteError) as exc:
        knn(q, bank, k=1, backend=backend)
    assert ("memory bank" if where == "bank" else "queries") in str(exc.value)
    assert ("NaN" if value != value else "infinite") in str(exc.value)


def test_knn_finite_inputs_unchanged():
    g = torch.Generator().manual_seed(1)
    q, bank = torch.randn(7, 4, generator=g), torch.randn(30, 4, generator=g)
    d, i = knn(q, bank, k=2)
    ref = torch.cdist(q, bank).topk(2, largest=False)
    torch.testing.assert_close(d, ref.values, rtol=1e-4, atol=1e-4)
    assert torch.equal(i, ref.indices)


def _poisoned(lite0_weights, kind: str):
    """The real Lite0, then its first convolution's weight tensor made NaN or Inf in memory (the issue's corrupt
    files; load_backbone refuses such files, so the feature checks are tested on the loaded model). A single Inf
    element there would be clamped by ReLU6 into finite features: only the load-time check can see it."""
    from models.backbones import load_backbone

    model = load_backbone(LITE0, lite0_weights)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.fill_(float(kind))
    return model


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_patchcore_bank_refuses_nan_features_and_names_image_and_weights(tiny_root, lite0_weights, kind):
    from dataset_readers import read_category
    from methods.patchcore import build_bank, defaults_for
    from models.feature_extractor import FeatureExtractor

    model = _poisoned(lite0_weights, kind)
    data = read_category("synthetic_loco", "synth_box", tiny_root)
    cfg = defaults_for("sapatchcore", resize=(64, 64), crop=64)
    with pytest.raises(NonFiniteError) as exc:
        build_bank(FeatureExtractor(model, cfg.layers), data.train, cfg, torch.device("cpu"), batch_size=3,
                   progress=False)
    msg = str(exc.value)
    assert isinstance(exc.value, UserError)
    assert str(data.train[0].path) in msg and Path(lite0_weights).name in msg and "corrupt" in msg
    assert "(the image is finite)" in msg


def test_check_features_blames_a_non_finite_image(tmp_path):
    feats = torch.ones(2, 3, 4, 4)
    feats[1, 0, 0, 0] = float("nan")
    images = torch.zeros(2, 3, 8, 8)
    images[1, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"features of .*b\.png are NaN: the image itself"):
        check_features(feats, images, [tmp_path / "a.png", tmp_path / "b.png"], nn.Identity())


def test_glass_cache_refuses_nan_features(tiny_root, lite0_weights):
    from dataset_readers import read_category
    from methods.glass import Glass, GlassConfig, Trainer, fast_config

    model = _poisoned(lite0_weights, "nan")
    data = read_category("synthetic_loco", "synth_box", tiny_root)
    cfg = fast_config(GlassConfig())
    with pytest.raises(NonFiniteError) as exc:
        Trainer(Glass(model, cfg), cfg, torch.device("cpu")).cache_features(data.train, 64)
    assert str(data.train[0].path) in str(exc.value) and Path(lite0_weights).name in str(exc.value)


def test_glass_nan_discriminator_output_says_training_diverged():
    from methods.glass import GlassConfig, Trainer

    class Boom(nn.Module):  # stands in for a discriminator whose output went NaN
        def forward(self, x):
            return torch.full((len(x), 1), float("nan"))

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = GlassConfig(lr=0.5)
    err = trainer.diverged(torch.ones(1, 2, 2, 4), torch.ones(1, 3, 8, 8), None)
    assert isinstance(err, NonFiniteError) and "diverged" in str(err) and "lower --lr (now 0.5)" in str(err)
    with pytest.raises(RuntimeError, match="between 0 and 1"):  # what BCE says, and what train_epoch translates
        torch.nn.functional.binary_cross_entropy(Boom()(torch.ones(3, 2))[:, 0], torch.ones(3))


# ------------------------------------------------------------------------------------------ SA-PatchCore banks
@pytest.fixture(scope="module")
def bank_run(tiny_root, lite0_weights, tmp_path_factory):
    import sapatchcore

    out = tmp_path_factory.mktemp("banks")
    common = ["--dataset", "synthetic_loco", "--data-root", str(tiny_root), "--fast", "--backbone", LITE0,
              "--weights", str(lite0_weights), "--score-dir", str(out / "s"), "--device", "cpu", "--no-maps"]
    for d in ("c1", "c2"):
        sapatchcore.main(common + ["--categories", "synth_box", "--ckpt-dir", str(out / d)])
    return out, common


def test_identical_runs_write_identical_banks(bank_run):
    out, _ = bank_run
    a, b = (out / "c1" / "sapatchcore_synth_box.pt").read_bytes(), (out / "c2" / "sapatchcore_synth_box.pt").read_bytes()
    assert a == b


def test_load_bank_of_another_category_is_refused(bank_run, capsys):
    import sapatchcore

    out, common = bank_run
    foreign = out / "c1" / "sapatchcore_synth_bottle.pt"
    shutil.copy(out / "c1" / "sapatchcore_synth_box.pt", foreign)
    with pytest.raises(SystemExit) as exc:
        sapatchcore.main(common + ["--categories", "synth_bottle", "--ckpt-dir", str(out / "c1"), "--load-bank"])
    assert exc.value.code == 1
    line = _error_line(capsys)
    assert str(foreign) in line and "category synth_box (this run: synth_bottle)" in line and "--load-bank" in line


def test_load_bank_with_other_settings_or_no_record_is_refused(bank_run, capsys):
    import sapatchcore

    out, common = bank_run
    with pytest.raises(SystemExit):
        sapatchcore.main(common + ["--categories", "synth_box", "--ckpt-dir", str(out / "c1"), "--load-bank",
                                   "--coreset-ratio", "0.5"])
    assert "coreset_ratio=0.01 (this run: 0.5)" in _error_line(capsys)
    old = out / "old"
    state = load_checkpoint(out / "c1" / "sapatchcore_synth_box.pt")
    state.pop(META_KEY)
    save_checkpoint(old / "sapatchcore_synth_box.pt", state)
    with pytest.raises(SystemExit):
        sapatchcore.main(common + ["--categories", "synth_box", "--ckpt-dir", str(old), "--load-bank"])
    assert "no provenance record" in _error_line(capsys)
    # a scoring-only setting may change between --load-bank runs
    res = sapatchcore.main(common + ["--categories", "synth_box", "--ckpt-dir", str(out / "c1"), "--load-bank",
                                     "--num-nn", "3"])
    assert np.isfinite(res["synth_box"].test_scores).all()


def test_nan_bank_file_is_refused_as_a_script(bank_run, tmp_path):
    """As a user runs it: exit 1, one line naming the bank, no traceback."""
    out, common = bank_run
    state = load_checkpoint(out / "c1" / "sapatchcore_synth_box.pt")
    state["bank"][0, 0] = float("nan")
    save_checkpoint(tmp_path / "sapatchcore_synth_box.pt", state)
    proc = subprocess.run([sys.executable, "sapatchcore.py", *common, "--categories", "synth_box", "--ckpt-dir",
                           str(tmp_path), "--load-bank"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "sapatchcore_synth_box.pt") in last and "NaN" in last


# ------------------------------------------------------------------------------------------ GLASS
def test_las_texture_ops_match_torchvision_and_leave_the_global_rng_alone():
    from PIL import Image
    from torchvision import transforms as T

    from dataset_readers.torch_data import IMAGENET_MEAN, IMAGENET_STD
    from methods.glass_las import texture_transform

    img = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    ops = [T.ColorJitter(contrast=(0.8, 1.2)), T.ColorJitter(brightness=(0.8, 1.2)),
           T.ColorJitter(saturation=(0.8, 1.2), hue=(-0.2, 0.2)), T.RandomHorizontalFlip(p=1),
           T.RandomVerticalFlip(p=1), T.RandomGrayscale(p=1), T.RandomAutocontrast(p=1), T.RandomEqualize(p=1),
           T.RandomAffine(degrees=(-45, 45))]
    for seed in range(12):  # every op appears: 12 draws of 3 of 9
        r_ref, r_new = np.random.default_rng(seed), np.random.default_rng(seed)
        chosen = [ops[i] for i in r_ref.choice(9, 3, replace=False)]
        ref_tf = T.Compose([T.Resize(32, antialias=True), *chosen, T.CenterCrop(32), T.ToTensor(),
                            T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        torch.manual_seed(int(r_ref.integers(2 ** 31)))  # the previous implementation: global RNG seeded per item
        ref = ref_tf(img)
        tf = texture_transform(32, 32, True, r_new)
        gen = torch.Generator().manual_seed(int(r_new.integers(2 ** 31)))
        torch.manual_seed(123)
        state = torch.get_rng_state()
        out = tf(img, gen)
        assert torch.equal(torch.get_rng_state(), state)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_las_items_do_not_touch_the_global_rng(tmp_path, dtd_root):
    from PIL import Image

    from dataset_readers.base import Sample
    from methods.glass_las import LASDataset, list_textures

    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(tmp_path / "a.png")
    ds = LASDataset([Sample(str(tmp_path / "a.png"), "train")], list_textures(dtd_root), 64, 64, seed=5)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    _, a, _ = ds[0]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # a different global state changes nothing in the item
    _, b, _ = ds[0]
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def glass_run(tiny_root, lite0_weights, dtd_root, tmp_path_factory):
    import glass

    out = tmp_path_factory.mktemp("glass")
    common = ["--dataset", "synthetic_loco", "--data-root", str(tiny_root), "--fast", "--backbone", LITE0,
              "--weights", str(lite0_weights), "--dtd-root", str(dtd_root), "--device", "cpu", "--threads", "1",
              "--distribution", "2", "--epochs", "2"]
    for w in (0, 1):
        glass.main(common + ["--categories", "synth_box", "--workers", str(w), "--score-dir", str(out / f"s{w}"),
                             "--ckpt-dir", str(out / f"c{w}")])
    return out, common


def test_glass_scores_identical_for_any_workers(glass_run, tiny_root):
    from dataset_readers import read_category
    from evaluation.score_files import load_scores

    out, _ = glass_run
    groups = read_category("synthetic_loco", "synth_box", tiny_root).score_groups()
    for g in ("logi", "struc", "val"):
        s0 = load_scores("synth_box", "glass", g, samples=groups[g], score_dir=out / "s0")
        s1 = load_scores("synth_box", "glass", g, samples=groups[g], score_dir=out / "s1")
        assert np.array_equal(s0, s1) and np.ptp(s0) > 0


def _ckpt(out: Path, w: int = 0, category: str = "synth_box") -> Path:
    return out / f"c{w}" / "glass" / "synthetic_loco" / category / "ckpt.pth"


def test_glass_test_only_refuses_unfinished_foreign_and_other_settings(glass_run, tmp_path, capsys, caplog):
    import glass

    out, common = glass_run
    assert load_checkpoint(_ckpt(out))[META_KEY]["finished"] is True
    # a run killed at epoch 2 of 20 leaves a checkpoint saved at the end of epoch 2, finished False
    state = load_checkpoint(_ckpt(out))
    state[META_KEY].update(finished=False, progress="epoch 2 of 20")
    killed = tmp_path / "k" / "glass" / "synthetic_loco" / "synth_box" / "ckpt.pth"
    save_checkpoint(killed, state)
    args = common + ["--categories", "synth_box", "--score-dir", str(tmp_path / "s"), "--test-only"]
    with pytest.raises(SystemExit) as exc:
        glass.main(args + ["--ckpt-dir", str(tmp_path / "k")])
    line = _error_line(capsys)
    assert exc.value.code == 1 and str(killed) in line and "unfinished" in line and "--allow-unfinished" in line
    with caplog.at_level("WARNING"):
        glass.main(args + ["--ckpt-dir", str(tmp_path / "k"), "--allow-unfinished"])
    assert "unfinished" in caplog.text
    # synth_box's checkpoint copied into synth_bottle's folder
    foreign = _ckpt(out, 0, "synth_bottle")
    foreign.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(_ckpt(out), foreign)
    with pytest.raises(SystemExit):
        glass.main(common + ["--categories", "synth_bottle", "--score-dir", str(tmp_path / "s"), "--test-only",
                             "--ckpt-dir", str(out / "c0")])
    line = _error_line(capsys)
    assert str(foreign) in line and "category synth_box (this run: synth_bottle)" in line
    # other training settings than the checkpoint's
    with pytest.raises(SystemExit):
        glass.main(args + ["--ckpt-dir", str(out / "c0"), "--epochs", "3"])
    assert "meta_epochs=2 (this run: 3)" in _error_line(capsys)


def test_sinbad_refuses_nan_features(tiny_root, lite0_weights):
    """SINBAD's set descriptors count projections above thresholds: NaN features would become finite counts."""
    from dataset_readers import read_category
    from methods.sinbad import DEEP_LAYERS, SinbadConfig, run_unit
    from models.feature_extractor import FeatureExtractor

    data = read_category("synthetic_loco", "synth_box", tiny_root)
    cfg = SinbadConfig.fast_config(canvas=64, set_res=32, projections=4, batch_size=8)
    extractor = FeatureExtractor(_poisoned(lite0_weights, "nan"), [DEEP_LAYERS[14]])
    with pytest.raises(NonFiniteError) as exc:
        run_unit(data, 14, n_crops=1, cfg=cfg, extractor=extractor, device=torch.device("cpu"))
    assert Path(lite0_weights).name in str(exc.value) and "corrupt" in str(exc.value)


def test_lgst_nan_teacher_names_the_weights_and_a_nan_loss_says_diverged(lite0_weights):
    from methods.csad import lgst

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    cfg = lgst.LGSTConfig(input_size=64, channels=16, student_width=8, ae_base=16, iterations=2, eval_freq=2)
    model = lgst.build_model(_poisoned(lite0_weights, "nan"), cfg, 0)
    with pytest.raises(NonFiniteError) as exc:
        lgst.train(model, train, train[:2], device=torch.device("cpu"), seed=0)
    msg = str(exc.value)
    assert "teacher features" in msg and Path(lite0_weights).name in msg and "lower --lr" not in msg
    # finite teacher, absurd learning rate: the message says the training diverged, not the data
    from models.backbones import load_backbone

    model = lgst.build_model(load_backbone(LITE0, lite0_weights), lgst.LGSTConfig(
        input_size=64, channels=16, student_width=8, ae_base=16, iterations=5, eval_freq=5, lr=1e30), 0)
    with pytest.raises(NonFiniteError, match=r"diverged.*lower --lr \(now 1e\+30\)"):
        lgst.train(model, train, train[:2], device=torch.device("cpu"), seed=0)


def test_patch_histogram_params_refuse_nan_truncated_and_foreign(tmp_path):
    from methods.csad.patch_histogram import PatchHistogram

    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 3, (6, 8, 8), generator=g)
    ph = PatchHistogram(3).fit(maps)
    ph.set_validation(maps[:3])
    meta = checkpoint_meta(method="segmentor", dataset="synthetic_loco", category="synth_box",
                           weights={"backbone": LITE0, "sha256": "cd" * 32}, config={"epochs": 2})
    path = tmp_path / "p.npz"
    ph.save(path, meta=meta)
    again = PatchHistogram.load(path, expected=meta)
    np.testing.assert_array_equal(again.score(maps), ph.score(maps))
    with pytest.raises(CheckpointError, match="category synth_box \\(this run: synth_bottle\\)"):
        PatchHistogram.load(path, expected=dict(meta, category="synth_bottle"))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=f"cannot read patch-histogram params {path}"):
        PatchHistogram.load(path)
    ph.hist_invcov[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="hist_invcov .*not finite"):
        ph.save(tmp_path / "q.npz")
    assert not (tmp_path / "q.npz").exists()


def test_glass_nan_score_blames_the_trained_weights_not_the_data(tiny_root, lite0_weights):
    from dataset_readers import read_category
    from methods.glass import Glass, GlassConfig, fast_config, predict
    from models.backbones import load_backbone

    data = read_category("synthetic_loco", "synth_box", tiny_root)
    cfg = fast_config(GlassConfig())
    model = Glass(load_backbone(LITE0, lite0_weights), cfg)
    with torch.no_grad():
        next(model.discriminator.parameters()).fill_(float("nan"))  # what a diverged training leaves
    with pytest.raises(NonFiniteError) as exc:
        predict(model, data.test[:2], cfg, 64, torch.device("cpu"))
    msg = str(exc.value)
    assert str(data.test[0].path) in msg and "training diverged" in msg and "lower --lr" in msg


def test_sinbad_ensemble_refuses_units_of_different_weights(tiny_root, lite0_weights, tmp_path, capsys):
    import sinbad

    common = ["--dataset", "synthetic_loco", "--data-root", str(tiny_root), "--categories", "synth_box", "--fast",
              "--backbone", LITE0, "--canvas", "64", "--crop-res", "32", "--projections", "4", "--crops", "1",
              "--score-dir", str(tmp_path), "--device", "cpu"]
    sinbad.main(common + ["--levels", "14", "--weights", str(lite0_weights), "--units-only"])
    with pytest.warns(UserWarning, match="random weights"):
        sinbad.main(common + ["--levels", "7", "--weights", "random", "--units-only"])
    with pytest.raises(SystemExit) as exc:
        sinbad.main(common + ["--levels", "7", "14", "--ensemble-only"])
    line = _error_line(capsys)
    assert exc.value.code == 1 and "different backbone weights" in line and "RANDOM" in line
