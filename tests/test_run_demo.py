"""run_demo's orchestration: the step graph, concurrency, and one line for a failing step (no demo is run)."""
from __future__ import annotations

import sys
import time

import pytest

import run_demo
from common.errors import UserError
from common.pipeline import Step, check_graph, last_lines, run_steps

PY = sys.executable


def py_step(name: str, code: str, after=()) -> Step:
    return Step(name, [PY, "-c", code], tuple(after))


def test_dependent_step_waits_and_independent_steps_overlap(tmp_path):
    # "a" only succeeds if "b" starts while "a" runs (jobs=2); "c" only succeeds if "a" has finished.
    a = (f"import pathlib, time; d = pathlib.Path({str(tmp_path)!r}); t = time.time()\n"
         "while not (d / 'b.started').exists():\n"
         "    time.sleep(0.05)\n"
         "    assert time.time() - t < 60, 'b did not start beside a'\n"
         "(d / 'a.done').touch()")
    b = f"import pathlib; pathlib.Path({str(tmp_path)!r}, 'b.started').touch(); print('hello from b')"
    c = f"import pathlib, sys; sys.exit(0 if pathlib.Path({str(tmp_path)!r}, 'a.done').exists() else 3)"
    lines = []
    res = run_steps([py_step("a", a), py_step("b", b), py_step("c", c, after=["a"])], jobs=2,
                    log_dir=tmp_path / "logs", echo=lines.append)
    assert [r.status for r in res] == ["ok", "ok", "ok"], lines
    assert last_lines(tmp_path / "logs" / "b.log") == ["hello from b"]
    assert all(r.cpu_s > 0 and r.wall_s >= r.cpu_s * 0.1 for r in res)
    assert any(ln.startswith("[done] c:") and "CPU" in ln for ln in lines)


def test_failure_cancels_running_steps_and_skips_dependents(tmp_path):
    steps = [py_step("slow", "import time; time.sleep(120)"),
             py_step("bad", "import sys; print('step output'); print('error: no such folder x', file=sys.stderr); "
                            "sys.exit(2)"),
             py_step("after_bad", "pass", after=["bad"])]
    lines = []
    t0 = time.monotonic()
    res = {r.name: r for r in run_steps(steps, jobs=2, log_dir=tmp_path, echo=lines.append)}
    assert time.monotonic() - t0 < 60  # the 120 s step was cancelled, not waited for
    assert res["bad"].status == "failed" and res["bad"].returncode == 2
    assert res["slow"].status == "cancelled"
    assert res["after_bad"].status == "not run"
    assert "  bad | error: no such folder x" in lines


