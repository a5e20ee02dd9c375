"""Metrics against hand-computed values, sklearn and brute-force references that loop over every threshold."""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from evaluation import metrics as M
from evaluation.fusion import fuse, subsets, trimmed_stats, trimmed_z_normalize

LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)


# ---------------------------------------------------------------------------------------------- references

def _area_segments(x, y, limit):
    """Independent integration: walk the polyline segment by segment, cut at the limit."""
    area = 0.0
    for x0, y0, x1, y1 in zip(x[:-1], y[:-1], x[1:], y[1:]):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (limit - x0)
    return area / limit


def _thresholds(maps):
    values = np.unique(np.concatenate([np.ravel(m) for m in maps]))
    return np.concatenate([[values[-1] + 1.0], values[::-1], [values[0] - 1.0]])


def brute_spro(maps, channels, sats, limits=LIMITS):
    """The official definition evaluated at every threshold with full-image comparisons."""
    xs, ys = [], []
    n_neg = sum(int((~np.logical_or.reduce([np.zeros_like(m, bool)] + list(c))).sum()) for m, c in zip(maps, channels))
    for t in _thresholds(maps):
        fp, per_channel = 0, []
        for m, chans, ss in zip(maps, channels, sats):
            binary = m > t
            union = np.logical_or.reduce([np.zeros_like(m, bool)] + list(chans))
            fp += int((binary & ~union).sum())
            per_channel += [min((binary & c).sum() / s, 1.0) for c, s in zip(chans, ss)]
        xs.append(fp / n_neg)
        ys.append(np.mean(per_channel))
    return {lim: _area_segments(xs, ys, lim) for lim in limits}


def brute_aupro(maps, masks, limit=0.3):
    regions, n_ok = [], 0
    for m, g in zip(maps, masks):
        lab, k = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [(len(regions), m, lab == j) for j in range(1, k + 1)]
        n_ok += int((~g).sum())
    xs, ys = [], []
    for t in _thresholds(maps):
        xs.append(sum(int(((m > t) & ~g).sum()) for m, g in zip(maps, masks)) / n_ok)
        ys.append(np.mean([((m > t) & r).sum() / r.sum() for _, m, r in regions]))
    return _area_segments(xs, ys, limit)


def _random_loco(rng, n_good=3, n_bad=4, size=(12, 14), levels=None, max_channels=3):
    maps, chans, sats = [], [], []
    for i in range(n_good + n_bad):
        m = rng.random(size) if levels is None else rng.integers(0, levels, size).astype(np.float32)
        cs, ss = [], []
        if i >= n_good:
            for _ in range(rng.integers(1, max_channels + 1)):
                c = np.zeros(size, bool)
                y0, x0 = rng.integers(0, size[0] - 3), rng.integers(0, size[1] - 3)
                c[y0:y0 + rng.integers(2, 6), x0:x0 + rng.integers(2, 7)] = True
                m[c] += rng.random() * 0.8  # defects score a bit higher, overlapping channels allowed
                rel = bool(rng.integers(0, 2))
                ss.append(M.saturation_area(int(c.sum()), rng.choice([0.5, 0.8, 1.0]) if rel else int(rng.integers(1, 30)), rel))
                cs.append(c)
        maps.append(m)
        chans.append(cs)
        sats.append(ss)
    return maps, chans, sats


# ---------------------------------------------------------------------------------------------- image level

def test_image_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(5, 60))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 4, n).astype(float) if trial % 2 else rng.normal(size=n) + labels
        assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_official_tie_rule_is_optimistic_and_equal_without_ties():
    # the MVTec LOCO script's ROC (`src/metrics.py`) on ties: OK = {0, 1}, NOK = {1, 1}: official 1.0, correct 0.75.
    scores, labels = [0, 1, 1, 1], [0, 0, 1, 1]
    assert M.official_loco_image_auroc(scores, labels) == pytest.approx(1.0)
    assert M.image_auroc(scores, labels) == pytest.approx(0.75)
    # Ties inside each class only: the official vertex after the first element of a group errs the other way.
    assert M.official_loco_image_auroc([0] * 5 + [1] * 3, [0] * 5 + [1] * 3) == pytest.approx(13 / 15)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 80)
    scores = rng.normal(size=80) + labels
    assert M.official_loco_image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    tied = rng.integers(0, 3, 80).astype(float)
    assert M.official_loco_image_auroc(tied, labels) > roc_auc_score(labels, tied) + 1e-3


def test_auroc_refuses_one_class_and_nan():
    with pytest.raises(M.MetricError, match="both classes"):
        M.image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(M.MetricError, match="NaN"):
        M.image_auroc([np.nan, 0.2], [0, 1])


