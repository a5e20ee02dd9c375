"""Speed benchmark: the timing harness against known sleeps, the throughput arithmetic, peak-memory probe, the
CSV/markdown writers, and a tiny end-to-end run."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import speed

CPU = torch.device("cpu")


def test_time_fn_measures_a_known_sleep():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.03)

    t = speed.time_fn(fn, device=CPU, warmup=2, runs=5)
    assert len(calls) == 7 and t["warmup"] == 2 and t["runs"] == 5
    assert 29.5 <= t["median_ms"] <= 45.0  # sleep never returns early; a loaded machine adds a little
    assert t["median_ms"] <= t["p95_ms"] + 1e-9 and 29.5 <= t["mean_ms"] <= 60.0


def test_time_fn_budget_cuts_runs_but_keeps_one():
    t = speed.time_fn(lambda: time.sleep(0.03), device=CPU, warmup=10, runs=100, budget_s=0.05)
    # warm-up stops once it took budget/4 = 12.5 ms (after one call); timing once it took 50 ms (two calls)
    assert t["warmup"] == 1 and t["runs"] == 2
    t = speed.time_fn(lambda: time.sleep(0.02), device=CPU, warmup=0, runs=3, budget_s=0.001)
    assert t["warmup"] == 0 and t["runs"] == 1


def test_throughput_arithmetic():
    assert speed.throughput(1, 10.0) == pytest.approx(100.0)
    assert speed.throughput(8, 40.0) == pytest.approx(200.0)
    assert speed.throughput(32, 1000.0) == pytest.approx(32.0)


def test_measure_inference_picks_the_best_batch():
    # 10 ms fixed + 2 ms per image: batch 1 -> 83 img/s, batch 4 -> 222 img/s, batch 8 -> 308 img/s
    s = speed.Settings(device=CPU, warmup=1, runs=3, batch_sizes=(1, 4, 8), budget_s=None)

    def build():
        return lambda x: time.sleep(0.010 + 0.002 * len(x))

    row = speed.measure_inference(s, build, lambda b: torch.zeros(b, 1))
    assert row["best_batch"] == 8 and row["batches"] == "1 4 8"
    assert 12.0 <= row["latency_ms"] <= 20.0
    assert 200.0 <= row["throughput_img_s"] <= 8 / 0.026 * 1.001
    assert row["runs"] == 3 and row["warmup"] == 1


def test_measure_inference_skips_batches_over_the_budget():
    s = speed.Settings(device=CPU, warmup=0, runs=1, batch_sizes=(1, 2, 64), budget_s=0.5)
    row = speed.measure_inference(s, lambda: (lambda x: time.sleep(0.02)), lambda b: torch.zeros(b, 1))
    # one call at batch 64 is predicted at 64 x 20 ms = 1.3 s > 0.5 s: skipped; batch 2 runs
    assert row["batches"] == "1 2"
    assert row["throughput_img_s"] == pytest.approx(2 / 0.02, rel=0.35)


def test_peak_memory_sees_a_known_allocation():
    with speed.PeakMemory(CPU) as m:
        a = np.ones(200 * 2 ** 20 // 8)  # 200 MiB, every page touched
        del a
    assert 190.0 <= m.mib <= 320.0, m.probe
    with speed.PeakMemory(CPU) as m2:
        b = np.ones(10)
    assert m2.mib < 50.0 and b.sum() == 10


def _rows():
    return [
        {**{k: "" for k in speed.COLUMNS}, "method": "csad", "input": "256x256", "threads": 2, "warmup": 1,
         "runs": 5, "best_batch": 4, "latency_ms": 1234.5678, "latency_median_ms": 1200.0, "latency_p95_ms": 1300.25,
         "throughput_img_s": 0.875, "train_s": 12.5, "train_unit": "s/epoch of 4 images", "peak_infer_mib": 512.0,
         "peak_train_mib": 1024.5, "anchor": speed.ANCHORS["csad"].text,
         "stages": 'one pass, "quoted", with commas', "batches": "1 2 4"},
        {**{k: "" for k in speed.COLUMNS}, "method": "sinbad_l7", "input": "1024x1024 canvas, 30 crops at 224",
         "threads": 2, "warmup": 0, "runs": 1, "best_batch": 1, "latency_ms": 2.5e4, "latency_median_ms": 2.5e4,
         "latency_p95_ms": 2.5e4, "throughput_img_s": 0.04, "train_s": 50.0, "train_unit": "s/fit of 2 images",
         "peak_infer_mib": 0.0, "peak_train_mib": 300.0},
    ]


def test_csv_round_trip_and_markdown(tmp_path):
    rows = _rows()
    env = {"device": "CPU test", "threads": 2, "dtype": "fp32", "torch": torch.__version__, "weights": "random"}
    paths = speed.write_outputs(rows, env, tmp_path)
    back = speed.read_csv(paths["csv"])
    assert [list(r) for r in back] == [list(speed.COLUMNS)] * 2
    for a, b in zip(rows, back):
        for k in speed.COLUMNS:
            if k in speed.NUMERIC and a[k] != "":
                assert b[k] == pytest.approx(a[k]) and type(b[k]) is speed.NUMERIC[k]
            else:
                assert b[k] == str(a[k])
    md = paths["md"].read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(rows)  # header + one line per method
    assert "| csad | 256x256 | 1235 (1300) | 0.875 (4) | 12.5 s/epoch of 4 images |" in md
    assert "8.9 ms/img" in md and "weights: random" in md


def test_anchors_and_method_names():
    a = speed.ANCHORS
    assert a["csad"].latency_ms == 8.9 and a["lgst"].latency_ms == 2.0 and a["glass"].throughput == 82.0
    assert a["patchcore"].latency_ms == 220.0
    assert speed.expand_methods(["sinbad", "csad", "sinbad_l7"]) == ["sinbad_l7", "sinbad_l14", "sinbad_l224", "csad"]
    with pytest.raises(ValueError, match="unknown method 'effnet'"):
        speed.expand_methods(["effnet"])


def test_cli_errors(tmp_path):
    import benchmark_speed

    with pytest.raises(SystemExit, match="fp16 needs a GPU"):
        benchmark_speed.main(["--device", "cpu", "--dtype", "fp16", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown method"):
        benchmark_speed.main(["--device", "cpu", "--methods", "nope", "--out-dir", str(tmp_path)])


def test_end_to_end_fast(tmp_path):
    """Two cheap methods at --fast sizes through the real script: CSV columns, positive finite values, and
    throughput at the best batch >= the batch-1 rate implied by the latency."""
    import torchvision

    import benchmark_speed

    out = tmp_path / "speed"
    benchmark_speed.main(["--methods", "patchcore", "sinbad_l224", "--fast", "--device", "cpu", "--warmup", "1",
                          "--runs", "2", "--batch-sizes", "1", "2", "--images", "2", "--out-dir", str(out)])
    rows = speed.read_csv(out / "speed.csv")
    assert (out / "speed.csv").read_text().splitlines()[0] == ",".join(speed.COLUMNS)
    assert [r["method"] for r in rows] == ["patchcore", "sinbad_l224"]
    for r in rows:
        for k in ("latency_ms", "latency_median_ms", "latency_p95_ms", "throughput_img_s", "train_s"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["method"], k, r[k])
        assert r["throughput_img_s"] >= 1000.0 / r["latency_ms"] * (1 - 1e-9)
        assert r["runs"] == 2 and r["warmup"] == 1 and r["best_batch"] in (1, 2)
        assert r["device"].startswith("CPU") and r["weights"] == "random"
    pc = rows[0]
    assert pc["input"] == "56x56" and "0.22 s/img" in pc["anchor"] and "memory bank of 2 images" in pc["train_unit"]
    # the WRN50-2 weights are loaded inside the inference stage: its peak holds at least their float32 bytes
    weight_mib = sum(p.numel() for p in torchvision.models.wide_resnet50_2().parameters()) * 4 / 2 ** 20
    assert pc["peak_infer_mib"] >= 0.9 * weight_mib
    assert "speed does not depend on weight values" in (out / "speed.md").read_text()


def test_official_csad_timing_row(tmp_path):
    """The official protocol row: batch 8, latency = call time / 8, throughput = 8 images per call."""
    s = speed.Settings(device=CPU, fast=True, budget_s=1.0, work_dir=tmp_path)
    row = speed.run_method("csad_official", s)
    assert row["best_batch"] == 8 and row["train_s"] == "" and row["runs"] >= 1
    assert row["throughput_img_s"] * row["latency_ms"] == pytest.approx(1000.0)
    assert "8.9 ms/img" in row["anchor"] and "no per-call synchronisation" in row["stages"]
    t = speed.time_fn(lambda: time.sleep(0.01), device=CPU, warmup=0, runs=2, sync_each=False)
    assert t["runs"] == 2 and t["median_ms"] >= 9.5


# ----------------------------------------------------------------------------------------------- rehearsal
def _loco_tree(root, n_train=3, n_val=2, n_test=2):
    """A tiny MVTec LOCO-layout category with masks, component maps and defects_config.json."""
    from PIL import Image

    cat = root / "cat"
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    mask = Image.new("L", (8, 8), 255)
    for split, kind, n in [("train", "good", n_train), ("validation", "good", n_val), ("test", "good", n_test),
                           ("test", "logical_anomalies", n_test)]:
        for i in range(n):
            (cat / split / kind).mkdir(parents=True, exist_ok=True)
            img.save(cat / split / kind / f"{i:03d}.png")
            if split == "train":
                (cat / "component_maps" / split / kind).mkdir(parents=True, exist_ok=True)
                mask.save(cat / "component_maps" / split / kind / f"{i:03d}.png")
            if kind != "good":
                (cat / "ground_truth" / kind / f"{i:03d}").mkdir(parents=True, exist_ok=True)
                mask.save(cat / "ground_truth" / kind / f"{i:03d}" / "000.png")
    (cat / "defects_config.json").write_text('[{"defect_name": "d", "pixel_value": 255, '
                                             '"saturation_threshold": 1.0, "relative_saturation": true}]')
    return cat


def test_rehearsal_subset_reads_as_the_first_images(tmp_path):
    from benchmarks.rehearse import limit_images, make_subset
    from dataset_readers.mvtec_loco import read_mvtec_loco

    src = _loco_tree(tmp_path / "src", n_train=5, n_val=3, n_test=3)
    sub = make_subset(src, tmp_path / "sub", n_train=2, n_val=1, n_test=2)
    data = read_mvtec_loco(tmp_path / "sub", "cat")
    assert [Path(s.path).name for s in data.train] == ["000.png", "001.png"] and len(data.validation) == 1
    assert [(s.defect_type, Path(s.path).name) for s in data.test] == [
        ("good", "000.png"), ("good", "001.png"), ("logical_anomalies", "000.png"), ("logical_anomalies", "001.png")]
    assert all(len(s.mask_paths) == 1 for s in data.test if s.defect_type != "good")
    assert sorted(p.name for p in (sub / "component_maps" / "train" / "good").iterdir()) == ["000.png", "001.png"]
    assert (sub / "train" / "good" / "000.png").resolve() == (src / "train" / "good" / "000.png").resolve()
    # again with more images: the folder is rebuilt, not added to
    make_subset(src, tmp_path / "sub", n_train=4, n_val=1, n_test=1)
    assert len(read_mvtec_loco(tmp_path / "sub", "cat").train) == 4
    # --limits images alternate between the test types
    assert [Path(p).parent.name + "/" + Path(p).name for p in limit_images(src, 3)] == [
        "good/000.png", "logical_anomalies/000.png", "good/001.png"]


def test_rehearsal_widens_a_degenerate_selection_only(tmp_path):
    """Random stage-1 weights can select fewer supervised images than a segmentor batch: the rehearsal then
    supervises every training image; a selection of a full batch, or too few images for one, stays as written."""
    import numpy as np

    from benchmarks.rehearse import widen_supervision

    def labels(n, sup):
        cat = tmp_path / f"masks_{n}_{len(sup)}" / "cat"
        for i in range(n):
            (cat / f"{i:03d}").mkdir(parents=True)
        (cat / "info").mkdir()
        np.save(cat / "info" / "filtered_histogram_indices.npy", np.array(sup, np.int64))
        return cat

    cat = labels(6, [2])
    assert widen_supervision(cat) == (1, 6)
    assert np.load(cat / "info" / "filtered_histogram_indices.npy").tolist() == [0, 1, 2, 3, 4, 5]
    for n, sup in ((6, [0, 2, 3, 5]), (3, [1])):
        cat = labels(n, sup)
        assert widen_supervision(cat) is None
        assert np.load(cat / "info" / "filtered_histogram_indices.npy").tolist() == sup


CHILD = r"""
import os, sys, time, numpy as np
sys.path.insert(0, {repo!r})
from common.memory import stage
print("first", flush=True)
with stage("alloc", images=3):
    a = np.ones(800 * 2 ** 20 // 8)
    time.sleep(0.4)
    del a
print("second", flush=True)
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
sys.exit({rc})
"""


def test_rehearsal_process_measurement(tmp_path):
    """A child that allocates 800 MiB in a stage and burns 0.3 s of CPU: the wait4 peak, the stage record, the
    sampled phase peak, the CPU time and the exit code are all seen."""
    from benchmarks.rehearse import REPO, Run, run_process

    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), rc=3))
    r = run_process(Run("s", "m", "base", "child", [sys.executable, str(script)]), env={},
                    log_path=tmp_path / "child.log", timeout_s=60)
    assert r.rc == 3 and "second" in r.error
    assert r.maxrss_mb >= 800 and r.cpu_s >= 0.3 and r.wall_s >= 0.7
    assert [s["stage"] for s in r.stages] == ["alloc"] and r.stages[0]["images"] == 3
    assert r.stages[0]["peak_rss_mb"] - r.stages[0]["rss_start_mb"] >= 790
    first = next(p for p in r.phases if p["line"] == "first")
    second = next(p for p in r.phases if p["line"] == "second")
    # the sampled peak of the phase after "first" holds the allocation; the phase after "second" does not (the
    # interpreter grows by 100-200 MiB after the stage on a loaded machine, hence a margin well under 800)
    assert first["peak_mb"] >= r.stages[0]["peak_rss_mb"] - 20 and first["seconds"] >= 0.4
    assert first["peak_mb"] - second["peak_mb"] >= 400
    # a run past its time limit is killed and says so
    script.write_text("import time\nprint('start', flush=True)\ntime.sleep(30)\n")
    r = run_process(Run("s", "m", "base", "slow", [sys.executable, str(script)]), env={},
                    log_path=tmp_path / "slow.log", timeout_s=1)
    assert r.rc == -9 and r.error.startswith("timed out after 1 s") and r.wall_s < 20


def test_rehearsal_growth_arithmetic():
    from benchmarks.rehearse import Run, growth

    def run(variant, iters, images, peak, secs):
        r = Run("real", "glass", variant, "glass", [], iterations=iters, images=images, rc=0, wall_s=secs,
                cpu_s=secs / 2, maxrss_mb=peak)
        r.stages = [{"stage": "fit", "peak_rss_mb": peak - 100, "seconds": secs - 1, "cpu_s": None}]
        return r

    rows = growth([run("base", 1, 4, 1000, 10), run("iters2", 2, 4, 1010, 16), run("images2", 1, 8, 1400, 30)])
    by = {(g["vary"], g["stage"]): g for g in rows}
    assert by[("iterations", "(process)")]["peak_mb_per_unit"] == pytest.approx(10.0)
    assert by[("iterations", "(process)")]["seconds_per_unit"] == pytest.approx(6.0)
    assert by[("images", "fit")]["peak_mb_per_unit"] == pytest.approx(100.0)  # (1300 - 900) / 4 images
    assert by[("images", "(process)")]["cpu_s_per_unit"] == pytest.approx(2.5)
    assert by[("images", "fit")]["cpu_s_per_unit"] is None
    failed = run("iters2", 2, 4, 5000, 1)
    failed.rc = 1
    assert all(g["vary"] != "iterations" for g in growth([run("base", 1, 4, 1000, 10), failed]))


def test_rehearsal_spearman():
    from benchmarks.rehearse import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


TOY = """
import sys, torch
from common.memory import stage
with stage("a"):
    x = torch.ones(1024, 1024, 8)  # 32 MiB
    y = x * 2                      # +32 MiB live at once
    del x, y
with stage("b"):
    z = torch.ones(1024, 1024, 4)  # 16 MiB, kept
sys.exit(5)
"""


def test_rehearsal_tensor_peaks_per_stage(tmp_path, monkeypatch):
    """exec_script under the profiler: the live-tensor peak of each stage is the known allocation, the CPU time
    is added to the stage records, the script's exit code comes back, and the stage hook is restored."""
    import json

    import common.memory as cm
    from benchmarks.rehearse import exec_script

    script, out = tmp_path / "toy.py", tmp_path / "toy.json"
    script.write_text(TOY)
    hook = cm.StageMeter.stage
    meter = cm.StageMeter()  # a meter of this test's own: the suite's stays off
    monkeypatch.setattr(cm, "METER", meter)
    meter.enable()
    try:
        assert exec_script([str(script)], out) == 5
    finally:
        meter._sampler.stop()
    assert cm.StageMeter.stage is hook
    res = json.loads(out.read_text())
    peaks = {s["stage"]: s for s in res["stages"]}
    assert peaks["a"]["peak_tensor_mb"] - peaks["a"]["tensor_start_mb"] == pytest.approx(64.0, abs=0.5)
    assert peaks["b"]["peak_tensor_mb"] - peaks["b"]["tensor_start_mb"] == pytest.approx(16.0, abs=0.5)
    assert res["peak_tensor_mb"] >= 64.0 and res["rc"] == 5
    recs = meter.records
    assert [r["stage"] for r in recs] == ["a", "b"] and all(r["cpu_s"] >= 0 for r in recs)
