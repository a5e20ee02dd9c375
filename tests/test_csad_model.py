"""The fused CSAD model (methods.csad.model.CSADModel): train_segmentor.py and CSAD.py on a tiny synthetic category,
the ckpt/csad_<category>.pth CSAD.py writes from both checkpoints, its scores against the benchmark's fusion of the
score files, its maps against the LGST TIFFs, a fresh process (predict.py), --test-only, refusals, bf16, one
backbone pass, and fit() against the separately run parts."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import CheckpointError

REPO_ROOT = Path(__file__).resolve().parent.parent
LITE0 = "efficientnet_lite0"
CAT = "synth_box"
SIZE = 64  # the segmentor resolution = the LGST input size (one backbone pass)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The scripts run single-threaded (below); the in-process predictions too, so that the reduction orders and
    hence the float32 numbers are the same. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _main(module, argv):
    """A script's main() with one thread (the thread count changes reduction orders, see test_segmentor)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        try:
            return module.main(argv)
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, lite0_weights):
    """train_segmentor.py (2 epochs), then CSAD.py (30 iterations), both at 64 px with Lite0, into one ckpt dir:
    CSAD.py finds segmentor_synth_box_64.pth there and writes csad_synth_box.pth."""
    import CSAD
    import train_segmentor
    from dataset_readers.synthetic_loco import generate

    out = tmp_path_factory.mktemp("csad_model")
    root = generate(out / "data", size=SIZE, n_train=10, n_val=6, n_test=4, seed=0, categories=[CAT],
                    component_maps=True)
    common = ["--dataset", "synthetic_loco", "--data-root", str(root), "--categories", CAT, "--fast", "--backbone",
              LITE0, "--weights", str(lite0_weights), "--ckpt-dir", str(out / "ckpt"), "--score-dir",
              str(out / "scores")]
    _main(train_segmentor, common + ["--labels", "component-maps", "--masks-root", str(out / "masks"),
                                     "--resolution", str(SIZE), "--epochs", "2", "--sup-only-epochs", "1",
                                     "--lsa-points", "200", "--lsa-attempts", "20"])
    _main(CSAD, common + ["--input-size", str(SIZE), "--iterations", "30", "--no-penalty"])
    return {"out": out, "root": root, "common": common, "fused": out / "ckpt" / f"csad_{CAT}.pth",
            "seg": out / "ckpt" / f"segmentor_{CAT}_{SIZE}.pth", "lgst": out / "ckpt" / f"best_{CAT}.pth"}


@pytest.fixture(scope="module")
def loaded(run, lite0_weights):
    from dataset_readers import read_category
    from methods.base import ImageList, load_model

    model, meta = load_model(run["fused"], weights=lite0_weights)
    data = read_category("synthetic_loco", CAT, run["root"])
    return model, meta, data, model.predict(ImageList(data.test))


def _files(data, method, score_dir):
    from evaluation.score_files import load_scores

    return {g: load_scores(CAT, method, g, samples=s, score_dir=score_dir) for g, s in data.score_groups().items()}


