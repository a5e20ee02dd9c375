"""CSAD stage 2: segmentor head, losses, hole filling, LSA, Patch Histogram and the train_segmentor.py run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from methods.csad.patch_histogram import PatchHistogram, class_histograms, fit_gaussian, mahalanobis
from methods.csad.segmentor import (LabeledLSA, SegmentorConfig, ce_loss, dice_loss, entropy_loss, fill_holes_by_class,
                                    find_components, focal_loss, histogram_loss, light_augment)
from models.segmentor import Segmentor, load_segmentor, save_segmentor


# --- Patch Histogram -------------------------------------------------------------------------------------------

def test_mahalanobis_matches_numpy_reference():
    rng = np.random.default_rng(0)
    train = rng.random((40, 6))
    train[:, 0] = 0  # constant background bin: zero variance, the pseudo-inverse must ignore it
    train[:, 5] = 1 - train[:, 1]  # linearly dependent bin: singular covariance
    test = rng.random((7, 6))
    mean, inv = fit_gaussian(train)
    ref_cov = np.cov(train.T)  # N-1 normalisation
    np.testing.assert_allclose(mean, train.mean(0))
    np.testing.assert_allclose(inv, np.linalg.pinv(ref_cov), atol=1e-10)
    ref = [np.sqrt((x - mean) @ np.linalg.pinv(ref_cov) @ (x - mean)) for x in test]
    np.testing.assert_allclose(mahalanobis(test, mean, inv), ref, rtol=1e-10)
    # full-rank case against scipy
    from scipy.spatial.distance import mahalanobis as sp_maha
    full = rng.normal(size=(50, 3))
    m, s = fit_gaussian(full)
    np.testing.assert_allclose(mahalanobis(full[:4], m, s), [sp_maha(x, m, np.linalg.inv(np.cov(full.T))) for x in full[:4]],
                               rtol=1e-8)


def test_quadrant_order_is_column_major():
    # classes 1..4 fill top-left, top-right, bottom-left, bottom-right quadrants of an 8x8 map
    m = torch.zeros(1, 8, 8, dtype=torch.long)
    m[0, :4, :4], m[0, :4, 4:], m[0, 4:, :4], m[0, 4:, 4:] = 1, 2, 3, 4
    m[0, 0, 0] = 0  # one background pixel in the top-left quadrant
    h = class_histograms(m, 5, grid=2, keep_background=True).reshape(4, 5)
    # pinned order: top-left, bottom-left, top-right, bottom-right
    expected = torch.zeros(4, 5)
    expected[0, 0], expected[0, 1] = 1 / 16, 15 / 16
    expected[1, 3] = expected[2, 2] = expected[3, 4] = 1.0
    torch.testing.assert_close(h, expected)
    g = class_histograms(m, 5, grid=1)  # background bin zeroed by default
    torch.testing.assert_close(g, torch.tensor([[0, 15 / 64, 16 / 64, 16 / 64, 16 / 64]]))


def test_class_histograms_match_numpy_loops():
    rng = np.random.default_rng(1)
    maps = rng.integers(0, 4, size=(3, 6, 6))
    got = class_histograms(torch.from_numpy(maps), 4, grid=2, keep_background=True).numpy()
    for b in range(3):
        ref = []
        for x0 in (0, 3):  # column-major: x offset outer, y offset inner
            for y0 in (0, 3):
                cell = maps[b, y0:y0 + 3, x0:x0 + 3]
                ref += [np.mean(cell == c) for c in range(4)]
        np.testing.assert_allclose(got[b], ref, rtol=1e-6)


def test_patch_histogram_normalisation_and_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    base = np.zeros((30, 8, 8), np.int64)
    base[:, 2:6, 2:6] = 1
    for i in range(30):  # normal variation: a few pixels of class 2
        base[i, rng.integers(0, 8, 3), rng.integers(0, 8, 3)] = 2
    train, val = torch.from_numpy(base[:20]), torch.from_numpy(base[20:])
    ph = PatchHistogram(3).fit(train)
    val_score = ph.set_validation(val)
    dg, dp = ph.distances(val)
    from evaluation.fusion import trimmed_z_normalize
    np.testing.assert_allclose(val_score, trimmed_z_normalize(dg, dg) + trimmed_z_normalize(dp, dp))
    odd = base[20:21].copy()
    odd[0, 2:6, 2:6] = 2  # component of the wrong class
    assert ph.score(torch.from_numpy(odd))[0] > val_score.max()
    ph.save(tmp_path / "p.npz")
    again = PatchHistogram.load(tmp_path / "p.npz")
    np.testing.assert_allclose(again.score(val), ph.score(val))
    with np.load(tmp_path / "p.npz") as z:
        assert {"hist_mean", "hist_invcov", "patch_hist_mean", "patch_hist_invcov", "hist_val_score",
                "patch_hist_val_score"} <= set(z.files)


# --- losses ------------------------------------------------------------------------------------------------------

def _probs_2x2():
    # B=1, C=2, 1x2 image: pixel 0 p=(0.8, 0.2) label 0; pixel 1 p=(0.4, 0.6) label 1
    p = torch.tensor([[[[0.8, 0.4]], [[0.2, 0.6]]]])
    t = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    return p, t


def test_histogram_loss_hand_computed():
    p, _ = _probs_2x2()
    # mean probs: (0.6, 0.4); target (0.5, 0.5): background excluded -> |0.4 - 0.5| / batch 1
    assert histogram_loss(p, torch.tensor([[0.5, 0.5]])).item() == pytest.approx(0.1)
    p2 = torch.cat([p, p])
    assert histogram_loss(p2, torch.tensor([[0.5, 0.5], [0.0, 1.0]])).item() == pytest.approx((0.1 + 0.6) / 2)


def test_dice_loss_hand_computed():
    p, t = _probs_2x2()
    s = 1e-5
    d0 = (2 * 0.8 + s) / (1.2 + 1 + 2 * s)
    d1 = (2 * 0.6 + s) / (0.8 + 1 + 2 * s)
    w = np.array([1 / (1 + 1e-5), 1 / (1 + 1e-5)])
    w = w / w.sum()
    assert dice_loss(p, t).item() == pytest.approx((w[0] * (1 - d0) + w[1] * (1 - d1)) / 2, rel=1e-6)
    # class weights: a rare class weighs more (areas 3 and 1 -> weights 1/4 and 3/4)
    p3 = torch.full((1, 2, 1, 4), 0.5)
    t3 = torch.tensor([[[[1.0, 1, 1, 0]], [[0.0, 0, 0, 1]]]])
    d0, d1 = (2 * 1.5 + s) / (2 + 3 + 2 * s), (2 * 0.5 + s) / (2 + 1 + 2 * s)
    assert dice_loss(p3, t3).item() == pytest.approx((0.25 * (1 - d0) + 0.75 * (1 - d1)) / 2, rel=1e-4)


def test_focal_entropy_and_ce_hand_computed():
    p, t = _probs_2x2()
    pt = np.array([0.8, 0.6]) * (1 - 1e-5) + np.array([0.2, 0.4]) * 1e-5 + 1e-5
    assert focal_loss(p, t).item() == pytest.approx(np.mean(-(1 - pt) ** 2 * np.log(pt)), rel=1e-5)
    ent = -np.array([0.8, 0.4, 0.2, 0.6]) * np.log(np.array([0.8, 0.4, 0.2, 0.6]) + 1e-5)
    assert entropy_loss(p).item() == pytest.approx(ent.mean(), rel=1e-6)
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    onehot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    official = torch.nn.CrossEntropyLoss()(logits.softmax(1), onehot)  # the double softmax of the official code
    assert ce_loss(logits, onehot).item() == pytest.approx(official.item(), rel=1e-6)
    assert ce_loss(logits, onehot, on_logits=True).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


# --- labels and LSA ---------------------------------------------------------------------------------------------

def test_fill_holes_keeps_class_ids_drops_small_classes_and_official_permutes():
    lab = np.zeros((40, 40), np.uint8)
    lab[2:30, 2:30] = 3  # large ring of class 3 with a hole
    lab[10:20, 10:20] = 0
    lab[12:15, 12:15] = 2  # small class 2 inside the hole: 9 px <= 100, dropped as by the official split
    lab[32:39, 2:38] = 1  # medium class 1
    lab[0, 39] = 4  # a 1 px class far from everything: dropped
    fixed = fill_holes_by_class(lab)
    big = (lab == 1) | (lab == 3)
    assert (fixed[big] == lab[big]).all()  # labelled pixels of kept classes keep their ids
    assert (fixed[10:20, 10:20] == 3).all()  # the hole (with the dropped class inside) takes its class
    assert fixed[0, 39] == 0 and set(np.unique(fixed)) == {0, 1, 3}
    lab2 = np.zeros((40, 40), np.uint8)  # three classes whose area order is a 3-cycle of the id order
    lab2[0:20, 0:20] = 3
    lab2[25:35, 0:15] = 2
    lab2[25:35, 20:31] = 1
    lab2[36:40, 0:40] = 1  # areas: class 3 400 > class 1 270 > class 2 150
    official = fill_holes_by_class(lab2, official=True)
    assert (fill_holes_by_class(lab2) == lab2).all()
    # official re-merge: inverted un-mapping of the 3-cycle sends 3 -> 2, 1 -> 3, 2 -> 1
    for src, dst in ((3, 2), (1, 3), (2, 1)):
        assert (official[lab2 == src] == dst).all()
    assert set(np.unique(official)) == {0, 1, 2, 3}
    # a missing class 1: the official list positions shift ids 2, 3 -> 1, 2 (areas 150 < 400: no permutation)
    lab3 = np.where(lab2 == 1, 0, lab2)
    shifted = fill_holes_by_class(lab3, official=True)
    assert (shifted[lab3 == 3] == 2).all() and (shifted[lab3 == 2] == 1).all()
    assert (fill_holes_by_class(lab3) == lab3).all()


def _official_merge_masks(masks):
    """Reference for the official `merge_masks` (Tokichan/CSAD models/segmentation/dataloader.py): paint list
    ranks by descending area (stable sort), then un-map them through argsort(areas)[::-1]."""
    result = np.zeros_like(masks[0], dtype=np.uint8)
    for i, m in enumerate(sorted(masks, key=lambda x: np.sum(x), reverse=True)):
        result[m != 0] = i + 1
    order = np.argsort(np.array([np.sum(m) for m in masks]))[::-1]
    mapping = {o + 1: i + 1 for i, o in enumerate(order)}
    out = np.zeros_like(result)
    for o in order + 1:
        out[result == o] = mapping[o]
    return out


def test_official_hole_fill_equals_the_official_merge_on_random_maps():
    from scipy.ndimage import binary_fill_holes

    rng = np.random.default_rng(3)
    changed = 0
    for _ in range(8):
        lab = np.zeros((80, 80), np.uint8)
        for c in rng.permutation(5)[:4] + 1:
            y, x, h, w = rng.integers(0, 55, 2).tolist() + rng.integers(12, 26, 2).tolist()
            lab[y:y + h, x:x + w] = c
            lab[y + 3:y + h - 3, x + 3:x + w - 3] = 0  # rings, so hole filling matters
        masks = [binary_fill_holes(lab == c) for c in range(1, lab.max() + 1) if (lab == c).sum() > 100]
        assert masks  # (the official merge fails on an empty list)
        official = fill_holes_by_class(lab, official=True)
        np.testing.assert_array_equal(official, _official_merge_masks(masks))
        changed += int((official != fill_holes_by_class(lab)).any())
    assert changed  # some of these maps get shifted or permuted ids from the official re-merge


def test_label_resize_is_pil_nearest_after_full_resolution_filling():
    from PIL import Image
    import cv2
    from methods.csad.segmentor import prepare_background, prepare_label, resize_nearest

    rng = np.random.default_rng(4)
    lab = rng.integers(0, 6, size=(160, 80)).astype(np.uint8)  # LOCO juice_bottle aspect ratio, 1/10 size
    pil = np.asarray(Image.fromarray(lab).resize((32, 32), Image.NEAREST))
    np.testing.assert_array_equal(resize_nearest(lab, 32), pil)
    assert (cv2.resize(lab, (32, 32), interpolation=cv2.INTER_NEAREST) != pil).mean() > 0.1  # cv2 picks others
    # a 1 px ring: filled at full resolution its inside is class 1; resized first, the ring is lost
    ring = np.zeros((100, 100), np.uint8)
    ring[20, 20:80] = ring[79, 20:80] = ring[20:80, 20] = ring[20:80, 79] = 1
    ring[90:95, 5:10] = 2  # 25 px: dropped at full resolution (it would be 0-1 px at 10x10)
    cfg = SegmentorConfig(fill_holes=True)
    got = prepare_label(ring, 10, cfg)
    np.testing.assert_array_equal(got, resize_nearest(fill_holes_by_class(ring), 10))
    assert (got[3:7, 3:7] == 1).all() and 2 not in got
    assert (resize_nearest(ring, 10)[3:7, 3:7] == 0).all()
    assert prepare_label(ring, 10, SegmentorConfig()).tolist() == resize_nearest(ring, 10).tolist()
    # every non-zero background.jpg pixel is background (JPEG noise included), not only > 127
    bg = np.array([[0, 1], [5, 200]], np.uint8).repeat(4, 0).repeat(4, 1)
    np.testing.assert_array_equal(prepare_background(bg, 2), [[False, True], [True, True]])


def _lsa_scene():
    img = np.zeros((64, 64, 3), np.uint8)
    img[8:56, 8:56] = (90, 90, 90)
    lab = np.zeros((64, 64), np.uint8)
    lab[8:56, 8:56] = 1
    img[12:20, 12:20] = (250, 10, 10)
    lab[12:20, 12:20] = 2
    return img, lab


def test_lsa_pastes_a_labelled_copy():
    img, lab = _lsa_scene()
    comps = find_components(lab, (lab == 2).astype(np.uint8))
    assert len(comps) == 1 and comps[0].area == 64
    background = np.zeros((64, 64), bool)
    background[:8], background[56:], background[:, :8], background[:, 56:] = True, True, True, True
    cfg = SegmentorConfig(lsa_points=2000, lsa_attempts=200)
    out_img, out_lab, pasted = LabeledLSA(cfg, np.random.default_rng(0))(img, lab, comps, background)
    assert pasted == 1
    assert (out_lab[12:20, 12:20] == 2).all()  # the original stays in place
    new = (out_lab == 2) & (lab != 2)
    assert new.sum() > 30  # a displaced, rotated copy
    assert (out_img[new][:, 0] > 150).mean() > 0.9  # with the component's pixels
    assert (background & new).sum() / new.sum() < 0.5  # mandatory paste: mostly off the background
    assert (out_lab == lab).sum() + new.sum() == lab.size  # nothing else changed


def test_lsa_pastes_only_at_accepted_locations_unless_official():
    img, lab = _lsa_scene()
    comps = find_components(lab, (lab == 2).astype(np.uint8))
    everywhere = np.ones((64, 64), bool)  # no location can be accepted
    cfg = SegmentorConfig(lsa_points=500, lsa_attempts=30, max_aug_num=1)
    _, out, pasted = LabeledLSA(cfg, np.random.default_rng(0))(img, lab, comps, everywhere)
    assert pasted == 0 and (out == lab).all()
    cfg_off = SegmentorConfig(lsa_points=500, lsa_attempts=30, max_aug_num=1, official_lsa=True)
    _, out, pasted = LabeledLSA(cfg_off, np.random.default_rng(0))(img, lab, comps, everywhere)
    assert pasted == 1 and (out == 2).sum() > 64


def test_lsa_centre_mask_warp_and_zero_masked_source():
    import cv2
    from methods.csad.segmentor import _affine

    img, lab = _lsa_scene()
    lab[12:20, 16:20] = 3  # two classes inside the component
    inst = ((lab == 2) | (lab == 3)).astype(np.uint8)
    (comp,) = find_components(lab, inst)
    assert comp.centre == (12 + 8 // 2, 12 + 8 // 2)  # cv2.boundingRect x + w//2, not (min+max)/2 = 15.5
    # columns 12..15 (w 4): 12 + 2 = 14, not 13.5
    assert find_components(lab, np.pad(inst[:, :16], ((0, 0), (0, 48))))[0].centre == (14, 16)
    background = np.zeros((64, 64), bool)
    for official in (False, True):
        cfg = SegmentorConfig(lsa_points=500, lsa_attempts=20, max_aug_num=1, official_lsa=official)
        lsa = LabeledLSA(cfg, np.random.default_rng(1))
        found = lsa.find_location(comp, [], lab, background, threshold=0.5, mandatory=True)
        mat, _, wm = found
        mask255 = inst * 255
        ref_mask = cv2.warpAffine(mask255, mat, (64, 64), flags=cv2.INTER_LINEAR) > 200
        np.testing.assert_array_equal(wm, ref_mask)
        assert 40 < wm.sum() < 64  # the bilinear mask loses its edge pixels
        out_img, out_lab = img.copy(), lab.copy()
        lsa._paste(img, lab, out_img, out_lab, found)
        src = np.where(inst[..., None] > 0, img, 0).astype(np.uint8)  # zero-masked source
        np.testing.assert_array_equal(out_img[wm], cv2.warpAffine(src, mat, (64, 64), flags=cv2.INTER_LINEAR)[wm])
        src_lab = np.where(inst > 0, lab, 0).astype(np.uint8)
        flag = cv2.INTER_LINEAR if official else cv2.INTER_NEAREST
        np.testing.assert_array_equal(out_lab[wm], cv2.warpAffine(src_lab, mat, (64, 64), flags=flag)[wm])
        np.testing.assert_array_equal(out_lab[~wm], lab[~wm])
        if not official:
            assert set(np.unique(out_lab[wm]).tolist()) == {2, 3}
    # the official bilinear label warp invents ids between 2 and 3 on a rotated paste; nearest never does
    mat = _affine(30.0, comp.centre, (44.3, 40.6))
    wm = cv2.warpAffine(inst * 255, mat, (64, 64), flags=cv2.INTER_LINEAR) > 200
    lab1 = np.where(inst > 0, np.where(lab == 2, 1, 3), lab).astype(np.uint8)  # classes 1 and 3 side by side
    for official, expect_wrong in ((False, False), (True, True)):
        lsa = LabeledLSA(SegmentorConfig(official_lsa=official), np.random.default_rng(0))
        out_img, out_lab = img.copy(), lab1.copy()
        lsa._paste(img, lab1, out_img, out_lab, (mat, comp, wm))
        assert (2 in out_lab[wm]) == expect_wrong


def test_lsa_resamples_the_component_every_10_attempts_unless_official():
    img, lab = _lsa_scene()
    lab[30:38, 30:38] = 2
    inst = np.zeros((64, 64), np.uint8)
    inst[12:20, 12:20], inst[30:38, 30:38] = 1, 2
    a, b = find_components(lab, inst)
    everywhere = np.ones((64, 64), bool)  # nothing can be accepted
    for official in (False, True):
        cfg = SegmentorConfig(lsa_points=200, lsa_attempts=25, official_lsa=official)
        queue = [b]
        found = LabeledLSA(cfg, np.random.default_rng(0)).find_location(a, queue, lab, everywhere, threshold=0.5,
                                                                        mandatory=True)
        if official:  # never re-sampled; the mandatory paste uses the last attempt anyway
            assert queue == [b] and found is not None and found[1] is a
        else:  # b taken at attempt 10, nothing accepted, no paste
            assert queue == [] and found is None


def test_light_augment_keeps_labels_aligned():
    x = torch.zeros(6, 3, 32, 32)
    y = torch.zeros(6, 32, 32, dtype=torch.long)
    x[:, :, 10:20, 10:20], y[:, 10:20, 10:20] = 1.0, 1
    xa, ya = light_augment(x, y, torch.Generator().manual_seed(0))
    assert ya.dtype == torch.long and set(ya.unique().tolist()) <= {0, 1}
    inside = ya == 1
    assert (xa.mean(1)[inside] > 0.5).float().mean() > 0.97  # labelled pixels still sit on the bright square
    assert abs(int(inside.sum()) - 600) < 60  # small shift/scale/rotation only


def test_config_defaults_fast_preset_and_flag_precedence():
    from methods.csad.segmentor import SegmentorConfig, make_config
    import train_segmentor

    c = make_config("breakfast_box")
    assert (c.resolution, c.epochs, c.sup_only_epochs, c.batch_size, c.lr, c.weight_decay) == (256, 120, 50, 4, 0.01, 1e-5)
    assert (c.ce_weight, c.focal_weight, c.dice_weight, c.hist_weight, c.entropy_weight) == (0.5, 10, 1, 10, 1)
    assert (c.lsa_points, c.lsa_attempts, c.min_distance, c.eval_batch, c.dtype) == (10000, 500, 0.2, 16, "fp32")
    assert c.fill_holes and not c.ce_on_logits and not c.official_lsa and not c.official_hole_fill
    assert make_config("screw_bag").min_distance == 0.1 and not make_config("screw_bag").fill_holes
    fast = SegmentorConfig.fast()
    assert (fast.resolution, fast.epochs, fast.sup_only_epochs, fast.lsa_points, fast.lsa_attempts) == (64, 12, 6, 2000, 100)

    def cfg(category, argv=()):
        return train_segmentor.category_config(train_segmentor.parse_args(list(argv)), category)

    args = train_segmentor.parse_args(["--ce-on-logits", "--official-lsa", "--official-hole-fill"])
    assert args.seed == 42 and args.labels == "pseudo" and args.masks_root.endswith("datasets/masks")
    f = cfg("juice_bottle", ["--fast", "--ce-on-logits", "--official-lsa", "--official-hole-fill"])
    assert f.resolution == 64 and f.epochs == 12 and f.ce_on_logits and f.official_lsa and f.official_hole_fill
    assert f.fill_holes  # the category's official value on top of the --fast preset
    # an explicit flag wins over --fast even when it equals the full default, and over the category's value
    g = cfg("juice_bottle", ["--fast", "--resolution", "256", "--no-fill-holes", "--epochs", "3", "--dtype", "bf16"])
    assert (g.resolution, g.epochs, g.sup_only_epochs, g.fill_holes, g.dtype) == (256, 3, 6, False, "bf16")
    assert cfg("screw_bag", ["--min-distance", "0.2"]).min_distance == 0.2 and cfg("screw_bag").min_distance == 0.1
    assert cfg("pushpins") == make_config("pushpins")  # no flag: the official values
    assert "(default 120; --fast 12)" in " ".join(train_segmentor.build_parser().format_help().split())


# --- training step: two BatchNorm passes -------------------------------------------------------------------------

def _bn_state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("use_unsup", [False, True])
def test_train_step_runs_two_bn_passes_in_every_epoch(use_unsup):
    import copy
    from methods.csad.segmentor import train_step

    torch.manual_seed(0)
    model = Segmentor(3, (8, 16))
    ref = copy.deepcopy(model)
    sup = {"layer1": torch.randn(2, 8, 8, 8), "layer3": torch.randn(2, 16, 2, 2)}
    unsup = {"layer1": torch.randn(2, 8, 8, 8) * 3 + 1, "layer3": torch.randn(2, 16, 2, 2) * 2}
    y = torch.randint(0, 3, (2, 32, 32))
    onehot = F.one_hot(y, 3).permute(0, 3, 1, 2).float()
    target = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]])
    cfg = SegmentorConfig(resolution=32)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_step(model, opt, cfg, sup, onehot, unsup_feats=unsup, target_hist=target, use_unsup=use_unsup)

    # hand computation for the first BatchNorm (low-level 1x1 conv on layer1): two momentum-0.999 updates,
    # first towards the supervised batch, then towards the unsupervised one
    w = ref.low_level[0].weight[:, :, 0, 0].detach()
    m, rm, rv = 0.999, torch.zeros(48), torch.ones(48)
    for feats in (sup, unsup):
        z = torch.einsum("oc,bchw->bohw", w, feats["layer1"])
        rm = (1 - m) * rm + m * z.mean((0, 2, 3))
        rv = (1 - m) * rv + m * z.var((0, 2, 3), unbiased=True)
    bn = model.low_level[1]
    torch.testing.assert_close(bn.running_mean, rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, rv, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 2

    # every BatchNorm equals a hand-run two-pass forward of the untouched copy
    ref.train()
    with torch.no_grad():
        ref(sup, 32)
        ref(unsup, 32)
    got, want = _bn_state(model), _bn_state(ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    # ... and differs from one pass over the concatenated batch (what the previous version did)
    torch.manual_seed(0)
    fresh = Segmentor(3, (8, 16)).train()
    with torch.no_grad():
        fresh({k: torch.cat([sup[k], unsup[k]]) for k in sup}, 32)
    assert not torch.allclose(_bn_state(fresh)["low_level.1.running_mean"], rm, atol=1e-3)

    # the parameter update: in the supervised-only phase the unsupervised output carries no gradient
    torch.manual_seed(0)
    ref2 = Segmentor(3, (8, 16)).train()
    opt2 = torch.optim.Adam(ref2.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ls, lu = ref2(sup, 32), ref2(unsup, 32)
    ps, pu = ls.softmax(1), lu.softmax(1)
    loss = 0.5 * ce_loss(ls, onehot) + 10 * focal_loss(ps, onehot) + dice_loss(ps, onehot)
    if use_unsup:
        loss = loss + 10 * histogram_loss(pu, target) + entropy_loss(pu) + entropy_loss(ps)
    opt2.zero_grad()
    loss.backward()
    opt2.step()
    for (k, a), b in zip(model.named_parameters(), ref2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("script", ["train_segmentor", "pseudo_label"])
def test_official_switch_turns_on_every_official_flag(script):
    import importlib
    from common.official import official_flags_of

    mod = importlib.import_module(script)
    parser = mod.build_parser()
    flags = official_flags_of(parser)
    known = {"train_segmentor": {"official_hole_fill", "official_lsa"},
             "pseudo_label": {"official_background_match", "amg_for_no_sam"}}[script]
    dests = {a.dest for a in parser._actions}
    # every official-behaviour option of the script is listed (a new --official-* flag must join the switch)
    assert known | {d for d in dests if d.startswith("official_")} - {"official"} == set(flags)
    off, on = mod.parse_args([]), mod.parse_args(["--official"])
    assert not off.official and all(getattr(off, d) is False for d in flags)
    assert on.official and all(getattr(on, d) is True for d in flags)
    if script == "train_segmentor":
        from methods.csad.segmentor import make_config

        cfg = make_config("juice_bottle", official_hole_fill=on.official_hole_fill, official_lsa=on.official_lsa)
        assert cfg.official_hole_fill and cfg.official_lsa and not cfg.ce_on_logits  # official CE is the default


# --- network and checkpoint -------------------------------------------------------------------------------------

def test_segmentor_head_size_and_checkpoint_roundtrip(tmp_path):
    m = Segmentor(5, (256, 1024))
    n = sum(p.numel() for p in m.parameters())
    assert n == 9_236_576 + 257 * 5  # the official head's 9.24 M parameters + 257 per class
    small = Segmentor(3, (24, 112))
    feats = {"layer1": torch.randn(2, 24, 16, 16), "layer3": torch.randn(2, 112, 4, 4)}
    small.train()
    small(feats, 64)  # one training step's statistics (momentum 0.999: running stats ~ the last batch)
    small.eval()
    out = small(feats, 64)
    assert out.shape == (2, 3, 64, 64)
    path = tmp_path / "segmentor_x_64.pth"
    save_segmentor(path, small, "efficientnet_lite0", 64)
    loaded = load_segmentor(path)
    assert loaded.ckpt_config == {"num_classes": 3, "in_channels": [24, 112], "backbone": "efficientnet_lite0",
                                  "resolution": 64, "layers": ["layer1", "layer3"]}
    torch.testing.assert_close(loaded(feats, 64), out)
    with pytest.raises(FileNotFoundError, match="segmentor_missing"):
        load_segmentor(tmp_path / "segmentor_missing.pth")


# --- end to end on the synthetic dataset -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_with_maps(tmp_path_factory):
    from dataset_readers.synthetic_loco import generate

    root = tmp_path_factory.mktemp("synth_maps")
    generate(root, size=128, n_train=24, n_val=8, n_test=10, seed=0, categories=["synth_box"], component_maps=True)
    return root


def test_missing_pseudo_labels_is_a_clear_error(synth_with_maps, tmp_path, lite0_weights):
    import train_segmentor
    with pytest.raises(SystemExit, match=str(tmp_path / "none" / "synth_box")):  # main() exits 1
        train_segmentor.main(["--dataset", "synthetic_loco", "--data-root", str(synth_with_maps), "--fast",
                              "--categories", "synth_box", "--backbone", "efficientnet_lite0", "--weights",
                              str(lite0_weights), "--masks-root", str(tmp_path / "none"), "--score-dir",
                              str(tmp_path / "s"), "--ckpt-dir", str(tmp_path / "c")])


@pytest.fixture(scope="module")
def fast_run(synth_with_maps, tmp_path_factory, lite0_weights):
    """One --fast training run on synth_box (12 epochs at 64 px, Lite0), and a --test-only run from its checkpoint
    into other score and mask folders."""
    import train_segmentor

    out = tmp_path_factory.mktemp("fast_run")
    common = ["--dataset", "synthetic_loco", "--data-root", str(synth_with_maps), "--fast", "--categories", "synth_box",
              "--backbone", "efficientnet_lite0", "--weights", str(lite0_weights), "--ckpt-dir", str(out / "ckpt")]
    threads = torch.get_num_threads()
    # one thread: the CPU thread count changes the reduction order, hence a few argmax pixels and the AUROCs below
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # read by main's set_threads
        (res,) = train_segmentor.main(common + ["--labels", "component-maps", "--masks-root", str(out / "masks"),
                                                "--score-dir", str(out / "scores")])
        (again,) = train_segmentor.main(common + ["--test-only", "--masks-root", str(out / "masks_t"),
                                                  "--score-dir", str(out / "scores_t")])
    torch.set_num_threads(threads)
    return {"out": out, "res": res, "again": again, "common": common,
            "ckpt": out / "ckpt" / "segmentor_synth_box_64.pth"}


def test_fast_run_separates_wrong_count_and_colour(synth_with_maps, fast_run, lite0_weights):
    from dataset_readers import load_mask, read_category
    from evaluation.score_files import load_scores
    from methods.csad.patch_histogram import params_path

    res, out = fast_run["res"], fast_run["out"]
    masks, scores = out / "masks", out / "scores"
    assert res["num_classes"] == 5 and res["sup"] == 12 and res["unsup"] == 12
    data = read_category("synthetic_loco", "synth_box", synth_with_maps)
    groups = data.score_groups()
    logi = load_scores("synth_box", "patchhist", "logi", samples=groups["logi"], score_dir=scores)  # order verified
    load_scores("synth_box", "patchhist", "struc", samples=groups["struc"], score_dir=scores)
    val = load_scores("synth_box", "patchhist", "val", samples=groups["val"], score_dir=scores)
    assert len(list((masks / "synth_box" / "test_seg_output").glob("*.png"))) == len(data.test)
    # the validation scores are the trimmed-z sums of the saved raw validation distances (q20-q80 of 8 images
    # keeps 4, so their median is not pinned near 0)
    from evaluation.fusion import trimmed_z_normalize
    with np.load(params_path(scores, "synth_box")) as z:
        dg, dp = z["hist_val_score"], z["patch_hist_val_score"]
    np.testing.assert_allclose(val, trimmed_z_normalize(dg, dg) + trimmed_z_normalize(dp, dp), rtol=1e-5, atol=1e-6)

    names = {e["pixel_value"]: e["defect_name"] for e in data.defects_config}
    kinds = [{names[int(load_mask(m).max())] for m in s.mask_paths} for s in groups["logi"]]
    sel = np.array([not k or bool(k & {"wrong_count", "wrong_colour"}) for k in kinds])
    y = np.array([s.label for s in groups["logi"]])
    assert 0 < y[sel].sum() < sel.sum()
    auc = roc_auc_score(y[sel], logi[sel])
    # measured 0.80 (5 anomalous vs 10 good; seed 42, 12 epochs at 64 px, EfficientNet-Lite0, one CPU thread;
    # 0.74 with two threads); chance is 0.5
    assert auc >= 0.75, auc
    assert roc_auc_score(y, logi) >= 0.7

    # the saved network alone (models.segmentor.load_segmentor) + the params file reproduce the saved scores
    from dataset_readers.torch_data import imagenet_transform
    from methods.base import ImageList
    from methods.csad.segmentor import Encoder
    from models.backbones import load_backbone

    seg = load_segmentor(fast_run["ckpt"])
    images = ImageList(groups["logi"])
    x = torch.stack([imagenet_transform((64, 64))(images[i]) for i in range(len(images))])
    enc = Encoder(load_backbone("efficientnet_lite0", lite0_weights), torch.device("cpu"))
    with torch.no_grad():
        maps = seg(enc.extractor(x), 64).argmax(1)
    ph = PatchHistogram.load(params_path(scores, "synth_box"))
    np.testing.assert_allclose(ph.score(maps), logi, rtol=1e-6, atol=1e-6)


def test_test_only_reproduces_every_output_bit_for_bit(fast_run):
    out = fast_run["out"]
    assert fast_run["again"]["test_only"] and fast_run["again"]["num_classes"] == 5
    files = sorted((out / "scores").glob("*.npy"))
    assert {f.name for f in files} == {f"synth_box_patchhist_{g}_score.npy" for g in ("logi", "struc", "val")}
    for f in files:
        a, b = np.load(f), np.load(out / "scores_t" / f.name)
        assert a.dtype == b.dtype and np.array_equal(a, b), f.name
    pngs = sorted((out / "masks" / "synth_box" / "test_seg_output").glob("*.png"))
    assert len(pngs) == 30
    for f in pngs:
        assert f.read_bytes() == (out / "masks_t" / "synth_box" / "test_seg_output" / f.name).read_bytes(), f.name
    with np.load(out / "scores" / "synth_box_patchhist_params.npz") as z, \
            np.load(out / "scores_t" / "synth_box_patchhist_params.npz") as zt:
        assert all(np.array_equal(z[k], zt[k]) for k in z.files) and set(z.files) == set(zt.files)


@pytest.mark.filterwarnings("ignore:efficientnet_lite0. random weights")
def test_test_only_refuses_other_settings_and_old_checkpoints(fast_run, tmp_path, capsys):
    import train_segmentor
    from common.io import save_checkpoint, load_checkpoint

    common = fast_run["common"] + ["--masks-root", str(tmp_path / "m"), "--score-dir", str(tmp_path / "s")]

    def refused(*extra):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            train_segmentor.main(common + list(extra))
        assert exc.value.code == 1
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        return line

    line = refused("--test-only", "--epochs", "5")
    assert str(fast_run["ckpt"]) in line and "epochs=12 (this run: 5)" in line
    line = refused("--test-only", "--weights", "random")
    assert "weights_sha256" in line and "(this run: RANDOM)" in line
    old = load_checkpoint(fast_run["ckpt"])
    for k in ("patch_histogram", "val_scores", "segmentor_config"):
        del old[k]  # what the previous version wrote: the network only, the histogram in a separate file
    save_checkpoint(tmp_path / "old.pth", old)
    line = refused("--checkpoint", str(tmp_path / "old.pth"))
    assert f"{tmp_path / 'old.pth'}: this segmentor checkpoint holds no Patch Histogram" in line
    line = refused("--checkpoint", str(fast_run["ckpt"]), "--categories", "synth_box", "synth_bottle")
    assert "--checkpoint names one file, but 2 categories" in line
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").glob("*.npy"))


def test_bf16_predict_is_finite_and_ranks_like_fp32(fast_run, synth_with_maps):
    from scipy.stats import spearmanr

    from dataset_readers import read_category
    from methods.base import ImageList, load_model

    model, _ = load_model(fast_run["ckpt"])
    images = ImageList(read_category("synthetic_loco", "synth_box", synth_with_maps).test)
    fp32 = model.predict(images)
    model.cfg.dtype = "bf16"  # what predict.py --dtype sets
    bf16 = model.predict(images)
    assert np.isfinite(bf16.scores).all() and bf16.scores.dtype == np.float64
    assert (bf16.label_maps == fp32.label_maps).mean() > 0.95
    rho = spearmanr(bf16.scores, fp32.scores)[0]
    assert rho > 0.9, rho
