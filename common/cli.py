"""Flags every method script shares, so the demo and the README can drive all scripts alike."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("AD_SHARED_DIR", REPO_ROOT.parent / "shared"))


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """The parser every script starts from. allow_abbrev=False: '--iter 5 --see 3' must be refused, not silently
    read as '--iterations 5 --seed 3'."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


def ensure_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create `path` and prove it is writable (write + delete a probe file) before any expensive work, so an
    unwritable --score-dir fails in a second instead of after training. Returns the folder."""
    from common.errors import UserError

    folder = Path(path).expanduser()
    try:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{flag} {folder} is a file, not a folder; pass a folder path to {flag}")
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        fix = ("a part of that path is a file" if isinstance(exc, (NotADirectoryError, FileExistsError)) else
               "fix its permissions")
        raise UserError(f"{flag} {folder} is not writable ({reason}); {fix}, or pass another {flag}") from None
    return folder


def add_common_args(parser: argparse.ArgumentParser, dataset: str, categories: list[str] | None,
                    backbone: str = "wide_resnet50_2", seed: int = 0) -> argparse.ArgumentParser:
    """dataset/categories/seed defaults come from the constants at the top of each script."""
    g = parser.add_argument_group("common")
    g.add_argument("--dataset", default=dataset, help="dataset name (see dataset_readers.registry.DATASETS)")
    g.add_argument("--data-root", default=None, help="dataset root; default: the dataset's folder under datasets/")
    g.add_argument("--categories", nargs="+", default=categories, help="categories to run; default: all")
    g.add_argument("--backbone", default=backbone, help="backbone name (models.backbones.BACKBONES)")
    g.add_argument("--weights", default=None,
                   help="backbone weights file; default ckpt/<official file name>; 'random' for a smoke test")
    g.add_argument("--fast", action="store_true", help="tiny resolution and iteration counts (tests and demo)")
    g.add_argument("--seed", type=int, default=seed)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--score-dir", default=str(REPO_ROOT / "anomaly_score"))
    g.add_argument("--ckpt-dir", default=str(REPO_ROOT / "ckpt"))
    return parser


def resolve_categories(args: argparse.Namespace, check: bool = False) -> list[str]:
    """--categories or every category of the dataset. check: also refuse a missing dataset root or an unknown
    category now, before weights are loaded (read_category would refuse them later, after that work)."""
    from dataset_readers import list_categories
    from dataset_readers.base import DatasetError
    from dataset_readers.registry import DATASETS, dataset_root

    categories = list(args.categories) if args.categories else list_categories(args.dataset, args.data_root)
    if check:
        root = dataset_root(args.dataset, args.data_root)  # an unknown --dataset is refused here
        if not root.is_dir():
            raise DatasetError(f"dataset root not found: {root} (get {args.dataset} from "
                               f"{DATASETS[args.dataset].url}, or pass --data-root)")
        known = list_categories(args.dataset, args.data_root)
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise DatasetError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                               f"{', '.join(repr(c) for c in unknown)} for {args.dataset} under {root}; choose "
                               f"from: {', '.join(known)}")
        if not categories:
            raise DatasetError(f"no category folders under {root}; check --data-root")
    return categories


def ensure_output_dirs(args: argparse.Namespace, *names: str) -> None:
    """ensure_writable_dir for each named output flag of `args` (e.g. "score_dir", "ckpt_dir") that is set."""
    for name in names:
        value = getattr(args, name, None)
        if value:
            ensure_writable_dir(value, "--" + name.replace("_", "-"))
