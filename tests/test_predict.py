"""predict.py: the image collection, the one-line refusal of unreadable files, the outputs, and, per method, the
same image scores as the method's own score files (from its checkpoint, in a fresh model object)."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CATEGORY = "synth_box"


def _png(path: Path, value: int, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def test_collect_images_folders_globs_files(tmp_path):
    from evaluation.predictions import collect_images, relative_name

    a = _png(tmp_path / "d" / "a.png", 10)
    b = _png(tmp_path / "d" / "sub" / "a.png", 20)  # same name in a sub-folder: kept apart
    c = _png(tmp_path / "e" / "c.jpg", 30)
    (tmp_path / "d" / "notes.txt").write_text("x")
    _png(tmp_path / "d" / ".hidden" / "h.png", 0)
    paths, base = collect_images([str(tmp_path / "d"), str(tmp_path / "e" / "*.jpg"), str(a)])
    assert [p.resolve() for p in paths] == sorted(p.resolve() for p in (a, b, c))
    names = {relative_name(p, base) for p in paths}
    assert names == {Path("d/a.png"), Path("d/sub/a.png"), Path("e/c.jpg")}


def test_collect_images_refuses_empty(tmp_path):
    from common.errors import UserError
    from evaluation.predictions import collect_images

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        collect_images([str(tmp_path / "empty")])


def test_read_chunks_refuses_unreadable_alone(tmp_path):
    from evaluation.predictions import read_chunks

    good = [_png(tmp_path / f"{i}.png", 10 * i) for i in range(5)]
    bad = tmp_path / "broken.png"
    bad.write_bytes(good[0].read_bytes()[:40])  # truncated
    paths = good[:2] + [bad] + good[2:]
    seen, refused = [], []
    for idx, images, bad_list in read_chunks(paths, chunk=2):
        assert len(idx) == len(images)
        seen += idx
        refused += bad_list
    assert seen == [0, 1, 3, 4, 5]
    assert [i for i, _ in refused] == [2] and "broken.png" in refused[0][1]
    assert np.asarray(Image.open(paths[3])).mean() == 20


def test_overlay_scale_is_shared(tmp_path):
    from evaluation.predictions import overlay_rgb

    im = Image.fromarray(np.full((4, 4, 3), 128, np.uint8))
    low = np.asarray(overlay_rgb(im, np.zeros((4, 4)), 0.0, 1.0), dtype=float)
    high = np.asarray(overlay_rgb(im, np.ones((4, 4)), 0.0, 1.0), dtype=float)
    # a zero map on a [0, 1] scale stays close to the image; a map at the top of the scale does not
    assert np.abs(low - 128).max() < np.abs(high - 128).max()
    assert np.abs(low - 128).max() <= 0.15 * 255 + 1


def test_scores_csv_round_trip(tmp_path):
    from evaluation.predictions import read_scores_csv, write_scores_csv

    rows = [{"path": "a.png", "score": 0.1 + 0.2}, {"path": "b.png", "score": -1e-300}]
    write_scores_csv(tmp_path / "s.csv", rows, ["path", "score"], ["made by a test"])
    back = read_scores_csv(tmp_path / "s.csv")
    assert [float(r["score"]) for r in back] == [0.1 + 0.2, -1e-300]  # repr: exact float round trip
    assert (tmp_path / "s.csv").read_text().startswith("# made by a test\n")


def run(args, check=True, **kw):
    res = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def score_file_scores(root: Path, score_dir: Path, method: str) -> dict[str, float]:
    """{image path: score} from a method's test score files (logi and struc share the good images)."""
    from dataset_readers import read_category

    data = read_category("synthetic_loco", CATEGORY, root)
    out = {}
    for group, samples in data.score_groups().items():
        if group == "val":
            continue
        arr = np.load(score_dir / f"{CATEGORY}_{method}_{group}_score.npy")
        for s, v in zip(samples, arr):
            out[str(Path(s.path).resolve())] = float(v)
    return out


def predicted(out: Path) -> dict[str, dict]:
    from evaluation.predictions import read_scores_csv

    return {str(Path(r["path"]).resolve()): r for r in read_scores_csv(out / "scores.csv")}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    from dataset_readers.synthetic_loco import generate

    root = tmp_path_factory.mktemp("predict_loco")
    generate(root, size=64, n_train=6, n_val=2, n_test=4, seed=0, categories=[CATEGORY])
    return root


def _check_against_score_files(root: Path, score_dir: Path, method: str, out: Path, maps: bool) -> None:
    import tifffile

    from dataset_readers import read_category
    from evaluation.score_files import anomaly_map_path

    want = score_file_scores(root, score_dir, method)
    got = predicted(out)
    assert set(got) == set(want)  # every test image once, nothing else
    for path, score in want.items():
        assert float(got[path]["score"]) == pytest.approx(score, rel=1e-6, abs=1e-9), path
    if maps:
        data = read_category("synthetic_loco", CATEGORY, root)
        base = Path(data.test[0].path).parents[1]
        for s in data.test:
            ours = tifffile.imread(out / "maps" / Path(s.path).relative_to(base).with_suffix(".tiff"))
            ref = tifffile.imread(anomaly_map_path(method, CATEGORY, s, score_dir))
            assert ours.shape == ref.shape == Image.open(s.path).size[::-1]  # original size
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
            assert (out / "overlays" / Path(s.path).relative_to(base).with_suffix(".png")).is_file()


