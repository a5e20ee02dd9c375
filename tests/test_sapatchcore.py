"""SA-PatchCore / PatchCore: coreset vs brute force, kNN vs cdist, the attention block by hand, Eq. 7, geometry,
and the whole script on the synthetic dataset (PatchCore must rank structural anomalies above good images)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import sapatchcore
from dataset_readers import Sample, read_category
from dataset_readers.torch_data import imagenet_transform
from evaluation.metrics import image_auroc
from evaluation.score_files import anomaly_map_path, load_scores
from methods.knn import knn
from methods.patchcore import (defaults_for, embed, greedy_kcenter, reweight_factor, resized_size, score_embeddings,
                               select_coreset, sparse_jl_projection, uncrop)
from models.self_attention import channel_self_attention


# ------------------------------------------------------------------------------------------------ coreset
def brute_force_kcenter(x: np.ndarray, n: int, start: int | None = None, init: np.ndarray | None = None) -> list[int]:
    """Textbook greedy k-center with a full distance matrix and explicit loops."""
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    chosen = []
    if init is None:
        chosen.append(start)
        min_d = dist[start].copy()
    else:
        min_d = init.copy()
    while len(chosen) < n:
        i = int(np.argmax(min_d))
        chosen.append(i)
        min_d = np.minimum(min_d, dist[i])
    return chosen


def test_kcenter_equals_brute_force_with_same_start():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12))
    got = greedy_kcenter(torch.from_numpy(x), 40, start_index=17, progress=False).tolist()
    assert got == brute_force_kcenter(x, 40, start=17)
    assert got[0] == 17 and len(set(got)) == 40


def test_approx_coreset_equals_brute_force_from_start_distances():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(250, 6))
    starts = [3, 50, 120]
    init = np.sqrt(((x[:, None] - x[starts][None]) ** 2).sum(-1)).mean(1)  # PatchCore: mean distance to the starts
    got = greedy_kcenter(torch.from_numpy(x), 25, start_dists=torch.from_numpy(init), progress=False).tolist()
    assert got == brute_force_kcenter(x, 25, init=init)


def test_select_coreset_size_and_determinism():
    bank = torch.randn(1000, 32)
    for method, ratio in (("patchcore", 0.1), ("sapatchcore", 0.01)):
        cfg = defaults_for(method, seed=5)
        a = select_coreset(bank, cfg, n_images=10, progress=False)
        b = select_coreset(bank, cfg, n_images=10, progress=False)
        assert len(a) == int(1000 * ratio) and len(set(a.tolist())) == len(a)
        assert torch.equal(a, b)
    # SA-PatchCore starts at the first patch of a (seeded) random training image
    assert select_coreset(bank, defaults_for("sapatchcore", seed=5), n_images=10, progress=False)[0] % 100 == 0


def test_coreset_covers_isolated_cluster():
    """k-center picks a far outlier cluster that random subsampling would likely miss."""
    g = torch.Generator().manual_seed(0)
    bank = torch.cat([torch.randn(2000, 16, generator=g), torch.randn(5, 16, generator=g) + 50.0])
    idx = select_coreset(bank, defaults_for("patchcore", coreset_ratio=0.01), progress=False)
    assert (idx >= 2000).any()


def test_jl_dimension_matches_closed_form():
    n = 313_600
    k = math.floor(4 * math.log(n) / (0.9 ** 2 / 2 - 0.9 ** 3 / 3))
    proj = sparse_jl_projection(n, 1536, 0.9, 0, seed=0)
    assert k == 312 and proj.shape == (1536, 312)
    # sparse with density 1/sqrt(1536): entries are 0 or +-sqrt(sqrt(1536) / 312)
    vals = np.unique(np.abs(proj.numpy()))
    np.testing.assert_allclose(vals[1:], math.sqrt(math.sqrt(1536) / 312), rtol=1e-5)
    assert abs((proj != 0).float().mean().item() - 1 / math.sqrt(1536)) < 0.005


# ------------------------------------------------------------------------------------------------ kNN
@pytest.mark.parametrize("k", [1, 4])
def test_knn_equals_cdist_across_chunks(k):
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(257, 24, generator=g), torch.randn(1013, 24, generator=g)
    ref_d, ref_i = torch.cdist(q.double(), bank.double()).topk(k, dim=1, largest=False)
    for chunk in (3000, 50_000, 2 ** 26):  # many bank chunks, a few, one
        d, i = knn(q, bank, k=k, chunk_elems=chunk)
        torch.testing.assert_close(d.double(), ref_d, rtol=1e-4, atol=1e-4)
        assert torch.equal(i, ref_i)
    d2, _ = knn(q, bank, k=k, squared=True, chunk_elems=3000)
    torch.testing.assert_close(d2.double(), ref_d ** 2, rtol=1e-4, atol=1e-4)


def test_knn_faiss_equals_torch():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    q, bank = torch.randn(300, 40, generator=g), torch.randn(2000, 40, generator=g)
    dt, it = knn(q, bank, k=3, chunk_elems=10_000)
    df, i_f = knn(q, bank, k=3, backend="faiss")
    torch.testing.assert_close(df, dt, rtol=1e-4, atol=1e-4)
    assert torch.equal(i_f, it)


# ------------------------------------------------------------------------------------------------ attention
def test_self_attention_hand_computed_2x2():
    m = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[3.0, 3.0], [3.0, 3.0]]]])  # (1, 2, 2, 2)
    out = channel_self_attention(m)
    e = math.e
    expected_c0 = [(e + 2 * e ** 2) / (e + 2 + e ** 2),  # m_i = 1: weights exp(1*m_j)
                   0.75, 0.75,  # m_i = 0: uniform weights, the channel mean (1 + 0 + 0 + 2) / 4
                   (e ** 2 + 2 * e ** 4) / (e ** 2 + 2 + e ** 4)]  # m_i = 2: weights exp(2*m_j)
    torch.testing.assert_close(out[0, 0].flatten(), torch.tensor(expected_c0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0, 1], m[0, 1])  # a constant channel stays constant: channels do not mix
    # chunking over channels gives the same result
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(channel_self_attention(x, chunk_elems=144), channel_self_attention(x))


def test_sapatchcore_embedding_layout():
    """avg-pooled layer2 first, then max-pool + attention of layer3 repeated 2x2 (nearest), 28x28 for 224 px."""
    from models.backbones import load_backbone
    from models.feature_extractor import FeatureExtractor

    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        fe = FeatureExtractor(load_backbone("resnet18", "random"), ["layer2", "layer3"])
    x = torch.randn(2, 3, 224, 224)
    cfg = defaults_for("sapatchcore")
    e = embed(fe, x, cfg)
    assert e.shape == (2, 28, 28, 128 + 256)
    f = fe(x)
    l3 = channel_self_attention(torch.nn.functional.max_pool2d(f["layer3"], 3, 1, 1))
    torch.testing.assert_close(e[:, 2 * 5 + 1, 2 * 7, 128:], l3[:, :, 5, 7])
    torch.testing.assert_close(e[:, 0, 0, :128], f["layer2"][:, :, :2, :2].sum((2, 3)) / 9)  # zero padding counted
    pc = embed(fe, x, defaults_for("patchcore"))
    assert pc.shape == (2, 28, 28, 1024)


# ------------------------------------------------------------------------------------------------ scoring
def test_scores_and_reweighting_match_brute_force():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(60, 5, generator=g)
    emb = torch.randn(2, 3, 4, 5, generator=g)
    emb[1, 2, 3] += 6.0  # one clearly anomalous patch
    cfg = defaults_for("sapatchcore", reweight=True, reweight_b=4)
    patch, image = score_embeddings(emb, bank, cfg)
    d = torch.cdist(emb.reshape(-1, 5).double(), bank.double())
    torch.testing.assert_close(patch.double().flatten(), d.min(1).values, rtol=1e-5, atol=1e-5)
    assert patch[1].argmax() == 2 * 4 + 3
    for b in range(2):
        p = d[b * 12:(b + 1) * 12]
        star = int(p.min(1).values.argmax())
        s_star, m_star = p[star].min(0)
        support = torch.cdist(bank[m_star][None].double(), bank.double())[0].argsort()[:4]  # b nearest of m* in M
        w = 1 - torch.softmax(p[star, support], 0)[0]
        torch.testing.assert_close(image[b].double(), w * s_star, rtol=1e-5, atol=1e-5)
    # without reweighting the image score is the max patch score; squared distance is its square
    _, plain = score_embeddings(emb, bank, defaults_for("sapatchcore"))
    _, sq = score_embeddings(emb, bank, defaults_for("patchcore"))
    torch.testing.assert_close(plain.double(), d.min(1).values.reshape(2, 12).max(1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sq, plain ** 2, rtol=1e-4, atol=1e-4)
    assert 0 < reweight_factor(emb[1, 2, 3][None], torch.tensor([0]), bank, 9).item() < 1


def test_resize_and_uncrop_geometry(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (90, 150)).save(path)  # W x H
    s = Sample(str(path), "test")
    for resize, crop in (((64,), 48), ((64, 80), 48)):
        tf = imagenet_transform(resize[0] if len(resize) == 1 else resize)
        assert tuple(tf(Image.open(path).convert("RGB")).shape[1:]) == resized_size(s, resize)
    maps = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4) + 1
    full = uncrop(maps, (7, 8), 4)
    assert full.shape == (2, 7, 8)
    top, left = round(3 / 2), 2  # torchvision CenterCrop offsets
    np.testing.assert_array_equal(full[:, top:top + 4, left:left + 4], maps)
    assert full[0, 0, 0] == 1 and full[1, -1, -1] == 17  # outside the crop: each map's minimum


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def synth_run(synthetic_root, lite0_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("sapc")
    common = ["--dataset", "synthetic_loco", "--data-root", str(synthetic_root), "--categories", "synth_box",
              "--fast", "--backbone", "efficientnet_lite0", "--weights", str(lite0_weights),
              "--score-dir", str(out / "scores"), "--ckpt-dir", str(out / "ckpt"), "--device", "cpu"]
    res = {m: sapatchcore.main(common + ["--method", m])["synth_box"] for m in ("patchcore", "sapatchcore")}
    return synthetic_root, out, common, res


def test_patchcore_ranks_structural_anomalies_above_good(synth_run):
    root, out, _, _ = synth_run
    data = read_category("synthetic_loco", "synth_box", root)
    groups = data.score_groups()
    struc = load_scores("synth_box", "patchcore", "struc", samples=groups["struc"], score_dir=out / "scores")
    auc = image_auroc(struc, [s.label for s in groups["struc"]])
    assert auc >= 0.85, f"patchcore structural AUROC {auc:.3f}"
    for method in ("patchcore", "sapatchcore"):
        val = load_scores("synth_box", method, "val", samples=groups["val"], score_dir=out / "scores")
        assert np.isfinite(val).all() and len(val) == len(data.validation)
    # maps: one float32 TIFF per test image at the original size
    import tifffile
    s = data.test[-1]
    m = tifffile.imread(anomaly_map_path("patchcore", "synth_box", s, out / "scores"))
    assert m.dtype == np.float32 and m.shape == (128, 128)


def test_sapatchcore_ranks_corrupted_images_above_good(synth_run, tmp_path):
    """A 50 x 50 noise square (a clear structural defect) must outscore every good test image."""
    from PIL import Image

    from methods.base import load_model

    root, out, _, _ = synth_run
    model, meta = load_model(out / "ckpt" / "sapatchcore_synth_box.pt")
    cfg = model.cfg
    assert meta["method"] == cfg.method == "sapatchcore" and cfg.attention and cfg.coreset_ratio == 0.01
    good = [s for s in read_category("synthetic_loco", "synth_box", root).test if s.label == 0]
    rng = np.random.default_rng(0)
    bad = []
    for s in good[:3]:
        a = np.asarray(Image.open(s.path).convert("RGB")).copy()
        a[30:80, 30:80] = rng.integers(0, 256, (50, 50, 3))
        bad.append(Image.fromarray(a))
    scores = model.predict([Image.open(s.path).convert("RGB") for s in good] + bad, maps=False).scores
    assert scores[len(good):].min() > scores[:len(good)].max(), scores


def _outputs(score_dir, method: str) -> dict:
    """Every score file and TIFF map of `method` under score_dir, by relative path."""
    import tifffile

    files = [f for f in sorted(score_dir.rglob("*.npy")) + sorted(score_dir.rglob("*.tiff"))
             if f"_{method}_" in f.name or f"/{method}/" in str(f.relative_to(score_dir))]
    return {str(f.relative_to(score_dir)): np.load(f) if f.suffix == ".npy" else tifffile.imread(f) for f in files}


@pytest.mark.parametrize("method", ["patchcore", "sapatchcore"])
def test_test_only_reproduces_score_files_and_maps_bit_for_bit(synth_run, method):
    root, out, common, res = synth_run
    state = torch.load(out / "ckpt" / f"{method}_synth_box.pt", weights_only=True)
    n_train = len(read_category("synthetic_loco", "synth_box", root).train)
    ratio = {"patchcore": 0.1, "sapatchcore": 0.01}[method]
    dim = {"patchcore": 1024, "sapatchcore": 40 + 112}[method]  # Lite0 layer2 + layer3 channels
    assert state["bank"].shape == (int(n_train * 14 * 14 * ratio), dim)  # 112 px crop, 14 x 14 patches
    assert state["config"]["coreset_ratio"] == ratio and state["meta"]["finished"] is True
    again = sapatchcore.main(common + ["--method", method, "--test-only", "--score-dir",
                                       str(out / f"again_{method}")])["synth_box"]
    a, b = _outputs(out / "scores", method), _outputs(out / f"again_{method}", method)
    assert sum(k.endswith(".npy") for k in a) == 3 and sum(k.endswith(".tiff") for k in a) == 24  # 8 per test folder
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert np.array_equal(again.test_scores, res[method].test_scores) and again.bank_size == len(state["bank"])
    if method == "patchcore":  # --checkpoint FILE (implies --test-only; --ckpt-dir is not read)
        named = sapatchcore.main(common + ["--method", method, "--no-maps", "--score-dir", str(out / "named"),
                                           "--checkpoint", str(out / "ckpt" / "patchcore_synth_box.pt"),
                                           "--ckpt-dir", str(out / "nothing")])["synth_box"]
        assert np.array_equal(named.test_scores, res[method].test_scores)
        assert np.array_equal(named.val_scores, res[method].val_scores)
        idx = json.loads((out / "named" / "synth_box_patchcore_struc_score.json").read_text())
        assert len(idx["images"]) == len(idx["labels"])


def test_load_model_in_a_fresh_process_gives_the_score_files(synth_run):
    """methods.base.load_model with only the bank file (weights found again by their hash), in another process:
    the training run's scores and maps."""
    import os
    import subprocess
    import sys

    import tifffile

    from evaluation.score_files import load_scores

    root, out, _, _ = synth_run
    path = out / "ckpt" / "sapatchcore_synth_box.pt"
    code = (f"import numpy as np, torch; torch.set_num_threads({torch.get_num_threads()}); "
            "from dataset_readers import read_category; from methods.base import ImageList, load_model; "
            f"m, meta = load_model({str(path)!r}); d = read_category('synthetic_loco', 'synth_box', {str(root)!r}); "
            "p = m.predict(ImageList(d.test)); "
            f"np.save({str(out / 'fresh_scores.npy')!r}, p.scores); np.save({str(out / 'fresh_map.npy')!r}, p.maps[-1]); "
            "print(meta['method'], type(m).__name__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["sapatchcore", "PatchCoreModel"]
    data = read_category("synthetic_loco", "synth_box", root)
    scores = np.load(out / "fresh_scores.npy")
    pos = {s.path: i for i, s in enumerate(data.test)}
    for g, samples in data.score_groups().items():
        if g != "val":
            saved = load_scores("synth_box", "sapatchcore", g, samples=samples, score_dir=out / "scores")
            assert np.array_equal(saved, scores[[pos[s.path] for s in samples]]), g
    tiff = tifffile.imread(anomaly_map_path("sapatchcore", "synth_box", data.test[-1], out / "scores"))
    assert np.array_equal(np.load(out / "fresh_map.npy"), tiff)  # 128 x 128 resize: the map is the full image


def test_clear_errors(synth_run, tmp_path):
    _, _, common, _ = synth_run
    with pytest.raises(SystemExit, match="sapatchcore_synth_box.pt"):  # main() exits 1 with the one-line message
        sapatchcore.main(common + ["--ckpt-dir", str(tmp_path), "--load-bank", "--no-maps"])
    with pytest.raises(SystemExit, match="unknown category"):
        sapatchcore.main(common[:5] + ["nope"] + common[6:])
    with pytest.raises(SystemExit, match="not found"):
        sapatchcore.main(["--dataset", "mvtec_ad", "--data-root", str(tmp_path / "missing"), "--categories", "bottle",
                          "--weights", "random"])


# ------------------------------------------------------------------------------------------------ official input
def _pil_reference(img, size_wh, resample, crop):
    """PIL resize + centre crop + ImageNet normalisation, by hand (what the official transforms compute)."""
    a = np.asarray(img.resize(size_wh, resample), dtype=np.float32) / 255.0
    h, w = a.shape[:2]
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    a = a[top:top + crop, left:left + crop]
    a = (a - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def test_input_resize_filters_match_pil():
    """SA-PatchCore: PIL LANCZOS to 256x256 (run.py's Image.ANTIALIAS) then crop 224; PatchCore: PIL bilinear of
    the shorter side to 256 (torchvision Resize default) then crop 224."""
    from PIL import Image

    from methods.patchcore import transform_for

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8))  # H=50, W=70: upsampled
    sa = defaults_for("sapatchcore")
    assert sa.resample == "lanczos" and defaults_for("patchcore").resample == "bilinear"
    got = transform_for(sa)(img)
    torch.testing.assert_close(got, _pil_reference(img, (256, 256), Image.LANCZOS, 224), rtol=0, atol=1e-5)
    bilinear = _pil_reference(img, (256, 256), Image.BILINEAR, 224)
    assert (got - bilinear).abs().max() > 0.05  # the filters really differ on this image
    pc = transform_for(defaults_for("patchcore"))(img)
    torch.testing.assert_close(pc, _pil_reference(img, (358, 256), Image.BILINEAR, 224), rtol=0, atol=1e-5)
    torch.testing.assert_close(transform_for(defaults_for("sapatchcore", resample="bilinear"))(img), bilinear,
                               rtol=0, atol=1e-5)


