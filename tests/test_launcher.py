"""The submitit launcher (common/launcher.py): jobs through submitit's local executor in dependency order, one line
per failed step, --skip-done, the SLURM job parameters, and one run_demo table through `--launcher local`."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import run_demo
from common.launcher import LaunchOptions, dependency_ids, launch_steps, slurm_parameters, status_path
from common.pipeline import Step

pytest.importorskip("submitit")

PY = sys.executable


def write(path, check=None) -> list[str]:
    """A step that writes `path`, after checking (exit 3 otherwise) that `check` exists."""
    code = "import pathlib, sys\n"
    if check:
        code += f"if not pathlib.Path({str(check)!r}).exists(): sys.exit(3)\n"
    code += f"pathlib.Path({str(path)!r}).write_text('x'); print('wrote', {str(path)!r})"
    return [PY, "-c", code]


def opts(tmp_path, **kw) -> LaunchOptions:
    return LaunchOptions("local", tmp_path / "logs", cwd=str(tmp_path), jobs=2, poll_s=0.05, **kw)


def test_local_jobs_keep_the_order_and_a_failure_stops_only_its_dependents(tmp_path):
    steps = [Step("a", write(tmp_path / "a")), Step("b", write(tmp_path / "b", check=tmp_path / "a"), ("a",)),
             Step("bad", [PY, "-c", "import sys; print('error: no such folder /x', file=sys.stderr); sys.exit(2)"]),
             Step("after_bad", write(tmp_path / "after_bad"), ("bad",)),
             Step("d", write(tmp_path / "d"))]
    lines: list[str] = []
    res = {r.name: r for r in launch_steps(steps, opts(tmp_path), echo=lines.append)}
    assert {n: r.status for n, r in res.items()} == {"a": "ok", "b": "ok", "bad": "failed", "after_bad": "not run",
                                                     "d": "ok"}, lines
    assert res["bad"].returncode == 2 and res["b"].returncode == 0
    assert (tmp_path / "b").exists() and (tmp_path / "d").exists() and not (tmp_path / "after_bad").exists()
    assert (tmp_path / "logs" / "b.log").read_text().strip() == f"wrote {tmp_path / 'b'}"  # the step's own log
    assert json.loads(status_path(tmp_path / "logs", "bad").read_text())["returncode"] == 2
    assert "  bad | error: no such folder /x" in lines
    # b was submitted only after a's job had finished (and b itself checked that a's file was there)
    first = {tag: next(i for i, ln in enumerate(lines) if ln.startswith(tag))
             for tag in ("[done] a:", "[submitted] b ")}
    assert first["[done] a:"] < first["[submitted] b "]


def test_local_jobs_start_in_the_callers_order(tmp_path):
    """The caller lists the longest chains first: with one job at a time, b (after a) starts before c, which was
    ready from the start."""
    steps = [Step("a", write(tmp_path / "a")), Step("b", write(tmp_path / "b"), ("a",)),
             Step("c", write(tmp_path / "c"))]
    lines: list[str] = []
    launch_steps(steps, LaunchOptions("local", tmp_path / "logs", cwd=str(tmp_path), jobs=1, poll_s=0.05),
                 echo=lines.append)
    assert [ln.split()[1] for ln in lines if ln.startswith("[submitted]")] == ["a", "b", "c"]


def test_skip_done_reruns_only_what_did_not_finish(tmp_path):
    steps = [Step("a", write(tmp_path / "a")), Step("b", write(tmp_path / "b", check=tmp_path / "a"), ("a",)),
             Step("c", write(tmp_path / "c"))]
    assert all(r.status == "ok" for r in launch_steps(steps, opts(tmp_path), echo=lambda _: None))
    for name in "abc":
        (tmp_path / name).unlink()
    status_path(tmp_path / "logs", "a").unlink()  # as if a had failed: a and its dependent b run again, c not
    lines: list[str] = []
    res = {r.name: r.status for r in launch_steps(steps, opts(tmp_path, skip_done=True), echo=lines.append)}
    assert res == {"a": "ok", "b": "ok", "c": "ok"}
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("[skipped]")] == ["[skipped] c"]
    # a changed command is not "done"
    changed = [steps[0], steps[1], Step("c", [*write(tmp_path / "c"), "--changed"])]
    launch_steps(changed, opts(tmp_path, skip_done=True), echo=lambda _: None)
    assert (tmp_path / "c").exists()


def test_slurm_job_parameters_and_dependencies(tmp_path, monkeypatch):
    """What each SLURM job is submitted with, checked by submitit's own sbatch writer (no cluster here)."""
    from submitit.slurm.slurm import _make_sbatch_string

    monkeypatch.setattr(run_demo, "DTD_ROOT", tmp_path / "no_dtd")  # the same graph with or without DTD here
    monkeypatch.setattr(run_demo, "PENALTY_ROOT", tmp_path / "no_penalty")
    args = run_demo.parse_args(["--dataset", "synthetic_loco", "--weights", "random", "--launcher", "slurm"])
    steps = {s.name: s for s in run_demo.build_steps(args, split=run_demo.METHOD_STEPS)}
    ids = {name: str(1000 + i) for i, name in enumerate(steps)}
    # one job per (method, category); a category's segmentor waits for that category's pseudo-labels only
    assert {"pseudo_label:synth_box", "train_segmentor:synth_box", "CSAD:synth_bottle", "glass:synth_box",
            "sapatchcore:synth_bottle", "mean_image:synth_box"} <= set(steps)
    assert steps["train_segmentor:synth_box"].after == ("generate", "textures", "pseudo_label:synth_box")
    o = LaunchOptions("slurm", tmp_path, cwd=str(tmp_path), partition="P", gpus_per_job=1, cpus_per_job=8,
                      time_min=600, slurm_params={"account": "proj"})
    seg = steps["train_segmentor:synth_box"]
    params = slurm_parameters(seg, o, dependency_ids(seg, ids))
    want = f"afterok:{ids['generate']}:{ids['textures']}:{ids['pseudo_label:synth_box']}"
    assert params["dependency"] == want
    sbatch = _make_sbatch_string(command="run", folder=tmp_path, **params).splitlines()
    for line in ("#SBATCH --partition=P", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --time=600", "#SBATCH --job-name=train_segmentor.synth_box", "#SBATCH --account=proj",
                 f"#SBATCH --dependency={want}",
                 "#SBATCH --kill-on-invalid-dep=yes"):
        assert line in sbatch, (line, sbatch)
    bench = steps["benchmark"]
    params = slurm_parameters(bench, o, dependency_ids(bench, ids))
    waits = params["dependency"].removeprefix("afterok:").split(":")
    assert sorted(waits) == sorted(ids[n] for n in bench.after) and ids["CSAD:synth_box"] in waits
    assert "gpus_per_node" not in params  # the benchmark only reads score files
    first = slurm_parameters(steps["generate"], o, dependency_ids(steps["generate"], {}))
    assert "dependency" not in first and "kill-on-invalid-dep" not in first.get("additional_parameters", {})
    # a skipped (already done) predecessor is not waited for
    assert dependency_ids(seg, {"generate": "7"}) == ["7"]


