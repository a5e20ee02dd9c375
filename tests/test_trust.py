"""A user's mistake gives one line and exit 1 in every script, never a traceback or a silent wrong number.

Each bad input is built in a temporary folder on tiny synthetic data. Most cases call the scripts' main() in
process (guard turns a UserError into SystemExit(1) whose text is the message); a few run the real command line
to check that stderr holds exactly that one line.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_readers import read_category
from dataset_readers.base import DatasetError, Ignored, load_image, load_mask, take_images

REPO_ROOT = Path(__file__).resolve().parent.parent
# module -> extra arguments that make a run cheap; every script's failure here happens before weights or data load
SCRIPTS = {
    "glass": [],
    "sinbad": ["--levels", "224"],
    "sapatchcore": [],
    "CSAD": ["--no-penalty"],
    "train_segmentor": ["--labels", "component-maps"],
    "pseudo_label": [],
    "methods.mean_image": [],
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    from dataset_readers.synthetic_loco import generate

    root = tmp_path_factory.mktemp("tiny")
    generate(root, size=64, n_train=4, n_val=2, n_test=2, seed=0)
    return root


def _args(root: Path, out: Path, module: str = "", fast: bool = True, **over) -> list[str]:
    """The flags every script shares (+ --masks-root for the CSAD stages), then `over` (flag -> value)."""
    a = {"--dataset": "synthetic_loco", "--data-root": str(root), "--categories": "synth_box",
         "--score-dir": str(out / "scores"), "--ckpt-dir": str(out / "ckpt"), "--weights": "random"}
    if module in ("pseudo_label", "train_segmentor"):
        a["--masks-root"] = str(out / "masks")
    a.update(over)
    return [x for k, v in a.items() for x in (k, v)] + (["--fast"] if fast else []) + SCRIPTS.get(module, [])


def _main(module: str):
    return importlib.import_module(module).main


def _exit_message(module: str, argv: list[str], capsys) -> str:
    """Run main(argv); it must exit 1 with the message on stderr as one 'error: ...' line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _main(module)(argv)
    assert exc.value.code == 1, (module, exc.value.code)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("module", sorted(SCRIPTS))
def test_user_errors_are_one_line(module, tiny_root, tmp_path, capsys):
    cases = {
        "missing root": (dict(**{"--data-root": str(tmp_path / "missing")}), r"dataset root not found: .*missing"),
        "unknown category": (dict(**{"--categories": "nope"}), r"unknown category 'nope' for synthetic_loco"),
        "unknown dataset": (dict(**{"--dataset": "nope"}), r"unknown dataset 'nope'"),
        "score dir is a file": (dict(**{"--score-dir": str(tmp_path / "afile")}), r"--score-dir .*afile is a file"),
        "score dir below a file": (dict(**{"--score-dir": str(tmp_path / "afile" / "s")}),
                                   r"--score-dir .*afile/s is not writable"),
        "unknown device": (dict(**{"--device": "gpu"}), r"unknown --device 'gpu'"),
    }
    if module == "pseudo_label":  # stage 1 writes only under --masks-root
        del cases["score dir is a file"], cases["score dir below a file"]
    if module in ("glass", "sapatchcore", "CSAD", "train_segmentor"):
        cases["ckpt dir below a file"] = (dict(**{"--ckpt-dir": str(tmp_path / "afile" / "c")}),
                                          r"--ckpt-dir .*afile/c is not writable")
    if module in ("pseudo_label", "train_segmentor"):
        cases["masks root below a file"] = (dict(**{"--masks-root": str(tmp_path / "afile" / "m")}),
                                            r"--masks-root .*afile/m is not writable")
    (tmp_path / "afile").write_text("not a folder")
    for name, (over, pattern) in cases.items():
        msg = _exit_message(module, _args(tiny_root, tmp_path, module, **over), capsys)
        assert re.search(pattern, msg), (module, name, msg)
    # nothing was written by the refused runs (the checks come before any work)
    assert not (tmp_path / "scores").exists() or not any((tmp_path / "scores").rglob("*.npy"))