def test_pixel_auroc_equals_sklearn():
    rng = np.random.default_rng(2)
    masks = rng.random((6, 10, 11)) > 0.8
    maps = np.round(rng.random((6, 10, 11)) + masks * 0.3, 1)  # rounding creates ties
    assert M.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_f1_max_closed_form():
    # Sorted scores 0.9(+) 0.8(-) 0.7(+) 0.1(-): thresholds give F1 = 2/3, 1/2, 4/5, 2/3 -> 0.8.
    assert M.f1_max([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(0.8)
    assert M.f1_max([0.2, 0.9, 0.8], [0, 1, 1]) == pytest.approx(1.0)
    # A tie between a positive and a negative cannot be split: best is 2*1/(2+1).
    assert M.f1_max([0.5, 0.5], [0, 1]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------- sPRO, by hand

def _hand_case(sat_threshold, relative):
    good = np.array([[0.0, 1.0]])
    bad = np.array([[3.0, 1.2, 0.5, 1.5]])
    chan = np.array([[True, True, False, False]])
    s = M.saturation_area(2, sat_threshold, relative)
    return [good, bad], [[], [chan]], [[], [s]]


def test_spro_single_region_by_hand():
    # Defect-free pixels {0, 1, 0.5, 1.5}; defect pixels {3, 1.2}, s = 2.
    # Curve: (0,0) (0,.5) (.25,.5) (.25,1) (.5,1) (.75,1) (1,1).
    r = M.spro(*_hand_case(1.0, True))
    assert r[0.01] == pytest.approx(0.5)
    assert r[0.1] == pytest.approx(0.5)
    assert r[0.3] == pytest.approx((0.25 * 0.5 + 0.05) / 0.3)
    assert r[1.0] == pytest.approx(0.875)


def test_spro_absolute_saturation_by_hand():
    # Absolute S = 1: the first defect pixel already saturates, the curve jumps to 1 at FPR 0.
    r = M.spro(*_hand_case(1, False))
    assert all(v == pytest.approx(1.0) for v in r.values())
    # S larger than the area is capped at the area (s = 2), same as the relative 1.0 case.
    assert M.spro(*_hand_case(500, False))[1.0] == pytest.approx(0.875)


def test_spro_relative_saturation_by_hand():
    # Relative 0.5 of a 4-pixel defect: s = 2, so two of four defect pixels saturate it.
    good = np.array([[0.0, 0.1]])
    bad = np.array([[0.9, 0.8, 0.05, 0.02, 0.2]])
    chan = np.array([[True, True, True, True, False]])
    s = M.saturation_area(4, 0.5, True)
    assert s == 2
    r = M.spro([good, bad], [[], [chan]], [[], [s]])
    # Defect-free {0, 0.1, 0.2}: sPRO reaches 1 before any FP.
    assert r[0.05] == pytest.approx(1.0)
    # Without saturation (s = 4) the curve reaches 0.5 at FPR 0, then 1 only after 0.2 and 0.1 fired.
    r4 = M.spro([good, bad], [[], [chan]], [[], [4]])
    assert r4[0.05] == pytest.approx(0.5)


def test_spro_several_regions_and_good_image_fp():
    # One image, two channels (weights 1/2 each); the good image's hottest pixel is an FP before the second defect.
    good = np.array([[5.0, 0.0, 0.0, 0.0]])
    bad = np.array([[9.0, 4.0, 0.0, 0.0]])
    c1 = np.array([[True, False, False, False]])
    c2 = np.array([[False, True, False, False]])
    r = M.spro([good, bad], [[], [c1, c2]], [[], [1, 1]], limits=(1 / 6, 1.0))
    # Defect-free pixels: 6. Curve: (0,0) (0,.5) (1/6,.5) (1/6,1) ... (1,1).
    assert r[1 / 6] == pytest.approx(0.5)
    assert r[1.0] == pytest.approx((1 / 6 * 0.5 + 5 / 6) / 1.0)
    # Merging the two channels into one region with the same absolute S = 1 would saturate at the first pixel:
    # channels are separate regions, never merged.
    merged = M.spro([good, bad], [[], [c1 | c2]], [[], [1]], limits=(1 / 6,))
    assert merged[1 / 6] == pytest.approx(1.0) and r[1 / 6] == pytest.approx(0.5)


def test_spro_ties_between_defect_and_background():
    # The defect pixel ties with a good-image pixel: both switch at the same threshold, one diagonal step.
    good = np.array([[2.0, 0.0]])
    bad = np.array([[2.0, 0.0]])
    chan = np.array([[True, False]])
    r = M.spro([good, bad], [[], [chan]], [[], [1]], limits=(1 / 3, 1.0))
    # Defect-free: 3 pixels. Curve: (0,0) -> (1/3, 1) -> (1, 1).
    assert r[1 / 3] == pytest.approx(0.5)
    assert r[1.0] == pytest.approx((0.5 / 3 + 2 / 3))


def test_spro_matches_brute_force_random():
    rng = np.random.default_rng(3)
    for levels in (None, 6):  # continuous scores and heavily tied integer scores
        for _ in range(3):
            maps, chans, sats = _random_loco(rng, levels=levels)
            fast, ref = M.spro(maps, chans, sats), brute_spro(maps, chans, sats)
            for lim in LIMITS:
                assert fast[lim] == pytest.approx(ref[lim], abs=1e-10)


def test_spro_refuses_map_of_wrong_size():
    with pytest.raises(M.MetricError, match="ground-truth"):
        M.spro([np.zeros((4, 4)), np.zeros((4, 5))], [[], [np.ones((4, 4), bool)]], [[], [1]])


# ---------------------------------------------------------------------------------------------- AU-PRO

def test_aupro_matches_brute_force():
    rng = np.random.default_rng(4)
    maps = np.round(rng.random((5, 16, 16)), 2)
    masks = np.zeros((5, 16, 16), bool)
    masks[1, 2:5, 2:6] = True
    masks[1, 9:14, 9:11] = True  # two 8-connected regions in one image
    masks[2, 3:4, 3:4] = masks[2, 4:5, 4:5] = True  # diagonal neighbours: one 8-connected region
    masks[3, 0:8, 0:16] = True
    maps[masks] += 0.3
    for lim in (0.05, 0.3, 1.0):
        assert M.aupro(maps, masks, lim) == pytest.approx(brute_aupro(maps, masks, lim), abs=1e-10)


def test_aupro_random_anchor():
    # Random scores: PRO(fpr) ~ fpr, so AU-PRO@0.3 ~ 0.15 (official toy test: 0.1510).
    rng = np.random.default_rng(5)
    maps = rng.random((100, 96, 96)).astype(np.float32)
    masks = np.zeros(maps.shape, bool)
    for i, (y, x) in enumerate(rng.integers(0, 86, (100, 2))):
        masks[i, y:y + 10, x:x + 10] = True
    assert M.aupro(maps, masks) == pytest.approx(0.15, abs=0.006)
    perfect = maps + masks * 2.0
    assert M.aupro(perfect, masks) == pytest.approx(1.0)


def test_spro_and_aupro_speed_200_maps_256():
    rng = np.random.default_rng(6)
    n, size = 200, (256, 256)
    maps = rng.random((n,) + size, dtype=np.float32)
    chans, sats, masks = [], [], np.zeros((n,) + size, bool)
    for i in range(n):
        if i < 100:
            chans.append([])
            sats.append([])
            continue
        cs = []
        for _ in range(2):
            y, x = rng.integers(0, 200, 2)
            c = np.zeros(size, bool)
            c[y:y + 40, x:x + 50] = True
            cs.append(c)
            masks[i] |= c
        maps[i][masks[i]] += 0.5
        chans.append(cs)
        sats.append([M.saturation_area(int(c.sum()), 1200, False) for c in cs])
    t0 = time.perf_counter()
    r = M.spro(list(maps), chans, sats)
    t1 = time.perf_counter()
    a = M.aupro(maps, masks)
    t2 = time.perf_counter()
    print(f"sPRO 200x256x256: {t1 - t0:.2f} s, AU-PRO: {t2 - t1:.2f} s")
    assert t1 - t0 < 20 and t2 - t1 < 20
    assert 0.5 < r[0.05] <= 1.0 and 0.5 < a <= 1.0


# ---------------------------------------------------------------------------------------------- fusion

def test_trimmed_stats_and_fusion_on_known_arrays():
    val = np.arange(10, dtype=float)  # q20 = 1.8, q80 = 7.2 -> kept 2..7: mean 4.5, std sqrt(35/12)
    mean, std = trimmed_stats(val)
    assert mean == pytest.approx(4.5)
    assert std == pytest.approx(np.sqrt(35 / 12))
    z = trimmed_z_normalize(np.array([4.5, 4.5 + std]), val)
    assert z == pytest.approx([0.0, 1.0])
    a_test, b_test = np.array([1.0, 2.0, 9.0]), np.array([0.0, 10.0, 20.0])
    fused = fuse({"a": a_test, "b": b_test}, {"a": val, "b": val * 10})
    expected = (a_test - 4.5) / std + (b_test - 45.0) / (10 * std)
    assert fused == pytest.approx(expected)
    assert subsets(["patchhist", "LGST"]) == [("patchhist",), ("LGST",), ("patchhist", "LGST")]
    assert len(subsets(["a", "b", "c"])) == 7