def test_slurm_launcher_without_slurm_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/srun
    with pytest.raises(SystemExit) as exc:
        run_demo.main(["--weights", "random", "--launcher", "slurm", "--partition", "P", "--steps", "mean_image",
                       "--results-dir", str(tmp_path / "r"), "--score-dir", str(tmp_path / "s"), "--ckpt-dir",
                       str(tmp_path / "c"), "--data-root", str(tmp_path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --launcher slurm needs sbatch and srun on PATH")


def test_run_demo_local_launcher_runs_the_table(synthetic_root, tmp_path, capsys):
    """The synthetic table through submitit's local executor: one job per (method, category), then the benchmark,
    which reads the jobs' score files; --skip-done then reruns only the job whose status was lost."""
    out = tmp_path
    argv = ["--launcher", "local", "--data-root", str(synthetic_root), "--steps", "mean_image", "benchmark",
            "--weights", "random", "--score-dir", str(out / "s"), "--ckpt-dir", str(out / "c"), "--results-dir",
            str(out / "r"), "--masks-root", str(out / "m"), "--jobs", "2"]
    run_demo.main(argv)
    logs = out / "r" / "logs"
    steps = json.loads((logs / "steps.json").read_text())["steps"]
    assert {s["name"]: s["status"] for s in steps} == {"mean_image:synth_box": "ok", "mean_image:synth_bottle": "ok",
                                                       "benchmark": "ok"}
    for cat in ("synth_box", "synth_bottle"):
        rec = json.loads(status_path(logs, f"mean_image:{cat}").read_text())
        assert rec["returncode"] == 0 and rec["cmd"][rec["cmd"].index("--categories") + 1:] == [cat]
    table = json.loads((out / "r" / "benchmark_synthetic_loco.json").read_text())["mean_image"]
    assert set(table) >= {"synth_box", "synth_bottle"}
    assert 0 <= table["synth_box"]["classification"]["auc_roc"]["mean"] <= 1
    assert "| synth_bottle | mean_image |" in capsys.readouterr().out  # run_demo printed the benchmark's table

    box = sorted((out / "s").glob("synth_box_mean_image_*score.npy"))
    bottle = sorted((out / "s").glob("synth_bottle_mean_image_*score.npy"))
    assert box and bottle
    before = {p: p.stat().st_mtime_ns for p in box + bottle}
    kept = {p: np.load(p) for p in box}
    status_path(logs, "mean_image:synth_box").unlink()  # as if that job had failed
    run_demo.main([*argv, "--skip-done"])
    steps = {s["name"]: s for s in json.loads((logs / "steps.json").read_text())["steps"]}
    assert all(s["status"] == "ok" for s in steps.values())
    assert all(p.stat().st_mtime_ns == before[p] for p in bottle)  # not rerun
    assert all(p.stat().st_mtime_ns != before[p] for p in box)  # rerun, same scores (seeded)
    for p in box:
        np.testing.assert_array_equal(np.load(p), kept[p])
    printed = capsys.readouterr().out
    assert "[skipped] mean_image:synth_bottle" in printed and "[submitted] benchmark" in printed


def test_failed_jobs_give_one_line_each_and_exit_1(tmp_path, monkeypatch, capsys):
    def fake_steps(args, py=PY, jobs=1, split=None):
        fail = "import sys; print('error: dataset root not found: /{}', file=sys.stderr); sys.exit(1)"
        return [Step("sinbad:synth_box", [PY, "-c", fail.format("box")]), Step("glass", [PY, "-c", "pass"]),
                Step("sinbad:synth_bottle", [PY, "-c", fail.format("bottle")]),
                Step("benchmark", [PY, "-c", "pass"], ("sinbad:synth_box", "glass", "sinbad:synth_bottle"))]

    monkeypatch.setattr(run_demo, "build_steps", fake_steps)
    with pytest.raises(SystemExit) as exc:
        run_demo.main(["--weights", "random", "--launcher", "local", "--results-dir", str(tmp_path / "res"),
                       "--score-dir", str(tmp_path / "s"), "--ckpt-dir", str(tmp_path / "c")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    logs = tmp_path / "res" / "logs"
    assert err == [f"error: step sinbad:synth_box failed (exit 1): dataset root not found: /box; its log: "
                   f"{logs / 'sinbad.synth_box.log'}",
                   f"error: step sinbad:synth_bottle failed (exit 1): dataset root not found: /bottle; its log: "
                   f"{logs / 'sinbad.synth_bottle.log'}"]
    steps = {s["name"]: s["status"] for s in json.loads((logs / "steps.json").read_text())["steps"]}
    assert steps == {"sinbad:synth_box": "failed", "glass": "ok", "sinbad:synth_bottle": "failed",
                     "benchmark": "not run"}
