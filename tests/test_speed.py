"""Speed benchmark: the timing harness against known sleeps, the throughput arithmetic, peak-memory probe, the
CSV/markdown writers, and a tiny end-to-end run."""
from __future__ import annotations

import math
import time

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

    t = speed.time_fn(fn, CPU, warmup=2, runs=5)
    assert len(calls) == 7 and t["warmup"] == 2 and t["runs"] == 5
    assert 29.5 <= t["median_ms"] <= 45.0  # sleep never returns early; a loaded machine adds a little
    assert t["median_ms"] <= t["p95_ms"] + 1e-9 and 29.5 <= t["mean_ms"] <= 60.0


def test_time_fn_budget_cuts_runs_but_keeps_one():
    t = speed.time_fn(lambda: time.sleep(0.03), CPU, warmup=10, runs=100, budget_s=0.05)
    # warm-up stops once it took budget/4 = 12.5 ms (after one call); timing once it took 50 ms (two calls)
    assert t["warmup"] == 1 and t["runs"] == 2
    t = speed.time_fn(lambda: time.sleep(0.02), CPU, warmup=0, runs=3, budget_s=0.001)
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
    t = speed.time_fn(lambda: time.sleep(0.01), CPU, warmup=0, runs=2, sync_each=False)
    assert t["runs"] == 2 and t["median_ms"] >= 9.5
