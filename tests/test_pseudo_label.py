"""CSAD stage 1 (pseudo_label.py): mask post-processing, layout contract, descriptors, clustering and selection on
constructed data with a known answer; the real model-loading and inference code on tiny random models."""
from __future__ import annotations

import dataclasses
import json
import logging

import cv2
import numpy as np
import pytest
import torch

from methods.csad import label_layout as L
from methods.csad.pseudo_label import clustering as C
from methods.csad.pseudo_label import masks as M
from methods.csad.pseudo_label.config import (CategoryConfig, PseudoLabelConfig, PseudoLabelError, background_terms,
                                              is_background_phrase, load_config)

LOG = logging.getLogger("test_pseudo_label")


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# --- configuration --------------------------------------------------------------------------------------------------

def test_config_table_matches_spec_and_rejects_unknown_category():
    pp = load_config("pushpins")
    assert (pp.box_threshold, pp.text_threshold, pp.settings.bandwidth, pp.no_sam, pp.filter_hist) == \
        (0.15, 0.2, 3.5, True, False)
    jb = load_config("juice_bottle")
    assert (jb.filter_by_combine, jb.use_grounding_filter, jb.no_sam) == (False, False, False)
    # official grounding_segmentation: grounding_config.get('filter_by_combine', False); only juice_bottle sets it
    for cat in ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors"):
        assert load_config(cat).filter_by_combine is False, cat
    assert load_config("screw_bag").settings.bandwidth == 3.0
    assert load_config("splicing_connectors").settings.bandwidth == 4.0
    # the official SamAutomaticMaskGenerator arguments (hard-coded in Tokichan/CSAD pseudo_label.py segmentation())
    assert pp.settings.amg_params() == dict(
        points_per_side=32, points_per_batch=16, pred_iou_thresh=0.88, stability_score_thresh=0.96,
        stability_score_offset=1.0, box_nms_thresh=0.7, crop_n_layers=1, crop_nms_thresh=0.7,
        crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=1, min_mask_region_area=500,
        output_mode="binary_mask")
    for cat in ("synth_box", "synth_bottle"):
        assert load_config(cat).text_prompt
    with pytest.raises(PseudoLabelError, match="no stage-1 settings for category 'nope'"):
        load_config("nope")


def test_settings_defaults_are_the_official_values_and_fast_changes_only_sizes():
    d = PseudoLabelConfig()
    # Tokichan/CSAD: component_feature_extractor.py (65, 60), class_histogram/*.yaml (reduce_dim, proj_dim),
    # pseudo_label.py ClassHistogram (0.5, 0.1, 0.5, 0.001), filter_small_masks (0.001), grounded_sam.py (800, 1333)
    assert (d.crop_size, d.n_rotations, d.reduce_dim, d.proj_dim) == (65, 60, True, 512)
    assert (d.small_cluster_fraction, d.hdbscan_min_fraction, d.select_fraction, d.min_class_area) == \
        (0.5, 0.1, 0.5, 0.001)
    assert (d.min_instance_fraction, d.grounding_short_side, d.grounding_max_size, d.sam_model) == \
        (0.001, 800, 1333, "vit_h")
    assert (d.bandwidth, d.bandwidth_retries, d.grounding_ckpt, d.sam_ckpt) == (None, 0, None, None)
    fast = PseudoLabelConfig.fast()
    changed = {f.name for f in dataclasses.fields(d) if getattr(fast, f.name) != getattr(d, f.name)}
    assert changed == {"grounding_ckpt", "sam_ckpt", "grounding_short_side", "grounding_max_size", "n_rotations",
                       "bandwidth_retries", "amg_points_per_side", "amg_pred_iou_thresh",
                       "amg_stability_score_thresh"}
    assert PseudoLabelConfig.fast(n_rotations=3).n_rotations == 3


def _config_copy(tmp_path, edit) -> str:
    from methods.csad.pseudo_label.config import DEFAULT_CONFIG

    raw = json.loads(DEFAULT_CONFIG.read_text())
    edit(raw)
    path = tmp_path / "stage1.json"
    path.write_text(json.dumps(raw))
    return str(path)


def test_entry_overrides_the_preset_and_an_explicit_flag_overrides_the_entry(tmp_path):
    from pseudo_label import category_configs, parse_args

    path = _config_copy(tmp_path, lambda raw: raw["categories"]["synth_box"].update(n_rotations=4, bandwidth=9))
    cfgs = category_configs(parse_args(["--fast", "--config", path, "--bandwidth", "2", "--crop-size", "33"]),
                            ["synth_box", "synth_bottle"])
    box, bottle = cfgs["synth_box"].settings, cfgs["synth_bottle"].settings
    assert (box.n_rotations, box.bandwidth, box.crop_size, box.grounding_ckpt) == (4, 2.0, 33, "tiny")
    assert (bottle.n_rotations, bottle.bandwidth, bottle.crop_size) == (8, 2.0, 33)
    cfgs = category_configs(parse_args(["--config", path]), ["synth_box", "synth_bottle"])
    assert cfgs["synth_box"].settings == dataclasses.replace(PseudoLabelConfig(), n_rotations=4, bandwidth=9.0)
    assert type(cfgs["synth_box"].settings.bandwidth) is float  # JSON 9 -> 9.0, as the flag would give
    assert cfgs["synth_bottle"].settings == dataclasses.replace(PseudoLabelConfig(), bandwidth=3.5)


