"""PatchCore / SA-PatchCore as a model object: fit on PIL images, maps in each image's frame, the checkpoint alone
rebuilds the model, the official BatchNorm update survives save/load (also in a fresh process), bf16 inference,
no-crop batches of mixed sizes, the settings' precedence and refusals, keyword-only arguments."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoints import META_KEY
from common.errors import CheckpointError, UserError

REPO = Path(__file__).resolve().parent.parent
LITE0 = "efficientnet_lite0"


def _image(rng, w: int, h: int, defect: bool = False) -> Image.Image:
    """A smooth gradient with mild noise (the normal images); `defect`: a noise square in the middle."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200 + 20
    a = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    if defect:
        a[h // 3:h // 3 + h // 4, w // 3:w // 3 + w // 4] = rng.integers(0, 256, (h // 4, w // 4, 3))
    return Image.fromarray(a)


def _backbone(lite0_weights):
    from models.backbones import load_backbone

    return load_backbone(LITE0, lite0_weights)


@pytest.fixture(scope="module")
def fitted(lite0_weights):
    """PatchCore (shorter-side resize 64, crop 56) fitted on six landscape images; test images of both aspects."""
    from methods.patchcore import PatchCoreConfig, PatchCoreModel

    rng = np.random.default_rng(0)
    train = [_image(rng, 80, 64) for _ in range(6)]
    test = [_image(rng, 80, 64), _image(rng, 80, 64, defect=True), _image(rng, 64, 96), _image(rng, 64, 96, True)]
    cfg = PatchCoreConfig.fast("patchcore", resize=(64,), crop=56, coreset_ratio=0.25, batch_size=4)
    backbone = _backbone(lite0_weights)
    model = PatchCoreModel(backbone, cfg, device="cpu").fit(train, progress=False)
    return model, backbone, train, test


def test_model_fits_on_pil_images_and_round_trips_through_its_checkpoint(fitted):
    from methods.base import BACKBONE_STATE_KEY
    from methods.maps import resized_hw
    from methods.patchcore import PatchCoreModel, bank_meta

    model, backbone, train, test = fitted
    assert model.method == "patchcore" and model.n_train == 6
    assert model.bank.shape == (int(6 * 7 * 7 * 0.25), 1024)  # 56 px crop: 7 x 7 patches per image, 25 %
    pred = model.predict(test, progress=False)
    assert pred.scores.dtype == np.float64 and np.isfinite(pred.scores).all()
    assert pred.scores[1] > pred.scores[0] and pred.scores[3] > pred.scores[2]  # the noise squares score higher
    # maps in each image's resized frame (aspect kept, the crop undone), the margins at each map's minimum
    assert [m.shape for m in pred.maps] == [resized_hw(80, 64, 64)] * 2 + [resized_hw(64, 96, 64)] * 2
    m = pred.maps[1]
    assert m.dtype == np.float32 and m[:, :12].max() == m.min() and m[:, 12:68].max() > m.min()
    # networks only on the preprocessed batch, then the search: the same image scores
    batch = model.preprocess(test[:2])
    emb = model.forward_networks(batch)
    assert emb.shape == (2, 7, 7, 1024)
    np.testing.assert_allclose(model.score_embeddings(emb)[1].double().numpy(), pred.scores[:2], rtol=1e-5)
    # the checkpoint alone gives the same numbers, with the shared backbone or a rebuilt one
    ckpt = {**model.checkpoint(), META_KEY: bank_meta(backbone, model.cfg, dataset="folder", category="parts")}
    assert BACKBONE_STATE_KEY not in ckpt and "bn_buffers" not in ckpt and ckpt["n_train"] == 6
    for kw in ({"backbone": backbone}, {}):
        back = PatchCoreModel.from_checkpoint(ckpt, **kw)
        again = back.predict(test, progress=False)
        assert back.cfg == model.cfg and torch.equal(back.bank, model.bank)
        assert np.array_equal(again.scores, pred.scores)
        assert all(np.array_equal(a, b) for a, b in zip(again.maps, pred.maps))


def test_bf16_predict_is_finite_and_ranks_like_fp32(fitted):
    from scipy.stats import spearmanr

    model, _, train, test = fitted
    images = train + test
    ref = model.predict(images, progress=False)
    model.cfg.dtype = "bf16"
    try:
        low = model.predict(images, progress=False)
    finally:
        model.cfg.dtype = "fp32"
    assert low.scores.dtype == np.float64 and np.isfinite(low.scores).all()
    assert all(m.dtype == np.float32 and np.isfinite(m).all() for m in low.maps)
    assert not np.array_equal(low.scores, ref.scores)  # it did run in bf16
    assert spearmanr(low.scores, ref.scores).statistic > 0.9
    pix = spearmanr(np.concatenate([m.ravel() for m in low.maps]), np.concatenate([m.ravel() for m in ref.maps]))
    assert pix.statistic > 0.9
    assert np.array_equal(model.predict(images, progress=False).scores, ref.scores)  # fp32 again: exact


def test_no_crop_batches_images_of_one_size_together(fitted):
    """Without a crop (shorter-side resize) inputs differ in size: each batch holds one size, and every image
    scores as it does alone."""
    from methods.patchcore import PatchCoreConfig, PatchCoreModel, _batches, resized_size_of

    model, backbone, train, _ = fitted
    cfg = PatchCoreConfig.fast("patchcore", resize=(48,), crop=0, coreset_ratio=0.25)
    nocrop = PatchCoreModel(backbone, cfg).fit(train, progress=False)
    rng = np.random.default_rng(3)
    images = [_image(rng, 64, 48), _image(rng, 48, 64), _image(rng, 64, 48, True), _image(rng, 48, 64, True)]
    sizes = [im.size for im in images]
    assert _batches(cfg, 4, 8, sizes) == [[0, 2], [1, 3]]
    assert _batches(cfg, 4, 1, sizes) == [[0], [2], [1], [3]]
    pred = nocrop.predict(images, progress=False)
    assert [m.shape for m in pred.maps] == [resized_size_of(s, cfg.resize) for s in sizes] == [(48, 64), (64, 48)] * 2
    alone = np.array([nocrop.predict([im], maps=False, progress=False).scores[0] for im in images])
    np.testing.assert_allclose(pred.scores, alone, rtol=1e-5)
    assert pred.scores[2] > pred.scores[0] and pred.scores[3] > pred.scores[1]


def test_official_bn_update_is_stored_and_reproduced_on_load(lite0_weights, tmp_path):
    """--official-bn-update: the statistics move once per backbone, the checkpoint carries them, and a model
    loaded in a fresh process (weights found again by their hash) scores bit for bit as the fitted one."""
    from methods.base import ImageList
    from methods.patchcore import BN_STATE_KEY, PatchCoreConfig, PatchCoreModel, bank_meta

    rng = np.random.default_rng(1)
    paths = []
    for i, im in enumerate([_image(rng, 64, 64) for _ in range(4)] + [_image(rng, 64, 64, True) for _ in range(2)]):
        im.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    train, test = ImageList(paths[:3]), ImageList(paths[3:])
    cfg = PatchCoreConfig.fast("patchcore", resize=(64,), crop=56, official_bn_update=True, coreset_ratio=0.5)
    backbone = _backbone(lite0_weights)
    loaded = {k: v.clone() for k, v in backbone.named_buffers()}
    model = PatchCoreModel(backbone, cfg).fit(train, progress=False)
    moved = {k: v.clone() for k, v in backbone.named_buffers()}
    assert any(k.endswith("running_mean") and not torch.equal(moved[k], loaded[k]) for k in loaded)
    PatchCoreModel(backbone, cfg)  # a second model on the same backbone (the next category): no second update
    assert all(torch.equal(v, moved[k]) for k, v in backbone.named_buffers())
    with pytest.raises(UserError, match="freshly loaded backbone"):
        PatchCoreModel(backbone, PatchCoreConfig.fast("patchcore", resize=(64,), crop=56))
    pred = model.predict(test, progress=False)
    path = model.save(tmp_path / "bank.pt", bank_meta(backbone, cfg, dataset="folder", category="parts", train=paths[:3]))

    code = (f"import numpy as np, torch; torch.set_num_threads({torch.get_num_threads()}); "  # the same float sums
            "from methods.base import ImageList, load_model; "
            f"m, meta = load_model({str(path)!r}); p = m.predict(ImageList({paths[3:]!r}), progress=False); "
            f"np.save({str(tmp_path / 's.npy')!r}, p.scores); np.save({str(tmp_path / 'm.npy')!r}, np.stack(p.maps)); "
            "print(meta['method'], type(m).__name__, m.cfg.official_bn_update)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["patchcore", "PatchCoreModel", "True"]
    assert np.array_equal(np.load(tmp_path / "s.npy"), pred.scores)
    assert np.array_equal(np.load(tmp_path / "m.npy"), np.stack(pred.maps))

    from common.io import load_checkpoint

    ckpt = load_checkpoint(path)
    assert all(torch.equal(ckpt[BN_STATE_KEY][k], moved[k]) for k in moved)
    # a bank saved without the statistics (older files): the update runs again on a fresh backbone, same numbers
    old = {k: v for k, v in ckpt.items() if k != BN_STATE_KEY}
    again = PatchCoreModel.from_checkpoint(old).predict(test, progress=False)
    assert np.array_equal(again.scores, pred.scores)
    # the statistics matter: the same bank scored with the file's statistics gives other numbers
    plain = PatchCoreModel(_backbone(lite0_weights), PatchCoreConfig.fast("patchcore", resize=(64,), crop=56))
    plain.bank = model.bank
    assert not np.allclose(plain.predict(test, maps=False, progress=False).scores, pred.scores, rtol=1e-4)


def test_from_checkpoint_and_predict_refuse_in_one_line(fitted):
    from methods.patchcore import PatchCoreModel

    model, backbone, _, test = fitted
    with pytest.raises(CheckpointError, match="not a PatchCore/SA-PatchCore memory bank"):
        PatchCoreModel.from_checkpoint({"discriminator": {}}, backbone=backbone)
    with pytest.raises(CheckpointError, match=r"x\.pt holds no \(N, D\) memory bank"):
        PatchCoreModel.from_checkpoint({"bank": torch.zeros(5), "config": {}}, backbone=backbone, source="x.pt")
    nan = model.bank.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"memory bank in x\.pt is NaN"):
        PatchCoreModel.from_checkpoint({"bank": nan, "config": model.cfg.to_dict()}, backbone=backbone,
                                       source="x.pt")
    with pytest.raises(UserError, match="fit the model"):
        PatchCoreModel(backbone, model.cfg).predict(test)


# ------------------------------------------------------------------------------------------ settings
def test_settings_precedence_per_method():
    import sapatchcore
    from methods.patchcore import PatchCoreConfig, defaults_for

    def cfg(*argv):
        return sapatchcore.build_config(sapatchcore.parse_args(list(argv)))

    assert cfg() == PatchCoreConfig() == defaults_for("sapatchcore")
    pc = cfg("--method", "patchcore")
    assert pc == defaults_for("patchcore") and pc.method == "patchcore"
    assert (pc.coreset_ratio, pc.sampler, pc.proj_dim, pc.squared, pc.resample, pc.resize) == \
        (0.1, "approx", 128, True, "bilinear", (256,))
    assert (cfg("--fast").resize, cfg("--fast").crop) == ((128, 128), 112)
    assert (cfg("--fast", "--method", "patchcore").resize, cfg("--fast", "--method", "patchcore").crop) == ((128,), 112)
    # an explicit flag equal to the full default still wins over --fast
    a = cfg("--fast", "--resize", "256", "256", "--crop", "224")
    assert (a.resize, a.crop) == ((256, 256), 224)
    # a flag equal to the other method's default is still this run's value
    assert cfg("--method", "patchcore", "--coreset-ratio", "0.01", "--distance", "l2").coreset_ratio == 0.01
    assert not cfg("--method", "patchcore", "--distance", "l2").squared
    # --sampler alone brings its projection
    assert cfg("--method", "patchcore", "--sampler", "kcenter").proj_dim == 0
    assert cfg("--sampler", "approx").proj_dim == 128
    b = cfg("--no-attention", "--reweight", "--reweight-b", "5", "--num-nn", "3", "--resize-filter", "bilinear",
            "--dtype", "bf16", "--batch-size", "2", "--seed", "7")
    assert (b.attention, b.reweight, b.reweight_b, b.num_nn, b.resample, b.dtype, b.batch_size, b.seed) == \
        (False, True, 5, 3, "bilinear", "bf16", 2, 7)
    assert sapatchcore.parse_args(["--load-bank"]).test_only is True
    help_text = " ".join(sapatchcore.build_parser().format_help().split())
    assert "(default per --method: sapatchcore 0.01, patchcore 0.1)" in help_text
    assert "--fast: sapatchcore 128 128, patchcore 128" in help_text


def test_impossible_settings_are_refused_in_one_line(tmp_path, capsys):
    import sapatchcore

    base = ["--score-dir", str(tmp_path / "s"), "--ckpt-dir", str(tmp_path / "c"), "--data-root",
            str(tmp_path / "missing"), "--weights", "random", "--device", "cpu"]
    for extra, pattern in ((["--coreset-ratio", "0"], r"--coreset-ratio must be in \(0, 1\] \(got 0.0\)"),
                           (["--reweight-b", "1"], "--reweight-b must be at least 2"),
                           (["--resize", "1", "2", "3"], "--resize takes one size"),
                           (["--dtype", "fp16"], "--dtype fp16 needs a CUDA device")):
        with pytest.raises(SystemExit) as exc:
            sapatchcore.main(base + extra)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert exc.value.code == 1 and len(err) == 1, extra
        assert re.search(pattern, err[0]), err[0]


def test_functions_with_more_than_five_parameters_are_keyword_only():
    for rel in ["methods/patchcore.py", "sapatchcore.py"]:
        tree = ast.parse((REPO / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                total = len(positional) + len(node.args.kwonlyargs)
                assert total <= 5 or len(positional) <= 5 and node.args.kwonlyargs, (rel, node.name)
            if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Attribute) and
                                                    node.func.attr in ("debug", "info", "warning", "error")):
                assert len(node.args) <= 5, (rel, node.lineno)
