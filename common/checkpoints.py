"""Checkpoints and memory banks that know where they came from.

Every checkpoint the methods write carries a `meta` record: method, dataset, category, backbone and weights
sha256 (or RANDOM), the configuration that shapes the model, a fingerprint of the training images, whether
training finished, and the project commit. Loading compares the record with the current run and refuses a
foreign, unfinished or record-less file with one CheckpointError line naming the file, what differs and the fix.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.errors import CheckpointError
from common.io import load_checkpoint
from common.provenance import RANDOM, _plain, git_commit, weights_record

META_KEY = "meta"
META_FORMAT = 1
# Checked between the saved record and the current run, in this order (the commit is recorded, not checked:
# a checkpoint stays usable across commits that do not change its model).
CHECKED = ("method", "dataset", "category", "backbone", "weights_sha256", "train_images")
UNFINISHED_FLAG = "--allow-unfinished"


def images_fingerprint(samples: Sequence[Any]) -> str:
    """'<count>:<sha256 prefix>' of the training image names (relative to their category folder when possible),
    so a checkpoint built on other images is recognised without hashing pixel data."""
    names = []
    for s in samples:
        p = Path(getattr(s, "path", s))
        names.append("/".join(p.parts[-3:]))  # e.g. train/good/000.png: independent of where the dataset lives
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]
    return f"{len(names)}:{digest}"


def checkpoint_meta(*, method: str, dataset: str, category: str, model: Any = None, weights: Mapping | None = None,
                    config: Mapping | None = None, train_samples: Sequence[Any] | None = None,
                    finished: bool = True, **extra) -> dict:
    """The record stored under checkpoint[META_KEY]. `model`: a backbone from models.backbones.load_backbone
    (or pass `weights` = common.provenance.weights_record(...)); `config`: only what shapes the saved model."""
    w = dict(weights) if weights is not None else weights_record(model)
    return {"format": META_FORMAT, "method": method, "dataset": dataset, "category": category,
            "backbone": w.get("backbone"), "weights_sha256": w.get("sha256") or RANDOM, "weights_file": w.get("weights"),
            "train_images": images_fingerprint(train_samples) if train_samples is not None else None,
            "config": _plain(dict(config or {})), "finished": bool(finished), "commit": git_commit(), **_plain(extra)}


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] + "…" if len(s) > 16 and all(c in "0123456789abcdef" for c in s) else s


def differences(saved: Mapping, expected: Mapping) -> list[str]:
    """'<key> <saved> (this run: <current>)' for every checked field and config entry that differs."""
    out = []
    for key in CHECKED:
        a, b = saved.get(key), expected.get(key)
        if b is not None and a != b:
            out.append(f"{key} {_short(a)} (this run: {_short(b)})")
    sc, ec = saved.get("config") or {}, expected.get("config") or {}
    for key in ec:
        if sc.get(key, "<missing>") != ec[key]:
            out.append(f"{key}={sc.get(key, '<missing>')} (this run: {ec[key]})")
    return out


def check_meta(path: str | Path, ckpt: Any, expected: Mapping, *, fix: str, allow_unfinished: bool = False,
               logger: logging.Logger | None = None) -> dict:
    """Refuse `ckpt` (loaded from `path`) unless its record matches `expected` (from checkpoint_meta for the
    current run) and it is finished; `fix` says how to re-create it. Returns the saved record."""
    meta = ckpt.get(META_KEY) if isinstance(ckpt, Mapping) else None
    if not isinstance(meta, Mapping) or meta.get("format") is None:
        raise CheckpointError(f"{path} has no provenance record (written by an older version of this project, or "
                              f"not by it), so it cannot be checked against this run; {fix}")
    diff = differences(meta, expected)
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise CheckpointError(f"{path} was made by another run: {shown}; run with the settings it was made with, "
                              f"or {fix}")
    if not meta.get("finished", False):
        where = meta.get("progress")
        what = f"{path} is from an unfinished run{f' (last saved: {where})' if where else ''}"
        if not allow_unfinished:
            raise CheckpointError(f"{what}; {fix}, or pass {UNFINISHED_FLAG} to use it anyway")
        (logger or logging.getLogger("checkpoints")).warning("%s; used anyway (%s): its numbers are not those of "
                                                             "a finished run", what, UNFINISHED_FLAG)
    return dict(meta)


def load_checked(path: str | Path, expected: Mapping, *, fix: str, allow_unfinished: bool = False,
                 logger: logging.Logger | None = None, map_location: Any = "cpu",
                 missing_hint: str | None = None) -> tuple[dict, dict]:
    """load_checkpoint + check_meta: (checkpoint, saved record). `missing_hint`: what to say if there is no file
    (default `fix`)."""
    if not Path(path).is_file():
        load_checkpoint(path, hint=missing_hint or fix)  # raises MissingCheckpointError
    ckpt = load_checkpoint(path, map_location=map_location, hint=fix)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} is not a checkpoint of this project (it holds a {type(ckpt).__name__}); {fix}")
    meta = check_meta(path, ckpt, expected, fix=fix, allow_unfinished=allow_unfinished, logger=logger)
    return dict(ckpt), meta
