"""The project's user-facing errors and the guard every script's main() runs under.

A UserError is a mistake in the user's input or setup (a missing or corrupt file, a wrong size, an unknown
name, an unwritable folder): its message is one line that names the file and the fix. Scripts print it alone
(no traceback) and exit 1. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """One line for the user: what is wrong, which file, how to fix it."""


class WeightsError(UserError, RuntimeError):
    """A backbone weights file that is missing, truncated, foreign, pickled or not finite."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    pass


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or memory bank that is missing, corrupt, unfinished or from another run."""


class UserExit(SystemExit):
    """SystemExit(1) that still reads as its message, so a caller (or a test) of main() can match on it."""

    def __init__(self, message: str):
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


def guard(main: Callable) -> Callable:
    """Wrap a script's main(): a UserError becomes 'error: <message>' on stderr and exit status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            text = str(exc)
            if "\nOriginal Traceback" in text:  # re-raised from a DataLoader worker: keep the original message
                last = text.rstrip().splitlines()[-1]
                head, _, rest = last.partition(": ")
                text = rest if head.rsplit(".", 1)[-1] == type(exc).__name__ else last
            msg = " ".join(text.split())  # one line, whatever the message holds
            print(f"error: {msg}", file=sys.stderr, flush=True)
            raise UserExit(msg) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None

    return wrapper


# Non-finite numbers (methods.knn re-exports these for the methods)
RANDOM = "RANDOM"  # the weights record of a random-weights backbone (common.provenance re-exports it)


class NonFiniteError(UserError, FloatingPointError):
    """NaN or Inf in features, a memory bank, distances or a training loss, with its cause."""


def _kind(x) -> str:
    import torch

    return "NaN" if bool(torch.isnan(x).any()) else "infinite"


def require_finite(x, what: str, cause: str) -> None:
    """One isfinite reduction over the whole tensor (one host sync); `cause` says where it comes from and the fix."""
    import torch

    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} {'are' if what.endswith('s') else 'is'} {_kind(x)}: {cause}")


def weights_cause(backbone) -> str:
    """Why features can be non-finite when the images are finite: the backbone weights."""
    file = getattr(backbone, "weights_file", None)
    digest = getattr(backbone, "weights_sha256", None)
    if not file or digest in (None, RANDOM):
        return ("the random backbone weights overflow on it (no --weights given); pass the pretrained --weights "
                "file")
    return (f"the backbone weights {file} (sha256 {str(digest)[:12]}…) are corrupt or overflow on it; download "
            "them again")