@pytest.mark.parametrize("edit, pattern", [
    (lambda r: r.update(common={"crop_size": 65}), r"top-level key\(s\) \['common'\] are not read"),
    (lambda r: r["categories"]["synth_box"].update(n_rotations="8"), r"'n_rotations' must be a JSON int, got \"8\""),
    (lambda r: r["categories"]["synth_box"].update(no_sam=1), r"'no_sam' must be a JSON bool"),
    (lambda r: r["categories"]["synth_box"].update(feature_list=["cnn_image"]), r"unknown key\(s\) \['feature_list'\]"),
    (lambda r: r["categories"]["synth_box"].update(min_class_area=2), r"'min_class_area' must lie in \[0, 1\]"),
    (lambda r: r["categories"]["synth_box"].update(bandwidth=0), r"'bandwidth' must be > 0"),
    (lambda r: r["categories"]["synth_box"].update(sam_model="vit_x"), r"'sam_model' must be one of"),
    (lambda r: r["categories"]["synth_box"].pop("filter_by_combine"), r"lacks \['filter_by_combine'\]"),
])
def test_config_mistakes_name_the_file_entry_and_key(tmp_path, edit, pattern):
    path = _config_copy(tmp_path, edit)
    with pytest.raises(PseudoLabelError, match=pattern) as err:
        load_config("synth_box", path)
    assert path in str(err.value)


def test_flags_keep_their_names_and_build_the_config():
    from common.config import config_from_args
    from pseudo_label import build_parser, parse_args

    a = parse_args(["--sam-model", "vit_b", "--grounding-ckpt", "g.pth", "--sam-ckpt", "random", "--bandwidth", "3",
                    "--max-batch", "7", "--no-reduce-dim", "--official"])
    cfg = config_from_args(PseudoLabelConfig, a)
    assert (cfg.sam_model, cfg.grounding_ckpt, cfg.sam_ckpt, cfg.bandwidth, cfg.max_batch, cfg.reduce_dim) == \
        ("vit_b", "g.pth", "random", 3.0, 7, False)
    assert a.official_background_match is True and a.amg_for_no_sam is True
    assert config_from_args(PseudoLabelConfig, parse_args([])) == PseudoLabelConfig()
    assert config_from_args(PseudoLabelConfig, parse_args(["--fast"])) == PseudoLabelConfig.fast()
    assert config_from_args(PseudoLabelConfig, parse_args(["--fast", "--n-rotations", "60"])) == \
        PseudoLabelConfig.fast(n_rotations=60)  # an explicit flag equal to the full default still wins
    dests = {action.dest for action in build_parser()._actions}
    assert {f.name for f in dataclasses.fields(PseudoLabelConfig)} <= dests
    from pseudo_label import category_configs

    with pytest.raises(PseudoLabelError, match=r"^--n-rotations must be > 0, got 0"):  # the flag, not the file
        category_configs(parse_args(["--n-rotations", "0"]), ["synth_box"])


def test_background_prompt_matching_fixed_vs_official():
    prompt = load_config("pushpins").background_prompt  # " container ."
    phrase = "container(0.35)"
    assert is_background_phrase(phrase, background_terms(prompt))
    assert not is_background_phrase(phrase, background_terms(prompt, official=True))
    assert is_background_phrase("a container here", background_terms(prompt, official=True))
    assert background_terms("") == [] and background_terms("", official=True) == []  # "" must not match all
    assert is_background_phrase("zip-lock bag(0.5)", background_terms("zip - lock bag".replace(" - ", "-")))


# --- mask post-processing --------------------------------------------------------------------------------------------

def test_intersect_ratio_and_vectorised_ratios():
    a, b = box(20, 20, 0, 10, 0, 10), box(20, 20, 5, 20, 5, 20)  # |a|=100, |b|=225, overlap 25
    assert M.intersect_ratio(a, b) == pytest.approx(25 / 100)
    np.testing.assert_allclose(M.ratios_to(np.stack([a, b]), b), [25 / 100, 1.0])
    np.testing.assert_allclose(M.ratios_to(np.stack([a, b]), b, mode="self"), [25 / 100, 1.0])