@pytest.mark.parametrize("module", sorted(SCRIPTS) + ["benchmark_speed"])
def test_abbreviated_flags_are_refused(module, tiny_root, tmp_path, capsys):
    # --fas would silently mean --fast with argparse's default allow_abbrev=True
    argv = ["--fas"] if module == "benchmark_speed" else _args(tiny_root, tmp_path, module, fast=False) + ["--fas"]
    with pytest.raises(SystemExit) as exc:
        _main(module)(argv)
    assert exc.value.code == 2 and "--fas" in capsys.readouterr().err


def test_benchmark_speed_out_dir_checked_first(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    msg = _exit_message("benchmark_speed", ["--out-dir", str(tmp_path / "afile" / "o"), "--methods", "lgst"], capsys)
    assert "--out-dir" in msg and "afile/o" in msg


@pytest.mark.parametrize("script", ["sapatchcore.py", "CSAD.py", "train_segmentor.py"])
def test_command_line_prints_one_line(script, tiny_root, tmp_path):
    """The real command: exit 1, no traceback, stderr = the one error line (here: an unknown category)."""
    argv = _args(tiny_root, tmp_path, script[:-3], **{"--categories": "nope"})
    r = subprocess.run([sys.executable, script, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines
    assert lines[-1] == (f"error: unknown category 'nope' for synthetic_loco under {tiny_root}; choose from: "
                         "synth_box, synth_bottle"), lines


def test_corrupt_image_names_the_file(tiny_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    bad = root / "synth_box" / "train" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:80])  # truncated PNG
    for module in ("methods.mean_image", "sinbad"):
        msg = _exit_message(module, _args(root, tmp_path / module, module), capsys)
        assert f"cannot read image {bad}" in msg and "re-download or remove the file" in msg, msg


def test_config_json_errors_name_the_file(tiny_root, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    for text, pattern in (("{not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object"),
                          ('{"categories": {"synth_box": {"text_prompt": "box"}}}', "lacks")):
        cfg.write_text(text)
        msg = _exit_message("pseudo_label", _args(tiny_root, tmp_path, "pseudo_label") + ["--config", str(cfg)],
                            capsys)
        assert str(cfg) in msg and pattern in msg, msg


# --- 16-bit images ----------------------------------------------------------------------------------------------------

def _write_rgb16_png(path: Path, rgb16: np.ndarray) -> None:
    import cv2

    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb16[..., ::-1]))  # cv2 writes BGR


def test_16bit_images_convert_like_their_8bit_originals(tmp_path):
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    grey8 = rgb8[..., 1].copy()
    Image.fromarray(rgb8).save(tmp_path / "rgb8.png")
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # PIL: mode I;16
    _write_rgb16_png(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 257)
    import tifffile

    tifffile.imwrite(tmp_path / "grey16be.tif", (grey8.astype(np.uint16) * 257).astype(">u2"))  # PIL: I;16B
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb8.astype(np.uint16) * 257)  # PIL: RGB (high byte)
    import cv2

    rgba16 = np.dstack([rgb8[..., ::-1].astype(np.uint16) * 257, np.full(rgb8.shape[:2], 65535, np.uint16)])
    assert cv2.imwrite(str(tmp_path / "rgba16.png"), rgba16)  # PIL: RGBA (high byte)
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    ref_rgb = np.asarray(load_image(tmp_path / "rgb8.png"))
    ref_grey = np.asarray(load_image(tmp_path / "grey8.png"))
    for name, ref in (("grey16.png", ref_grey), ("grey16be.tif", ref_grey), ("rgb16.png", ref_rgb),
                      ("rgb16.tif", ref_rgb), ("rgba16.png", ref_rgb)):
        got = np.asarray(load_image(tmp_path / name))
        assert got.shape == ref.shape and got.dtype == np.uint8
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1, name
    # values that are not multiples of 257: scaled by 255/65535 (PIL's own convert() would clip them to 255)
    ramp = np.linspace(0, 65535, 99, dtype=np.uint16).reshape(9, 11)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    got = np.asarray(load_image(tmp_path / "ramp16.png", mode="L")).astype(int)
    assert np.abs(got - np.rint(ramp.astype(np.float64) * 255 / 65535)).max() == 0
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 90  # not all white
    # a 16-bit mask keeps 8-bit label values, a 0/65535 mask becomes 0/255
    m = np.zeros((9, 11), np.uint16)
    m[2:4, 3:6] = 252
    Image.fromarray(m).save(tmp_path / "m16.png")
    assert set(np.unique(load_mask(tmp_path / "m16.png"))) == {0, 252}
    Image.fromarray(m // 252 * 65535).save(tmp_path / "m16full.png")
    assert set(np.unique(load_mask(tmp_path / "m16full.png"))) == {0, 255}
    # float images: [0, 1] scaled, anything else refused with the path
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif", mode="L")).tolist() == [[128] * 4] * 4
    Image.fromarray(np.full((4, 4), 7.0, np.float32)).save(tmp_path / "f7.tif")
    with pytest.raises(DatasetError, match="f7.tif.*outside"):
        load_image(tmp_path / "f7.tif")


def test_16bit_dataset_scores_like_8bit(tiny_root, tmp_path):
    """A train and a test image saved as 16-bit RGB PNGs score exactly as their 8-bit originals."""
    from evaluation.score_files import load_scores

    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    cat = root / "synth_box"
    for p in (cat / "test" / "good" / "000.png", cat / "train" / "good" / "002.png"):
        rgb = np.asarray(Image.open(p).convert("RGB")).astype(np.uint16) * 257
        _write_rgb16_png(p, rgb)
    argv = ["--dataset", "synthetic_loco", "--categories", "synth_box", "--fast", "--no-maps"]
    from methods import mean_image

    mean_image.main(argv + ["--data-root", str(tiny_root), "--score-dir", str(tmp_path / "s8")])
    mean_image.main(argv + ["--data-root", str(root), "--score-dir", str(tmp_path / "s16")])
    groups = read_category("synthetic_loco", "synth_box", root).score_groups()
    groups8 = read_category("synthetic_loco", "synth_box", tiny_root).score_groups()
    for g in ("logi", "struc"):
        a = load_scores("synth_box", "mean_image", g, samples=groups8[g], score_dir=tmp_path / "s8")
        b = load_scores("synth_box", "mean_image", g, samples=groups[g], score_dir=tmp_path / "s16")
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_16bit_greyscale_is_not_white(tmp_path):
    """The issue's case: an I;16 image through the RGB loader is its 8-bit grey, not 255 everywhere."""
    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = np.asarray(load_image(tmp_path / "g.png"))
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], np.rint(grey.astype(np.float64) * 255 / 65535).astype(np.uint8))


