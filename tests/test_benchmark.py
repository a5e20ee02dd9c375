"""benchmark_performance.py end to end on tiny hand-built layouts, and the mean-image baseline."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from sklearn.metrics import roc_auc_score

import benchmark_performance
from dataset_readers import read_category
from evaluation.benchmark import read_csv
from evaluation.fusion import trimmed_z_normalize
from evaluation.score_files import save_anomaly_maps, save_group_scores, score_path
from methods import mean_image

SIZE = 16


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_loco(root: Path, category: str = "breakfast_box", n_good: int = 5, n_logi: int = 3, n_struc: int = 3) -> Path:
    """A tiny MVTec LOCO layout: grey images; anomalies carry a bright 4x4 square, one GT PNG per defect."""
    rng = np.random.default_rng(0)
    cat = root / category
    grey = lambda: (np.full((SIZE, SIZE, 3), 120) + rng.integers(-5, 6, (SIZE, SIZE, 3))).astype(np.uint8)
    for split, n in (("train", 6), ("validation", 6)):
        for i in range(n):
            _png(cat / split / "good" / f"{i:03d}.png", grey())
    for i in range(n_good):
        _png(cat / "test" / "good" / f"{i:03d}.png", grey())
    for kind, n, value in (("logical_anomalies", n_logi, 255), ("structural_anomalies", n_struc, 254)):
        for i in range(n):
            img = grey()
            y = 2 + 2 * i
            img[y:y + 4, 4:8] = 250
            _png(cat / "test" / kind / f"{i:03d}.png", img)
            mask = np.zeros((SIZE, SIZE), np.uint8)
            mask[y:y + 4, 4:8] = value
            _png(cat / "ground_truth" / kind / f"{i:03d}" / "000.png", mask)
    (cat / "defects_config.json").write_text(json.dumps([
        {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 8, "relative_saturation": False},
        {"defect_name": "scratch", "pixel_value": 254, "saturation_threshold": 1.0, "relative_saturation": True}]))
    return root


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def log_lines():
    handler = Collect()
    logger = logging.getLogger("benchmark")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def _bench(root, scores, out, *extra):
    return benchmark_performance.main(["--dataset", "mvtec_loco", "--data-root", str(root), "--score-dir", str(scores),
                                       "--out-dir", str(out), "--no-figures", *extra])


def _write_branch(data, name, score_dir, rng, shift):
    groups = data.score_groups()
    out = {}
    for g, samples in groups.items():
        labels = np.array([s.label for s in samples])
        out[g] = rng.normal(size=len(samples)) + shift * labels
    save_group_scores(data, name, out, score_dir)
    return out


def test_benchmark_fusion_txt_csv_paper(tmp_path, log_lines):
    root = make_loco(tmp_path / "data")
    data = read_category("mvtec_loco", "breakfast_box", root)
    scores = tmp_path / "scores"
    rng = np.random.default_rng(1)
    ph = _write_branch(data, "patchhist", scores, rng, 1.0)
    lg = _write_branch(data, "LGST", scores, rng, 0.5)
    for level in (14, 7):
        _write_branch(data, f"sinbad_L{level}", scores, rng, 0.8)
    with pytest.raises(SystemExit) as exit_info:  # pushpins was asked for but is not there
        _bench(root, scores, tmp_path / "out", "--categories", "breakfast_box", "pushpins", "--pairs", "CSAD+sinbad_L7")
    assert exit_info.value.code == 1

    txt = [l for l in (tmp_path / "out" / "score_combine_result.txt").read_text().splitlines() if not l.startswith("#")]
    assert txt[0] == "BREAKFAST_BOX:"
    assert txt[1:4] == [l for l in txt[1:4] if re.fullmatch(r"\('[\w]+',( '[\w]+')?\)? AUC: \d+\.\d{3} \d+\.\d{3}", l)]
    lines = {l.split(" AUC: ")[0]: l.split(" AUC: ")[1] for l in txt[1:]}
    assert list(lines)[:3] == ["('patchhist',)", "('LGST',)", "('patchhist', 'LGST')"]
    # SINBAD levels ordered by level, every subset; the cross-method pair expands the CSAD family.
    assert list(lines)[3:6] == ["('sinbad_L7',)", "('sinbad_L14',)", "('sinbad_L7', 'sinbad_L14')"]
    assert "('patchhist', 'LGST', 'sinbad_L7')" in lines
    # The fused AUROC equals sklearn on hand-normalised scores.
    for k, group in enumerate(("logi", "struc")):
        labels = [s.label for s in data.score_groups()[group]]
        fused = trimmed_z_normalize(ph[group], ph["val"]) + trimmed_z_normalize(lg[group], lg["val"])
        assert float(lines["('patchhist', 'LGST')"].split()[k]) == pytest.approx(100 * roc_auc_score(labels, fused), abs=1e-3)
        assert float(lines["('LGST',)"].split()[k]) == pytest.approx(100 * roc_auc_score(labels, lg[group]), abs=1e-3)
    # CSV: no paper value (CSAD's 95.3 is a mean over all five categories), and the table says why.
    csv = read_csv(tmp_path / "out" / "benchmark_mvtec_loco.csv")
    header = csv[0]
    mean_row = next(r for r in csv if r[:2] == ["Mean", "patchhist+LGST"])
    assert mean_row[header.index("paper")] == ""
    md = (tmp_path / "out" / "benchmark_mvtec_loco.md").read_text()
    assert "| breakfast_box | patchhist+LGST |" in md
    assert "the Mean is over breakfast_box, the paper's over all 5 categories" in md
    # Missing methods and the missing category: one line each, no traceback.
    assert any(m.startswith("skip glass/breakfast_box: no score file") for m in log_lines)
    assert sum(m.startswith("SKIPPED category pushpins") for m in log_lines) == 1
    assert "summary: 1 refused or skipped, 0 warnings" in log_lines  # and once more in the closing summary
    assert "  SKIPPED category pushpins" in "\n".join(log_lines)


def test_benchmark_refuses_misordered_score_file(tmp_path, log_lines):
    root, data, scores = _two_branches(tmp_path)
    index = score_path("breakfast_box", "LGST", "logi", scores).with_suffix(".json")
    meta = json.loads(index.read_text())
    meta["images"][0], meta["images"][-1] = meta["images"][-1], meta["images"][0]  # as an unsorted os.listdir would
    index.write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        _bench(root, scores, tmp_path / "out", "--methods", "patchhist", "LGST")
    assert exit_info.value.code == 1
    txt = [l for l in (tmp_path / "out" / "score_combine_result.txt").read_text().splitlines() if not l.startswith("#")]
    assert "('patchhist',) AUC:" in "\n".join(txt)
    assert "LGST" not in "\n".join(txt)  # neither alone nor fused
    assert any(m.startswith("REFUSED LGST/breakfast_box") and "order does not match" in m for m in log_lines)


def test_benchmark_spro_from_maps_and_official_mode(tmp_path):
    root = make_loco(tmp_path / "data")
    data = read_category("mvtec_loco", "breakfast_box", root)
    scores = tmp_path / "scores"
    # Perfect maps (1 inside every defect, 0 elsewhere) and image scores that tie between two classes.
    maps = np.zeros((len(data.test), SIZE, SIZE), np.float32)
    for i, s in enumerate(data.test):
        for p in s.mask_paths:
            maps[i] += (np.asarray(Image.open(p)) > 0)
    save_anomaly_maps("glass", "breakfast_box", data.test, maps=maps, score_dir=scores)
    groups = {g: np.array([s.label for s in samp], float) * 0 for g, samp in data.score_groups().items()}
    save_group_scores(data, "glass", groups, scores)  # all tied: AUROC 0.5 from the image scores
    _bench(root, scores, tmp_path / "out", "--methods", "glass")
    row = dict(zip(*read_csv(tmp_path / "out" / "benchmark_mvtec_loco.csv")[:2]))
    assert row["auroc_logi"] == "50.000"
    for lim in ("0.01", "0.05", "0.3", "1"):
        assert row[f"spro{lim}_logi"] == row[f"spro{lim}_struc"] == "100.000"
    js = json.loads((tmp_path / "out" / "benchmark_mvtec_loco.json").read_text())
    assert js["glass"]["breakfast_box"]["localization"]["auc_spro"]["mean"]["0.05"] == pytest.approx(1.0)
    _bench(root, scores, tmp_path / "out2", "--methods", "glass", "--official-image-score")
    row = dict(zip(*read_csv(tmp_path / "out2" / "benchmark_mvtec_loco.csv")[:2]))
    # Map max separates the classes (good 0, anomalous 1), but every class is one tie group: the official ROC puts
    # its vertices after the first element of each group, (0, 0) (0, 2/3) (4/5, 1) (1, 1), area 13/15, not 1.
    assert row["auroc_logi"] == "86.667"
    assert row["auroc_struc"] == "86.667"


def test_mean_image_baseline_ranks_anomalies_and_writes_maps(tmp_path):
    root = make_loco(tmp_path / "data")
    scores = tmp_path / "scores"
    mean_image.main(["--dataset", "mvtec_loco", "--data-root", str(root), "--categories", "breakfast_box",
                     "--score-dir", str(scores), "--fast", "--resolution", "16"])
    data = read_category("mvtec_loco", "breakfast_box", root)
    for group, samples in data.score_groups().items():
        s = np.load(score_path("breakfast_box", "mean_image", group, scores))
        assert len(s) == len(samples)
        if group != "val":
            labels = np.array([x.label for x in samples])
            assert s[labels == 1].min() > s[labels == 0].max()  # a bright square beats every normal image
    bad = next(s for s in data.test if s.label)
    m = tifffile.imread(scores / "anomaly_maps" / "mean_image" / "breakfast_box" / "test" / bad.defect_type / f"{bad.stem}.tiff")
    assert m.shape == (SIZE, SIZE) and m.dtype == np.float32
    gt = np.asarray(Image.open(bad.mask_paths[0])) > 0
    assert gt[np.unravel_index(np.argmax(m), m.shape)]  # the map peaks inside the defect


def test_mean_image_on_synthetic_dataset(synthetic_root, tmp_path):
    scores, out = tmp_path / "scores", tmp_path / "out"
    mean_image.main(["--dataset", "synthetic_loco", "--data-root", str(synthetic_root), "--score-dir", str(scores),
                     "--fast"])
    benchmark_performance.main(["--dataset", "synthetic_loco", "--data-root", str(synthetic_root), "--score-dir",
                                str(scores), "--out-dir", str(out), "--no-figures", "--methods", "mean_image"])
    txt = [l for l in (out / "score_combine_result.txt").read_text().splitlines() if not l.startswith("#")]
    assert txt[0] == "SYNTH_BOX:" and txt[2] == "SYNTH_BOTTLE:"
    rows = read_csv(out / "benchmark_synthetic_loco.csv")
    header, mean = rows[0], next(r for r in rows if r[0] == "Mean")
    assert 0 <= float(mean[header.index("spro0.05_mean")]) <= 100


def test_benchmark_mvtec_ad_layout_pixel_metrics(tmp_path):
    cat = tmp_path / "data" / "widget"
    rng = np.random.default_rng(3)
    for i in range(3):
        _png(cat / "train" / "good" / f"{i:03d}.png", np.full((SIZE, SIZE, 3), 100, np.uint8))
        _png(cat / "test" / "good" / f"{i:03d}.png", np.full((SIZE, SIZE, 3), 100, np.uint8))
        _png(cat / "test" / "crack" / f"{i:03d}.png", np.full((SIZE, SIZE, 3), 100, np.uint8))
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[i:i + 5, 3:9] = 255
        _png(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    data = read_category("folder", "widget", tmp_path / "data")
    gts = np.stack([np.zeros((SIZE, SIZE), bool) if not s.mask_paths else np.asarray(Image.open(s.mask_paths[0])) > 0
                    for s in data.test])
    maps = (rng.random(gts.shape) + gts * 0.7).astype(np.float32)
    save_anomaly_maps("patchcore", "widget", data.test, maps=maps, score_dir=tmp_path / "scores")
    save_group_scores(data, "patchcore", {"test": maps.reshape(len(maps), -1).max(1)}, tmp_path / "scores")
    benchmark_performance.main(["--dataset", "folder", "--data-root", str(tmp_path / "data"), "--score-dir",
                                str(tmp_path / "scores"), "--out-dir", str(tmp_path / "out"), "--no-figures",
                                "--methods", "patchcore"])
    rows = read_csv(tmp_path / "out" / "benchmark_folder.csv")
    row = dict(zip(rows[0], rows[1]))
    assert float(row["pixel_auroc"]) == pytest.approx(100 * roc_auc_score(gts.ravel(), maps.ravel()), abs=1e-3)
    assert 50 < float(row["aupro"]) <= 100 and float(row["image_auroc"]) == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------- trust: refusals

def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _refused(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        benchmark_performance.main([str(a) for a in args])
    assert exit_info.value.code == 1
    return _error_line(capsys)


def _two_branches(tmp_path):
    root = make_loco(tmp_path / "data")
    data = read_category("mvtec_loco", "breakfast_box", root)
    scores = tmp_path / "scores"
    rng = np.random.default_rng(5)
    _write_branch(data, "patchhist", scores, rng, 1.0)
    _write_branch(data, "LGST", scores, rng, 1.0)
    return root, data, scores


def _loco_args(root, scores, out, *extra):
    return ["--dataset", "mvtec_loco", "--data-root", root, "--score-dir", scores, "--out-dir", out, "--no-figures",
            *extra]


def test_benchmark_refuses_score_files_of_another_category_or_dataset(tmp_path, capsys):
    root, data, scores = _two_branches(tmp_path)
    # juice_bottle's files copied under breakfast_box's names: same image names, so only the index tells.
    index = score_path("breakfast_box", "LGST", "logi", scores).with_suffix(".json")
    meta = json.loads(index.read_text())
    index.write_text(json.dumps(dict(meta, category="juice_bottle")))
    last = _refused(capsys, *_loco_args(root, scores, tmp_path / "out", "--methods", "patchhist", "LGST"))
    assert str(index) in last and "category 'juice_bottle', not 'breakfast_box'" in last
    txt = (tmp_path / "out" / "score_combine_result.txt").read_text()
    assert "('patchhist',) AUC:" in txt and "LGST" not in txt.split("BREAKFAST_BOX:")[1]

    index.write_text(json.dumps(dict(meta, dataset="synthetic_loco")))
    last = _refused(capsys, *_loco_args(root, scores, tmp_path / "out2", "--methods", "LGST"))
    assert str(index) in last and "dataset 'synthetic_loco', not 'mvtec_loco'" in last


@pytest.mark.parametrize("case", ["truncated", "two_d", "pickled", "not_npy", "bad_json", "json_list"])
def test_benchmark_malformed_score_files_one_line_naming_the_file(tmp_path, capsys, case):
    root, data, scores = _two_branches(tmp_path)
    npy = score_path("breakfast_box", "LGST", "struc", scores)
    n = len(np.load(npy))
    if case == "truncated":
        npy.write_bytes(npy.read_bytes()[:-20])
    elif case == "two_d":
        np.save(npy, np.zeros((n, 2)))
    elif case == "pickled":
        np.save(npy, np.array([{"a": 1}] * n, dtype=object), allow_pickle=True)
    elif case == "not_npy":
        npy.write_text("0.1\n0.2\n")
    elif case == "bad_json":
        npy.with_suffix(".json").write_text('{"images": [')
    else:
        npy.with_suffix(".json").write_text("[1, 2]")
    last = _refused(capsys, *_loco_args(root, scores, tmp_path / "out", "--methods", "patchhist", "LGST"))
    named = npy.with_suffix(".json") if case.endswith("json") or case == "json_list" else npy
    assert str(named) in last and "re-run LGST" in last, last
    assert last.startswith("error: 1 of the requested inputs refused or skipped (tables hold the rest); first: REFUSED")


def _category_broken(root: Path, case: str) -> None:
    cat = root / "breakfast_box"
    if case == "no_defects_config":
        (cat / "defects_config.json").unlink()
    elif case == "bad_defects_config":
        (cat / "defects_config.json").write_text("[{")
    elif case == "mask_size":
        mask = next((cat / "ground_truth").rglob("*.png"))
        Image.fromarray(np.zeros((SIZE + 2, SIZE), np.uint8)).save(mask)
    elif case == "no_ground_truth":
        import shutil

        shutil.rmtree(cat / "ground_truth" / "structural_anomalies")


@pytest.mark.parametrize("case", ["no_defects_config", "bad_defects_config", "mask_size", "no_ground_truth"])
def test_benchmark_dataset_problems_exit_nonzero_with_the_real_reason(tmp_path, capsys, case):
    root, data, scores = _two_branches(tmp_path)
    _category_broken(root, case)
    last = _refused(capsys, *_loco_args(root, scores, tmp_path / "out"))
    assert "SKIPPED category breakfast_box" in last and "run the method scripts first" not in last
    want = {"no_defects_config": "defects_config.json not found", "bad_defects_config": "defects_config.json",
            "mask_size": "masks must have the image's size", "no_ground_truth": "structural_anomalies"}[case]
    assert want in last, last


def test_benchmark_setup_errors_exit_nonzero(tmp_path, capsys):
    root, data, scores = _two_branches(tmp_path)
    out = tmp_path / "out"
    last = _refused(capsys, *_loco_args(tmp_path / "nowhere", scores, out))
    assert "dataset root not found" in last and str(tmp_path / "nowhere") in last
    (tmp_path / "wrong").mkdir()  # a root without any of the categories: not "run the method scripts first"
    last = _refused(capsys, *_loco_args(tmp_path / "wrong", scores, out))
    assert "none of the mvtec_loco categories" in last and "check --data-root" in last
    last = _refused(capsys, "--dataset", "mvtec_lcoo", "--data-root", root, "--score-dir", scores, "--out-dir", out)
    assert "unknown dataset 'mvtec_lcoo'" in last
    last = _refused(capsys, *_loco_args(root, scores, out, "--categories", "breakfast_box", "juice_botle"))
    assert "juice_botle" in last and "SKIPPED category" in last
    # A method asked for by name without score files; an empty score folder.
    last = _refused(capsys, *_loco_args(root, scores, out, "--methods", "patchhist", "glass"))
    assert "SKIPPED glass/breakfast_box: no score file" in last
    last = _refused(capsys, *_loco_args(root, tmp_path / "empty", out))
    assert "no score files found" in last and "run the method scripts first" in last
    with pytest.raises(SystemExit) as exit_info:  # no abbreviated flags
        benchmark_performance.main([str(a) for a in _loco_args(root, scores, out, "--no-fig")])
    assert exit_info.value.code == 2


def test_benchmark_warns_on_constant_scores(tmp_path, log_lines):
    root = make_loco(tmp_path / "data")
    data = read_category("mvtec_loco", "breakfast_box", root)
    save_group_scores(data, "glass", {g: np.full(len(s), 0.25) for g, s in data.score_groups().items()},
                      tmp_path / "scores")
    _bench(root, tmp_path / "scores", tmp_path / "out", "--methods", "glass")  # usable input: exit 0
    warned = [m for m in log_lines if m.startswith("WARNING glass/breakfast_box/logical: constant scores")]
    assert len(warned) == 1 and "AUROC of 50 means nothing" in warned[0]
    assert str(score_path("breakfast_box", "glass", "logi", tmp_path / "scores")) in warned[0]


def test_benchmark_script_exit_status_and_no_traceback(tmp_path):
    """As a user runs it: a refused file gives exit 1 and the file's name on the last line, no traceback."""
    import subprocess
    import sys

    root, data, scores = _two_branches(tmp_path)
    npy = score_path("breakfast_box", "LGST", "logi", scores)
    npy.write_bytes(npy.read_bytes()[:40])
    repo = Path(benchmark_performance.__file__).parent
    proc = subprocess.run([sys.executable, str(repo / "benchmark_performance.py"),
                           *map(str, _loco_args(root, scores, tmp_path / "out"))], capture_output=True, text=True,
                          cwd=repo, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(npy) in last
    assert "summary: 1 refused or skipped" in proc.stdout  # the log (stdout) ends with the summary


def test_figure_roc_curve_equals_sklearn_with_ties():
    from sklearn.metrics import roc_curve as sk_roc

    from evaluation.figures import roc_curve

    rng = np.random.default_rng(4)
    for _ in range(5):
        labels, s = rng.integers(0, 2, 40), rng.integers(0, 5, 40).astype(float)  # heavy ties
        fpr, tpr = roc_curve(labels, s)
        sk_fpr, sk_tpr, _ = sk_roc(labels, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, sk_fpr)
        np.testing.assert_allclose(tpr, sk_tpr)


def test_benchmark_pair_without_score_files_is_a_failure(tmp_path, capsys):
    root, data, scores = _two_branches(tmp_path)
    last = _refused(capsys, *_loco_args(root, scores, tmp_path / "out", "--pairs", "CSAD+SINBAD"))
    assert "SKIPPED --pairs patchhist+LGST+sinbad/breakfast_box: no usable score files for sinbad" in last
    assert "('patchhist', 'LGST') AUC:" in (tmp_path / "out" / "score_combine_result.txt").read_text()


def test_benchmark_refuses_unreadable_or_wrong_size_maps(tmp_path, capsys):
    root = make_loco(tmp_path / "data")
    data = read_category("mvtec_loco", "breakfast_box", root)
    scores = tmp_path / "scores"
    save_anomaly_maps("glass", "breakfast_box", data.test, maps=np.random.default_rng(0).random((len(data.test), SIZE, SIZE)),
                      score_dir=scores)
    _write_branch(data, "glass", scores, np.random.default_rng(1), 1.0)
    from evaluation.score_files import anomaly_map_path

    tiff = anomaly_map_path("glass", "breakfast_box", data.test[-1], scores)
    tiff.write_bytes(tiff.read_bytes()[:30])
    last = _refused(capsys, *_loco_args(root, scores, tmp_path / "out", "--methods", "glass"))
    assert str(tiff) in last and "not a readable TIFF" in last
    tifffile.imwrite(tiff, np.zeros((SIZE, SIZE + 4), np.float32))  # not at the mask's size
    last = _refused(capsys, *_loco_args(root, scores, tmp_path / "out", "--methods", "glass"))
    assert f"REFUSED glass/breakfast_box: {tiff} is 20x16 but its image" in last and "original image size" in last
