"""Run run_demo's step graph as submitit jobs: one job per step (per (method, category) when the graph is split),
on SLURM (`--launcher slurm`) or on this machine through submitit's local executor (`--launcher local`).

Each job runs its step's command with the step's log file, then writes `<log_dir>/<step>.status.json` (command,
exit status, wall and CPU seconds) and fails when the command failed, so that SLURM's `afterok` keeps its
dependents from starting. A failed job does not stop the independent ones: every job writes its own score
files, and `--skip-done` reruns only what did not finish (a step is skipped when its status file holds exit 0 for
the same command and none of its predecessors runs again).

SLURM: every job is submitted at once in dependency order, each with `--dependency=afterok:<ids>` and
`--kill-on-invalid-dep=yes` (a job whose predecessor failed is cancelled instead of pending forever); this process
then waits for them. Local: a job is submitted when its predecessors have succeeded, at most `jobs` at a time.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from common.errors import UserError
from common.pipeline import Step, StepResult, check_graph, last_lines, log_name

NO_GPU_STEPS = ("generate", "textures", "benchmark")  # data generation and scoring files: CPU only


@dataclass
class LaunchOptions:
    launcher: str  # "local" | "slurm"
    log_dir: Path
    cwd: str
    env: dict = field(default_factory=dict)  # set on top of the job's own environment (thread counts)
    jobs: int = 1  # local: jobs at once
    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    time_min: int = 2880
    slurm_params: dict = field(default_factory=dict)  # any other sbatch option, e.g. {"account": "x"}
    skip_done: bool = False
    poll_s: float = 0.5
    heartbeat_s: float = 300.0


def status_path(log_dir: Path, step: str) -> Path:
    return Path(log_dir) / (log_name(step)[: -len(".log")] + ".status.json")


def run_step_job(name: str, cmd: list[str], *, cwd: str, env: dict, log: str, status: str) -> int:
    """The body of one job (runs on the compute node): the step's command, its log, its status file.
    Standard library only, so that unpickling the job needs nothing beyond this module."""
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, **env), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        _, wait_status, usage = os.wait4(proc.pid, 0)
    rc = proc.returncode = os.waitstatus_to_exitcode(wait_status)
    record = {"name": name, "cmd": cmd, "returncode": rc, "wall_s": time.monotonic() - t0,
              "cpu_s": usage.ru_utime + usage.ru_stime, "host": os.uname().nodename}
    tmp = f"{status}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, status)
    if rc != 0:
        raise RuntimeError(f"step {name} exited with status {rc}; its log: {log}")
    return rc


def _gpus(step: Step, opts: LaunchOptions) -> int:
    return 0 if step.name.split(":")[0] in NO_GPU_STEPS else opts.gpus_per_job


def slurm_parameters(step: Step, opts: LaunchOptions, dependency_ids: Sequence[str] = ()) -> dict:
    """The SlurmExecutor.update_parameters() keywords of one step's job (kept apart so that they can be checked
    without a cluster)."""
    gpus = _gpus(step, opts)
    params: dict = {"job_name": step.name.replace(":", "."), "time": int(opts.time_min), "nodes": 1,
                    "ntasks_per_node": 1, "stderr_to_stdout": True}
    if opts.partition:
        params["partition"] = opts.partition
    if gpus:
        params["gpus_per_node"] = gpus
    if opts.cpus_per_job:
        params["cpus_per_task"] = opts.cpus_per_job
    extra = dict(opts.slurm_params)
    if dependency_ids:
        params["dependency"] = "afterok:" + ":".join(dependency_ids)
        extra.setdefault("kill-on-invalid-dep", "yes")
    if extra:
        params["additional_parameters"] = extra
    return params


def dependency_ids(step: Step, submitted: dict[str, str]) -> list[str]:
    """The job ids a step's SLURM job waits for: its predecessors submitted in this launch (a skipped one is done)."""
    return [submitted[a] for a in step.after if a in submitted]


def local_parameters(step: Step, opts: LaunchOptions) -> dict:
    gpus = _gpus(step, opts)
    # the local executor's own default time limit is 2 minutes
    params = {"timeout_min": int(opts.time_min), "gpus_per_node": gpus, "tasks_per_node": 1, "nodes": 1,
              "stderr_to_stdout": True}
    # it sets CUDA_VISIBLE_DEVICES=0..n-1 itself: keep the devices the caller's CUDA_VISIBLE_DEVICES chose
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(" ", "").split(",")
    if gpus and all(v.isdigit() for v in visible):
        params["visible_gpus"] = tuple(int(v) for v in visible)
    return params


