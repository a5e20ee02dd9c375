"""How an output was made: dataset, categories, backbone and weights hash, settings, seed, commit.

A script calls `start_run(...)` once in main(); every writer (score files, checkpoints, tables, figures) then
takes `current()` and stores it beside its output, so any file can be traced back to the run that made it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.errors import RANDOM  # noqa: F401 (one definition, shared with the finiteness checks)

REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Short commit of the checkout, '+dirty' when tracked files changed; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def weights_record(model: Any = None, *, backbone: str | None = None, file: str | None = None,
                   sha256: str | None = None) -> dict:
    """Backbone name, weights file name and sha256 (full) of a model from models.backbones.load_backbone,
    or given explicitly; sha256 'RANDOM' for random weights."""
    if model is not None:
        backbone = backbone or getattr(model, "backbone_name", None)
        file = file or getattr(model, "weights_file", None)
        sha256 = sha256 or getattr(model, "weights_sha256", None)
    return {"backbone": backbone, "weights": Path(file).name if file else None, "sha256": sha256 or RANDOM}


def is_random(record: Mapping | None) -> bool:
    """Random backbone weights. A record without weights (a method with no backbone, e.g. the mean-image
    baseline) is not random."""
    w = (record or {}).get("weights")
    return bool(w) and w.get("sha256", RANDOM) == RANDOM


def _plain(value: Any) -> Any:
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_record(*, method: str, dataset: str, data_root: str | None, categories: list[str] | None,
               weights: Mapping | None = None, fast: bool = False, seed: int | None = None,
               settings: Any = None) -> dict:
    return {"method": method, "dataset": dataset, "data_root": str(data_root) if data_root else None,
            "categories": list(categories) if categories else None, "weights": dict(weights) if weights else None,
            "fast": bool(fast), "seed": seed, "settings": _plain(settings) if settings is not None else None,
            "commit": git_commit()}


_CURRENT: dict | None = None


def start_run(**kwargs) -> dict:
    """Record the run of this process (see run_record); returns the record."""
    global _CURRENT
    _CURRENT = run_record(**kwargs)
    return _CURRENT


def update_run(**fields) -> dict | None:
    """Fill in what is known only later (e.g. the weights once the backbone is loaded)."""
    if _CURRENT is not None:
        _CURRENT.update({k: _plain(v) for k, v in fields.items()})
    return _CURRENT


def current() -> dict | None:
    return None if _CURRENT is None else dict(_CURRENT)


def start_from_args(method: str, args: Any, weights: Mapping | None = None, settings: Any = None,
                    categories: Sequence[str] | None = None) -> dict:
    """start_run from a script's parsed common flags (common.cli.add_common_args): one line in each main().

    weights: weights_record(model); settings: the method's config (default: every flag)."""
    a = vars(args) if not isinstance(args, Mapping) else args
    return start_run(method=method, dataset=a.get("dataset"), data_root=a.get("data_root"),
                     categories=categories if categories is not None else a.get("categories"), weights=weights,
                     fast=bool(a.get("fast")), seed=a.get("seed"),
                     settings=settings if settings is not None else dict(a))


def weights_text(record: Mapping | None) -> str:
    w = (record or {}).get("weights")
    if not w:
        return "no backbone weights"
    if w.get("sha256", RANDOM) == RANDOM:
        return f"{w.get('backbone') or '?'} RANDOM weights"
    return f"{w.get('backbone')} {w.get('weights')} sha256:{str(w.get('sha256'))[:12]}"


def describe(record: Mapping | None) -> str:
    """One line for a table title or a figure caption."""
    if not record:
        return "provenance unknown"
    return f"{record.get('method')} on {record.get('dataset')} ({record.get('data_root')}), {run_text(record)}"


def run_text(record: Mapping | None) -> str:
    """Backbone + weights, settings, seed and commit of one run (no dataset): a table's per-method line."""
    if not record:
        return "provenance unknown (score file written before run records existed)"
    mode = "--fast" if record.get("fast") else "full settings"
    return f"{weights_text(record)}, {mode}, seed {record.get('seed')}, commit {record.get('commit')}"


RANDOM_TITLE = "RANDOM WEIGHTS: numbers not meaningful"


def summary_lines(dataset: str, data_root: Any, categories: Sequence[str] | None,
                  records: Mapping[str, Sequence[Mapping | None]]) -> list[str]:
    """How a table or figure was made: dataset and root, categories, then one line per method (its distinct runs).

    records: method name -> the run records of its score files (None for files without a record)."""
    lines = [f"dataset {dataset} ({data_root if data_root else 'default root'}), categories: "
             f"{', '.join(categories) if categories else 'all'}; evaluated at commit {git_commit()}"]
    for method, recs in records.items():
        texts = list(dict.fromkeys(run_text(r) for r in recs)) or [run_text(None)]
        lines.append(f"{method}: " + (texts[0] if len(texts) == 1 else f"{len(texts)} different runs: " + " | ".join(texts)))
    return lines


def any_random(records: Mapping[str, Sequence[Mapping | None]]) -> bool:
    """True when any score file came from random weights (a missing record is not counted as random)."""
    return any(r is not None and is_random(r) for recs in records.values() for r in recs)
