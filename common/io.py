"""Atomic writes (temp file in the same folder, then rename) and safe checkpoint loading."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from common.errors import CheckpointError


def _read_umask() -> int:
    """The process umask, read once at import. Linux reports it in /proc without changing it; elsewhere it can
    only be read by setting it, done here before any thread writes files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates 0600; the final file gets the mode a plain open() would give (0644 under umask 022),
        # so other accounts (e.g. the official evaluation in a container) can read scores and maps.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, np.asarray(array))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    pass


def checkpoint_bytes(obj: Any) -> bytes:
    """torch.save into memory. Saving to a path would name the archive's records after the (random) temp file,
    so identical objects would give different bytes; an in-memory buffer always uses the same record name."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(path: str | os.PathLike, obj: Any) -> None:
    """torch.save, atomically; the same object always gives the same bytes. `obj` holds tensors and plain Python
    values only (it is loaded back with weights_only=True)."""
    data = checkpoint_bytes(obj)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", hint: str = "") -> Any:
    """torch.load with weights_only=True: a pickle is never executed. Every failure is one CheckpointError line
    naming the file and what to do (`hint`: how to (re-)create it)."""
    import torch

    path = Path(path)
    fix = hint or "re-run the script that writes it"
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint not found: {path}; {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        msg = str(exc)
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in msg or "Unsupported global" in msg:
            what = re.search(r"GLOBAL ([\w.]+)", msg)
            raise CheckpointError(
                f"{path} is not a plain checkpoint: it asks to run pickled Python code"
                f"{' (' + what.group(1) + ')' if what else ''}, so it is not loaded, and it must not be loaded "
                f"unsafely; delete it and {fix}") from None
        first = msg.strip().splitlines()[0].split(". ")[0] if msg.strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt ({first}); delete it and "
                              f"{fix}") from None