def _job_python() -> str:
    """The interpreter line submitit runs the job with: this one, with the repository importable (the job
    unpickles run_step_job from common.launcher whatever the folder it starts in)."""
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    return shlex.join(["env", f"PYTHONPATH={path}", sys.executable])


def make_executor(opts: LaunchOptions):
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher needs the submitit package; install it with: .venv/bin/pip install "
                        "submitit==1.5.4 (it is in requirements.txt)") from None
    folder = opts.log_dir / "submitit"  # submitit's own files: pickled job, its stdout, its result
    if opts.launcher == "slurm":
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise UserError("--launcher slurm needs sbatch and srun on PATH: run it on a SLURM login node, or use "
                            "--launcher local to run the same jobs on this machine")
        return submitit.SlurmExecutor(folder=folder, max_num_timeout=0, python=_job_python())
    return submitit.LocalExecutor(folder=folder, max_num_timeout=0, python=_job_python())


def _read_status(log_dir: Path, step: str) -> dict | None:
    """A step's status file; None where it is missing or unreadable."""
    try:
        return json.loads(status_path(log_dir, step).read_text())
    except (OSError, ValueError):
        return None


def _previous_ok(step: Step, opts: LaunchOptions) -> dict | None:
    record = _read_status(opts.log_dir, step.name)
    if record is None:
        return None
    return record if record.get("returncode") == 0 and record.get("cmd") == list(step.cmd) else None


