"""GLASS: Perlin masks, truncated projection, focal/OHEM, judge, variant table, clear failures, end-to-end ranking."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataset_readers.base import DatasetError
from methods.glass import (GlassConfig, choose_variant, distribution_judge, fast_config, focal_ohem, glass_loss,
                           truncated_projection, uncrop_map)
from methods.glass_las import LASDataset, list_textures, perlin_mask, perlin_noise
from models.glass_nets import Adaptor, Discriminator

torch.set_num_threads(2)


def test_perlin_noise_is_zero_on_lattice_points_and_bounded():
    rng = np.random.default_rng(0)
    n = perlin_noise((64, 64), (4, 8), rng)
    assert n.shape == (64, 64)
    # gradient noise vanishes at lattice corners: rows 0,16,32,48 x cols 0,8,...,56
    assert np.abs(n[::16, ::8]).max() < 1e-12
    assert np.abs(n).max() <= np.sqrt(2) + 1e-9 and n.std() > 0.05


@pytest.mark.parametrize("seed", range(6))
def test_perlin_mask_binary_nonempty_and_pooled(seed):
    rng = np.random.default_rng(seed)
    fg = np.zeros((64, 64), np.float32)
    fg[16:48, 8:40] = 1
    for use_fg in (None, fg):
        mask_l, mask_s = perlin_mask((64, 64), 8, rng, use_fg)
        assert mask_l.shape == (64, 64) and mask_s.shape == (8, 8)
        assert set(np.unique(mask_l)) <= {0.0, 1.0} and set(np.unique(mask_s)) <= {0.0, 1.0}
        assert mask_s.max() == 1.0  # never empty after the retry
        pooled = mask_l.reshape(8, 8, 8, 8).max(axis=(1, 3))
        np.testing.assert_array_equal(pooled, mask_s)
        if use_fg is not None:
            assert mask_l[fg == 0].max() == 0  # anomalies only on the foreground


def test_empty_foreground_is_a_clear_error():
    with pytest.raises(DatasetError, match="--fg 0"):
        perlin_mask((32, 32), 8, np.random.default_rng(0), np.zeros((32, 32)))


def test_truncated_projection_keeps_norms_in_annulus_and_is_differentiable():
    torch.manual_seed(0)
    centre = torch.randn(500, 16)
    scale = torch.logspace(-3, 1, 500)[:, None]
    g = (centre + torch.randn(500, 16) * scale).requires_grad_(True)
    out = truncated_projection(g, centre, 0.5, 1.0)
    norms = (out - centre).norm(dim=1)
    assert norms.min() >= 0.5 - 1e-5 and norms.max() <= 1.0 + 1e-5
    before = (g - centre).norm(dim=1)
    inside = (before >= 0.5) & (before <= 1.0)
    assert inside.sum() > 10
    torch.testing.assert_close(out[inside], g[inside])  # points already in the annulus do not move
    # direction is kept
    cos = F.cosine_similarity(out - centre, g - centre, dim=1)
    assert cos.min() > 0.9999
    out.sum().backward()
    assert g.grad is not None and torch.isfinite(g.grad).all()


def test_focal_ohem_matches_hand_computation():
    s = torch.tensor([0.9, 0.2, 0.6, 0.05])
    m = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # squared errors 0.01, 0.64, 0.36, 0.0025; median = 0.185 -> keep rows 1 and 2
    pt1 = 0.2 * (1 - 1e-5) + 0.8 * 1e-5 + 1e-5
    pt2 = 0.4 * (1 - 1e-5) + 0.6 * 1e-5 + 1e-5
    expected = np.mean([-(1 - pt1) ** 2 * np.log(pt1), -(1 - pt2) ** 2 * np.log(pt2)])
    assert focal_ohem(s, m, 0.5).item() == pytest.approx(expected, rel=1e-5)


def test_glass_loss_trains_both_networks_and_logs_radius():
    torch.manual_seed(0)
    cfg = replace_cfg(step=10)
    n, d = 64, 32
    adaptor, disc = Adaptor(d), Discriminator(d, 2, 16)
    x = adaptor(torch.randn(n, d))
    f = adaptor(torch.randn(n, d))
    m = (torch.arange(n) % 4 == 0).float()
    c = torch.zeros(n, d)
    for svd in (0, 1):
        loss, stats = glass_loss(disc, x, f, m, c, svd=svd, cfg=cfg)
        adaptor.zero_grad()
        disc.zero_grad()
        loss.backward(retain_graph=True)
        assert torch.isfinite(loss)
        assert adaptor.layers[0].weight.grad.abs().sum() > 0 and disc.tail.weight.grad.abs().sum() > 0
        # r_t = 0.75-quantile of ||z - c|| over x and the unmasked rows of f
        dist = torch.cat([x.norm(dim=1), f.norm(dim=1)[m == 0]]).detach()
        assert stats["r_t"].item() == pytest.approx(torch.quantile(dist, 0.75).item(), rel=1e-5)


def replace_cfg(**kw) -> GlassConfig:
    from dataclasses import replace

    return replace(fast_config(GlassConfig()), **kw)


def test_distribution_judge_flat_vs_structured_mean_image():
    flat = np.full((288, 288, 3), 120, np.uint8)
    assert distribution_judge(flat)[0] == 0
    yy, xx = np.mgrid[:288, :288]
    disc = ((((xx - 144) ** 2 + (yy - 144) ** 2) < 80 ** 2) * 255).astype(np.uint8)  # sharp aligned object
    flag, info = distribution_judge(np.repeat(disc[..., None], 3, 2))
    assert flag == 1 and info["n"] > 60 and info["radius"] > 12
    assert info["l1_density"] > 0.21 or info["l2_density"] > 0.21



def _lattice_by_hand(k: int, lo: int = -289, hi: int = 288) -> int:
    """Integer points with x^2 + y^2 <= k, x and y in [lo, hi], counted in exact integer arithmetic."""
    return sum(1 for x in range(lo, hi + 1) for y in range(lo, hi + 1) if x * x + y * y <= k)


def test_lattice_count_keeps_boundary_points_at_integer_r2():
    """The official judge compares sqrt(x^2+y^2) <= r; r = sqrt(65) is the largest distance of a point (1, 8), and
    sqrt(65)^2 rounds below 65, so comparing squares would drop all 16 boundary points of the circle x^2+y^2 = 65."""
    from methods.glass import lattice_count

    r = float(np.sqrt(1 ** 2 + 8 ** 2))
    assert r * r < 65  # the rounding the squared comparison trips on
    assert lattice_count(r) == _lattice_by_hand(65) == 213
    assert lattice_count(np.sqrt(3.0)) == _lattice_by_hand(3) == 9  # (0,0), 4 at distance 1, 4 at sqrt(2)
    for k in (2, 13, 25, 50):
        assert lattice_count(float(np.sqrt(k))) == _lattice_by_hand(k)
    # the official off-centre grid (np.indices((578, 578)), centre 144) differs only once the disc passes x = -144
    assert lattice_count(144.0, official_grid=True) == lattice_count(144.0)
    r = 150.0
    assert lattice_count(r, official_grid=True) == _lattice_by_hand(150 * 150, lo=-144, hi=433) \
        < lattice_count(r) == _lattice_by_hand(150 * 150)


def test_variant_table_and_judge_fallback():
    calls = []

    def judge():
        calls.append(1)
        return 1

    assert choose_variant("mvtec_ad", "bottle", 0, judge) [0] == 1
    assert choose_variant("mvtec_ad", "carpet", 0, judge)[0] == 0
    assert choose_variant("mad_man", "Person_1/screw", 0, judge)[0] == 1
    assert choose_variant("visa", "pcb1", 0, judge)[0] == 1 and choose_variant("visa", "candle", 0, judge)[0] == 0
    assert choose_variant("mpdd", "tubes", 0, judge)[0] == 0
    assert choose_variant("mvtec_ad", "bottle", 4, judge)[0] == 0
    assert choose_variant("mvtec_ad", "bottle", 2, judge)[0] == 0 and choose_variant("wfdd", "grey_cloth", 3, judge)[0] == 1
    assert not calls  # the table answers without running the judge
    svd, source = choose_variant("synthetic_loco", "synth_box", 0, judge)
    assert svd == 1 and calls == [1] and "judge" in source


def test_uncrop_map_places_crop_in_resized_frame():
    m = np.arange(16, dtype=np.float32).reshape(4, 4) + 1
    out = uncrop_map(m, w=12, h=8, resize=4, crop=4)  # resized to 4 x 6, crop columns 1..4
    assert out.shape == (4, 6)
    np.testing.assert_array_equal(out[:, 1:5], m)
    assert (out[:, [0, 5]] == m.min()).all()
    same = uncrop_map(m, 8, 8, 4, 4)  # no crop to undo: m itself, not a copy
    assert np.shares_memory(same, m) and np.array_equal(same, m)


def test_missing_textures_and_fg_masks_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="--dtd-root"):
        list_textures(tmp_path)
    from dataset_readers.base import Sample

    s = [Sample(str(tmp_path / "000.png"), "train")]
    with pytest.raises(DatasetError, match="--fg 0"):
        LASDataset(s, [tmp_path / "t.jpg"], 64, 64, fg_root=tmp_path / "fg_mask" / "cat")


def test_las_item_blends_texture_only_inside_mask(tmp_path, dtd_root):
    from PIL import Image

    from dataset_readers.base import Sample

    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "a.png")
    ds = LASDataset([Sample(str(tmp_path / "a.png"), "train")], list_textures(dtd_root), 64, 64, seed=3)
    i, aug, mask_s = ds[0]
    plain = ds.image_tf(Image.open(tmp_path / "a.png").convert("RGB"))
    up = mask_s.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert mask_s.sum() > 0 and aug.shape == (3, 64, 64)
    torch.testing.assert_close(aug[:, up == 0], plain[:, up == 0])  # outside every masked cell: untouched
    assert (aug - plain).abs().sum() > 0
    _, aug2, _ = ds[0]
    torch.testing.assert_close(aug, aug2)  # reproducible per (seed, epoch, index)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_end_to_end_ranks_structural_anomalies_and_reloads_checkpoint(synthetic_root, lite0_weights, dtd_root,
                                                                       tmp_path, restore_threads):
    import glass
    from evaluation.metrics import image_auroc
    from evaluation.score_files import anomaly_map_path, load_scores
    from dataset_readers import read_category

    common = ["--dataset", "synthetic_loco", "--data-root", str(synthetic_root), "--categories", "synth_box",
              "--fast", "--backbone", "efficientnet_lite0", "--weights", str(lite0_weights),
              "--dtd-root", str(dtd_root), "--score-dir", str(tmp_path / "s"), "--ckpt-dir", str(tmp_path / "c"),
              "--device", "cpu", "--threads", "1", "--distribution", "2"]  # 1 thread: far faster on a busy CPU
    (res,) = glass.main(common)
    data = read_category("synthetic_loco", "synth_box", synthetic_root)
    groups = data.score_groups()
    struc = load_scores("synth_box", "glass", "struc", samples=groups["struc"], score_dir=tmp_path / "s")
    auc = image_auroc(struc, [s.label for s in groups["struc"]])
    assert auc > 0.75, auc  # measured 0.906 (manifold, --fast) with the DTD subset, 0.812 with generated textures
    assert res["metrics"]["image_auroc_struc"] == pytest.approx(auc)
    sample = data.test[-1]
    import tifffile
    from PIL import Image

    amap = tifffile.imread(anomaly_map_path("glass", "synth_box", sample, tmp_path / "s"))
    assert amap.shape == Image.open(sample.path).size[::-1] and amap.dtype == np.float32
    ckpt = tmp_path / "c" / "glass" / "synthetic_loco" / "synth_box" / "ckpt.pth"
    log = json.loads((ckpt.parent / "train_log.json").read_text())
    assert len(log) == 20 and all(np.isfinite(e["loss"]) for e in log)
    # test-only run from the checkpoint gives the same scores, bit for bit
    (res2,) = glass.main(common + ["--checkpoint", str(ckpt), "--score-dir", str(tmp_path / "s2")])
    assert np.array_equal(load_scores("synth_box", "glass", "struc", samples=groups["struc"], score_dir=tmp_path / "s2"), struc)
    with pytest.raises(SystemExit, match="--checkpoint"):  # main() exits 1 with the one-line message
        glass.main(common + ["--test-only", "--ckpt-dir", str(tmp_path / "nothing")])