def test_fused_score_is_the_benchmark_fusion_of_the_score_files(run, loaded):
    import benchmark_performance
    import json

    from evaluation.benchmark import CSAD_BRANCHES
    from evaluation.fusion import fuse
    from evaluation.metrics import image_auroc
    from evaluation.score_files import scores_for_samples
    from methods.csad.model import CSADModel

    model, meta, data, pred = loaded
    assert isinstance(model, CSADModel) and meta["method"] == "csad" and meta["category"] == CAT
    files = {b: _files(data, b, run["out"] / "scores") for b in CSAD_BRANCHES}
    got = scores_for_samples(pred.scores, data.test, data)
    extra = {b: scores_for_samples(pred.extra[b], data.test, data) for b in CSAD_BRANCHES}
    assert set(got) == {"logi", "struc"}
    for g in got:
        # each branch is the number its own script wrote (LGST: float32 bit for bit)
        np.testing.assert_array_equal(extra["LGST"][g].astype(np.float32), files["LGST"][g])
        np.testing.assert_allclose(extra["patchhist"][g], files["patchhist"][g], rtol=0, atol=1e-9)
        # the fused score: evaluation.fusion.fuse of the files, as benchmark_performance.py computes it
        ref = fuse({b: files[b][g] for b in CSAD_BRANCHES}, {b: files[b]["val"] for b in CSAD_BRANCHES})
        np.testing.assert_allclose(got[g], ref, rtol=0, atol=1e-6)
        assert np.ptp(ref) > 0  # a real ranking, not constants
    np.testing.assert_array_equal(model.lgst.val_scores, files["LGST"]["val"])  # stored in the LGST checkpoint
    np.testing.assert_array_equal(model.patchhist.val_scores, files["patchhist"]["val"])
    # and the table benchmark_performance.py writes for patchhist+LGST
    out = run["out"] / "bench"
    benchmark_performance.main(["--dataset", "synthetic_loco", "--data-root", str(run["root"]), "--categories", CAT,
                                "--score-dir", str(run["out"] / "scores"), "--out-dir", str(out), "--methods",
                                "patchhist", "LGST", "--no-maps", "--no-figures"])
    table = json.loads((out / "benchmark_synthetic_loco.json").read_text())["patchhist+LGST"][CAT]
    auc = table["classification"]["auc_roc"]
    groups = data.score_groups()
    for g, kind in (("logi", "logical_anomalies"), ("struc", "structural_anomalies")):
        labels = np.array([s.label for s in groups[g]])
        assert image_auroc(got[g], labels) == pytest.approx(auc[kind], abs=1e-12)


def test_maps_are_the_lgst_maps(run, loaded):
    from evaluation.score_files import load_anomaly_map
    from evaluation.score_files import map_at_size

    model, _, data, pred = loaded
    assert len(pred.maps) == len(data.test) and pred.maps[0].shape == (SIZE, SIZE)
    assert pred.maps[0].dtype == np.float32 and pred.scores.dtype == np.float64
    for s, m, score in zip(data.test, pred.maps, pred.extra["LGST"]):
        tiff = load_anomaly_map("LGST", CAT, s, run["out"] / "scores")
        np.testing.assert_array_equal(map_at_size(m, (tiff.shape[1], tiff.shape[0])), tiff)
        assert float(m.max()) == np.float32(score)  # the LGST image score is the map's maximum


def test_the_file_is_self_describing_and_predict_py_reads_it_in_a_fresh_process(run, loaded, lite0_weights,
                                                                                 tmp_path):
    from common.provenance import RANDOM
    from evaluation.predictions import read_scores_csv
    from methods.base import BACKBONE_STATE_KEY

    model, meta, data, pred = loaded
    ckpt = torch.load(run["fused"], weights_only=True)
    assert meta["backbone"] == LITE0 and meta["weights_sha256"] not in (None, RANDOM) and meta["finished"]
    assert meta["dataset"] == "synthetic_loco" and meta["train_images"].startswith("10:")
    assert meta["config"]["LGST"]["input_size"] == SIZE and meta["config"]["segmentor"]["resolution"] == SIZE
    assert BACKBONE_STATE_KEY not in ckpt  # real weights: found again by name and sha256
    assert ckpt["segmentor"]["meta"]["method"] == "segmentor" and ckpt["LGST"]["meta"]["method"] == "LGST"
    folder = Path(data.test[0].path).parent
    r = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(run["fused"]), "--images", str(folder),
                        "--out", str(tmp_path / "p"), "--weights", str(lite0_weights), "--device", "cpu",
                        "--no-overlays"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {Path(row["path"]).resolve(): row for row in read_scores_csv(tmp_path / "p" / "scores.csv")}
    idx = [i for i, s in enumerate(data.test) if Path(s.path).parent == folder]
    assert idx and len(rows) == len(idx)
    for i in idx:
        row = rows[Path(data.test[i].path).resolve()]
        assert float(row["score"]) == pytest.approx(pred.scores[i], abs=1e-6)
        assert float(row["LGST"]) == pytest.approx(pred.extra["LGST"][i], abs=1e-6)
        assert float(row["patchhist"]) == pytest.approx(pred.extra["patchhist"][i], abs=1e-6)
    assert len(list((tmp_path / "p" / "maps").rglob("*.tiff"))) == len(idx)


