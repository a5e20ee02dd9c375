"""SINBAD: set features per pyramid level (7, 14, 224) and their ensemble, image-level scores only.

    python sinbad.py                                  # fit every unit + the ensemble, save the model, score
    python sinbad.py --test-only                      # score again from the saved model (bit for bit)
    python sinbad.py --level 7 --crops 16 --units-only   # one unit as its own process
    python sinbad.py --ensemble-only                  # combine the unit files (and merge the unit checkpoints)

The model (every unit's fitted state and the ensemble normalisation) goes to
<ckpt-dir>/sinbad/<dataset>/<category>.pth; methods.base.load_model and predict.py read it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import atomic_write_json, get_logger, pick_device, seed_everything, set_threads
from common.cli import add_common_args, ensure_output_dirs, make_parser, resolve_categories
from common.config import add_config_args, config_from_args
from common.errors import CheckpointError, UserError, guard
from common.memory import stage
from common.official import add_official_switch
from dataset_readers import read_category
from evaluation.score_files import save_group_scores, scores_for_samples
from methods.base import ImageList, reduced_precision
from methods.sinbad import (PIXEL_LEVEL, SinbadConfig, SinbadModel, checkpoint_path, combine, ensemble,
                            load_unit, merge_checkpoints, narrowed_config, record_config, save_unit, timing_record,
                            unit_checkpoint_path, unit_groups, unit_path, unit_weights_sha, units_for,
                            with_validation, work_dir)

DATASET = "mvtec_loco"
CATEGORIES = None  # None: every category of --dataset
BACKBONE = "wide_resnet50_2"
SEED = 0
VAL_HOLDOUT = 0.1  # share of train images held out where a dataset has no validation split
NO_BACKBONE = {"backbone": None, "weights": None, "sha256": "none"}  # the record of a pixel-level-only model

log = get_logger("sinbad")
# --official: every official behaviour at once, known bugs included (the whitening default already is official)
OFFICIAL_FLAGS = {"official_thresholds": True}

__all__ = ["main", "build_parser", "parse_args", "make_config", "unit_groups", "check_compatible"]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_common_args(p, DATASET, CATEGORIES, BACKBONE, SEED)
    g = p.add_argument_group("SINBAD")
    g.add_argument("--units-only", action="store_true",
                   help="write the unit files and unit checkpoints, skip the ensemble")
    g.add_argument("--ensemble-only", action="store_true",
                   help="combine existing unit files into score files; merge their unit checkpoints into the model")
    g.add_argument("--test-only", action="store_true",
                   help="score with the saved model <ckpt-dir>/sinbad/<dataset>/<category>.pth, no fitting")
    g.add_argument("--checkpoint", default=None, help="score with this model file (implies --test-only)")
    g.add_argument("--official-thresholds", action="store_true",
                   help="official: re-fit thresholds on the first batch of every split (and of every scoring "
                        "call), test included")
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


@guard
def main(argv=None) -> dict:
    args = parse_args(argv)
    test_only = bool(args.test_only or args.checkpoint)
    if args.units_only and args.ensemble_only:
        raise UserError("--units-only and --ensemble-only exclude each other; pass one of them")
    if test_only and (args.units_only or args.ensemble_only or args.benchmark):
        raise UserError("--test-only scores with a saved model; drop --units-only, --ensemble-only and --benchmark")
    # checked before any work; a test-only run only reads --ckpt-dir (which may be read-only)
    ensure_output_dirs(args, "score_dir", *(() if test_only else ("ckpt_dir",)))
    categories = resolve_categories(args, check=True)
    if args.checkpoint and len(categories) != 1:
        raise UserError(f"--checkpoint {args.checkpoint} is one category's model; pass that one with --categories")
    set_threads()
    seed_everything(args.seed)
    cfg = make_config(args)
    device = pick_device(args.device)
    reduced_precision(cfg.dtype, device)  # refuses fp16 on a CPU now, not after the fit
    units = units_for(cfg)
    backbone = None
    if not args.ensemble_only and any(lv != PIXEL_LEVEL for lv, _ in units):
        from models.backbones import load_backbone

        backbone = load_backbone(args.backbone, args.weights)
    from common.provenance import start_from_args, weights_record  # the run record every score file carries

    start_from_args("sinbad", args, weights_record(backbone) if backbone is not None else None,  # None: no deep
                    {"args": args, "config": cfg}, categories)
    log.info("SINBAD on %s (%s), levels %s, crops %s, %s; unit files under %s", args.dataset, device,
             list(cfg.levels), list(cfg.crops), "fast" if args.fast else "full size", work_dir(args.score_dir))
    results, bench = {}, {}
    for category in categories:
        with stage("read", category=category):
            raw = read_category(args.dataset, category, args.data_root)
            data = with_validation(raw, VAL_HOLDOUT)
        if args.ensemble_only:
            unit_scores = {u: load_unit(unit_path(args.score_dir, category, *u), data) for u in units}
            check_compatible(unit_scores)
            with stage("write", category=category):
                results[category] = write_scores(args, raw, data, ensemble(unit_scores, cfg))
            merge_unit_checkpoints(args, cfg, data, unit_scores)
            continue
        if test_only:
            model, test_units, val_units, timings = score_saved(args, cfg, data, backbone, device)
        else:
            model, test_units, timings = fit_and_score(args, cfg, data, backbone, device)
            val_units = model.validation_units
        with stage("write", category=category):
            for u in units:
                save_unit(unit_path(args.score_dir, category, *u),
                          {"test": test_units[u], "val": val_units[u], "timing": timings[u],
                           "weights_sha256": unit_weights_sha(u[0], backbone), "fit_id": model.units[u].fit_id},
                          data, cfg, {"level": u[0], "crops": u[1], "dataset": args.dataset,
                                      "backbone": args.backbone, "category": category})
                bench[f"{category}/L{u[0]}_c{u[1]}"] = timings[u]
            if args.units_only:
                continue
            norms = model.norms
            test, val = combine(test_units, norms, cfg), combine(val_units, norms, cfg)
            results[category] = write_scores(args, raw, data, {m: (test[m], val[m]) for m in test})
    if args.benchmark:
        write_benchmark(args, bench)
    return results


# ------------------------------------------------------------------------------------------------ fit / score
def model_meta(args, data, cfg: SinbadConfig, backbone) -> dict:
    """The checkpoint record: what --test-only checks (the config includes the validation images, which give
    the ensemble normalisation)."""
    from common.checkpoints import checkpoint_meta, images_fingerprint
    from common.provenance import weights_record

    weights = weights_record(backbone) if backbone is not None else NO_BACKBONE
    config = {**record_config(cfg), "validation_images": images_fingerprint(data.validation)}
    return checkpoint_meta(method="sinbad", dataset=args.dataset, category=data.category, weights=weights,
                           config=config, train_samples=data.train)


def _save(path: Path, ckpt: dict, meta: dict) -> None:
    from common.checkpoints import META_KEY
    from common.io import save_checkpoint

    save_checkpoint(path, {**ckpt, META_KEY: meta})
    log.info("model saved to %s (%.1f MB)", path, path.stat().st_size / 2 ** 20)


def save_model(args, cfg: SinbadConfig, data, model: SinbadModel) -> None:
    """The model, or with --units-only one checkpoint per unit (merged later by --ensemble-only)."""
    with stage("save", category=data.category):
        if not args.units_only:
            _save(checkpoint_path(args.ckpt_dir, args.dataset, data.category), model.checkpoint(),
                  model_meta(args, data, cfg, model.backbone))
            return
        for u in model.unit_keys:
            _save(unit_checkpoint_path(args.ckpt_dir, args.dataset, data.category, *u), model.checkpoint(units=[u]),
                  model_meta(args, data, narrowed_config(cfg, [u]), model.backbone if u[0] != PIXEL_LEVEL else None))


def fit_and_score(args, cfg: SinbadConfig, data, backbone, device) -> tuple[SinbadModel, dict, dict]:
    """Fit (all units at once, or with --benchmark each unit alone so that each has its own time), save, score
    the test images. Returns the model, raw test scores per unit and per-unit timings."""
    import torch

    parts = [units_for(cfg)] if not args.benchmark else [[u] for u in units_for(cfg)]
    models, test_units, timings = [], {}, {}
    for part in parts:
        sub = cfg if len(parts) == 1 else narrowed_config(cfg, part)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0, c0 = time.perf_counter(), time.process_time()
        model = SinbadModel(backbone, sub, device=device)
        with stage("fit", category=data.category):
            model.fit(ImageList(data.train), validation=ImageList(data.validation))
        fit_s, fit_c = time.perf_counter() - t0, time.process_time() - c0
        if len(parts) == 1:
            save_model(args, cfg, data, model)
        t1, c1 = time.perf_counter(), time.process_time()
        with stage("predict", category=data.category):
            test_units.update(model.predict_units(ImageList(data.test), desc=f"{data.category} test"))
        test_s = time.perf_counter() - t1
        timing = timing_record(seconds=fit_s + test_s, cpu_seconds=fit_c + time.process_time() - c1,
                               test_seconds=test_s, images=len(data.train) + len(data.validation) + len(data.test),
                               test_images=len(data.test), device=device)
        if len(part) > 1:
            timing["shared_by_units"] = [f"L{lv}_c{c}" for lv, c in part]
        log.info("%s %s: %.1f s (%.3f s/image, test %.3f s/image, CPU %.3f s/image), peak RSS %.0f MB",
                 data.category, " ".join(f"L{lv}_c{c}" for lv, c in part), timing["seconds"],
                 timing["s_per_image"], timing["test_s_per_image"], timing["cpu_s_per_image"], timing["peak_rss_mb"])
        timings.update({u: dict(timing) for u in part})
        models.append(model)
    if len(models) == 1:
        return models[0], test_units, timings
    model = SinbadModel.merged(models, cfg)
    save_model(args, cfg, data, model)
    return model, test_units, timings


def score_saved(args, cfg: SinbadConfig, data, backbone, device) -> tuple[SinbadModel, dict, dict, dict]:
    """--test-only: the saved model, checked against this run, scores the test and validation images."""
    path = Path(args.checkpoint) if args.checkpoint else checkpoint_path(args.ckpt_dir, args.dataset, data.category)
    fix = f"re-create it: run sinbad.py for {data.category} without --test-only (with this run's settings)"
    t0, c0 = time.perf_counter(), time.process_time()
    model = SinbadModel.load(path, device=device, expected=model_meta(args, data, cfg, backbone), fix=fix,
                             backbone=backbone, weights=args.weights)
    model.cfg.dtype = cfg.dtype  # inference-only settings come from this run
    log.info("%s: scoring with the model %s", data.category, path)
    with stage("predict", category=data.category):
        t1 = time.perf_counter()
        test_units = model.predict_units(ImageList(data.test), desc=f"{data.category} test")
        test_s = time.perf_counter() - t1
        val_units = model.predict_units(ImageList(data.validation), desc=f"{data.category} val")
    timing = timing_record(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                           test_seconds=test_s, images=len(data.validation) + len(data.test),
                           test_images=len(data.test), device=device)
    return model, test_units, val_units, {u: dict(timing, test_only=True) for u in model.unit_keys}


def merge_unit_checkpoints(args, cfg: SinbadConfig, data, unit_scores: dict) -> Path | None:
    """--ensemble-only: the unit checkpoints of the unit files just combined -> one model checkpoint. Skipped,
    with the reason, where a unit has no checkpoint or not the one of its unit file's fit."""
    from common.checkpoints import images_fingerprint, load_checked

    paths = {u: unit_checkpoint_path(args.ckpt_dir, args.dataset, data.category, *u) for u in unit_scores}
    missing = [f"L{lv}_c{c}" for (lv, c), p in paths.items() if not p.is_file()]
    if missing:
        log.info("%s: no model checkpoint: no unit checkpoint for %s (sinbad.py --units-only writes them)",
                 data.category, ", ".join(missing))
        return None
    expected = {"method": "sinbad", "dataset": args.dataset, "category": data.category,
                "train_images": images_fingerprint(data.train),
                "config": {"validation_images": images_fingerprint(data.validation)}}
    ckpts, metas = [], []
    try:
        for u, p in paths.items():
            ck, meta = load_checked(p, expected, fix="re-run that unit with --units-only")
            held = [(s.get("level"), s.get("crops")) for s in ck.get("units") or []]
            if held != [u]:
                raise CheckpointError(f"{p} holds units {held}, not only L{u[0]}_c{u[1]}; re-run that unit with "
                                      "--units-only")
            fit_id = ck["units"][0].get("fit_id")
            if fit_id != unit_scores[u]["info"].get("fit_id"):
                raise CheckpointError(f"{p} is not the fit its unit file {unit_path(args.score_dir, data.category, *u)}"
                                      " came from; re-run that unit with --units-only")
            ckpts.append(ck)
            metas.append(meta)
        merged = merge_checkpoints(ckpts, cfg)
    except CheckpointError as exc:
        log.warning("%s: no model checkpoint written (the score files are unaffected): %s", data.category, exc)
        return None
    deep = [m for m in metas if m.get("backbone")]
    shas = {m.get("weights_sha256") for m in deep}
    if len(shas) > 1:
        log.warning("%s: no model checkpoint written: the unit checkpoints name different weights", data.category)
        return None
    weights = ({"backbone": deep[0]["backbone"], "weights": deep[0].get("weights_file"),
                "sha256": deep[0]["weights_sha256"]} if deep else NO_BACKBONE)
    from common.checkpoints import checkpoint_meta

    meta = checkpoint_meta(method="sinbad", dataset=args.dataset, category=data.category, weights=weights,
                           config={**record_config(cfg), "validation_images": images_fingerprint(data.validation)},
                           train_samples=data.train)
    path = checkpoint_path(args.ckpt_dir, args.dataset, data.category)
    with stage("save", category=data.category):
        _save(path, merged, meta)
    return path


def write_scores(args, raw, data, combined: dict) -> dict:
    """Score files per method and group; returns the image AUROC per method and labelled group (for the log)."""
    out = {}
    for method, (test, val) in combined.items():
        groups = scores_for_samples(test, data.test, raw)
        if "val" in raw.score_groups():
            groups["val"] = val
        paths = save_group_scores(raw, method, groups, args.score_dir)
        out[method] = auroc_by_group(raw, groups)
        log.info("%s %s: %s -> %s", data.category, method,
                 "image AUROC " + (", ".join(f"{g} {100 * a:.1f}%" for g, a in out[method].items())
                                   or "n/a (no labels)"), paths[0].parent)
    return out


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
