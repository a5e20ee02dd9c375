"""CSAD stage 2 as a model object: PatchHistModel fit from in-memory pseudo-labels, its one checkpoint (segmentor +
Patch Histogram + validation scores), load_model in this and in a fresh process, the shared-backbone interface the
fused CSAD uses, and predict.py on a segmentor checkpoint."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.errors import CheckpointError, UserError
from methods.base import ImageList, load_model
from methods.csad import label_layout as layout
from methods.csad.segmentor import (PatchHistModel, PseudoLabels, SegmentorConfig, read_pseudo_labels,
                                    segmentor_meta)

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = dict(resolution=32, epochs=2, sup_only_epochs=1, lsa_points=200, lsa_attempts=20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dataset_readers import read_category
    from dataset_readers.synthetic_loco import generate

    root = tmp_path_factory.mktemp("tiny_ph")
    generate(root, size=64, n_train=8, n_val=4, n_test=3, seed=0, categories=["synth_box"], component_maps=True)
    data = read_category("synthetic_loco", "synth_box", root)
    maps = [cv2.imread(str(layout.component_maps_dir(root, "synth_box") / f"{s.stem}.png"), cv2.IMREAD_UNCHANGED)
            for s in data.train]
    return root, data, maps


def _labels(maps, sup=(0, 1, 2, 3, 4)) -> PseudoLabels:
    """True component maps as stage-1 arrays: instances = the label's components, background = class 0."""
    sup = np.asarray(sup)
    return PseudoLabels(int(max(m.max() for m in maps)) + 1, sup, [maps[i] for i in sup],
                        backgrounds=[(maps[i] == 0).astype(np.uint8) * 255 for i in sup])


def _fit(backbone, data, maps, **over):
    model = PatchHistModel(backbone, SegmentorConfig(**{**TINY, **over}))
    return model.fit(ImageList(data.train), labels=_labels(maps), validation=ImageList(data.validation), seed=0)


@pytest.fixture(scope="module")
def fitted(tiny, lite0_weights, tmp_path_factory):
    from models.backbones import load_backbone

    root, data, maps = tiny
    bb = load_backbone("efficientnet_lite0", lite0_weights)
    model = _fit(bb, data, maps)
    path = tmp_path_factory.mktemp("ph_ckpt") / "segmentor_synth_box_32.pth"
    model.save(path, segmentor_meta(bb, model.cfg, dataset="synthetic_loco", category="synth_box",
                                    train_samples=data.train, seed=0))
    return model, path, model.predict(ImageList(data.test))


def test_read_pseudo_labels_gives_the_layout_arrays_by_stem(tiny, tmp_path):
    root, data, maps = tiny
    layout.write_from_component_maps(root, "synth_box", tmp_path, good_fraction=0.5)
    pl = read_pseudo_labels(data, tmp_path)
    assert pl.num_classes == max(m.max() for m in maps) + 1 and pl.sup.tolist() == [0, 1, 2, 3]
    for j, i in enumerate(pl.sup):
        np.testing.assert_array_equal(pl.labels[j], maps[i])
        np.testing.assert_array_equal(pl.instances[j], layout.instance_map(maps[i]))
        assert ((pl.backgrounds[j] > 127) == (maps[i] == 0)).mean() > 0.99  # background.jpg: JPEG noise
    bad = layout.image_dir("synth_box", data.train[1].stem, tmp_path) / layout.LABEL_MAP
    cv2.imwrite(str(bad), np.zeros((10, 10), np.uint8))
    with pytest.raises(layout.LayoutError, match=f"{bad} is 10x10 but .* is 64x64"):
        pl.labels[1]  # read (and checked) when accessed