def test_split_components_filters_and_sorts():
    h = w = 100
    m = box(h, w, 0, 10, 0, 10) | box(h, w, 50, 80, 50, 80) | box(h, w, 90, 95, 0, 5)  # 100, 900, 25 px
    whole = np.ones((h, w), bool)  # bbox = image: dropped
    comps = M.split_components(np.stack([m, whole]))
    assert [int(c.sum()) for c in comps] == [900, 100]  # 25 px <= 50 dropped, sorted by area desc
    # 4-connectivity: two squares touching only diagonally are two components
    diag = box(h, w, 0, 10, 0, 10) | box(h, w, 10, 20, 10, 20)
    assert len(M.split_components(diag[None])) == 2


def test_filter_by_combine_and_merge_masks():
    h = w = 100
    small = box(h, w, 10, 20, 10, 20)        # 100 px
    duplicate = box(h, w, 10, 20, 10, 21)    # 110 px, ~all inside `small`
    big = box(h, w, 0, 60, 0, 60)            # 3600 px, contains small
    other = box(h, w, 70, 90, 70, 90)        # 400 px, disjoint
    tiny = box(h, w, 95, 98, 95, 98)         # 9 px <= 0.1 % of 10^4: dropped
    kept = M.filter_by_combine(np.stack([big, duplicate, other, small, tiny]), min_fraction=0.001)
    areas = sorted(int(k.sum()) for k in kept)
    # small accepted first; duplicate overlaps the union by > 90 % -> deferred, and in pass 2 rejected;
    # big is deferred in pass 1 (intersect_ratio uses the smaller set) but accepted in pass 2 (100/3600 < 0.9)
    assert areas == [100, 400, 3600]
    ids = M.merge_masks(kept, min_fraction=0.001)
    assert ids.dtype == np.uint8 and set(np.unique(ids)) == {0, 1, 2, 3}
    assert ids[15, 15] == 3 and ids[5, 5] == 1 and ids[80, 80] == 2  # the small mask overwrites the big one


def test_grounding_filter_background_removal_and_id_map_roundtrip():
    h = w = 60
    fg = box(h, w, 0, 30, 0, 30)
    inside, half_out = box(h, w, 5, 15, 5, 15), box(h, w, 20, 40, 20, 40)
    comps = np.stack([inside, half_out])
    assert len(M.grounding_filter(comps, fg)) == 1
    bg = box(h, w, 0, 60, 18, 60)
    left = M.remove_background(comps, bg)
    assert len(left) == 1 and left[0][10, 10]
    ids = M.merge_masks(comps, min_fraction=0.001)
    again = M.instances_from_id_map(ids)
    assert sorted(int(c.sum()) for c in again) == sorted(int(c.sum()) for c in M.id_map_to_stack(ids)[0])
    pts = M.sam_background_points(50, 80)
    # the official list, in its order (x, y): inset corners, then the corners with the image extent as the far one
    assert pts.tolist() == [[10, 10], [10, 40], [70, 10], [70, 40], [0, 0], [0, 50], [80, 0], [80, 50]]


# --- layout contract -------------------------------------------------------------------------------------------------

def _component_maps(root, category="synth_box", n=4, h=40, w=48):
    src = L.component_maps_dir(root, category)
    src.mkdir(parents=True)
    maps = []
    for i in range(n):
        m = np.zeros((h, w), np.uint8)
        m[2:12, 2:12] = 1
        m[20:30, 10 + i:30] = 2
        m[32:36, 40:46] = 1  # a second class-1 instance
        cv2.imwrite(str(src / f"{i:03d}.png"), m)
        maps.append(m)
    return maps


def test_write_from_component_maps_and_check_layout(tmp_path):
    maps = _component_maps(tmp_path / "data")
    out = L.write_from_component_maps(tmp_path / "data", "synth_box", tmp_path / "masks", good_fraction=0.5)
    assert out == tmp_path / "masks" / "synth_box"
    stems = L.check_layout("synth_box", tmp_path / "masks")
    assert stems == ["000", "001", "002", "003"]
    info = L.read_info("synth_box", tmp_path / "masks")
    np.testing.assert_array_equal(info["filtered_histogram_indices"], [0, 1])
    expected = np.stack([[(m == 1).mean(), (m == 2).mean()] for m in maps])
    np.testing.assert_allclose(info["filtered_component_histogram"], expected)
    np.testing.assert_array_equal(L.read_label_map("synth_box", "002", tmp_path / "masks"), maps[2])
    inst = L.read_label_map("synth_box", "000", tmp_path / "masks", L.REFINED)
    assert len(np.unique(inst)) == 4  # background + three connected components
    np.testing.assert_array_equal(L.read_background("synth_box", "001", tmp_path / "masks"), maps[1] == 0)
    assert L.num_classes("synth_box", tmp_path / "masks") == 3
    with pytest.raises(L.LayoutError, match="already exists"):
        L.write_from_component_maps(tmp_path / "data", "synth_box", tmp_path / "masks")
    (out / "001" / L.REFINED).unlink()
    with pytest.raises(L.LayoutError, match=r"001/refined_masks.png"):
        L.check_layout("synth_box", tmp_path / "masks")
    with pytest.raises(L.LayoutError, match="component maps not found"):
        L.write_from_component_maps(tmp_path / "data", "synth_bottle", tmp_path / "masks")


