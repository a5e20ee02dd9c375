"""Every output says how it was made: the score-file index carries the run record, the benchmark's tables and
figures state it, random weights are flagged in the titles, and the paper column appears only under the paper's
protocol."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import benchmark_performance
from common import provenance as P
from dataset_readers import read_category
from evaluation.benchmark import Config, PaperRule, Provenance, Row, read_csv
from evaluation.score_files import save_anomaly_maps, save_group_scores, score_path
from tests.test_benchmark import make_loco

SHA = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
REAL = {"backbone": "efficientnet_lite0", "weights": "efficientnet-lite0-57934424.pth", "sha256": SHA}
RANDOM = {"backbone": "efficientnet_lite0", "weights": None, "sha256": "RANDOM"}


@pytest.fixture(autouse=True)
def no_run(monkeypatch):
    """Each test starts without a run record (the record is per process)."""
    monkeypatch.setattr(P, "_CURRENT", None)


def _scores(data, name, score_dir, weights, fast=True, seed=0, maps=False):
    P.start_run(method=name, dataset="mvtec_loco", data_root=str(data.root.parent), categories=[data.category],
                weights=weights, fast=fast, seed=seed, settings={"lr": 1e-4})
    rng = np.random.default_rng(seed)
    save_group_scores(data, name, {g: rng.normal(size=len(s)) + np.array([x.label for x in s])
                                   for g, s in data.score_groups().items()}, score_dir)
    if maps:
        save_anomaly_maps(name, data.category, data.test, maps=rng.random((len(data.test), 16, 16)).astype(np.float32),
                          score_dir=score_dir)
    P.start_run(method="other", dataset="x", data_root=None, categories=None)  # the next writer's own record


def test_weights_record_and_describe():
    class Model:
        backbone_name, weights_file, weights_sha256 = "efficientnet_lite0", "/x/ckpt/efficientnet-lite0-57934424.pth", SHA

    rec = P.run_record(method="LGST", dataset="mvtec_loco", data_root="/d", categories=["juice_bottle"],
                       weights=P.weights_record(Model()), fast=False, seed=42)
    assert rec["weights"] == REAL  # the file name only, the full hash
    assert not P.is_random(rec)
    assert P.describe(rec) == ("LGST on mvtec_loco (/d), efficientnet_lite0 efficientnet-lite0-57934424.pth "
                               f"sha256:579344248a93, full settings, seed 42, commit {P.git_commit()}")
    rnd = dict(rec, weights=P.weights_record(backbone="efficientnet_lite0"), fast=True)
    assert P.is_random(rnd) and "RANDOM weights, --fast" in P.describe(rnd)
    assert not P.is_random(dict(rec, weights=None))  # no backbone (the mean-image baseline) is not random
    assert P.run_text(None).startswith("provenance unknown")


def test_score_index_carries_the_run_record(tmp_path):
    data = read_category("mvtec_loco", "breakfast_box", make_loco(tmp_path / "data"))
    _scores(data, "LGST", tmp_path / "s", REAL, fast=False, seed=7)
    index = json.loads(score_path("breakfast_box", "LGST", "logi", tmp_path / "s").with_suffix(".json").read_text())
    assert index["dataset"] == "mvtec_loco" and index["category"] == "breakfast_box"
    run = index["run"]
    assert run["method"] == "LGST" and run["weights"]["sha256"] == SHA and run["seed"] == 7 and run["fast"] is False
    assert run["categories"] == ["breakfast_box"] and run["settings"] == {"lr": 1e-4} and run["commit"]


def _bench(root, scores, out, *extra):
    return benchmark_performance.main(["--dataset", "mvtec_loco", "--data-root", str(root), "--score-dir", str(scores),
                                       "--out-dir", str(out), *extra])


def test_tables_and_figures_state_provenance_and_random_weights(tmp_path):
    root = make_loco(tmp_path / "data")
    data = read_category("mvtec_loco", "breakfast_box", root)
    scores, out = tmp_path / "s", tmp_path / "out"
    _scores(data, "patchhist", scores, REAL, fast=True, seed=3)
    _scores(data, "LGST", scores, RANDOM, fast=True, seed=3, maps=True)
    _bench(root, scores, out, "--methods", "patchhist", "LGST")

    md = (out / "benchmark_mvtec_loco.md").read_text()
    title = md.splitlines()[0]
    assert title == "## Benchmark: mvtec_loco — RANDOM WEIGHTS: numbers not meaningful"
    assert f"- dataset mvtec_loco ({root}), categories: breakfast_box; evaluated at commit {P.git_commit()}" in md
    assert (f"- patchhist: efficientnet_lite0 efficientnet-lite0-57934424.pth sha256:579344248a93, --fast, seed 3, "
            f"commit {P.git_commit()}") in md
    assert "- LGST: efficientnet_lite0 RANDOM weights, --fast, seed 3" in md
    csv_text = (out / "benchmark_mvtec_loco.csv").read_text().splitlines()
    assert csv_text[0] == "# Benchmark: mvtec_loco — RANDOM WEIGHTS: numbers not meaningful"
    assert any(l.startswith("# patchhist: ") and "sha256:579344248a93" in l for l in csv_text)
    assert read_csv(out / "benchmark_mvtec_loco.csv")[0][:2] == ["category", "experiment"]  # readers skip '# '
    txt = (out / "score_combine_result.txt").read_text().splitlines()
    assert txt[0].endswith("RANDOM WEIGHTS: numbers not meaningful") and "BREAKFAST_BOX:" in txt
    js = json.loads((out / "benchmark_mvtec_loco.json").read_text())["_provenance"]
    assert js["random_weights"] is True and js["runs"]["LGST"][0]["weights"]["sha256"] == "RANDOM"
    assert js["runs"]["patchhist"][0]["weights"]["sha256"] == SHA

    # Figures: the title says RANDOM, the caption (drawn and in the PNG metadata) names weights and commit.
    figs = sorted((out / "figures" / "breakfast_box").glob("*.png"))
    assert {p.name for p in figs} >= {"roc.png", "overlay_LGST.png", "all_methods.png"}
    for p in figs:
        info = Image.open(p).info
        assert "RANDOM WEIGHTS" in info["Title"], p
        assert "sha256:579344248a93" in info["Description"] and P.git_commit() in info["Description"], p


def test_real_weights_title_and_old_index_without_record(tmp_path):
    root = make_loco(tmp_path / "data")
    data = read_category("mvtec_loco", "breakfast_box", root)
    scores, out = tmp_path / "s", tmp_path / "out"
    _scores(data, "patchhist", scores, REAL, fast=False)
    _scores(data, "LGST", scores, REAL, fast=False)
    for g in ("logi", "struc", "val"):  # an index written before run records existed
        index = score_path("breakfast_box", "LGST", g, scores).with_suffix(".json")
        meta = json.loads(index.read_text())
        del meta["run"], meta["dataset"]
        index.write_text(json.dumps(meta))
    _bench(root, scores, out, "--methods", "patchhist", "LGST", "--no-figures")
    md = (out / "benchmark_mvtec_loco.md").read_text()
    assert md.splitlines()[0] == "## Benchmark: mvtec_loco" and "RANDOM" not in md
    assert "- LGST: provenance unknown" in md and "| breakfast_box | LGST |" in md


def _rule(dataset, categories, records, test_sets, official=False):
    cfg = Config(dataset=dataset, data_root=None, categories=categories, methods=[], score_dir=Path("."),
                 out_dir=Path("."), official_image_score=official)
    return PaperRule(cfg, [], Provenance(dataset, None, categories, records), test_sets)


LOCO_FULL = {"breakfast_box": 275, "juice_bottle": 330, "pushpins": 310, "screw_bag": 341, "splicing_connectors": 312}


def test_paper_column_only_under_the_papers_protocol():
    full = {c: {"test": n, "logi": 1, "struc": 1} for c, n in LOCO_FULL.items()}
    real = {"patchhist": [{"weights": REAL, "fast": False}], "LGST": [{"weights": REAL, "fast": False}],
            "patchcore": [{"weights": REAL, "fast": False}]}
    mean = Row("Mean", ("patchhist", "LGST"))
    assert _rule("mvtec_loco", list(LOCO_FULL), real, full).value(mean) == pytest.approx(0.953)
    assert _rule("mvtec_loco", list(LOCO_FULL), real, full).value(Row("Mean", ("patchcore",))) == pytest.approx(0.816)
    # A logical-only subset, a downscaled subset of the test set, one category, --fast, random weights, the
    # official image score, a synthetic dataset: no paper value, and the rule says why.
    logical_only = {c: {"test": n, "logi": 1} for c, n in LOCO_FULL.items()}
    rule = _rule("mvtec_loco", list(LOCO_FULL), real, logical_only)
    assert rule.value(Row("Mean", ("patchcore",))) is None and "lacks a logical or structural" in rule.reasons[0]
    subset = dict(full, juice_bottle={"test": 40, "logi": 1, "struc": 1})
    rule = _rule("mvtec_loco", list(LOCO_FULL), real, subset)
    assert rule.value(mean) is None and "juice_bottle has 40 test images, the official test set 330" in rule.reasons[0]
    rule = _rule("mvtec_loco", ["juice_bottle"], real, full)
    assert rule.value(Row("Mean", ("patchhist", "LGST"))) is None and "the paper's over all 5" in rule.reasons[0]
    fast = {k: [{"weights": REAL, "fast": True}] for k in real}
    assert _rule("mvtec_loco", list(LOCO_FULL), fast, full).value(mean) is None
    rnd = dict(real, LGST=[{"weights": RANDOM, "fast": False}])
    assert _rule("mvtec_loco", list(LOCO_FULL), rnd, full).value(mean) is None
    assert _rule("mvtec_loco", list(LOCO_FULL), real, full, official=True).value(mean) is None
    assert _rule("synthetic_loco", ["synth_box", "synth_bottle"], real, {}).value(mean) is None
    # MVTec AD: the 99.0 of PatchCore needs all 15 classes.
    from dataset_readers.mvtec_ad import MVTEC_AD_CATEGORIES

    ad = {c: {"test": 100} for c in MVTEC_AD_CATEGORIES}
    assert _rule("mvtec_ad", list(MVTEC_AD_CATEGORIES), real, ad).value(Row("Mean", ("patchcore",))) == pytest.approx(0.99)
    assert _rule("mvtec_ad", ["bottle"], real, ad).value(Row("Mean", ("patchcore",))) is None


def test_paper_results_json_is_cited_and_never_invents_numbers():
    paper = json.loads((Path(benchmark_performance.__file__).parent / "evaluation" / "paper_results.json").read_text())
    for dataset, entries in paper.items():
        if dataset.startswith("_"):
            continue
        for name, e in entries.items():
            if name.startswith("_"):
                continue
            assert e.get("source") and "specs" not in e["source"] and "shared" not in e["source"], (dataset, name)
            for v in (e.get("categories") or {}).values():
                assert v is None or (isinstance(v, dict) or 0 <= v <= 100)