def test_graph_errors_are_caught_before_running(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        check_graph([Step("a", ["x"], ("nope",))])
    with pytest.raises(ValueError, match="cycle"):
        check_graph([Step("a", ["x"], ("b",)), Step("b", ["x"], ("a",))])


def test_demo_graph_keeps_the_order_csad_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(run_demo, "DTD_ROOT", tmp_path / "no_dtd")
    monkeypatch.setattr(run_demo, "PENALTY_ROOT", tmp_path / "no_penalty")
    args = run_demo.parse_args(["--weights", "random", "--results-dir", str(tmp_path)])
    steps = run_demo.build_steps(args)
    by = {s.name: s for s in steps}
    assert steps[0].name == "generate" and "textures" in by  # no DTD: generated textures, first
    assert all("generate" in s.after for s in steps if s.name in run_demo.STEPS)
    assert "pseudo_label" in by["train_segmentor"].after
    assert "textures" in by["glass"].after and "textures" in by["CSAD"].after
    # the fused CSAD model is written by a --test-only pass once both of its parts are trained
    assert {"train_segmentor", "CSAD"} <= set(by["csad_fused"].after) and by["csad_fused"].cmd[1] == "CSAD.py"
    assert "--test-only" in by["csad_fused"].cmd and "--test-only" not in by["CSAD"].cmd
    assert set(run_demo.METHOD_STEPS) <= set(by["benchmark"].after)
    assert by["glass"].cmd[by["glass"].cmd.index("--dtd-root") + 1] == str(run_demo.SYNTHETIC_TEXTURES)
    assert all("--fast" in s.cmd for s in steps if s.name in run_demo.METHOD_STEPS)
    check_graph(steps)
    # only some steps: predecessors not selected are taken as done
    args = run_demo.parse_args(["--weights", "random", "--steps", "train_segmentor", "benchmark"])
    by = {s.name: s for s in run_demo.build_steps(args)}
    assert "pseudo_label" not in by["train_segmentor"].after and by["benchmark"].after[-1] == "train_segmentor"


def test_long_steps_run_per_category_when_jobs_allow(tmp_path):
    args = run_demo.parse_args(["--weights", "random", "--seed", "3"])
    by = {s.name: s for s in run_demo.build_steps(args, jobs=2)}
    assert {"CSAD:synth_box", "CSAD:synth_bottle", "sinbad:synth_box", "sinbad:synth_bottle"} <= set(by)
    assert "CSAD" not in by and "sinbad" not in by
    cmd = by["CSAD:synth_bottle"].cmd
    assert cmd[cmd.index("--categories") + 1:] == ["synth_bottle"] and cmd[cmd.index("--seed") + 1] == "3"
    assert {"CSAD:synth_box", "CSAD:synth_bottle", "sinbad:synth_box"} <= set(by["benchmark"].after)
    assert list(by)[0] == "generate"
    default = run_demo.build_steps(run_demo.parse_args(["--weights", "random"]), jobs=2)
    assert not any("--seed" in s.cmd for s in default)  # each script's own seed (train_segmentor: 42)
    one = {s.name for s in run_demo.build_steps(args, jobs=1)}
    assert "CSAD" in one and "CSAD:synth_box" not in one


def test_full_run_without_dtd_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(run_demo, "DTD_ROOT", tmp_path / "dtd" / "images")
    args = run_demo.parse_args(["--full", "--dataset", "mvtec_loco"])
    with pytest.raises(UserError, match="DTD.*dtd-r1.0.1.tar.gz"):
        run_demo.build_steps(args)
    args = run_demo.parse_args(["--full", "--dataset", "mvtec_loco", "--steps", "CSAD"])
    assert [s.name for s in run_demo.build_steps(args)] == ["CSAD"]  # no GLASS, no DTD needed


def test_failing_step_gives_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    def fake_steps(args, py=PY, jobs=1):
        return [py_step("sinbad", "import sys; print('error: dataset root not found: /x', file=sys.stderr); "
                                  "sys.exit(1)"),
                py_step("benchmark", "pass", after=["sinbad"])]

    monkeypatch.setattr(run_demo, "build_steps", fake_steps)
    with pytest.raises(SystemExit) as exc:
        run_demo.main(["--weights", "random", "--results-dir", str(tmp_path / "res"), "--score-dir",
                       str(tmp_path / "s"), "--ckpt-dir", str(tmp_path / "c")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("error: step sinbad failed (exit 1): dataset root not found: /x; its log: ")
    assert err[0].endswith(str(tmp_path / "res" / "logs" / "sinbad.log"))


def test_missing_data_root_stops_before_any_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_demo.main(["--weights", "random", "--data-root", str(tmp_path / "nope"), "--results-dir",
                       str(tmp_path / "r")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --data-root {tmp_path / 'nope'} is not a folder")
    assert not (tmp_path / "r" / "logs").exists()


def test_missing_weights_file_is_one_line(tmp_path):
    args = run_demo.parse_args(["--weights", str(tmp_path / "none.pth")])
    with pytest.raises(UserError, match="none.pth"):
        run_demo.demo_weights(args)


def test_csad_per_category_process_gives_the_same_scores(synthetic_root, dtd_root, tmp_path):
    """run_demo runs CSAD one process per category: a category's scores must be bit-identical to those of a run
    over all categories (each category is seeded on its own; one thread, as in the demo)."""
    import os
    import subprocess

    import numpy as np

    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [PY, "CSAD.py", "--dataset", "synthetic_loco", "--data-root", str(synthetic_root), "--fast",
            "--iterations", "4", "--input-size", "64", "--backbone", "efficientnet_lite0", "--weights", "random",
            "--penalty-dir", str(dtd_root), "--no-maps"]
    for name, extra in (("both", []), ("one", ["--categories", "synth_bottle"])):
        out = tmp_path / name
        subprocess.run([*base, "--score-dir", str(out), "--ckpt-dir", str(out / "ckpt"), *extra], check=True,
                       cwd=run_demo.REPO_ROOT, env=env, capture_output=True)
    for group in ("logi", "struc", "val"):
        f = f"synth_bottle_LGST_{group}_score.npy"
        a, b = np.load(tmp_path / "both" / f), np.load(tmp_path / "one" / f)
        assert a.shape == b.shape and np.ptp(a) > 0
        np.testing.assert_array_equal(a, b)