def test_test_only_writes_the_same_fused_model_and_says_when_it_cannot(run, loaded, tmp_path, caplog):
    import CSAD
    from methods.base import ImageList, load_model

    model, _, data, pred = loaded
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run["out"] / "ckpt", ckpt)
    (ckpt / f"csad_{CAT}.pth").unlink()
    args = [a if a != str(run["out"] / "ckpt") else str(ckpt) for a in run["common"]]
    args = [a if a != str(run["out"] / "scores") else str(tmp_path / "s") for a in args]
    args += ["--input-size", str(SIZE), "--iterations", "30", "--test-only"]
    with caplog.at_level("INFO"):
        _main(CSAD, args)
    assert f"fused CSAD model (segmentor {ckpt / f'segmentor_{CAT}_{SIZE}.pth'}" in caplog.text
    again, _ = load_model(ckpt / f"csad_{CAT}.pth", weights=args[args.index("--weights") + 1])
    np.testing.assert_array_equal(again.predict(ImageList(data.test)).scores, pred.scores)
    # a default segmentor checkpoint that does not fit: a warning naming the difference, no fused file
    seg = torch.load(ckpt / f"segmentor_{CAT}_{SIZE}.pth", weights_only=True)
    torch.save({**seg, "meta": {**seg["meta"], "train_images": "3:0123456789abcdef"}},
               ckpt / f"segmentor_{CAT}_{SIZE}.pth")
    (ckpt / f"csad_{CAT}.pth").unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        _main(CSAD, args)
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "fused CSAD model not written" in r.message]
    assert warned and "different runs (train_images 3:0123456789abcdef vs 10:" in warned[0].message
    assert not (ckpt / f"csad_{CAT}.pth").exists()
    # without the segmentor checkpoint: no fused file, and the log says how to get one
    (ckpt / f"segmentor_{CAT}_{SIZE}.pth").unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        _main(CSAD, args)
    assert "no fused CSAD model" in caplog.text and f"train_segmentor.py --categories {CAT} --resolution 64" \
        in caplog.text
    assert not (ckpt / f"csad_{CAT}.pth").exists()


def test_an_explicit_missing_segmentor_checkpoint_stops_before_any_work(run, tmp_path, capsys):
    import CSAD

    args = [a if a != str(run["out"] / "scores") else str(tmp_path / "s") for a in run["common"]]
    with pytest.raises(SystemExit) as e:
        CSAD.main(args + ["--segmentor-checkpoint", str(tmp_path / "none.pth")])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "--segmentor-checkpoint" in err and "none.pth: no such file" in err and "Traceback" not in err


def test_from_parts_refuses_parts_that_do_not_fit_together(run, lite0_weights):
    from methods.csad.model import CSADModel

    seg, lg = (torch.load(run[k], weights_only=True) for k in ("seg", "lgst"))
    CSADModel.from_parts(seg, lg, weights=lite0_weights)  # the pair itself is fine

    def refused(s, g, match):
        with pytest.raises(CheckpointError, match=match):
            CSADModel.from_parts(s, g, weights=lite0_weights)

    refused(lg, seg, "is a LGST checkpoint, not a segmentor one")
    other = {**seg, "meta": {**seg["meta"], "category": "synth_bottle"}}
    refused(other, lg, "different runs \\(category synth_bottle vs synth_box\\)")
    other = {**lg, "config": {**lg["config"], "input_size": 128}}
    refused(seg, other, "works at 64 px but .* at 128 px.*--resolution 128")
    refused(seg, {k: v for k, v in lg.items() if k != "val_scores"}, "holds no LGST validation scores")
    unfinished = {**lg, "meta": {**lg["meta"], "finished": False}}
    refused(seg, unfinished, "unfinished run")
    # an older LGST checkpoint works when its validation scores are passed
    old = {k: v for k, v in lg.items() if k != "val_scores"}
    m = CSADModel.from_parts(seg, old, weights=lite0_weights, lgst_val_scores=lg["val_scores"].numpy())
    np.testing.assert_array_equal(m.lgst.val_scores, lg["val_scores"].numpy())
    with pytest.raises(CheckpointError, match="not a fused CSAD checkpoint"):
        CSADModel.from_checkpoint(lg, weights=lite0_weights)


