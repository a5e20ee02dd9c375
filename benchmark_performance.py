"""Turn the score files of every method into the papers' tables (logic in evaluation/benchmark.py).

MVTec LOCO-style datasets: logical / structural / mean image AUROC per category and experiment, AU-sPRO (all
official FPR limits) where TIFF maps exist. Other datasets: image AUROC, pixel AUROC, AU-PRO@0.3, F1-max.
Fusion: trimmed-z-normalised branch scores summed, every subset of CSAD's and SINBAD's branches, plus --pairs.

    python benchmark_performance.py                                   # constants below
    python benchmark_performance.py --dataset mvtec_loco --data-root D --pairs CSAD+SINBAD
    python benchmark_performance.py --official-image-score            # map max + the official LOCO tie rule
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import guard
from common.official import add_official_switch
from evaluation import metrics as M
from evaluation.benchmark import Config, run

REPO_ROOT = Path(__file__).resolve().parent
DATASET = "synthetic_loco"
ROOT = None  # None: the dataset's default folder under datasets/
CATEGORIES = None  # None: every category of the dataset
METHODS = ["patchhist", "LGST", "sinbad", "glass", "patchcore", "sapatchcore", "mean_image"]
PAIRS: list[str] = []  # cross-method fusions, e.g. ["CSAD+SINBAD"]
SCORE_DIR = REPO_ROOT / "anomaly_score"
OUT_DIR = REPO_ROOT / "results"
# --official: the official MVTec LOCO script's image AUROC (map maximum, its tie rule)
OFFICIAL_FLAGS = {"official_image_score": True}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--dataset", default=DATASET)
    p.add_argument("--data-root", default=ROOT)
    p.add_argument("--categories", nargs="+", default=CATEGORIES)
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"score-file method names (SINBAD levels are found); default: those present of {' '.join(METHODS)}")
    p.add_argument("--pairs", nargs="+", default=PAIRS,
                   help="cross-method fusions: branches or families joined by '+', e.g. CSAD+SINBAD patchhist+LGST+sinbad")
    p.add_argument("--score-dir", default=str(SCORE_DIR))
    p.add_argument("--out-dir", default=str(OUT_DIR))
    p.add_argument("--official-image-score", action="store_true",
                   help="image AUROC from the map maximum with the official LOCO tie rule (cross-check only)")
    p.add_argument("--no-maps", action="store_true", help="skip sPRO / pixel metrics even where TIFF maps exist")
    p.add_argument("--no-figures", action="store_true", help="skip the ROC and overlay figures")
    p.add_argument("--masks-root", default=None, help="CSAD pseudo-label root, for the segmentation figure")
    p.add_argument("--spro-limit", type=float, default=M.SPRO_HEADLINE_LIMIT, help="sPRO limit of the markdown table")
    add_official_switch(p, OFFICIAL_FLAGS, help_extra="sPRO stays exact (the official sampled curve converges to it)")
    return p


@guard
def main(argv=None) -> int:
    """Exit status 0 only when everything asked for was evaluated; otherwise one closing line names the first cause."""
    from common.cli import resolve_categories

    args = build_parser().parse_args(argv)
    categories = resolve_categories(args)
    cfg = Config(dataset=args.dataset, data_root=args.data_root, categories=categories,
                 methods=args.methods or METHODS, score_dir=Path(args.score_dir), out_dir=Path(args.out_dir),
                 pairs=args.pairs, explicit_methods=args.methods is not None,
                 explicit_categories=args.categories is not None, requested_categories=list(categories),
                 official_image_score=args.official_image_score, maps=not args.no_maps, figures=not args.no_figures,
                 masks_root=args.masks_root, spro_limit=args.spro_limit)
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
