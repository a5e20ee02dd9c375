"""SA-PatchCore (default) and its PatchCore baseline (--method patchcore): build the memory bank of every
category, score the test and validation images, write score files, anomaly maps and the bank to ckpt/.

    python sapatchcore.py                                   # SA-PatchCore, all MVTec LOCO categories
    python sapatchcore.py --method patchcore --dataset mvtec_ad --coreset-ratio 0.01
    python sapatchcore.py --test-only --categories juice_bottle   # score with ckpt/sapatchcore_juice_bottle.pt
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import get_logger, pick_device, seed_everything, set_threads
from common.checkpoints import load_checked
from common.cli import add_common_args, ensure_output_dirs, make_parser, resolve_categories
from common.config import add_config_args, cli_fields, explicit_overrides
from common.errors import UserError, guard
from common.memory import stage
from common.official import add_official_switch
from dataset_readers import read_category
from evaluation.score_files import save_anomaly_maps, save_group_scores, scores_for_samples
from methods.base import ImageList, reduced_precision
from methods.patchcore import (BN_MARK, METHODS, NON_MODEL_KEYS, SAMPLER_PROJ_DIM, PatchCoreConfig, PatchCoreModel,
                               bank_meta, bank_path)
from models.backbones import load_backbone

DATASET = "mvtec_loco"
CATEGORIES = None  # None = every category of the dataset
BACKBONE = "wide_resnet50_2"
SEED = 0
# --official: every official behaviour, known bugs included (the other defaults already are the official values)
OFFICIAL_FLAGS = {"official_bn_update": True}


def _fmt(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (tuple, list)) else f"{v:g}" if isinstance(v, float) else str(v)


def _per_method_helps(parser: argparse.ArgumentParser) -> None:
    """Where a default depends on --method, the help gives it per method (add_config_args knows one default)."""
    full = {m: PatchCoreConfig.preset(m) for m in METHODS}
    fast = {m: PatchCoreConfig.fast(m) for m in METHODS}
    helps = {f.name: f.metadata.get("help", "") for f in cli_fields(PatchCoreConfig)}
    for action in parser._actions:
        name = action.dest
        if name not in helps:
            continue
        per_full = {m: getattr(c, name) for m, c in full.items()}
        per_fast = {m: getattr(c, name) for m, c in fast.items()}
        if len(set(map(_fmt, per_full.values()))) == 1 and len(set(map(_fmt, per_fast.values()))) == 1:
            continue
        text = "default per --method: " + ", ".join(f"{m} {_fmt(v)}" for m, v in per_full.items())
        if per_fast != per_full:
            text += "; --fast: " + ", ".join(f"{m} {_fmt(v)}" for m, v in per_fast.items())
        action.help = f"{helps[name]} ({text})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_common_args(p, DATASET, CATEGORIES, BACKBONE, SEED)
    g = add_config_args(p, PatchCoreConfig, title="method settings (defaults: the official code of the chosen "
                        "--method)")
    g.add_argument("--method", choices=METHODS, default="sapatchcore",
                   help="sapatchcore (IshidaKengo/SA-PatchCore) or patchcore (amazon patchcore-inspection)")
    _per_method_helps(p)
    r = p.add_argument_group("run")
    r.add_argument("--name", default=None, help="method name in score files and the bank's file name (default: the "
                   "method, e.g. patchcore_p001 for a 1%% run)")
    r.add_argument("--test-only", "--load-bank", dest="test_only", action="store_true",
                   help="score with the bank saved in --ckpt-dir (<name>_<category>.pt) instead of building it")
    r.add_argument("--checkpoint", default=None, help="test only, with this bank file (.pt)")
    r.add_argument("--no-maps", action="store_true", help="skip the TIFF anomaly maps")
    add_official_switch(p, OFFICIAL_FLAGS, help_extra="only the patchcore method has an official bug to restore "
                        "(the official SA-PatchCore calls .eval() first)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_config(args: argparse.Namespace) -> PatchCoreConfig:
    """common.config's precedence with the chosen method's presets: its --fast preset (or its official
    defaults), then every explicit flag. --sampler alone also picks the projection that sampler uses."""
    over = explicit_overrides(PatchCoreConfig, args)
    if "sampler" in over:
        over["proj_dim"] = SAMPLER_PROJ_DIM[over["sampler"]]
    return PatchCoreConfig.preset(args.method, fast=bool(args.fast), **over, seed=args.seed)


@dataclass
class CategoryResult:
    test_scores: np.ndarray
    val_scores: np.ndarray | None
    bank_size: int
    paths: list[Path] = field(default_factory=list)


@guard
def main(argv=None) -> dict:
    args = parse_args(argv)
    test_only = args.test_only or args.checkpoint is not None
    # before any work: a test-only run reads --ckpt-dir (which may be read-only) and writes only scores
    ensure_output_dirs(args, "score_dir", *([] if test_only else ["ckpt_dir"]))
    log = get_logger(args.method)  # patchcore logs as patchcore, not sapatchcore
    if args.official_bn_update and args.method != "patchcore":
        if not args.official:
            raise UserError("--official-bn-update reproduces patchcore-inspection only; add --method patchcore or "
                            "drop the flag (the official SA-PatchCore never runs its backbone in train mode)")
        args.official_bn_update = False  # --official with sapatchcore: the official code has no such update
    cfg = build_config(args)
    set_threads()
    seed_everything(args.seed)
    device = pick_device(args.device)
    reduced_precision(cfg.dtype, device)  # refuses --dtype fp16 on the CPU now, not after the bank
    name = args.name or (cfg.method + ("_noattn" if not cfg.attention else ""))
    categories = resolve_categories(args, check=True)
    log.info("%s on %s (%d categories), backbone %s, device %s; scores -> %s, banks -> %s", name, args.dataset,
             len(categories), args.backbone, device, args.score_dir, args.ckpt_dir)
    backbone = load_backbone(args.backbone, args.weights)
    from common.provenance import start_from_args, weights_record  # the run record every score file carries

    start_from_args(name, args, weights_record(backbone), {"args": args, "config": cfg}, categories)
    results = {}
    for category in categories:
        t0 = time.perf_counter()
        results[category] = run_category(backbone, args.dataset, category, cfg, name=name, data_root=args.data_root,
                                          score_dir=args.score_dir, ckpt_dir=args.ckpt_dir, device=device,
                                          test_only=test_only, checkpoint=args.checkpoint, maps=not args.no_maps,
                                          log=log)
        log.info("%s/%s done in %.1f s", name, category, time.perf_counter() - t0)
    return results


def run_category(backbone, dataset: str, category: str, cfg: PatchCoreConfig, *, name: str, data_root, score_dir,
                 ckpt_dir, device, test_only: bool = False, checkpoint: str | None = None, maps: bool = True,
                 log=None) -> CategoryResult:
    """Read -> fit (or load the bank) -> save -> predict -> write score files and TIFF maps."""
    log = log or get_logger(cfg.method)
    with stage("read", category=category):
        data = read_category(dataset, category, data_root)
    path = Path(checkpoint) if checkpoint else bank_path(ckpt_dir, name, data.category)
    meta = bank_meta(backbone, cfg, dataset=data.dataset, category=data.category, train=data.train)
    if test_only:
        with stage("load", category=category):
            model = load_bank(path, meta, backbone, cfg, device=device, name=name, log=log)
    else:
        if cfg.official_bn_update and getattr(backbone, BN_MARK, None) is None:
            log.info("--official-bn-update: BatchNorm statistics moved by one all-ones forward in train mode (once "
                     "per run: every category starts from the same file plus one update)")
        log.info("%s/%s: embedding %d training images, coreset ratio %g (%s)", name, data.category,
                 len(data.train), cfg.coreset_ratio, cfg.sampler)
        model = PatchCoreModel(backbone, cfg, device=device)
        with stage("fit", category=category, images=len(data.train)):
            model.fit(ImageList(data.train))
        with stage("save", category=category):
            model.save(path, meta)
        log.info("memory bank %d x %d written to %s", *model.bank.shape, path)

    with stage("predict", category=category, images=len(data.test) + len(data.validation)):
        pred = model.predict(ImageList(data.test), maps=maps, desc="test")
        val = model.predict(ImageList(data.validation), maps=False, desc="validation").scores \
            if data.validation else None
    with stage("write", category=category):
        groups = scores_for_samples(pred.scores, data.test, data)
        if val is not None:
            groups["val"] = val
        paths = save_group_scores(data, name, groups, score_dir)
        for sample, m in zip(data.test, pred.maps or []):
            save_anomaly_maps(name, data.category, [sample], maps=m[None], score_dir=score_dir)
    log.info("%s/%s: scores written to %s%s", name, data.category, ", ".join(p.name for p in paths),
             f"; maps under {Path(score_dir) / 'anomaly_maps' / name / data.category}" if maps else "")
    from evaluation.metrics import group_aurocs  # for the log; benchmark_performance.py does the evaluation

    aurocs = group_aurocs(data, groups)
    log.info("%s/%s: image AUROC %s", name, data.category,
             ", ".join(f"{g} {100 * a:.1f}%" for g, a in aurocs.items()) or "n/a (no labels)")
    return CategoryResult(pred.scores, val, len(model.bank), paths)


def load_bank(path: Path, meta: dict, backbone, cfg: PatchCoreConfig, *, device, name: str, log) -> PatchCoreModel:
    """The saved bank of this run's settings, checked against its record; scoring-only settings are this run's."""
    fix = f"rebuild it: run without --test-only/--load-bank to build the {name} memory bank of {meta['category']}"
    ckpt, _ = load_checked(path, meta, fix=fix, logger=log)
    model = PatchCoreModel.from_checkpoint(ckpt, device=device, backbone=backbone, source=str(path), fix=fix)
    model.cfg = dataclasses.replace(model.cfg, **{k: getattr(cfg, k) for k in NON_MODEL_KEYS})
    log.info("loaded memory bank %s (%d x %d)", path, *model.bank.shape)
    return model


if __name__ == "__main__":
    main()
