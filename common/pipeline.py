"""Run a graph of command-line steps concurrently: a log file per step, wall and CPU time per step, one line on
failure. Used by run_demo.py.

A step starts when every step it names in `after` has succeeded, at most `jobs` at a time, in list order among
the ready ones (so the caller puts the longest chains first). A failed step cancels the running ones (SIGTERM
to their process groups) and nothing new starts; the caller turns the failure into one line.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


@dataclass
class Step:
    name: str
    cmd: list[str]
    after: tuple[str, ...] = ()


@dataclass
class StepResult:
    name: str
    status: str  # "ok" | "failed" | "cancelled" | "not run"
    returncode: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system of the step's process and the children it waited for
    log: Path | None = None
    cmd: list[str] = field(default_factory=list)


def check_graph(steps: Sequence[Step]) -> list[Step]:
    """Unique names, known predecessors, no cycle (a programming error, not a user's). Returns the steps in
    dependency order (each ready group in list order)."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate step names in {names}")
    known = set(names)
    for s in steps:
        missing = [a for a in s.after if a not in known]
        if missing:
            raise ValueError(f"step {s.name} waits for unknown steps {missing}")
    done: set[str] = set()
    order: list[Step] = []
    pending = list(steps)
    while pending:
        ready = [s for s in pending if set(s.after) <= done]
        if not ready:
            raise ValueError(f"steps {[s.name for s in pending]} wait for each other (a cycle)")
        order += ready
        done.update(s.name for s in ready)
        pending = [s for s in pending if s.name not in done]
    return order


def last_lines(path: Path, n: int = 15) -> list[str]:
    """The last n lines of a log as a terminal shows them: progress bars redraw with '\\r', keep the last draw."""
    try:
        data = path.read_bytes()[-64_000:].decode("utf-8", "replace")
    except OSError:
        return []
    lines = [ln.rsplit("\r", 1)[-1].rstrip() for ln in data.replace("\r\n", "\n").split("\n")]
    return [ln for ln in lines if ln.strip()][-n:]


def log_name(step: str) -> str:
    """A plain file name for a step's log ("CSAD:synth_box" -> "CSAD.synth_box.log", MAD's "a/b" -> "a__b")."""
    return step.replace("/", "__").replace(":", ".") + ".log"


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_steps(steps: Sequence[Step], *, jobs: int, log_dir: str | os.PathLike, env: dict | None = None,
              cwd: str | os.PathLike | None = None, echo: Callable[[str], None] = print,
              heartbeat_s: float = 60.0, poll_s: float = 0.2) -> list[StepResult]:
    """Run `steps`; returns one StepResult per step, in the given order."""
    check_graph(steps)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {s.name: StepResult(s.name, "not run", log=log_dir / log_name(s.name), cmd=list(s.cmd)) for s in steps}
    pending = list(steps)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    done_ok: set[str] = set()
    failed = False
    last_beat = time.monotonic()

    def start(step: Step) -> None:
        log_file = open(results[step.name].log, "wb")
        echo(f"[start] {step.name}: {' '.join(step.cmd[1:])}")
        # own process group, so that a cancel also stops the step's workers
        proc = subprocess.Popen(step.cmd, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        running[step.name] = (proc, time.monotonic(), log_file)

    def reap(name: str, block: bool) -> bool:
        proc, t0, log_file = running[name]
        pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        log_file.close()
        r = results[name]
        r.returncode, r.wall_s = proc.returncode, time.monotonic() - t0
        r.cpu_s = usage.ru_utime + usage.ru_stime
        del running[name]
        return True

    def cancel_running() -> None:
        for proc, _, _ in running.values():
            _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name in list(running):
            while not reap(name, block=False):
                if time.monotonic() > deadline:
                    _kill_group(running[name][0], signal.SIGKILL)
                    reap(name, block=True)
                    break
                time.sleep(poll_s)
            results[name].status = "cancelled"
            echo(f"[cancelled] {name} after {results[name].wall_s:.1f} s")

    try:
        while pending or running:
            if not failed:
                for step in [s for s in pending if set(s.after) <= done_ok]:
                    if len(running) >= max(1, jobs):
                        break
                    pending.remove(step)
                    start(step)
            for name in list(running):
                if not reap(name, block=False):
                    continue
                r = results[name]
                if r.returncode == 0:
                    r.status = "ok"
                    done_ok.add(name)
                    echo(f"[done] {name}: {r.wall_s:.1f} s wall, {r.cpu_s:.1f} s CPU")
                else:
                    r.status = "failed"
                    echo(f"[FAILED] {name}: exit {r.returncode} after {r.wall_s:.1f} s; last lines of {r.log}:")
                    for line in last_lines(r.log):
                        echo(f"  {name} | {line}")
                    failed = True
            if failed:
                cancel_running()
                break
            if pending and not running and not [s for s in pending if set(s.after) <= done_ok]:
                break  # cannot happen after check_graph; guards against an endless loop
            if running and time.monotonic() - last_beat >= heartbeat_s:
                last_beat = time.monotonic()
                for name, (_, t0, _) in running.items():
                    tail = last_lines(results[name].log, 1)
                    echo(f"[running] {name} {time.monotonic() - t0:.0f} s: {tail[0][:110] if tail else ''}")
            time.sleep(poll_s)
    except BaseException:  # Ctrl-C or an internal error: never leave steps running behind us
        for proc, _, _ in running.values():
            _kill_group(proc, signal.SIGKILL)
        for name in list(running):
            reap(name, block=True)
            results[name].status = "cancelled"
        raise
    return [results[s.name] for s in steps]


def timing_table(results: Sequence[StepResult], total_wall_s: float) -> list[str]:
    """Lines: step, status, wall and CPU seconds; the total CPU is the sum over steps."""
    lines = [f"{'step':>16s}  {'wall s':>7s}  {'CPU s':>7s}  status"]
    for r in results:
        lines.append(f"{r.name:>16s}  {r.wall_s:7.1f}  {r.cpu_s:7.1f}  {r.status}")
    lines.append(f"{'total':>16s}  {total_wall_s:7.1f}  {sum(r.cpu_s for r in results):7.1f}")
    return lines
