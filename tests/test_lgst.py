"""CSAD stage 3 (LGST): numerics against numpy / torchvision, networks, training statistics, the CLI end to end
on the synthetic dataset, checkpoint round trip, and the fused inference path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from methods.csad import lgst
from methods.csad.lgst import LGSTConfig, LGSTModel
from models.efficientad import AutoEncoder, LocalStudent, count_parameters

LITE0 = "efficientnet_lite0"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small convolutions run fastest single-threaded on a busy 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**kw) -> LGSTConfig:
    base = dict(input_size=64, channels=16, student_width=8, ae_base=16, iterations=3, eval_freq=2)
    base.update(kw)
    return LGSTConfig(**base)


def tiny_model(seed: int = 0, **kw) -> LGSTModel:
    from models.backbones import load_backbone

    with pytest.warns(UserWarning, match="random weights"):
        bb = load_backbone("resnet18", "random")
    return lgst.build_model(bb, tiny_cfg(**kw), seed)


# ------------------------------------------------------------------------------------------ numerics

@pytest.mark.parametrize("n", [1, 2, 7, 1000, 2 * 64 * 32 * 32])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.995, 0.999, 1.0])
def test_quantile_matches_numpy(n, q):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert float(lgst.quantile(x, q)) == pytest.approx(np.quantile(x.double().numpy(), q), rel=1e-5, abs=1e-6)


def test_hard_loss_is_mean_above_quantile():
    d = torch.arange(2000, dtype=torch.float64).reshape(2, 10, 10, 10) / 1000.0
    # q0.999 of 0..1.999 step 0.001 (2000 values): position 0.999 * 1999 = 1997.001 -> 1.997001
    expected = np.mean([1.998, 1.999])
    assert float(lgst.hard_loss(d, 0.999)) == pytest.approx(expected)
    d2 = torch.rand(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    a = d2.numpy().ravel()
    assert float(lgst.hard_loss(d2)) == pytest.approx(a[a >= np.quantile(a, 0.999)].mean(), rel=1e-5)


def test_quantile_normalisation_on_known_maps():
    m = torch.linspace(0, 1, 1001)
    qa, qb = lgst.quantile(m, 0.9), lgst.quantile(m, 0.995)
    assert (float(qa), float(qb)) == pytest.approx((0.9, 0.995))
    out = lgst.normalize_map(m, qa, qb, 0.1)
    assert float(out[900]) == pytest.approx(0.0, abs=1e-6)
    assert float(out[995]) == pytest.approx(0.1, abs=1e-6)
    assert float(out[0]) == pytest.approx(0.1 * -0.9 / 0.095, rel=1e-5)


def test_fit_quantiles_and_lgst_map_are_sum_of_normalised_maps():
    model = tiny_model().eval()
    val = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    lgst.fit_quantiles(model, val, torch.device("cpu"))
    st, ae = lgst.predict(model, val, torch.device("cpu"), raw=True)
    expect = [np.quantile(a.double().numpy(), q) for a in (st, ae) for q in (0.9, 0.995)]
    assert model.quantiles.tolist() == pytest.approx(expect, rel=1e-5)
    q = model.quantiles
    manual = 0.1 * (st - q[0]) / (q[1] - q[0]) + 0.1 * (ae - q[2]) / (q[3] - q[2])
    maps, scores = lgst.predict(model, val, torch.device("cpu"), upsample=False)
    torch.testing.assert_close(maps, manual)
    torch.testing.assert_close(scores, manual.flatten(1).amax(1))
    up, up_scores = lgst.predict(model, val, torch.device("cpu"))
    assert up.shape == (3, 64, 64) and torch.equal(up_scores, up.flatten(1).amax(1))


def test_channel_stats_equal_direct_computation():
    f = torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(2)) * 3 + 1
    mean, std = lgst.channel_stats(f)
    a = f.double().numpy()
    per_image_means = a.mean(axis=(2, 3))  # EfficientAD: mean of per-image channel means
    mu = per_image_means.mean(0)
    sigma = np.sqrt(np.mean([((x - mu[:, None, None]) ** 2).mean(axis=(1, 2)) for x in a], axis=0))
    np.testing.assert_allclose(mean.flatten().numpy(), mu, rtol=1e-5)
    np.testing.assert_allclose(std.flatten().numpy(), sigma, rtol=1e-5)


def test_official_teacher_stats_mean_of_batch_means_with_odd_n():
    f = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 + 1
    a = f.double().numpy()

    def official(order):  # batch 2, no drop_last: batches (o0, o1), (o2, o3), (o4)
        batches = [order[0:2], order[2:4], order[4:5]]
        mu = np.mean([a[b].mean(axis=(0, 2, 3)) for b in batches], axis=0)
        return mu, batches

    mu, batches = official([0, 1, 2, 3, 4])
    # by hand: the single-image last batch weighs double
    hand = ((a[0] + a[1]).mean((1, 2)) / 2 + (a[2] + a[3]).mean((1, 2)) / 2 + a[4].mean((1, 2))) / 3
    np.testing.assert_allclose(mu, hand, rtol=1e-12)
    var = np.mean([((a[b] - mu[None, :, None, None]) ** 2).mean(axis=(0, 2, 3)) for b in batches], axis=0)
    mean, std = lgst.channel_stats(f, batch_size=2)
    np.testing.assert_allclose(mean.flatten().numpy(), mu, rtol=1e-5)
    np.testing.assert_allclose(std.flatten().numpy(), np.sqrt(var), rtol=1e-5)
    g_mean, _ = lgst.channel_stats(f)
    assert np.abs(g_mean.flatten().numpy() - mu).max() > 1e-3  # differs from the default global mean
    # shuffled as the official loader: one permutation for the mean pass, a second for the variance pass
    g = torch.Generator().manual_seed(9)
    p1, p2 = torch.randperm(5, generator=g).tolist(), torch.randperm(5, generator=g).tolist()
    mu1, _ = official(p1)
    b2 = [p2[0:2], p2[2:4], p2[4:5]]
    var2 = np.mean([((a[b] - mu1[None, :, None, None]) ** 2).mean(axis=(0, 2, 3)) for b in b2], axis=0)
    mean, std = lgst.channel_stats(f, batch_size=2, generator=torch.Generator().manual_seed(9))
    np.testing.assert_allclose(mean.flatten().numpy(), mu1, rtol=1e-5)
    np.testing.assert_allclose(std.flatten().numpy(), np.sqrt(var2), rtol=1e-5)
    even_mean, even_std = lgst.channel_stats(f[:4], batch_size=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(even_mean, lgst.channel_stats(f[:4])[0])  # even N: both definitions agree
    torch.testing.assert_close(even_std, lgst.channel_stats(f[:4])[1])


def test_csad_official_switch_turns_on_every_official_flag():
    import CSAD
    from common.official import official_flags_of

    parser = CSAD.build_parser()
    flags = official_flags_of(parser)
    dests = {a.dest for a in parser._actions}
    assert {"select_on_test", "official_teacher_stats"} | {d for d in dests if d.startswith("official_")} == set(flags)
    off, on = CSAD.parse_args([]), CSAD.parse_args(["--official"])
    assert not off.select_on_test and not CSAD.make_config(off).official_teacher_stats
    assert on.select_on_test and CSAD.make_config(on).official_teacher_stats
    assert CSAD.make_config(CSAD.parse_args(["--official-teacher-stats", "--fast"])).official_teacher_stats


def test_csad_settings_come_from_lgstconfig_fast_first_then_explicit_flags():
    import dataclasses

    import CSAD
    from common.config import cli_fields

    def cfg(*argv):
        return CSAD.make_config(CSAD.parse_args(list(argv)))

    assert cfg() == LGSTConfig() and cfg("--fast") == LGSTConfig.fast()
    # an explicit flag wins over the preset, also when it equals the full default
    assert cfg("--fast", "--iterations", "60000").iterations == 60000
    assert cfg("--fast", "--input-size", "256", "--lr", "2e-4") == dataclasses.replace(LGSTConfig.fast(),
                                                                                       input_size=256, lr=2e-4)
    assert cfg("--no-padding").padding is False and cfg("--fast", "--padding").padding is True
    assert cfg("--dtype", "bf16").dtype == "bf16" and cfg("--q-end", "0.99").q_end == 0.99
    helptext = " ".join(CSAD.build_parser().format_help().split())
    assert "training iterations (default 60000; --fast 1000)" in helptext
    dests = {a.dest for a in CSAD.build_parser()._actions}
    assert {f.name for f in cli_fields(LGSTConfig)} <= dests  # every setting is a flag
    with pytest.raises(SystemExit):
        CSAD.parse_args(["--dtype", "int8"])


def test_color_augment_matches_torchvision():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    out = lgst.color_augment(x, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ops = torch.randint(0, 3, (6,), generator=g)
    factors = 0.8 + 0.4 * torch.rand(6, generator=g)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(6):
        assert 0.8 <= factors[i] <= 1.2
        torch.testing.assert_close(out[i], fns[int(ops[i])](x[i], float(factors[i])), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ networks

def test_official_network_sizes():
    # `Tokichan/CSAD models/model.py`: local student ~9.45 M parameters, autoencoder ~1.17 M, 512 output channels
    assert count_parameters(LocalStudent()) == pytest.approx(9.45e6, rel=0.01)
    assert count_parameters(AutoEncoder()) == pytest.approx(1.17e6, rel=0.01)
    ae = AutoEncoder(8, 8, in_size=256, out_size=64)
    assert ae.sizes == [3, 8, 15, 32, 63, 127]  # EfficientAD's decoder sizes at the official size
    s = LocalStudent(8, 4, out_size=64)
    assert s.trunk(torch.zeros(1, 3, 256, 256)).shape[-2:] == (64, 64)  # stride 4, no resize needed
    assert ae(torch.zeros(1, 3, 256, 256)).shape == (1, 8, 64, 64)


def test_teacher_projection_is_seeded_frozen_and_saved(tmp_path):
    a, b, c = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=2)
    assert torch.equal(a.teacher.proj.weight, b.teacher.proj.weight)
    assert not torch.equal(a.teacher.proj.weight, c.teacher.proj.weight)
    assert not any(p.requires_grad for p in a.teacher.parameters())
    lgst.save(a, tmp_path / "m.pth", "resnet18")
    ckpt = torch.load(tmp_path / "m.pth", weights_only=True)
    assert torch.equal(ckpt["teacher_proj"]["weight"], a.teacher.proj.weight)
    assert not any(k.startswith("extractor") for k in ckpt["student"])


def test_training_sets_teacher_statistics_and_is_reproducible():
    g = torch.Generator().manual_seed(4)
    train = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    val = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = tiny_model(seed=0)
        lgst.train(m, train, val, device=torch.device("cpu"), seed=0)
        runs.append(m)
    raw = lgst.teacher_features(runs[0], train, torch.device("cpu"))
    a = raw.double().numpy()
    np.testing.assert_allclose(runs[0].teacher_mean.flatten().numpy(), a.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(runs[0].teacher_std.flatten().numpy(), a.std(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    for k, v in runs[0].student.state_dict().items():
        torch.testing.assert_close(v, runs[1].student.state_dict()[k], rtol=0, atol=0)
    fresh = tiny_model(seed=0)
    assert not torch.equal(fresh.student.conv_st.weight, runs[0].student.conv_st.weight)  # it did train


def test_training_uses_the_official_teacher_stats_when_asked():
    g = torch.Generator().manual_seed(6)
    train = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=g)  # odd N
    val = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    m = tiny_model(seed=0, official_teacher_stats=True, iterations=1)
    lgst.train(m, train, val, device=torch.device("cpu"), seed=3)
    raw = lgst.teacher_features(m, train, torch.device("cpu"))
    mean, std = lgst.channel_stats(raw, 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(m.teacher_mean, mean)
    torch.testing.assert_close(m.teacher_std, std)
    assert not torch.allclose(m.teacher_mean, lgst.channel_stats(raw)[0])


def test_select_on_test_restores_the_best_evaluated_iteration():
    g = torch.Generator().manual_seed(5)
    train = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    model = tiny_model(iterations=3, eval_freq=1)
    metrics, snapshots = iter([1.0, 3.0, 2.0]), []

    def evaluate(m):
        snapshots.append({k: v.clone() for k, v in m.student.state_dict().items()})
        return next(metrics)

    info = lgst.train(model, train, train[:2], device=torch.device("cpu"), seed=0, evaluate=evaluate)
    assert info["selected"] == "test" and info["iteration"] == 2 and info["best_metric"] == 3.0
    for k, v in model.student.state_dict().items():
        torch.testing.assert_close(v, snapshots[1][k], rtol=0, atol=0)
    assert not torch.equal(snapshots[1]["conv_st.weight"], snapshots[2]["conv_st.weight"])


def test_missing_penalty_folder_is_a_clear_error(tmp_path):
    from dataset_readers import DatasetError

    with pytest.raises(DatasetError, match="--no-penalty"):
        lgst.find_penalty_images(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        lgst.find_penalty_images(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ end to end

N_CLEAR = 4  # clearly anomalous images added to the structural split


@pytest.fixture(scope="module")
def lgst_root(tmp_path_factory):
    """The synthetic LOCO data at test size, plus a few good test images with a large noise square pasted in
    (clear structural anomalies, stems 900..). Built in a fresh folder, so no dataset is modified."""
    from PIL import Image

    from dataset_readers.synthetic_loco import generate

    root = tmp_path_factory.mktemp("synthetic_lgst")
    generate(root, size=128, n_train=24, n_val=8, n_test=8, seed=0, categories=["synth_box"])
    cat = root / "synth_box"
    value = json.loads((cat / "defects_config.json").read_text())[0]["pixel_value"]
    rng = np.random.default_rng(0)
    for i, p in enumerate(sorted((cat / "test" / "good").glob("*.png"))[:N_CLEAR]):
        img = np.array(Image.open(p).convert("RGB"))
        h, w = img.shape[:2]
        s = h // 3
        y, x = int(rng.integers(h // 6, h - s - h // 6)), int(rng.integers(w // 6, w - s - w // 6))
        img[y:y + s, x:x + s] = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[y:y + s, x:x + s] = value
        stem = f"{900 + i}"
        Image.fromarray(img).save(cat / "test" / "structural_anomalies" / f"{stem}.png")
        (cat / "ground_truth" / "structural_anomalies" / stem).mkdir(parents=True)
        Image.fromarray(mask).save(cat / "ground_truth" / "structural_anomalies" / stem / "000.png")
    return root


@pytest.fixture(scope="module")
def fast_run(lgst_root, lite0_weights, dtd_root, tmp_path_factory):
    import CSAD

    out = tmp_path_factory.mktemp("lgst")
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")  # 1 thread is the fastest on the shared 2-core machine
    try:
        CSAD.main(["--dataset", "synthetic_loco", "--data-root", str(lgst_root), "--categories", "synth_box",
                   "--fast", "--backbone", LITE0, "--weights", str(lite0_weights), "--penalty-dir", str(dtd_root),
                   "--score-dir", str(out / "scores"), "--ckpt-dir", str(out / "ckpt")])
    finally:
        mp.undo()
        torch.set_num_threads(1)
    return out, lgst_root


def test_fast_run_ranks_structural_anomalies_and_writes_the_contract(fast_run, lite0_weights):
    from sklearn.metrics import roc_auc_score

    from dataset_readers import read_category
    from dataset_readers.base import image_size
    from evaluation.score_files import anomaly_map_path, load_anomaly_map, load_scores

    out, root = fast_run
    data = read_category("synthetic_loco", "synth_box", root)
    groups = data.score_groups()
    scores = {g: load_scores("synth_box", "LGST", g, samples=groups[g], score_dir=out / "scores") for g in ("logi", "struc", "val")}
    labels = np.array([s.label for s in groups["struc"]])
    clear = np.array([s.stem.startswith("9") for s in groups["struc"]])
    good_scores = scores["struc"][labels == 0]
    # every clearly anomalous image scores above every normal test image
    assert scores["struc"][clear].min() > good_scores.max(), (scores["struc"][clear], good_scores)
    # the whole structural group: the generator's own small defects + the clear ones
    auroc = roc_auc_score(labels, scores["struc"])
    assert auroc >= 0.75, f"LGST structural AUROC {auroc:.3f} on the synthetic data (measured 0.82)"
    # the generator's own scratches, blobs and broken parts alone (measured 0.73 at the --fast settings)
    own = ~clear
    auroc_own = roc_auc_score(labels[own], scores["struc"][own])
    assert auroc_own >= 0.65, f"LGST structural AUROC {auroc_own:.3f} on the generator's defects"
    # good test images appear in both groups with the same score
    n_good = sum(1 for s in groups["logi"] if s.label == 0)
    np.testing.assert_array_equal(scores["logi"][:n_good], scores["struc"][:n_good])
    index = json.loads((out / "scores" / "synth_box_LGST_struc_score.json").read_text())
    assert index["images"] == [f"test/{s.defect_type}/{s.stem}.png" for s in groups["struc"]]
    sample = groups["struc"][-1]
    m = load_anomaly_map("LGST", "synth_box", sample, out / "scores")
    w, h = image_size(sample.path)
    assert anomaly_map_path("LGST", "synth_box", sample, out / "scores").is_file() and m.shape == (h, w)
    assert m.max() == pytest.approx(scores["struc"][-1], rel=0.05)  # image score = map max


def test_checkpoint_reload_reproduces_scores(fast_run, lite0_weights):
    from dataset_readers import read_category
    from evaluation.score_files import load_scores
    from models.backbones import load_backbone

    out, root = fast_run
    data = read_category("synthetic_loco", "synth_box", root)
    model, ckpt = lgst.load_model(out / "ckpt" / "best_synth_box.pth", load_backbone(LITE0, lite0_weights))
    assert ckpt["selected"] == "final" and ckpt["iteration"] == LGSTConfig.fast().iterations
    val = lgst.load_images(data.validation, model.cfg.input_size)
    _, scores = lgst.predict(model, val, torch.device("cpu"))
    np.testing.assert_allclose(scores.numpy(), load_scores("synth_box", "LGST", "val", samples=data.validation,
                                                           score_dir=out / "scores"), rtol=1e-4)


def _run_csad(args):
    import CSAD

    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    try:
        CSAD.main(args)
    finally:
        mp.undo()
        torch.set_num_threads(1)


def test_test_only_reproduces_score_files_and_maps_bit_for_bit(fast_run, lite0_weights, tmp_path):
    import tifffile

    out, root = fast_run
    common = ["--dataset", "synthetic_loco", "--data-root", str(root), "--categories", "synth_box", "--fast",
              "--backbone", LITE0, "--weights", str(lite0_weights), "--ckpt-dir", str(out / "ckpt")]
    # no penalty folder needed and the checkpoint directory is only read
    _run_csad(common + ["--test-only", "--penalty-dir", str(tmp_path / "none"), "--score-dir", str(tmp_path / "a")])
    _run_csad(common + ["--checkpoint", str(out / "ckpt" / "best_synth_box.pth"), "--score-dir", str(tmp_path / "b")])
    ref = sorted(p.relative_to(out / "scores") for p in (out / "scores").rglob("*") if p.suffix in (".npy", ".tiff"))
    assert sum(p.suffix == ".npy" for p in ref) == 3 and sum(p.suffix == ".tiff" for p in ref) >= 8
    for d in ("a", "b"):
        got = sorted(p.relative_to(tmp_path / d) for p in (tmp_path / d).rglob("*") if p.suffix in (".npy", ".tiff"))
        assert got == ref
        for rel in ref:
            read = np.load if rel.suffix == ".npy" else tifffile.imread
            a, b = read(out / "scores" / rel), read(tmp_path / d / rel)
            assert a.dtype == b.dtype and np.array_equal(a, b), rel


def test_test_only_refuses_a_checkpoint_of_other_settings(fast_run, lite0_weights, tmp_path, capsys):
    out, root = fast_run
    with pytest.raises(SystemExit) as e:
        _run_csad(["--dataset", "synthetic_loco", "--data-root", str(root), "--categories", "synth_box", "--fast",
                   "--input-size", "64", "--backbone", LITE0, "--weights", str(lite0_weights), "--test-only",
                   "--ckpt-dir", str(out / "ckpt"), "--score-dir", str(tmp_path / "s")])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "best_synth_box.pth was made by another run" in err and "input_size=128 (this run: 64)" in err
    assert "Traceback" not in err and not (tmp_path / "s" / "synth_box_LGST_struc_score.npy").exists()


def test_detector_round_trip_and_predict_py_in_a_fresh_process(fast_run, lite0_weights, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dataset_readers import read_category
    from evaluation.predictions import read_scores_csv
    from evaluation.score_files import load_scores
    from methods.base import ImageList, load_model
    from methods.csad.lgst import LGSTDetector

    out, root = fast_run
    path = out / "ckpt" / "best_synth_box.pth"
    data = read_category("synthetic_loco", "synth_box", root)
    ref = load_scores("synth_box", "LGST", "val", samples=data.validation, score_dir=out / "scores")
    model, meta = load_model(path, weights=lite0_weights)
    assert isinstance(model, LGSTDetector) and meta["method"] == "LGST" and meta["category"] == "synth_box"
    pred = model.predict(ImageList(data.validation))  # the decoded PIL path, not the reader's stacks
    assert pred.scores.dtype == np.float64 and np.array_equal(pred.scores.astype(np.float32), ref)
    s = model.cfg.input_size
    assert len(pred.maps) == len(ref) and pred.maps[0].shape == (s, s) and pred.maps[0].dtype == np.float32
    np.testing.assert_array_equal(np.stack(pred.maps).reshape(len(ref), -1).max(1), pred.scores.astype(np.float32))
    batch = model.preprocess([ImageList(data.validation)[0]])
    st, ae = model.forward_networks(batch)
    assert st.shape == ae.shape == (1, s // 4, s // 4)
    # predict.py in a fresh process, on the validation folder
    folder = Path(data.validation[0].path).parent
    r = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(path), "--images", str(folder), "--out",
                        str(tmp_path / "p"), "--weights", str(lite0_weights), "--device", "cpu", "--no-overlays"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {Path(row["path"]).resolve(): float(row["score"]) for row in read_scores_csv(tmp_path / "p" / "scores.csv")}
    got = np.array([rows[Path(smp.path).resolve()] for smp in data.validation])
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert len(list((tmp_path / "p" / "maps").rglob("*.tiff"))) == len(ref)


def test_bf16_predict_is_finite_and_ranks_like_fp32(fast_run, lite0_weights):
    from scipy.stats import spearmanr

    from dataset_readers import read_category
    from methods.base import ImageList, load_model

    out, root = fast_run
    data = read_category("synthetic_loco", "synth_box", root)
    model, _ = load_model(out / "ckpt" / "best_synth_box.pth", weights=lite0_weights)
    images = lgst.load_images(data.test, model.cfg.input_size)
    ref = model.predict(images).scores
    model.cfg.dtype = "bf16"
    low = model.predict(images)
    assert low.scores.dtype == np.float64 and low.maps[0].dtype == np.float32 and np.isfinite(low.scores).all()
    assert not np.array_equal(low.scores, ref)  # the reduced-precision path really ran
    assert spearmanr(low.scores, ref).statistic > 0.9
    model.cfg.dtype = "fp16"
    with pytest.raises(Exception, match="needs a CUDA device"):
        model.predict(ImageList(data.test[:1]))


# ------------------------------------------------------------------------------------------ fused path

def test_fused_inference_runs_the_backbone_once_and_matches_separate_paths():
    from methods.csad.fused_inference import FusedCSAD
    from methods.csad.patch_histogram import PatchHistogram
    from models.backbones import load_backbone
    from models.feature_extractor import FeatureExtractor
    from models.segmentor import Segmentor

    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        bb = load_backbone("resnet18", "random")
    model = lgst.build_model(bb, tiny_cfg(), 0).eval()
    seg = Segmentor(3, (64, 256)).eval()
    x = torch.randn(4, 3, 64, 64)
    # separate paths first (their own extractors), then the fused module on the same backbone
    with torch.no_grad():
        seg_sep = seg(FeatureExtractor(bb, ["layer1", "layer3"])(x), 64)
        map_sep, score_sep = model.anomaly_maps(x)
    ph = PatchHistogram(3).fit(torch.randint(0, 3, (10, 64, 64), generator=torch.Generator().manual_seed(0)))
    ph.set_validation(torch.randint(0, 3, (6, 64, 64), generator=torch.Generator().manual_seed(1)))
    val = {"LGST": np.linspace(0, 1, 10), "patchhist": np.linspace(-1, 3, 10)}
    fused = FusedCSAD(bb, seg, model, ph, val, resolution=64)
    calls = []
    bb.conv1.register_forward_hook(lambda *a: calls.append(1))
    out = fused(x)
    assert len(calls) == 1
    torch.testing.assert_close(out["logits"], seg_sep)
    torch.testing.assert_close(out["lgst_map"], map_sep)
    from evaluation.fusion import trimmed_z_normalize

    ph_sep = ph.score(seg_sep.argmax(1))
    expect = trimmed_z_normalize(score_sep.numpy(), val["LGST"]) + trimmed_z_normalize(ph_sep, val["patchhist"])
    np.testing.assert_allclose(out["score"].numpy(), expect, rtol=1e-5)
