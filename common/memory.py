"""Peak memory and time per named stage of a run (read data, fit, save, predict, write), for the paper-scale
rehearsal (benchmarks/rehearse.py) and docs/speed.md.

    with stage("fit"):
        model.fit(train)

Off unless enabled (`enable()` or the AD_STAGE_LOG environment variable naming a JSON-lines file): then a
background thread samples this process's resident set size every 20 ms, so each stage gets its own peak (the
kernel's ru_maxrss only grows over the whole process), and on CUDA the stage's max_memory_allocated.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

ENV = "AD_STAGE_LOG"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class _Sampler(threading.Thread):
    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True, name="rss-sampler")
        self.interval, self.peak, self._stop_event = interval, rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def reset(self) -> int:
        now = rss_bytes()
        self.peak = now
        return now

    def stop(self) -> None:
        self._stop_event.set()


class StageMeter:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self._sampler: _Sampler | None = None
        self._path: Path | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._sampler is not None

    def enable(self, path: str | os.PathLike | None = None) -> None:
        if self._sampler is None:
            self._sampler = _Sampler()
            self._sampler.start()
        if path:
            self._path = Path(path)

    @contextlib.contextmanager
    def stage(self, name: str, **info) -> Iterator[dict]:
        """Time and peak memory of the block; `info` (e.g. category, images) is stored with the record."""
        rec: dict = {"stage": name, **info}
        if self._sampler is None:
            yield rec
            return
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with self._lock:  # stages do not nest across threads; the peak is the process's
            start_rss = self._sampler.reset()
        t0 = time.perf_counter()
        try:
            yield rec
        finally:
            if cuda:
                torch.cuda.synchronize()
            rec["seconds"] = time.perf_counter() - t0
            end = rss_bytes()
            rec["rss_start_mb"] = start_rss / 2 ** 20
            rec["rss_end_mb"] = end / 2 ** 20
            rec["peak_rss_mb"] = max(self._sampler.peak, end) / 2 ** 20
            if cuda:
                rec["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
            self.records.append(rec)
            if self._path is not None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                with open(self._path, "a") as fh:  # one line per stage: a crash keeps what was measured
                    fh.write(json.dumps(rec) + "\n")


METER = StageMeter()
if os.environ.get(ENV):
    METER.enable(os.environ[ENV])


def stage(name: str, **info):
    """Context manager: measure the block as stage `name` (a no-op unless enabled)."""
    return METER.stage(name, **info)


def enable(path: str | os.PathLike | None = None) -> StageMeter:
    METER.enable(path)
    return METER
