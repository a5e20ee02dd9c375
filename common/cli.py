"""Flags every method script shares, so the demo and the README can drive all scripts alike."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("AD_SHARED_DIR", REPO_ROOT.parent / "shared"))


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


def resolve_categories(args: argparse.Namespace) -> list[str]:
    from dataset_readers import list_categories

    return list(args.categories) if args.categories else list_categories(args.dataset, args.data_root)
