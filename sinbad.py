"""SINBAD: set features per pyramid level (7, 14, 224) and their ensemble, image-level scores only.

Default: every (category, level, crop count) unit in sequence, then the ensemble. Units can also run as separate
processes (--level/--crops --units-only) and be combined afterwards with --ensemble-only.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from common import atomic_write_json, get_logger, pick_device, seed_everything, set_threads
from common.cli import add_common_args, ensure_output_dirs, make_parser, resolve_categories
from common.config import add_config_args, config_from_args
from common.errors import UserError, guard
from common.official import add_official_switch
from dataset_readers import read_category
from evaluation.score_files import save_group_scores, scores_for_samples
from methods.sinbad import (CROP_RATIOS, LEVELS, PIXEL_LEVEL, DEEP_LAYERS, SinbadConfig, crop_counts, ensemble,
                            load_unit, run_units, save_unit, unit_path, with_validation, work_dir)

DATASET = "mvtec_loco"
CATEGORIES = None  # None: every category of --dataset
BACKBONE = "wide_resnet50_2"
SEED = 0
VAL_HOLDOUT = 0.1  # share of train images held out where a dataset has no validation split

log = get_logger("sinbad")
# --official: every official behaviour at once, known bugs included (the whitening default already is official)
OFFICIAL_FLAGS = {"official_thresholds": True}


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_common_args(p, DATASET, CATEGORIES, BACKBONE, SEED)
    g = p.add_argument_group("SINBAD")
    g.add_argument("--levels", "--level", nargs="+", type=int, default=list(LEVELS),
                   choices=sorted([*DEEP_LAYERS, PIXEL_LEVEL]),
                   help="pyramid levels (7: layer4, 14: layer3, 224: pixels)")
    g.add_argument("--crops", nargs="+", type=int, default=list(CROP_RATIOS), choices=list(CROP_RATIOS),
                   help="crops per canvas for the deep levels (16, 9, 4, 1 = ratios 0.25, 0.5, 0.7, 0.99)")
    g.add_argument("--units-only", action="store_true", help="write the unit files, skip the ensemble")
    g.add_argument("--ensemble-only", action="store_true", help="combine existing unit files into score files")
    g.add_argument("--official-thresholds", action="store_true",
                   help="official: re-fit thresholds on the first batch of every split, test included")
    g.add_argument("--benchmark", action="store_true", help="write time per image per level and peak memory (JSON)")
    add_config_args(p, SinbadConfig, title="SINBAD settings (methods.sinbad.SinbadConfig)")
    add_official_switch(p, OFFICIAL_FLAGS, help_extra="the official projections are unseeded, so two official runs "
                        "differ too (docs/sinbad.md)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def make_config(args) -> SinbadConfig:
    """The --fast preset (or the paper grid), then every flag given explicitly (an explicit value equal to the
    full default still wins over --fast)."""
    return config_from_args(SinbadConfig, args, seed=args.seed, official_thresholds=args.official_thresholds)


def units_for(args) -> list[tuple[int, int]]:
    return [(lv, c) for lv in args.levels for c in crop_counts(lv, args.crops)]


@guard
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.units_only and args.ensemble_only:
        raise UserError("--units-only and --ensemble-only exclude each other; pass one of them")
    ensure_output_dirs(args, "score_dir")  # unit files and scores go there; checked before any work
    categories = resolve_categories(args, check=True)
    set_threads()
    seed_everything(args.seed)
    cfg = make_config(args)
    device = pick_device(args.device)
    units = units_for(args)
    extractors = {}
    if not args.ensemble_only:
        from models.backbones import load_backbone
        from models.feature_extractor import FeatureExtractor

        deep = sorted({lv for lv, _ in units if lv != PIXEL_LEVEL})
        if args.benchmark:  # one backbone per deep level, so that each level's time is its own
            for lv in deep:
                extractors[lv] = FeatureExtractor(load_backbone(args.backbone, args.weights),
                                                  [DEEP_LAYERS[lv]]).to(device)
        elif deep:  # one pass to the deepest layer serves every deep level (the same crops); same scores
            shared = FeatureExtractor(load_backbone(args.backbone, args.weights),
                                      [DEEP_LAYERS[lv] for lv in deep]).to(device)
            extractors = {lv: shared for lv in deep}
    from common.provenance import start_from_args, weights_record  # the run record every score file carries

    bb = next((e.backbone for e in extractors.values() if hasattr(e, "backbone")), None)
    start_from_args("sinbad", args, weights_record(bb) if bb is not None else None,  # None: no deep level run
                    {"args": args, "config": cfg}, categories)
    log.info("SINBAD on %s (%s), levels %s, crops %s, %s; unit files under %s", args.dataset, device, args.levels,
             args.crops, "fast" if args.fast else "full size", work_dir(args.score_dir))
    results, bench = {}, {}
    for category in categories:
        raw = read_category(args.dataset, category, args.data_root)
        data = with_validation(raw, VAL_HOLDOUT)
        unit_scores = {}
        for levels, n_crops in ([] if args.ensemble_only else unit_groups(units, shared=not args.benchmark)):
            for lv, res in run_units(data, levels, n_crops, cfg, extractors.get(levels[0]), device, log).items():
                save_unit(unit_path(args.score_dir, category, lv, n_crops), res, data, cfg,
                          {"level": lv, "crops": n_crops, "dataset": args.dataset, "backbone": args.backbone,
                           "category": category})
                bench[f"{category}/L{lv}_c{n_crops}"] = res["timing"]
        for lv, n_crops in ([] if args.units_only else units):
            unit_scores[(lv, n_crops)] = load_unit(unit_path(args.score_dir, category, lv, n_crops), data)
        if args.units_only:
            continue
        check_compatible(unit_scores)
        combined = ensemble(unit_scores, cfg)
        results[category] = {}
        for method, (test, val) in combined.items():
            groups = scores_for_samples(test, data.test, raw)
            if "val" in raw.score_groups():
                groups["val"] = val
            paths = save_group_scores(raw, method, groups, args.score_dir)
            results[category][method] = auroc_by_group(raw, groups)
            log.info("%s %s: %s -> %s", category, method,
                     "image AUROC " + (", ".join(f"{g} {100 * a:.1f}%" for g, a in results[category][method].items())
                                       or "n/a (no labels)"), paths[0].parent)
    if args.benchmark:
        write_benchmark(args, bench)
    return results


def unit_groups(units: list[tuple[int, int]], shared: bool = True) -> list[tuple[list[int], int]]:
    """(levels, crop count) to run together: the deep levels of one crop count share their crops and backbone
    pass; the pixel level and, without `shared`, every unit run alone."""
    groups: dict[tuple, list[int]] = {}
    for lv, n_crops in units:
        key = ("deep", n_crops) if shared and lv != PIXEL_LEVEL else (lv, n_crops)
        groups.setdefault(key, []).append(lv)
    return [(levels, key[1]) for key, levels in groups.items()]


def _sha(digest: str) -> str:
    return digest if digest == "RANDOM" else f"sha256 {digest[:12]}…"


def check_compatible(unit_scores: dict) -> None:
    """All units of one ensemble must come from the same preprocessing/seed (e.g. not --fast mixed with full)."""
    from methods.sinbad import COMPAT_KEYS

    ref = None
    for key, u in unit_scores.items():
        cfg = {k: u["info"]["config"].get(k) for k in COMPAT_KEYS} | {"backbone": u["info"].get("backbone")}
        if ref is None:
            ref = (key, cfg)
        elif cfg != ref[1]:
            raise UserError(f"SINBAD units L{key[0]}_c{key[1]} and L{ref[0][0]}_c{ref[0][1]} were computed with "
                               f"different settings ({cfg} vs {ref[1]}); re-run the units with one setting")
    # deep units only (the pixel level has no weights): one weights file for the whole ensemble
    shas = [(k, u["info"]["weights_sha256"]) for k, u in unit_scores.items() if u["info"].get("weights_sha256")]
    for key, sha in shas[1:]:
        if sha != shas[0][1]:
            (k0, s0) = shas[0]
            raise UserError(f"SINBAD units L{key[0]}_c{key[1]} and L{k0[0]}_c{k0[1]} were computed with different "
                            f"backbone weights ({_sha(sha)} vs {_sha(s0)}); re-run the units with one --weights")


def auroc_by_group(data, groups: dict) -> dict:
    """Image AUROC per labelled group, for the log only (benchmark_performance.py does the evaluation)."""
    from evaluation.metrics import group_aurocs

    return group_aurocs(data, groups)


def write_benchmark(args, bench: dict) -> None:
    per_level: dict[str, list] = {}
    for key, t in bench.items():
        per_level.setdefault(key.rsplit("_c", 1)[0], []).append(t)  # "<category>/L<level>": sum over crop counts
    summary = {lv: {"s_per_image": float(np.sum([t["s_per_image"] for t in ts])),
                    "test_s_per_image": float(np.sum([t["test_s_per_image"] for t in ts])),
                    "cpu_s_per_image": float(np.sum([t.get("cpu_s_per_image", np.nan) for t in ts])),
                    "peak_rss_mb": float(max(t["peak_rss_mb"] for t in ts)),
                    "peak_cuda_mb": float(max(t["peak_cuda_mb"] for t in ts))} for lv, ts in per_level.items()}
    path = work_dir(args.score_dir) / "benchmark.json"
    atomic_write_json(path, {"backbone": args.backbone, "fast": args.fast, "levels": summary, "units": bench})
    for lv, s in summary.items():
        log.info("benchmark %s: %.3f s/image over all crop counts (test %.3f), peak RSS %.0f MB", lv,
                 s["s_per_image"], s["test_s_per_image"], s["peak_rss_mb"])
    log.info("benchmark written to %s", path)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