def test_predict_glass_checkpoint_gives_the_score_files(tiny_root, lite0_weights, dtd_root, tmp_path):
    """glass.py trains and scores; predict.py on the test folder, from the checkpoint alone, in a fresh
    process, gives the same image scores and maps."""
    run(["glass.py", "--dataset", "synthetic_loco", "--data-root", str(tiny_root), "--categories", CATEGORY,
         "--fast", "--backbone", "efficientnet_lite0", "--weights", str(lite0_weights), "--dtd-root", str(dtd_root),
         "--device", "cpu", "--threads", "1", "--epochs", "2", "--ckpt-dir", str(tmp_path / "c"),
         "--score-dir", str(tmp_path / "s")])
    (ckpt,) = [p for p in (tmp_path / "c").rglob("ckpt.pth")]
    test_dir = tiny_root / CATEGORY / "test"
    bad = test_dir / "good" / "zz_broken.png"
    bad.write_bytes(b"not an image")
    try:
        res = run(["predict.py", "--checkpoint", str(ckpt), "--images", str(test_dir), "--out", str(tmp_path / "o"),
                   "--device", "cpu", "--threads", "1"], check=False)
    finally:
        bad.unlink()
    # the unreadable file is refused in one line, the others are scored, and the exit status says so
    assert res.returncode == 1, res.stderr[-2000:]
    assert sum("zz_broken.png" in line for line in (res.stdout + res.stderr).splitlines()) == 1
    assert "Traceback" not in res.stderr
    _check_against_score_files(tiny_root, tmp_path / "s", "glass", tmp_path / "o", maps=True)
    run_json = (tmp_path / "o" / "run.json").read_text()
    assert '"method": "glass"' in run_json and "weights_sha256" in run_json
    # fp16 on the CPU: refused in one line before any image is scored
    res = run(["predict.py", "--checkpoint", str(ckpt), "--images", str(test_dir), "--out", str(tmp_path / "o16"),
               "--device", "cpu", "--dtype", "fp16"], check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "error: --dtype fp16 needs a CUDA device; use --dtype bf16 on the CPU"
    assert not (tmp_path / "o16" / "scores.csv").exists()


@pytest.mark.parametrize("method", ["patchcore", "sapatchcore"])
def test_predict_patchcore_bank_gives_the_score_files(method, tiny_root, lite0_weights, tmp_path):
    """sapatchcore.py builds the bank and scores; predict.py on the test folder, from the bank alone, in a
    fresh process, gives the same image scores and maps."""
    run(["sapatchcore.py", "--method", method, "--dataset", "synthetic_loco", "--data-root", str(tiny_root),
         "--categories", CATEGORY, "--fast", "--backbone", "efficientnet_lite0", "--weights", str(lite0_weights),
         "--device", "cpu", "--ckpt-dir", str(tmp_path / "c"), "--score-dir", str(tmp_path / "s")])
    (ckpt,) = list((tmp_path / "c").rglob(f"{method}_{CATEGORY}.pt"))
    run(["predict.py", "--checkpoint", str(ckpt), "--images", str(tiny_root / CATEGORY / "test"), "--out",
         str(tmp_path / "o"), "--device", "cpu", "--threads", "1"])
    _check_against_score_files(tiny_root, tmp_path / "s", method, tmp_path / "o", maps=True)
    assert f'"method": "{method}"' in (tmp_path / "o" / "run.json").read_text()


def test_predict_sinbad_model_gives_the_score_files(tiny_root, lite0_weights, tmp_path):
    """sinbad.py fits every unit and the ensemble; predict.py from the saved model gives the ensemble's image
    scores (SINBAD has no anomaly maps)."""
    run(["sinbad.py", "--dataset", "synthetic_loco", "--data-root", str(tiny_root), "--categories", CATEGORY,
         "--fast", "--backbone", "efficientnet_lite0", "--weights", str(lite0_weights), "--device", "cpu",
         "--canvas", "64", "--crop-res", "32", "--projections", "4", "--pixel-reps", "2",
         "--levels", "14", "224", "--crops", "4", "1", "--ckpt-dir", str(tmp_path / "c"),
         "--score-dir", str(tmp_path / "s")])
    ckpt = tmp_path / "c" / "sinbad" / "synthetic_loco" / f"{CATEGORY}.pth"
    run(["predict.py", "--checkpoint", str(ckpt), "--images", str(tiny_root / CATEGORY / "test"), "--out",
         str(tmp_path / "o"), "--device", "cpu", "--threads", "1"])
    _check_against_score_files(tiny_root, tmp_path / "s", "sinbad", tmp_path / "o", maps=False)
    assert not (tmp_path / "o" / "maps").exists()