def test_check_layout_rejects_wrong_histogram_rows(tmp_path):
    _component_maps(tmp_path / "data", n=3)
    L.write_from_component_maps(tmp_path / "data", "synth_box", tmp_path / "masks")
    stems = ["000", "001", "002"]
    L.write_info("synth_box", tmp_path / "masks", stems, good_indices=np.arange(2), class_hist=np.zeros((2, 2)))
    with pytest.raises(L.LayoutError, match=r"shape \(2, 2\), expected \(3, K\)"):
        L.check_layout("synth_box", tmp_path / "masks")
    L.write_info("synth_box", tmp_path / "masks", stems, good_indices=np.array([0, 3]), class_hist=np.zeros((3, 2)))
    with pytest.raises(L.LayoutError, match="indices outside 0..2"):
        L.check_layout("synth_box", tmp_path / "masks")


def test_generator_component_maps_convert(tmp_path):
    from dataset_readers.synthetic_loco import generate

    generate(tmp_path / "d", size=64, n_train=3, n_val=1, n_test=2, seed=0, categories=["synth_bottle"],
             component_maps=True)
    from pseudo_label import main

    (res,) = main(["--dataset", "synthetic_loco", "--data-root", str(tmp_path / "d"), "--categories", "synth_bottle",
                   "--from-component-maps", "--masks-root", str(tmp_path / "m")])
    stems = L.check_layout("synth_bottle", tmp_path / "m")
    assert len(stems) == 3 and L.num_classes("synth_bottle", tmp_path / "m") == 5  # background + 4 kinds


# --- clustering and selection ----------------------------------------------------------------------------------------