def launch_steps(steps: Sequence[Step], opts: LaunchOptions, echo: Callable[[str], None] = print,
                 executor=None) -> list[StepResult]:
    """Run `steps` as submitit jobs; one StepResult per step, in the given order. Failed steps are "failed", their
    dependents "not run"; skipped steps (--skip-done) are "ok" with the times of their earlier run."""
    order = check_graph(steps)
    opts.log_dir = Path(opts.log_dir)
    opts.log_dir.mkdir(parents=True, exist_ok=True)
    results = {s.name: StepResult(s.name, "not run", log=opts.log_dir / log_name(s.name), cmd=list(s.cmd))
               for s in steps}
    by_name = {s.name: s for s in steps}
    rerun: set[str] = set()
    for s in order:  # skip a step only when it is done and nothing before it runs again
        prev = _previous_ok(s, opts) if opts.skip_done else None
        if prev is None or any(a in rerun for a in s.after):
            rerun.add(s.name)
        else:
            r = results[s.name]
            r.status, r.returncode, r.wall_s, r.cpu_s = "ok", 0, prev.get("wall_s", 0.0), prev.get("cpu_s", 0.0)
            echo(f"[skipped] {s.name}: done in an earlier launch ({status_path(opts.log_dir, s.name)})")
    todo = [s for s in order if s.name in rerun]
    for s in todo:  # a stale status file must never be read as this launch's
        status_path(opts.log_dir, s.name).unlink(missing_ok=True)
    if not todo:
        return [results[s.name] for s in steps]
    executor = executor or make_executor(opts)
    jobs: dict[str, object] = {}
    submitted_at: dict[str, float] = {}

    def submit(step: Step, dependency_ids: Sequence[str] = ()) -> None:
        params = (slurm_parameters(step, opts, dependency_ids) if opts.launcher == "slurm"
                  else local_parameters(step, opts))
        try:
            executor.update_parameters(**params)
        except ValueError as exc:  # submitit's check of the job parameters (e.g. more GPUs than visible)
            raise UserError(f"job parameters for step {step.name} rejected by submitit: "
                            f"{str(exc).splitlines()[0]}; check --gpus-per-job/--slurm-param") from None
        job = executor.submit(run_step_job, step.name, list(step.cmd), cwd=str(opts.cwd), env=dict(opts.env),
                              log=str(results[step.name].log), status=str(status_path(opts.log_dir, step.name)))
        jobs[step.name] = job
        submitted_at[step.name] = time.monotonic()
        echo(f"[submitted] {step.name} (job {job.job_id}): {' '.join(step.cmd[1:])}")

    def finish(name: str) -> None:
        r = results[name]
        record = _read_status(opts.log_dir, name)
        if record is not None:
            r.returncode, r.wall_s, r.cpu_s = record["returncode"], record["wall_s"], record["cpu_s"]
            r.status = "ok" if r.returncode == 0 else "failed"
        elif any(results[a].status in ("failed", "not run", "cancelled") for a in by_name[name].after):
            r.status = "not run"  # SLURM cancelled it: a predecessor failed
        else:  # the job died before its step ended: time limit, node failure, scancel
            job = jobs[name]
            r.status, r.wall_s = "failed", time.monotonic() - submitted_at[name]
            r.log = Path(job.paths.stdout)
            echo(f"[FAILED] {name}: job {job.job_id} ended in state {job.state} without finishing its step")
            return
        if r.status == "ok":
            echo(f"[done] {name}: {r.wall_s:.1f} s wall, {r.cpu_s:.1f} s CPU")
        else:
            echo(f"[FAILED] {name}: exit {r.returncode} after {r.wall_s:.1f} s; last lines of {r.log}:")
            for line in last_lines(r.log):
                echo(f"  {name} | {line}")

    pending = list(todo)
    running: set[str] = set()
    dropped: set[str] = set()
    last_beat = time.monotonic()
    try:
        if opts.launcher == "slurm":
            for s in pending:  # in dependency order: a job's predecessors already have their SLURM ids
                submit(s, dependency_ids(s, {n: j.job_id for n, j in jobs.items()}))
                running.add(s.name)
            pending = []
        while pending or running:
            for s in [p for p in todo if p in pending]:  # dependency order: a dropped predecessor is seen first
                if any(results[a].status == "failed" or a in dropped for a in s.after):
                    pending.remove(s)  # a predecessor failed: it stays "not run"
                    dropped.add(s.name)
            for s in [p for p in steps if p in pending]:  # the caller's order: the longest chains first
                if len(running) >= max(1, opts.jobs):
                    break
                if all(results[a].status == "ok" for a in s.after):
                    pending.remove(s)
                    submit(s)
                    running.add(s.name)
            for name in [s.name for s in todo if s.name in running and jobs[s.name].done()]:
                running.discard(name)  # in dependency order: a predecessor is settled before its dependents
                finish(name)
            if running and time.monotonic() - last_beat >= opts.heartbeat_s:
                last_beat = time.monotonic()
                states = ", ".join(f"{n} {jobs[n].state}" for n in sorted(running))
                echo(f"[waiting] {len(running)} job(s): {states}")
            if not running and pending and not any(all(results[a].status == "ok" for a in s.after)
                                                   for s in pending):
                break  # cannot happen after the removal above; guards against an endless loop
            if running:
                time.sleep(opts.poll_s)
    except BaseException:  # Ctrl-C or a refused submission: no job of this launch may run on behind our back
        for name in running:
            try:
                jobs[name].cancel(check=False)
            except Exception:
                pass
            results[name].status = "cancelled"
        raise
    return [results[s.name] for s in steps]


def options_from_args(args, log_dir: Path, jobs: int, env: dict, cwd) -> LaunchOptions:
    """run_demo's flags as LaunchOptions; the thread counts of `env` go to every job."""
    gpus = args.gpus_per_job
    if gpus is None:  # local: the GPU this machine has, as the in-process scheduler would use it
        gpus = 1 if args.launcher == "slurm" else min(1, _visible_gpus())
    if gpus < 0 or (args.cpus_per_job is not None and args.cpus_per_job < 1) or args.job_time < 1:
        raise UserError("--gpus-per-job must be at least 0, --cpus-per-job and --job-time at least 1")
    keep = ("PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return LaunchOptions(launcher=args.launcher, log_dir=Path(log_dir), cwd=str(cwd),
                         env={k: env[k] for k in keep if k in env}, jobs=jobs, partition=args.partition,
                         gpus_per_job=gpus, cpus_per_job=args.cpus_per_job, time_min=args.job_time,
                         slurm_params=dict(kv.split("=", 1) for kv in args.slurm_param), skip_done=args.skip_done,
                         poll_s=10.0 if args.launcher == "slurm" else 0.5)  # submitit caches sacct calls anyway


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
