"""SinbadModel: fit/predict against the unit primitives and the ensemble, checkpoints (load_model, contents,
refusals), --official-thresholds in predict, reduced precision, and sinbad.py's --test-only / --units-only +
--ensemble-only / --benchmark paths reproducing the training run's files bit for bit. Tiny sizes throughout."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_readers import read_category
from methods.base import ImageList, load_model
from methods.sinbad import (DEEP_LAYERS, PIXEL_LEVEL, SinbadConfig, SinbadModel, encode, ensemble, nn_scores,
                            projection_matrix, units_for)

torch.set_num_threads(min(2, os.cpu_count() or 1))
LITE0 = "efficientnet_lite0"
# canvas 64, crops at 32 px; batch 4 so the training split has two batches (the first fits the thresholds)
TINY = dict(canvas=64, set_res=32, projections=4, pixel_reps=2, batch_size=4, crops=(4, 1))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run fastest on one thread


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from dataset_readers.synthetic_loco import generate

    r = tmp_path_factory.mktemp("sinbad_model")
    generate(r, size=64, n_train=8, n_val=4, n_test=4, seed=0, categories=["synth_box"])
    return r


@pytest.fixture(scope="module")
def data(root):
    return read_category("synthetic_loco", "synth_box", root)


@pytest.fixture(scope="module")
def backbone(lite0_weights):
    from models.backbones import load_backbone

    return load_backbone(LITE0, lite0_weights)


@pytest.fixture(scope="module")
def fitted(data, backbone):
    cfg = SinbadConfig.fast_config(**TINY)
    return SinbadModel(backbone, cfg).fit(ImageList(data.train), validation=ImageList(data.validation))


def _meta(data, model):
    from common.checkpoints import checkpoint_meta

    return checkpoint_meta(method="sinbad", dataset=data.dataset, category=data.category, model=model.backbone,
                           config={"levels": list(model.cfg.levels)}, train_samples=data.train)


def test_predict_equals_the_unit_primitives_and_the_ensemble(fitted, data, backbone):
    """Each unit's raw scores = encode (thresholds of the first training batch, frozen) + nn_scores; the image
    scores = ensemble() of those units; image-level only."""
    from models.feature_extractor import FeatureExtractor

    cfg, cpu = fitted.cfg, torch.device("cpu")
    assert units_for(cfg) == [(7, 4), (7, 1), (14, 4), (14, 1), (224, 1)]
    raw = fitted.predict_units(ImageList(data.test))
    ref_units = {}
    for lv, c in units_for(cfg):
        ex = None if lv == PIXEL_LEVEL else FeatureExtractor(backbone, [DEEP_LAYERS[lv]])
        dim = 3 if lv == PIXEL_LEVEL else ex.feature_dims[DEEP_LAYERS[lv]]
        proj = [torch.cat([projection_matrix(dim, cfg.n_projections(lv), seed=cfg.seed, level=lv, n_crops=c, position=k, rep=r)
                           for r in range(cfg.reps(lv))], 1) for k in range(c)]
        tr, thr = encode(data.train, lv, n_crops=c, cfg=cfg, extractor=ex, device=cpu, projections=proj)
        va, te = (encode(s, lv, n_crops=c, cfg=cfg, extractor=ex, device=cpu, projections=proj, thresholds=thr)[0]
                  for s in (data.validation, data.test))
        dd = cfg.n_projections(lv) * cfg.quantiles
        t, v = np.zeros((cfg.reps(lv), c, len(te))), np.zeros((cfg.reps(lv), c, len(va)))
        for r in range(cfg.reps(lv)):
            for k in range(c):
                cols = slice(r * dd, (r + 1) * dd)
                st, sv = nn_scores(tr[:, k, cols], [te[:, k, cols], va[:, k, cols]], cfg.alpha(lv), cfg.whiten)
                t[r, k], v[r, k] = st.numpy(), sv.numpy()
        np.testing.assert_array_equal(raw[(lv, c)], t)
        np.testing.assert_array_equal(fitted.validation_units[(lv, c)], v)
        ref_units[(lv, c)] = {"test": t, "val": v}
    pred = fitted.predict(ImageList(data.test))
    ref = ensemble(ref_units, cfg)
    assert pred.maps is None and set(pred.extra) == {"sinbad_L7", "sinbad_L14", "sinbad_L224"}
    np.testing.assert_array_equal(pred.scores, ref["sinbad"][0])
    for name, s in pred.extra.items():
        np.testing.assert_array_equal(s, ref[name][0])
    assert pred.scores.shape == (len(data.test),) and np.ptp(pred.scores) > 0
    # frozen thresholds: an image's score does not depend on the other images of the call
    np.testing.assert_allclose(fitted.predict(ImageList(data.test[5:9])).scores, pred.scores[5:9], rtol=1e-9)


def test_checkpoint_round_trip_contents_and_refusals(fitted, data, tmp_path):
    from common.checkpoints import META_KEY
    from common.errors import CheckpointError
    from common.io import load_checkpoint, save_checkpoint

    path = fitted.save(tmp_path / "m.pth", _meta(data, fitted))
    model, meta = load_model(path)  # method, backbone and weights found from the file alone
    assert isinstance(model, SinbadModel) and meta["category"] == "synth_box"
    images = ImageList(data.test)
    a, b = fitted.predict(images), model.predict(images)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert all(np.array_equal(a.extra[k], b.extra[k]) for k in a.extra)
    # what is stored: integer element counts, thresholds and norms; no projections, no whitening matrices
    ckpt = load_checkpoint(path)
    by = {(u["level"], u["crops"]): u for u in ckpt["units"]}
    assert by[(14, 4)]["counts"].dtype == torch.uint8 and by[(224, 1)]["counts"].dtype == torch.int16  # 1024 px
    assert tuple(by[(224, 1)]["norm"].shape) == (2, 1) and tuple(by[(7, 4)]["norm"].shape) == (1,)
    assert tuple(by[(7, 4)]["thresholds"].shape) == (4, 4, 5)
    stored = sum(t.numel() * t.element_size() for u in ckpt["units"] for t in u.values() if torch.is_tensor(t))
    proj = sum(p.numel() * 4 for u in model.units.values() for p in u.projections)
    banks = sum(bank.numel() * 8 * 2 for u in model.units.values() for _, bank in u.models)  # bank + vt
    assert stored < proj and stored < banks / 4, (stored, proj, banks)
    # a tampered unit is refused in one line
    bad = dict(ckpt, units=[dict(u, projection_sha="0" * 64) if u["level"] == 7 else u for u in ckpt["units"]])
    save_checkpoint(tmp_path / "bad.pth", bad)
    with pytest.raises(CheckpointError, match="projections of unit L7 c4"):
        load_model(tmp_path / "bad.pth")
    bad = dict(ckpt, units=ckpt["units"][:-1])
    save_checkpoint(tmp_path / "bad.pth", bad)
    with pytest.raises(CheckpointError, match=r"holds units .* names"):
        load_model(tmp_path / "bad.pth")
    assert ckpt[META_KEY]["method"] == "sinbad"


def test_whitening_rebuilt_elsewhere_is_reported(fitted, data, tmp_path, caplog):
    """The shrunk-covariance models are rebuilt on load; if they do not come out bit-identical (other device or
    BLAS) the load says so instead of silently scoring differently."""
    from common.io import load_checkpoint, save_checkpoint

    path = fitted.save(tmp_path / "m.pth", _meta(data, fitted))
    ckpt = load_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger="sinbad"):
        SinbadModel.from_checkpoint(ckpt)
    assert "differ in the last bits" not in caplog.text
    ckpt["units"][0]["whitening_sha"] = "f" * 64
    save_checkpoint(path, ckpt)
    with caplog.at_level(logging.WARNING, logger="sinbad"):
        load_model(path)
    assert "SINBAD L7 c4: the shrunk-covariance models rebuilt on cpu differ in the last bits" in caplog.text


def test_official_thresholds_refit_on_the_first_batch_of_every_predict_call(data, backbone):
    cfg = SinbadConfig.fast_config(**{**TINY, "levels": (14,), "crops": (1,), "batch_size": 2})
    frozen = SinbadModel(backbone, cfg).fit(data.train, validation=data.validation)
    official = SinbadModel(backbone, SinbadConfig.fast_config(**{**TINY, "levels": (14,), "crops": (1,),
                                                                  "batch_size": 2, "official_thresholds": True}))
    official.fit(data.train, validation=data.validation)
    # the validation split of fit was encoded the same way: re-fitted on its own first batch
    np.testing.assert_array_equal(official.predict_units(data.validation)[(14, 1)],
                                  official.validation_units[(14, 1)])
    assert not np.array_equal(official.validation_units[(14, 1)], frozen.validation_units[(14, 1)])
    # image test[2] in the second batch after two different first batches: official scores move, frozen stay
    a, b = [data.test[0], data.test[1], data.test[2]], [data.test[6], data.test[9], data.test[2]]
    assert official.predict(a).scores[2] != official.predict(b).scores[2]
    assert frozen.predict(a).scores[2] == pytest.approx(frozen.predict(b).scores[2], rel=1e-9)


def test_bf16_predict_is_finite_and_ranks_like_fp32(fitted, data):
    from scipy.stats import spearmanr

    images = ImageList(data.test)
    ref = fitted.predict(images).scores
    fitted.cfg.dtype = "bf16"
    try:
        low = fitted.predict(images).scores
    finally:
        fitted.cfg.dtype = "fp32"
    assert np.isfinite(low).all() and not np.array_equal(low, ref)
    assert spearmanr(ref, low)[0] > 0.9
    np.testing.assert_array_equal(fitted.predict(images).scores, ref)  # fp32 again: exact


def test_preprocess_and_forward_networks(fitted, data):
    batch = fitted.preprocess(ImageList(data.test[:3]))
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.float32
    feats = fitted.forward_networks(batch)
    assert len(feats) == 4 + 1  # every crop of crop counts 4 and 1 (the pixel level has no network)
    assert all(set(f) == {"layer3", "layer4"} and f["layer3"].shape[0] == 3 for f in feats)
    assert feats[0]["layer3"].shape[-1] == 32 // 16  # crops at 32 px, layer3 stride 16


# ------------------------------------------------------------------------------------------------ sinbad.py
def _files(d: Path) -> dict[str, Path]:
    return {str(p.relative_to(d)): p for p in sorted(d.rglob("*")) if p.suffix in (".npy", ".npz")}


def _same_files(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert set(fa) == set(fb)
    assert len([k for k in fa if k.endswith(".npy")]) == 3 * 3  # L14, L224, sinbad x logi, struc, val
    for k in fa:
        if k.endswith(".npy"):
            np.testing.assert_array_equal(np.load(fa[k]), np.load(fb[k]), err_msg=k)
        else:
            with np.load(fa[k]) as x, np.load(fb[k]) as y:
                np.testing.assert_array_equal(x["test"], y["test"], err_msg=k)
                np.testing.assert_array_equal(x["val"], y["val"], err_msg=k)


def _script(root: Path, weights: str) -> list[str]:
    return ["--dataset", "synthetic_loco", "--data-root", str(root), "--categories", "synth_box", "--fast",
            "--backbone", LITE0, "--weights", weights, "--device", "cpu", "--canvas", "64", "--crop-res", "32",
            "--projections", "4", "--pixel-reps", "2", "--batch-size", "4", "--levels", "14", "224",
            "--crops", "4", "1"]


def test_test_only_and_benchmark_reproduce_the_training_run(root, tmp_path, capsys):
    """Random weights: the checkpoint carries the backbone. --benchmark (one model per unit, merged) gives the
    default run's files; --test-only from either checkpoint gives them bit for bit."""
    import sinbad

    common = _script(root, "random")
    with pytest.warns(UserWarning, match="random weights"):
        sinbad.main(common + ["--score-dir", str(tmp_path / "a"), "--ckpt-dir", str(tmp_path / "ca")])
        sinbad.main(common + ["--score-dir", str(tmp_path / "b"), "--ckpt-dir", str(tmp_path / "cb"), "--benchmark"])
        sinbad.main(common + ["--score-dir", str(tmp_path / "t"), "--ckpt-dir", str(tmp_path / "cb"), "--test-only"])
    ckpt = tmp_path / "ca" / "sinbad" / "synthetic_loco" / "synth_box.pth"
    assert ckpt.is_file() and (tmp_path / "b" / "sinbad_units" / "benchmark.json").is_file()
    _same_files(tmp_path / "a", tmp_path / "b")
    _same_files(tmp_path / "a", tmp_path / "t")
    # --checkpoint names the file; another setting than the checkpoint's is one line naming both values
    with pytest.warns(UserWarning):
        sinbad.main(common + ["--score-dir", str(tmp_path / "t2"), "--checkpoint", str(ckpt)])
    _same_files(tmp_path / "a", tmp_path / "t2")
    capsys.readouterr()
    with pytest.warns(UserWarning), pytest.raises(SystemExit):
        sinbad.main(common + ["--score-dir", str(tmp_path / "t3"), "--checkpoint", str(ckpt), "--projections", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ckpt) in err[0] and "projections=4 (this run: 8)" in err[0], err


def test_units_as_processes_then_ensemble_merges_their_checkpoints(root, lite0_weights, tmp_path, caplog):
    import shutil

    import sinbad

    common = _script(root, str(lite0_weights))
    sinbad.main(common + ["--score-dir", str(tmp_path / "a"), "--ckpt-dir", str(tmp_path / "ca")])
    run = common + ["--score-dir", str(tmp_path / "u"), "--ckpt-dir", str(tmp_path / "cu")]
    for unit in (["--level", "14", "--crops", "4"], ["--level", "14", "--crops", "1"], ["--level", "224"]):
        sinbad.main(run + unit + ["--units-only"])
    units = tmp_path / "cu" / "sinbad" / "synthetic_loco" / "units" / "synth_box"
    assert sorted(p.name for p in units.iterdir()) == ["L14_c1.pth", "L14_c4.pth", "L224_c1.pth"]
    sinbad.main(run + ["--ensemble-only"])
    merged = tmp_path / "cu" / "sinbad" / "synthetic_loco" / "synth_box.pth"
    assert merged.is_file()
    sinbad.main(common + ["--score-dir", str(tmp_path / "t"), "--checkpoint", str(merged)])
    _same_files(tmp_path / "a", tmp_path / "u")
    _same_files(tmp_path / "a", tmp_path / "t")
    # a unit checkpoint of another fit than its unit file (here: another fit_id), or one holding other units:
    # the ensemble is written, the merge refused with the reason
    from common.io import load_checkpoint, save_checkpoint

    ck = load_checkpoint(units / "L14_c4.pth")
    save_checkpoint(units / "L14_c4.pth", dict(ck, units=[dict(ck["units"][0], fit_id="0" * 64)]))
    for bad, reason in (("fit_id", "is not the fit its unit file"), ("full", "holds units")):
        if bad == "full":
            shutil.copy(tmp_path / "ca" / "sinbad" / "synthetic_loco" / "synth_box.pth", units / "L14_c4.pth")
        merged.unlink(missing_ok=True)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sinbad"):
            sinbad.main(run + ["--ensemble-only"])
        assert not merged.exists() and "no model checkpoint written" in caplog.text and reason in caplog.text
    _same_files(tmp_path / "a", tmp_path / "u")  # the score files are those of the units all the same