def test_projection_is_seeded_and_scaled():
    x = np.random.default_rng(0).normal(size=(50, 300))
    a, b, c = C.random_projection(x, 512, 1), C.random_projection(x, 512, 1), C.random_projection(x, 512, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # E|xW^T|^2 = 0.01^2 * 512 * |x|^2
    ratio = (a ** 2).sum(1).mean() / ((x ** 2).sum(1).mean() * 512 * 1e-4)
    assert 0.9 < ratio < 1.1


def test_small_cluster_removal_and_histograms_match_brute_force():
    labels = np.array([0, 0, 0, 1, 2, 2, 2, 2, 3])
    kept = C.drop_small_clusters(labels, n_images=6, fraction=0.5)  # need >= 3 members
    np.testing.assert_array_equal(kept, [0, 0, 0, -1, 1, 1, 1, 1, -1])
    rng = np.random.default_rng(1)
    img, area = rng.integers(0, 4, 9), rng.random(9)
    hist = C.area_histograms(kept, img, area, 4, 2)
    brute = np.zeros((4, 2))
    for lab, i, a in zip(kept, img, area):
        if lab >= 0:
            brute[i, lab] += a
    np.testing.assert_allclose(hist, brute)


def test_hdbscan_main_mode_and_linf_selection():
    rng = np.random.default_rng(0)
    main = np.array([0.2, 0.1]) + rng.normal(0, 0.002, (24, 2))
    minor = np.array([0.05, 0.3]) + rng.normal(0, 0.002, (8, 2))
    hist = np.concatenate([main, minor])
    modes = C.hdbscan_modes(hist, 0.25)  # min_cluster_size 8
    assert len(set(modes[:24])) == 1 and modes[0] >= 0 and modes[0] not in set(modes[24:])
    sel = C.select_images(hist, modes, filter_hist=True, fraction=0.5, min_class_area=0.001)
    mean = hist[:24].mean(0)
    expected = np.sort(np.argsort(np.abs(hist - mean).max(1), kind="stable")[:12])
    np.testing.assert_array_equal(sel.good_indices, expected)
    np.testing.assert_array_equal(sel.main_mode, np.arange(24))
    both = C.select_images(hist, modes, filter_hist=False, fraction=0.5, min_class_area=0.001)
    minor_list = np.argsort(np.abs(hist - hist[24:].mean(0)).max(1), kind="stable")[:4]
    assert set(minor_list) <= set(range(24, 32))
    np.testing.assert_array_equal(both.good_indices, np.sort(np.concatenate([expected, minor_list])))
    # degenerate: a single image -> one mode, no crash
    np.testing.assert_array_equal(C.hdbscan_modes(hist[:1], 0.1), [0])


def test_cluster_components_two_kinds_and_degenerate_bandwidth():
    rng = np.random.default_rng(0)
    n_img, per = 10, 2
    kinds = np.tile([0, 0, 1, 1], n_img)  # two components of each kind per image
    centres = rng.normal(0, 3.0, (2, 64))  # far apart after projection
    feats = centres[kinds] + rng.normal(0, 0.005, (len(kinds), 64))
    img = np.repeat(np.arange(n_img), 2 * per)
    area = np.where(kinds == 0, 0.02, 0.05)
    official = PseudoLabelConfig()
    kw = dict(n_images=n_img, filter_hist=True, settings=official, seed=0, log=LOG)
    res = C.cluster_components(feats * 30, img, area, bandwidth=3.5, **kw)
    assert res["class_hist"].shape == (n_img, 2)
    cls = res["component_class"]
    assert set(cls[kinds == 0]) | set(cls[kinds == 1]) == {1, 2} and len(set(cls[kinds == 0])) == 1
    assert cls[kinds == 0][0] != cls[kinds == 1][0]
    with pytest.raises(PseudoLabelError, match="raise --bandwidth"):
        C.cluster_components(feats * 1e4, img, area, bandwidth=1e-3, **kw)
    # most images have no component at all: that cluster is skipped, the images with components form the mode
    few = np.isin(img, [0, 1, 2])
    res = C.cluster_components(feats[few] * 30, img[few], area[few], bandwidth=3.5,
                               **{**kw, "settings": PseudoLabelConfig(small_cluster_fraction=0.2)})
    assert res["class_hist"].shape == (n_img, 2) and set(res["main_mode"]) <= {0, 1, 2}
    with pytest.raises(PseudoLabelError, match=r"without any clustered component \(10 of 10 images"):
        C.select_images(np.zeros((10, 2)), np.zeros(10, np.int64), True, 0.5, 0.001)
    with pytest.raises(PseudoLabelError, match="no components"):
        C.cluster_components(np.zeros((0, 64)), img[:0], area[:0], bandwidth=3.5, **kw)


# --- descriptors + pipeline on constructed masks ---------------------------------------------------------------------

def test_align_and_rotate():
    from methods.csad.pseudo_label.descriptors import align_instance, rotate_batch

    img = np.full((100, 100, 3), 200, np.uint8)
    mask = box(100, 100, 20, 40, 30, 80)  # 20 x 50
    crop = align_instance(img, mask, 65)
    assert crop.shape == (65, 65, 3)
    scale = 65 / (np.hypot(19, 49) + 1)  # minAreaRect of the contour: (49, 19) px
    rows = np.flatnonzero(crop[..., 0].any(1))
    cols = np.flatnonzero(crop[..., 0].any(0))
    assert abs(len(cols) - round(50 * scale)) <= 1 and abs(len(rows) - round(20 * scale)) <= 1
    x = torch.zeros(2, 1, 9, 9)
    x[:, :, 4, 6:] = 1  # a bar to the right of the centre
    r = rotate_batch(x, 5)  # angles 0, 90, 180, 270, 360
    assert r.shape == (10, 1, 9, 9)
    torch.testing.assert_close(r[0], x[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(r[4], x[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(r[2], x[0].flip(-1), atol=1e-4, rtol=0)


def _two_kind_scene(rng, size=96):
    """Two red discs and two blue squares at random positions and angles; returns image, instance-id map and the
    true kind per instance id."""
    img = np.full((size, size, 3), 30, np.uint8)
    ids = np.zeros((size, size), np.uint8)
    kinds = {}
    cells = [(24, 24), (24, 72), (72, 24), (72, 72)]
    order = rng.permutation(4)
    for k, ci in enumerate(order):
        cy, cx = cells[ci] + rng.integers(-3, 4, 2)
        m = np.zeros((size, size), np.uint8)
        if k < 2:
            cv2.circle(m, (int(cx), int(cy)), 12, 1, -1)
            colour = (220, 40, 40)
        else:
            pts = cv2.boxPoints(((float(cx), float(cy)), (20, 20), float(rng.uniform(0, 90)))).astype(np.int32)
            cv2.fillPoly(m, [pts], 1)
            colour = (40, 60, 220)
        img[m > 0] = colour
        ids[m > 0] = k + 1
        kinds[k + 1] = int(k >= 2)
    return img, ids, kinds


@pytest.fixture(scope="module")
def lite0_descriptor(lite0_weights):
    from models.backbones import load_backbone
    from methods.csad.pseudo_label.descriptors import ComponentDescriptor

    return ComponentDescriptor(load_backbone("efficientnet_lite0", lite0_weights), torch.device("cpu"),
                               crop_size=65, n_rotations=12, max_batch=1024)


def test_pipeline_on_constructed_masks_two_kinds_two_classes(tmp_path, lite0_descriptor, monkeypatch):
    """Segmentation files are given (discs and squares); descriptors + MeanShift + HDBSCAN must give two classes
    that match the kinds pixel for pixel; a re-cluster reuses the descriptor cache. Every step is measured as a
    named stage of its category."""
    import contextlib
    import dataclasses

    from dataset_readers.base import CategoryData, Sample
    from methods.csad.pseudo_label import pipeline
    from methods.csad.pseudo_label.pipeline import Options, run_category

    stages = []

    @contextlib.contextmanager
    def record(name, **info):  # stands in for common.memory.stage, which is off in tests
        stages.append((name, info))
        yield {}

    monkeypatch.setattr(pipeline, "stage", record)

    rng = np.random.default_rng(0)
    root = tmp_path / "masks"
    samples, truth = [], {}
    (tmp_path / "img").mkdir()
    for i in range(6):
        img, ids, kinds = _two_kind_scene(rng)
        stem = f"{i:03d}"
        cv2.imwrite(str(tmp_path / "img" / f"{stem}.png"), img[..., ::-1])
        samples.append(Sample(str(tmp_path / "img" / f"{stem}.png"), "train"))
        d = L.image_dir("two_kinds", stem, root)
        for name in (L.GROUNDING, "grounding_background.png", L.ALL_MASKS, L.REFINED):
            L.write_png(d / name, ids if name != "grounding_background.png" else np.zeros_like(ids))
        L.write_background(d / L.BACKGROUND, ids == 0)
        truth[stem] = (ids, kinds)
    data = CategoryData("folder", "two_kinds", tmp_path, samples, [], [])
    cfg = CategoryConfig("two_kinds", "disc . square .", "", 0.3, 0.2, use_grounding_filter=True, no_sam=True,
                         filter_hist=True, filter_by_combine=True, settings=PseudoLabelConfig(bandwidth=3.5))

    def no_segmenter():
        raise AssertionError("segmentation files exist; the segmenter must not be built")

    kw = dict(make_segmenter=no_segmenter, descriptor_meta={"test": 1}, log=LOG)
    # the default bandwidth 3.5 (projected lite0 layer4: within-kind distances <= 3.2, between-kind >= 11.9)
    summary = run_category(data, cfg, Options(masks_root=root, seed=0), make_descriptor=lambda: lite0_descriptor,
                           **kw)
    assert summary["K"] == 2 and summary["components"] == 24
    assert stages == [(name, {"category": "two_kinds"}) for name in ("segment", "load", "describe", "cluster", "write")]
    stems = L.check_layout("two_kinds", root)
    mapping = {}
    for stem in stems:
        lab = L.read_label_map("two_kinds", stem, root)
        ids, kinds = truth[stem]
        assert (lab[ids == 0] == 0).all()
        for inst, kind in kinds.items():
            values = np.unique(lab[ids == inst])
            assert len(values) == 1 and values[0] > 0
            mapping.setdefault(kind, set()).add(int(values[0]))
    assert mapping[0] != mapping[1] and all(len(v) == 1 for v in mapping.values())

    def no_descriptor():
        raise AssertionError("descriptors are cached; re-clustering must not recompute them")

    wide = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, bandwidth=50.0))
    summary = run_category(data, wide, Options(masks_root=root, seed=0, recluster=True),
                           make_descriptor=no_descriptor, **kw)
    assert summary["K"] == 1  # a huge bandwidth merges the two kinds
    assert "bandwidth: 50.0\n" in (root / "two_kinds" / "info" / "info.txt").read_text()
    skipped = run_category(data, cfg, Options(masks_root=root, seed=0), make_descriptor=no_descriptor, **kw)
    assert skipped.get("skipped")


# --- tiny models: the real loading and inference code ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from models.grounding import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("bert"), "box disc square dot container".split())


@pytest.fixture(scope="module")
def tiny_grounding(tiny_bert):
    from models.grounding import load_grounding_dino

    return load_grounding_dino("tiny", tiny_bert)


def test_text_bert_matches_transformers_bert(tiny_bert):
    from transformers import BertModel
    from models.grounding import TextBert

    bert = BertModel.from_pretrained(tiny_bert).eval()
    ours = TextBert(bert).eval()
    ids = torch.tensor([[2, 11, 5, 12, 5, 3, 0, 0]])
    pad = (ids != 0).long()
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=pad).last_hidden_state
        got = ours(input_ids=ids, attention_mask=pad)["last_hidden_state"]
        torch.testing.assert_close(got[:, :6], ref[:, :6], atol=1e-5, rtol=1e-4)
        # a (B, L, L) block mask: token 1 sees only itself, so changing token 3 must not change it
        block = torch.eye(8, dtype=torch.bool)[None].clone()
        a = ours(input_ids=ids, attention_mask=block)["last_hidden_state"]
        b = ours(input_ids=ids.clone().index_fill_(1, torch.tensor([3]), 13), attention_mask=block)["last_hidden_state"]
    torch.testing.assert_close(a[:, 1], b[:, 1])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_tiny_grounding_dino_boxes_and_thresholds(tiny_grounding):
    from models.grounding import GroundingPredictor

    pred = GroundingPredictor(tiny_grounding, short_side=64, max_size=96)
    img = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    boxes, scores, phrases = pred.predict(img, "Box . disc", box_threshold=0.0, text_threshold=0.0)
    assert boxes.shape == (20, 4) and scores.shape == (20,) and len(phrases) == 20  # 20 queries, all kept
    assert all(p.endswith(")") and "(" in p for p in phrases)
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    thr = float(np.median(scores))
    kept = pred.predict(img, "box . disc .", box_threshold=thr, text_threshold=0.5)[1]
    np.testing.assert_allclose(np.sort(kept), np.sort(scores[scores > thr]), rtol=1e-5)
    assert len(pred.predict(img, "box . disc .", 1.0, 0.5)[0]) == 0


def test_checkpoint_loading_roundtrip(tmp_path, tiny_bert, tiny_grounding):
    """The real loaders (weights_only, 'model' key, 'module.' prefix, missing-tensor check) on tiny models."""
    from models.grounding import load_grounding_dino
    from models.sam_loader import build_tiny_sam, load_sam

    state = {"module." + k: v.clone() + 1 for k, v in tiny_grounding.state_dict().items()}
    torch.save({"model": state}, tmp_path / "gd.pth")
    loaded = load_grounding_dino(tmp_path / "gd.pth", tiny_bert, tiny_architecture=True)
    key = "transformer.decoder.layers.0.linear1.weight"
    torch.testing.assert_close(loaded.state_dict()[key], tiny_grounding.state_dict()[key] + 1)
    torch.save({"model": {k: v for k, v in list(state.items())[:5]}}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="missing tensors"):
        load_grounding_dino(tmp_path / "partial.pth", tiny_bert, tiny_architecture=True)
    sam = build_tiny_sam(seed=3)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    with pytest.raises(RuntimeError, match="does not fit HQ-SAM vit_tiny") as err:
        load_sam("vit_tiny", tmp_path / "sam.pth")
    assert "\n" not in str(err.value)


def test_missing_checkpoints_name_file_and_url(tmp_path):
    from models.grounding import find_bert_dir, load_grounding_dino
    from models.sam_loader import load_sam

    with pytest.raises(FileNotFoundError, match="groundingdino_swint_ogc.pth.*github.com/IDEA-Research"):
        load_grounding_dino(None, tmp_path, ckpt_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="bert-base-uncased"):
        find_bert_dir(None, tmp_path)
    with pytest.raises(FileNotFoundError, match="sam_hq_vit_b.pth.*huggingface.co/lkeab/hq-sam"):
        load_sam("vit_b", ckpt_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown HQ-SAM model"):
        load_sam("vit_x", ckpt_dir=tmp_path)


def test_sam_vit_tiny_random_box_prompt():
    from segment_anything_hq import SamPredictor
    from models.sam_loader import load_sam

    sam = load_sam("vit_tiny", "random")
    pred = SamPredictor(sam)
    img = np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)
    pred.set_image(img)
    masks, scores, _ = pred.predict(box=np.array([5, 5, 40, 30]), multimask_output=False, hq_token_only=False)
    assert masks.shape == (1, 40, 64) and masks.dtype == bool and scores.shape == (1,)


def test_segmenter_paths_on_tiny_models(tiny_grounding):
    from models.grounding import GroundingPredictor
    from models.sam_loader import load_sam
    from methods.csad.pseudo_label.segment import Segmenter

    amg = PseudoLabelConfig(amg_points_per_side=2, amg_pred_iou_thresh=0.0, amg_stability_score_thresh=0.0,
                            amg_min_mask_region_area=0).amg_params()
    seg = Segmenter(GroundingPredictor(tiny_grounding, 64, 96), load_sam(checkpoint="tiny"), amg)
    img = np.random.default_rng(1).integers(0, 255, (60, 72, 3), dtype=np.uint8)

    class NoAMG:
        def generate(self, image):
            raise AssertionError("no_sam categories must not run the automatic mask generator")

    amg_obj, seg.amg = seg.amg, NoAMG()
    res = seg.segment(img, load_config("synth_box"))  # no_sam: components from Grounded-SAM
    for arr in (res.grounding_mask, res.all_masks, res.refined_masks):
        assert arr.shape == (60, 72) and arr.dtype == np.uint8
    assert res.background.shape == (60, 72) and res.background.dtype == bool
    calls = []

    class CountingAMG:
        def generate(self, image):
            calls.append(image.shape)
            return amg_obj.generate(image)

    seg.amg = CountingAMG()
    res = seg.segment(img, load_config("synth_bottle"))  # AMG path (no grounding filter for synth_bottle)
    assert calls == [(60, 72, 3)] and res.refined_masks.shape == (60, 72)
    # refined instances are a de-overlapped subset of all_masks' pixels
    assert ((res.refined_masks > 0) <= (res.all_masks > 0)).all()


def test_box_masks_in_chunks_equal_one_decoder_call():
    """box_masks decodes `box_chunk` boxes per call (bounded memory): the masks equal one call for all boxes."""
    from models.sam_loader import load_sam
    from methods.csad.pseudo_label.segment import Segmenter

    amg = PseudoLabelConfig(amg_points_per_side=2).amg_params()
    seg = Segmenter(None, load_sam(checkpoint="tiny"), amg)
    img = np.random.default_rng(2).integers(0, 255, (60, 72, 3), dtype=np.uint8)
    seg.predictor.set_image(img)
    rng = np.random.default_rng(3)
    xy0 = rng.uniform(0, 40, (7, 2))
    boxes = np.concatenate([xy0, xy0 + rng.uniform(5, 30, (7, 2))], 1).astype(np.float32)
    seg.box_chunk = 1000
    whole = seg.box_masks(img, boxes)
    seg.box_chunk = 3  # 3 + 3 + 1
    chunked = seg.box_masks(img, boxes)
    assert whole.shape == (7, 60, 72) and whole.dtype == chunked.dtype == bool
    assert whole.any() and not whole.all()  # the comparison has both values to get wrong
    np.testing.assert_array_equal(chunked, whole)
    assert seg.box_masks(img, np.zeros((0, 4), np.float32)).shape == (0, 60, 72)


def test_models_load_once_and_build_each_categorys_segmenter_and_descriptor(lite0_weights):
    """Settings may differ per category: the models are loaded once, the cheap wrappers follow the settings."""
    from pseudo_label import Models, parse_args

    models = Models(parse_args(["--backbone", "efficientnet_lite0", "--weights", str(lite0_weights)]),
                    torch.device("cpu"))
    try:
        fast = PseudoLabelConfig.fast()
        seg = models.segmenter(fast)
        assert models.segmenter(PseudoLabelConfig.fast()) is seg
        other = models.segmenter(PseudoLabelConfig.fast(amg_pred_iou_thresh=0.5, grounding_short_side=96))
        assert other is not seg and other.grounder.model is seg.grounder.model
        assert other.predictor.model is seg.predictor.model
        assert (seg.amg.pred_iou_thresh, other.amg.pred_iou_thresh) == (0.0, 0.5)
        desc = models.descriptor(fast)
        assert models.descriptor(PseudoLabelConfig.fast()) is desc
        more = models.descriptor(PseudoLabelConfig.fast(n_rotations=4))
        assert more.extractor.backbone is desc.extractor.backbone and (desc.n_rotations, more.n_rotations) == (8, 4)
        img = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        inst = box(40, 40, 5, 30, 10, 20)[None]
        from methods.csad.pseudo_label.descriptors import ComponentDescriptor
        from models.backbones import load_backbone

        alone = ComponentDescriptor(load_backbone("efficientnet_lite0", lite0_weights), torch.device("cpu"),
                                    crop_size=fast.crop_size, n_rotations=4, max_batch=fast.max_batch)
        np.testing.assert_allclose(more(img, inst), alone(img, inst), rtol=1e-5, atol=1e-6)  # shared backbone
    finally:
        models.close()


def test_cli_fast_writes_every_file(tmp_path, lite0_weights):
    from dataset_readers.synthetic_loco import generate
    from pseudo_label import main

    # one category (the SAM automatic-mask path); the no_sam path runs in test_segmenter_paths_on_tiny_models
    generate(tmp_path / "d", size=64, n_train=4, n_val=1, n_test=2, seed=0, categories=["synth_bottle"])
    args = ["--dataset", "synthetic_loco", "--data-root", str(tmp_path / "d"), "--categories", "synth_bottle",
            "--fast", "--backbone",
            "efficientnet_lite0", "--weights", str(lite0_weights), "--masks-root", str(tmp_path / "m"),
            "--device", "cpu", "--bandwidth", "0.05"]  # too small on purpose: --fast doubles it until a class survives
    summaries = main(args)
    assert [s["category"] for s in summaries] == ["synth_bottle"]
    for s in summaries:
        cat = s["category"]
        stems = L.check_layout(cat, tmp_path / "m")
        assert stems == ["000", "001", "002", "003"]
        for stem in stems:
            for name in ("grounding_background.png", "cluster_map.png"):
                assert (L.image_dir(cat, stem, tmp_path / "m") / name).is_file()
        info = L.read_info(cat, tmp_path / "m")
        assert info["filtered_component_histogram"].shape == (4, s["K"]) and s["K"] >= 1
        assert (tmp_path / "m" / cat / "info" / "all_component_feats.npz").is_file()
        assert set(s["seconds_per_image"]) == {"segmentation", "descriptors", "clustering"}
        used = float((tmp_path / "m" / cat / "info" / "info.txt").read_text().split("bandwidth: ")[1].split()[0])
        assert used >= 0.1 and np.log2(used / 0.05) % 1 == 0  # doubled at least once
    args[args.index("synth_bottle")] = "nope"
    with pytest.raises(SystemExit, match="'nope'"):
        main(args)