def test_one_backbone_pass_per_batch_and_forward_networks(loaded):
    from methods.base import ImageList

    model, _, data, _ = loaded
    calls = []
    handle = model.backbone.conv_stem.register_forward_hook(lambda *a: calls.append(1))
    try:
        model.predict(ImageList(data.test[:3]))
        assert len(calls) == 1  # one batch, one backbone pass feeding both branches
        batch = model.preprocess(ImageList(data.test[:2]))
        logits, m_st, m_ae = model.forward_networks(batch)
    finally:
        handle.remove()
    assert batch.shape == (2, 3, SIZE, SIZE) and logits.shape == (2, model.patchhist.num_classes, SIZE, SIZE)
    assert m_st.shape == m_ae.shape == (2, SIZE // 4, SIZE // 4)
    # the same pixels the segmentor alone sees
    torch.testing.assert_close(batch, model.patchhist.preprocess(ImageList(data.test[:2])), rtol=0, atol=0)


def test_bf16_predict_is_finite_and_ranks_like_fp32(loaded):
    from scipy.stats import spearmanr

    from methods.base import ImageList

    model, _, data, pred = loaded
    model.cfg.dtype = "bf16"
    try:
        low = model.predict(ImageList(data.test))
    finally:
        model.cfg.dtype = "fp32"
    assert np.isfinite(low.scores).all() and low.maps[0].dtype == np.float32
    assert not np.array_equal(low.extra["LGST"], pred.extra["LGST"])  # the reduced-precision path really ran
    assert spearmanr(low.scores, pred.scores).statistic > 0.9


def test_fit_gives_the_fusion_of_the_parts(run):
    """CSADModel.fit on PIL images (random weights: plumbing only): its scores are the trimmed-z sum of its parts'
    own predictions (their own preprocessing and backbone passes), and a save/load round trip keeps them, with the
    random backbone stored once in the file."""
    import cv2

    from dataset_readers import read_category
    from evaluation.fusion import fuse
    from methods.base import BACKBONE_STATE_KEY, ImageList, load_model
    from methods.csad import label_layout as layout
    from methods.csad.lgst import LGSTConfig
    from methods.csad.model import CSADModel
    from methods.csad.segmentor import PseudoLabels, SegmentorConfig
    from models.backbones import load_backbone

    data = read_category("synthetic_loco", CAT, run["root"])
    maps = [cv2.imread(str(layout.component_maps_dir(run["root"], CAT) / f"{s.stem}.png"), cv2.IMREAD_UNCHANGED)
            for s in data.train]
    sup = np.arange(5)
    labels = PseudoLabels(int(max(m.max() for m in maps)) + 1, sup, [maps[i] for i in sup],
                          backgrounds=[(maps[i] == 0).astype(np.uint8) * 255 for i in sup])
    with pytest.warns(UserWarning, match="random weights"):
        backbone = load_backbone(LITE0, "random")
    model = CSADModel.build(backbone,
                            lgst_cfg=LGSTConfig(input_size=SIZE, channels=16, student_width=8, ae_base=16,
                                                iterations=3),
                            segmentor_cfg=SegmentorConfig(resolution=SIZE, epochs=2, sup_only_epochs=1,
                                                          lsa_points=200, lsa_attempts=20))
    model.fit(ImageList(data.train), labels=labels, validation=ImageList(data.validation))
    test = ImageList(data.test)
    pred = model.predict(test)
    ph, lg = model.patchhist.predict(test).scores, model.lgst.predict(test).scores
    np.testing.assert_allclose(pred.extra["patchhist"], ph, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(pred.extra["LGST"], lg)
    ref = fuse({"patchhist": ph, "LGST": lg}, {"patchhist": model.patchhist.val_scores, "LGST": model.lgst.val_scores})
    np.testing.assert_allclose(pred.scores, ref, rtol=0, atol=1e-6)
    path = run["out"] / "fit.pth"
    model.save(path, model.record(dataset="synthetic_loco", category=CAT, train_samples=data.train))
    ckpt = torch.load(path, weights_only=True)
    assert BACKBONE_STATE_KEY in ckpt and not any(BACKBONE_STATE_KEY in ckpt[p] for p in ("segmentor", "LGST"))
    again, meta = load_model(path)
    assert meta["method"] == "csad" and meta["train_images"].startswith("10:") and meta["weights_sha256"] == "RANDOM"
    assert again.patchhist.backbone is again.lgst.backbone is not backbone
    np.testing.assert_array_equal(again.predict(test).scores, pred.scores)