def test_fit_scores_and_validation_normalisation(fitted, tiny):
    model, _, pred = fitted
    _, data, _ = tiny
    ph = model.patch_histogram
    assert pred.scores.dtype == np.float64 and pred.scores.shape == (len(data.test),) and np.isfinite(pred.scores).all()
    assert pred.maps is None and pred.label_maps.shape == (len(data.test), 32, 32) and pred.label_maps.dtype == np.uint8
    # scores = trimmed-z of each detector against the validation distances; val_scores = those of validation
    from evaluation.fusion import trimmed_z_normalize

    dg, dp = ph.distances(torch.from_numpy(pred.label_maps))
    expect = trimmed_z_normalize(dg, ph.hist_val_score) + trimmed_z_normalize(dp, ph.patch_hist_val_score)
    np.testing.assert_allclose(pred.scores, expect, rtol=1e-12)
    assert model.val_scores.shape == (len(data.validation),)
    np.testing.assert_allclose(model.val_scores, ph.normalise(ph.hist_val_score, ph.patch_hist_val_score))
    assert model.history["sup"] == 5 and model.history["unsup"] == 3 and len(model.history["losses"]) == 2
    assert model.num_classes == ph.num_classes == 5 and model.resolution == 32


def test_checkpoint_roundtrip_in_process_and_in_a_fresh_one(fitted, tiny):
    model, path, pred = fitted
    _, data, _ = tiny
    again, meta = load_model(path)
    assert isinstance(again, PatchHistModel) and meta["method"] == "segmentor" and meta["category"] == "synth_box"
    assert "eval_batch" not in meta["config"] and meta["config"]["epochs"] == 2  # inference settings unchecked
    p2 = again.predict(ImageList(data.test))
    assert np.array_equal(p2.scores, pred.scores) and np.array_equal(p2.label_maps, pred.label_maps)
    assert np.array_equal(again.val_scores, model.val_scores) and again.cfg == model.cfg
    code = ("import sys, numpy as np; from methods.base import load_model, ImageList; "
            "m, _ = load_model(sys.argv[1]); np.save(sys.argv[2], m.predict(ImageList(sys.argv[3:])).scores)")
    out = path.parent / "fresh.npy"
    r = subprocess.run([sys.executable, "-c", code, str(path), str(out), *[s.path for s in data.test]],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(np.load(out), pred.scores)


def test_shared_backbone_interface_for_the_fused_model(fitted, tiny, lite0_weights):
    from models.backbones import load_backbone
    from models.feature_extractor import FeatureExtractor

    model, path, pred = fitted
    _, data, _ = tiny
    from common.io import load_checkpoint

    ckpt = load_checkpoint(path)
    bb = load_backbone("efficientnet_lite0", lite0_weights)
    shared = PatchHistModel.from_checkpoint(ckpt, backbone=bb)
    assert shared.backbone is bb
    x = shared.preprocess(ImageList(data.test))
    feats = FeatureExtractor(bb, ["layer1", "layer2", "layer3"])(x)  # one pass for every head, as FusedCSAD
    maps = shared.label_maps_from_features(feats)
    assert maps.dtype == torch.uint8 and np.array_equal(maps.numpy(), pred.label_maps)
    logits = shared.segmentor({k: feats[k] for k in ("layer1", "layer3")}, shared.resolution)  # FusedCSAD's call
    assert torch.equal(logits, shared.forward_networks(x)) and logits.shape == (len(data.test), 5, 32, 32)
    assert np.array_equal(shared.patch_histogram.score(logits.argmax(1)), pred.scores)
    assert np.array_equal(shared.score_label_maps(maps), pred.scores)
    assert isinstance(shared.val_scores, np.ndarray) and shared.val_scores.dtype == np.float64
    with pytest.warns(UserWarning, match="random weights"):
        other = load_backbone("efficientnet_lite0", "random")
    with pytest.raises(CheckpointError, match="weights sha256 579344248a93.*the shared backbone has RANDOM"):
        PatchHistModel.from_checkpoint(ckpt, backbone=other)


@pytest.mark.filterwarnings("ignore:efficientnet_lite0. random weights")
def test_random_weights_checkpoint_carries_the_backbone(tiny, tmp_path):
    from models.backbones import load_backbone

    _, data, maps = tiny
    torch.manual_seed(0)
    bb = load_backbone("efficientnet_lite0", "random")
    model = _fit(bb, data, maps, epochs=1)
    path = tmp_path / "r.pth"
    model.save(path, segmentor_meta(bb, model.cfg, dataset="synthetic_loco", category="synth_box",
                                    train_samples=data.train))
    again, _ = load_model(path)  # rebuilt from the stored state, not drawn again
    assert again.backbone is not bb
    assert np.array_equal(again.predict(ImageList(data.test)).scores, model.predict(ImageList(data.test)).scores)
    from common.io import load_checkpoint

    with pytest.raises(CheckpointError, match="other random backbone weights"):
        PatchHistModel.from_checkpoint(load_checkpoint(path), backbone=load_backbone("efficientnet_lite0", "random"))
    assert PatchHistModel.from_checkpoint(load_checkpoint(path), backbone=bb).backbone is bb


def test_fit_refuses_mismatched_labels_and_unfitted_use(tiny, lite0_weights):
    from models.backbones import load_backbone

    _, data, maps = tiny
    model = PatchHistModel(load_backbone("efficientnet_lite0", lite0_weights), SegmentorConfig(**TINY))
    with pytest.raises(RuntimeError, match="fit"):
        model.predict(ImageList(data.test))
    with pytest.raises(UserError, match="4 label maps for 5 supervised"):
        model.fit(ImageList(data.train), labels=PseudoLabels(5, np.arange(5), maps[:4]), seed=0)
    with pytest.raises(layout.LayoutError, match="only 3 supervised images .* batch size is 4"):
        model.fit(ImageList(data.train), labels=_labels(maps, sup=(0, 1, 2)), seed=0)
    small = [m[::2, ::2] for m in maps]
    with pytest.raises(UserError, match="pseudo-label 0 is 32x32 but training image 0 is 64x64"):
        model.fit(ImageList(data.train), labels=_labels(small), seed=0)


def test_predict_script_scores_a_segmentor_checkpoint(fitted, tiny, tmp_path):
    import csv

    import predict

    model, path, pred = fitted
    _, data, _ = tiny
    folder = Path(data.test[0].path).parents[1]  # test/<defect types>
    assert predict.main(["--checkpoint", str(path), "--images", str(folder), "--out", str(tmp_path / "o"),
                         "--batch-size", "2", "--device", "cpu"]) == 0
    with open(tmp_path / "o" / "scores.csv") as fh:
        rows = {r["path"]: float(r["score"]) for r in csv.DictReader(line for line in fh if not line.startswith("#"))}
    got = np.array([rows[str(Path(s.path))] for s in data.test])
    np.testing.assert_allclose(got, pred.scores, rtol=1e-9)
    assert not (tmp_path / "o" / "maps").exists() or not list((tmp_path / "o" / "maps").rglob("*.tiff"))


def test_without_validation_the_training_images_normalise(tiny, lite0_weights, caplog):
    from methods.csad.segmentor import images_uint8, predict_from_feats
    from models.backbones import load_backbone

    _, data, maps = tiny
    model = PatchHistModel(load_backbone("efficientnet_lite0", lite0_weights), SegmentorConfig(**{**TINY, "epochs": 1}))
    model.fit(ImageList(data.train), labels=_labels(maps), validation=[], seed=0)
    assert "no validation split" in caplog.text
    images, _ = images_uint8(ImageList(data.train), 32)
    train_maps = predict_from_feats(model.segmentor, model.encoder.encode_uint8(images, 16), 32, 16)
    dg, dp = model.patch_histogram.distances(train_maps)  # the re-encoded training images, as before
    assert np.array_equal(model.patch_histogram.hist_val_score, dg)
    assert np.array_equal(model.patch_histogram.patch_hist_val_score, dp)
    assert model.val_scores.shape == (len(data.train),)