def test_old_bank_config_reads_as_bilinear():
    from methods.patchcore import PatchCoreConfig

    d = defaults_for("sapatchcore").to_dict()
    del d["resample"]  # a bank saved before the filter was recorded was built with bilinear
    assert PatchCoreConfig.from_dict(d).resample == "bilinear"
    assert PatchCoreConfig.from_dict(defaults_for("sapatchcore").to_dict()).resample == "lanczos"


# ------------------------------------------------------------------------------------------------ official BN bug
def test_official_bn_update_equals_one_train_mode_forward_of_ones():
    """patchcore-inspection's feature_dimensions probe: one all-ones forward in train mode, stopped after layer3,
    so the BatchNorms of the stem and layers 1-3 take one momentum-0.1 update and layer4's stay as loaded."""
    import copy

    from methods.patchcore import official_bn_update
    from models.backbones import load_backbone
    from models.feature_extractor import FeatureExtractor

    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        net = load_backbone("resnet18", "random")
    for m in net.modules():  # non-trivial loaded statistics, so that an update is visible
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ref = copy.deepcopy(net).train()
    with torch.no_grad():
        x = torch.ones(1, 3, 112, 112)
        x = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        ref.layer3(ref.layer2(ref.layer1(x)))  # the official forward stops after layer3
    fe = FeatureExtractor(net, ["layer2", "layer3"])
    official_bn_update(fe, defaults_for("patchcore", crop=112))
    assert not net.training  # back in eval mode
    got, want = net.state_dict(), ref.state_dict()
    moved = [k for k in got if k.endswith("running_mean") and not torch.equal(got[k], before[k])]
    assert "bn1.running_mean" in moved and "layer3.1.bn2.running_mean" in moved
    for k in got:
        if k.startswith("layer4"):
            assert torch.equal(got[k], before[k]), k  # never reached
        else:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():  # by hand for the stem: one momentum-0.1 step toward the batch statistics of conv1(ones)
        y = net.conv1(torch.ones(1, 3, 112, 112))
    torch.testing.assert_close(net.bn1.running_mean, 0.9 * before["bn1.running_mean"] + 0.1 * y.mean((0, 2, 3)))
    torch.testing.assert_close(net.bn1.running_var,
                               0.9 * before["bn1.running_var"] + 0.1 * y.var((0, 2, 3), unbiased=True))
    assert int(got["bn1.num_batches_tracked"]) == int(before["bn1.num_batches_tracked"]) + 1


def test_saved_bank_refused_with_another_input_filter(synth_run, capsys):
    """A bank embedded with LANCZOS input must not be scored with bilinear input (or the BN update): the saved
    config records both."""
    _, _, common, _ = synth_run
    for extra in (["--resize-filter", "bilinear"], ["--method", "patchcore", "--official"]):
        with pytest.raises(SystemExit) as exc:
            sapatchcore.main(common + (["--method", "sapatchcore"] if "--method" not in extra else []) + extra +
                             ["--load-bank", "--no-maps"])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert ("resample" in err) or ("official_bn_update" in err), err