# --- files in unexpected places ---------------------------------------------------------------------------------------

def test_unexpected_files_are_listed_in_one_warning(tiny_root, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    cat = root / "synth_box"
    clean = read_category("synthetic_loco", "synth_box", tiny_root)
    shutil.copy(cat / "train/good/000.png", cat / "train/good/copy of 000.PNG")
    shutil.copy(cat / "train/good/001.png", cat / "train/good/001.PNG")  # same stem, other case
    shutil.copy(cat / "train/good/001.png", cat / "train/003.png")  # directly in train/
    (cat / "train/good/notes.txt").write_text("x")
    (cat / "train/good/.DS_Store").write_text("x")  # hidden: skipped silently
    (cat / "test/unknown").mkdir()
    shutil.copy(cat / "test/good/000.png", cat / "test/unknown/000.png")
    with caplog.at_level("WARNING", logger="dataset_readers"):
        data = read_category("synthetic_loco", "synth_box", root)
        read_category("synthetic_loco", "synth_box", root)  # once per process, not per read
    # what is taken is exactly the clean layout
    assert [Path(s.path).name for s in data.train] == [Path(s.path).name for s in clean.train]
    assert [(Path(s.path).name, s.defect_type) for s in data.test] == \
        [(Path(s.path).name, s.defect_type) for s in clean.test]
    lines = [r.getMessage() for r in caplog.records if r.name == "dataset_readers"]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("warning: synthetic_loco/synth_box: ignored 5 entries") and "\n" not in line
    for item in ("train/003.png", "train/good/copy of 000.PNG (not a numbered image)",
                 "train/good/001.PNG (duplicate of 001.png)", "train/good/notes.txt (not an image)",
                 "test/unknown/"):
        assert item in line, (item, line)
    assert ".DS_Store" not in line


def test_take_images_rules(tmp_path):
    for name in ("b.png", "a.PNG", "a.jpg", "c.JPG", "d.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    ign = Ignored(tmp_path)
    taken = take_images(tmp_path, ign)
    # stem a has a.PNG and a.jpg: one suffix each, so the tie goes to a lower-case suffix, then sorted order
    assert [p.name for p in taken] == ["a.jpg", "b.png", "c.JPG"]
    assert sorted(ign.items) == sorted(["a.PNG (duplicate of a.jpg)", "d.txt (not an image)", "sub/ (folder)"])
    ign = Ignored(tmp_path)
    assert take_images(tmp_path, ign, numbered=True) == []


def test_mvtec_ad_reader_lists_files_outside_good(tmp_path, caplog):
    cat = tmp_path / "bottle"
    img = np.zeros((8, 8, 3), np.uint8)
    for sub in ("train/good", "test/good", "test/broken", "ground_truth/broken"):
        (cat / sub).mkdir(parents=True)
    for sub, name in (("train/good", "000.png"), ("train", "001.png"), ("test/good", "000.png"),
                      ("test/broken", "000.png"), ("test", "stray.png")):
        Image.fromarray(img).save(cat / sub / name)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(cat / "ground_truth/broken/000_mask.png")
    with caplog.at_level("WARNING", logger="dataset_readers"):
        data = read_category("folder", "bottle", tmp_path)
    assert len(data.train) == 1 and len(data.test) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.name == "dataset_readers"]
    assert "ignored 2 entries" in line and "train/001.png" in line and "test/stray.png" in line


# --- output files readable under the user's umask ---------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    code = ("import os, sys; os.umask(int(sys.argv[1], 8)); import numpy as np; "
            "from common.io import atomic_write_text, atomic_save_npy; "
            "atomic_write_text(sys.argv[2] + '/a.json', '{}'); atomic_save_npy(sys.argv[2] + '/b.npy', np.zeros(2))")
    subprocess.run([sys.executable, "-c", code, oct(umask)[2:], str(tmp_path)], cwd=REPO_ROOT, check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    for name in ("a.json", "b.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npy"]  # no temp file left


def test_writable_dir_check(tmp_path):
    from common.cli import ensure_writable_dir
    from common.errors import UserError

    assert ensure_writable_dir(tmp_path / "new" / "deep", "--out-dir").is_dir()
    assert list((tmp_path / "new" / "deep").iterdir()) == []  # the probe file is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"--out-dir .*f is a file"):
        ensure_writable_dir(tmp_path / "f", "--out-dir")
    with pytest.raises(UserError, match=r"--out-dir .*f/x is not writable \(Not a directory\)"):
        ensure_writable_dir(tmp_path / "f" / "x", "--out-dir")


# --- pseudo_label --fast: a category's result does not depend on the category list ------------------------------------

def test_pseudo_label_category_independent_of_list(tmp_path, lite0_weights):
    from dataset_readers.synthetic_loco import generate
    from methods.csad import label_layout as L
    from pseudo_label import main

    generate(tmp_path / "d", size=64, n_train=4, n_val=1, n_test=1, seed=0)
    base = ["--dataset", "synthetic_loco", "--data-root", str(tmp_path / "d"), "--fast", "--backbone",
            "efficientnet_lite0", "--weights", str(lite0_weights), "--device", "cpu"]
    main(base + ["--categories", "synth_box", "--masks-root", str(tmp_path / "alone")])
    main(base + ["--categories", "synth_bottle", "synth_box", "--masks-root", str(tmp_path / "both")])
    a, b = L.read_info("synth_box", tmp_path / "alone"), L.read_info("synth_box", tmp_path / "both")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for stem in ("000", "001", "002", "003"):
        for name in ("grounding_mask.png", "refined_masks.png", "cluster_map.png"):
            pa = L.image_dir("synth_box", stem, tmp_path / "alone") / name
            pb = L.image_dir("synth_box", stem, tmp_path / "both") / name
            assert pa.read_bytes() == pb.read_bytes(), (stem, name)


class _CorruptDataset:
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise DatasetError("cannot read image /data/001.png (image file is truncated); re-download or remove the file")


def test_worker_error_stays_one_line(capsys):
    """A DatasetError raised in a DataLoader worker (--workers > 0) carries the worker's traceback as text; the
    guard prints only the original message."""
    import torch

    from common.errors import guard

    @guard
    def main():
        list(torch.utils.data.DataLoader(_CorruptDataset(), num_workers=1))

    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: cannot read image /data/001.png (image file is truncated); re-download or remove the file"
