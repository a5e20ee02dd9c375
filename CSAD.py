"""CSAD stage 3: train the LGST student-teacher per category and write its checkpoint, scores and maps.

    python CSAD.py                                   # all MVTec LOCO categories, official settings
    python CSAD.py --dataset synthetic_loco --fast --backbone efficientnet_lite0 --weights W --penalty-dir D
    python CSAD.py --test-only --categories juice_bottle  # re-score with ckpt/best_juice_bottle.pth, no training
    python CSAD.py --benchmark-speed --weights random   # batch-1 latency at 256 px

Writes {ckpt-dir}/best_{category}.pth, {score-dir}/{category}_LGST_{logi,struc,val}_score.npy and TIFF maps
under {score-dir}/anomaly_maps/LGST/, and, when the segmentor checkpoint of the category exists (train_segmentor.py
at the same resolution: {ckpt-dir}/segmentor_{category}_{input size}.pth, or --segmentor-checkpoint), the fused
CSAD model {ckpt-dir}/csad_{category}.pth (methods.csad.model.CSADModel; predict.py --checkpoint takes it).
See docs/csad_lgst.md.
"""
from __future__ import annotations

import argparse
import json

from common import get_logger, pick_device, seed_everything, set_threads
from common.cli import REPO_ROOT, add_common_args, ensure_output_dirs, make_parser, resolve_categories
from common.config import add_config_args, config_from_args
from common.errors import guard
from common.official import add_official_switch
from methods.csad.lgst import LGSTConfig

DATASET = "mvtec_loco"
CATEGORIES = None  # None: every category of --dataset (MVTec LOCO: the five official ones)
BACKBONE = "wide_resnet50_2_tv2"  # the official teacher: timm tv2_in1k = torchvision's IMAGENET1K_V2 weights
SEED = 0
PENALTY_DIR = REPO_ROOT / "datasets" / "imagenet_penalty"
# --official: every official behaviour of Tokichan/CSAD CSAD.py, its known bugs included (test-set checkpoint
# selection; teacher statistics as a mean of per-batch means). Its unseeded seed and HF-hub penalty images are not.
OFFICIAL_FLAGS = {"select_on_test": True, "official_teacher_stats": True}

log = get_logger("CSAD")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_common_args(p, DATASET, CATEGORIES, BACKBONE, SEED)
    g = p.add_argument_group("LGST run")
    g.add_argument("--penalty-dir", default=str(PENALTY_DIR),
                   help="natural-image folder for the penalty loss (searched recursively); default %(default)s")
    g.add_argument("--no-penalty", action="store_true", help="train without the penalty loss")
    g.add_argument("--select-on-test", action="store_true",
                   help="official behaviour: keep the iteration with the best test AUROC (default: final iteration)")
    g.add_argument("--test-only", action="store_true",
                   help="no training: score with {ckpt-dir}/best_{category}.pth (checked against this run's "
                        "settings) and write the same score files and maps")
    g.add_argument("--checkpoint", default=None, help="test only, with this checkpoint file (one category)")
    g.add_argument("--allow-unfinished", action="store_true",
                   help="with --test-only: accept a checkpoint of an unfinished run (warns); also the segmentor "
                        "checkpoint of the fused model")
    g.add_argument("--no-maps", action="store_true", help="do not write TIFF anomaly maps")
    g.add_argument("--segmentor-checkpoint", default=None,
                   help="the stage-2 checkpoint to fuse with (one category; default "
                        "{ckpt-dir}/segmentor_{category}_{input size}.pth when it exists)")
    g.add_argument("--no-fused", action="store_true",
                   help="do not write the fused CSAD model {ckpt-dir}/csad_{category}.pth")
    g.add_argument("--workers", type=int, default=0, help="data-loader workers for the penalty images")
    g.add_argument("--benchmark-speed", action="store_true",
                   help="only measure batch-1 latency (ms/img) after warm-up, at 256 px unless --input-size")
    g.add_argument("--speed-runs", type=int, default=20)
    g.add_argument("--speed-warmup", type=int, default=5)
    add_config_args(p, LGSTConfig, title="LGST settings (official values; --fast: the fast() preset; a flag given "
                                         "here overrides both)")
    add_official_switch(p, OFFICIAL_FLAGS, help_extra="the official seed is unseeded and its penalty images come "
                        "from the HF hub; --seed and --penalty-dir still apply")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def make_config(args):
    """LGSTConfig(), or LGSTConfig.fast() with --fast, then every LGST flag given explicitly."""
    return config_from_args(LGSTConfig, args)


@guard
def main(argv=None) -> None:
    args = parse_args(argv)
    test_only = args.test_only or args.checkpoint is not None
    if not args.benchmark_speed:  # before any work, not after 60000 iterations
        # a test-only run reads --ckpt-dir (which may be read-only) and writes only scores
        ensure_output_dirs(args, *(["score_dir"] if test_only else ["score_dir", "ckpt_dir"]))
        categories = resolve_categories(args, check=True)
        if args.checkpoint is not None and len(categories) != 1:
            from common.errors import UserError

            raise UserError(f"--checkpoint {args.checkpoint} is one category's checkpoint, but {len(categories)} "
                            f"categories are selected; pass --categories with one of them")
        check_segmentor_checkpoint(args, categories)
    set_threads()
    seed_everything(args.seed)
    import torch

    from dataset_readers import read_category
    from methods.csad import lgst
    from models.backbones import load_backbone

    device = pick_device(args.device)
    cfg = make_config(args)
    from methods.base import reduced_precision

    reduced_precision(cfg.dtype, device)  # e.g. fp16 on the CPU stops here, not after training
    penalty = None
    # a missing folder fails before the teacher loads (a test-only run needs none)
    if not args.benchmark_speed and not args.no_penalty and not test_only:
        penalty = lgst.find_penalty_images(args.penalty_dir)
        log.info("penalty loss on %d images from %s", len(penalty), args.penalty_dir)
    backbone = load_backbone(args.backbone, args.weights)
    if not args.benchmark_speed:
        from common.provenance import start_from_args, weights_record  # the run record every score file carries

        start_from_args("LGST", args, weights_record(backbone), {"args": args, "config": cfg}, categories)

    if args.benchmark_speed:
        if args.input_size is None:
            cfg.input_size = 256  # the paper's resolution, also with --fast
        model = lgst.build_model(backbone, cfg, args.seed)
        res = lgst.benchmark_latency(model, device, cfg.input_size, warmup=args.speed_warmup, runs=args.speed_runs)
        log.info("LGST latency (%s, batch 1, %d px, %d threads): %.1f ms/img mean, %.1f ms median over %d runs",
                 args.backbone, cfg.input_size, res["threads"], res["ms_mean"], res["ms_median"], res["runs"])
        print(json.dumps(res))
        return

    results = []
    for category in categories:
        data = read_category(args.dataset, category, args.data_root)
        log.info("%s/%s: %d train, %d validation, %d test images; %d iterations at %d px on %s", args.dataset,
                 category, len(data.train), len(data.validation), len(data.test), cfg.iterations, cfg.input_size,
                 device)
        res = lgst.run_category(data, backbone, cfg, device, seed=args.seed, score_dir=args.score_dir,
                                ckpt_dir=args.ckpt_dir, penalty=penalty, select_on_test=args.select_on_test,
                                save_maps=not args.no_maps, workers=args.workers, test_only=test_only,
                                checkpoint=args.checkpoint, allow_unfinished=args.allow_unfinished)
        log.info("%s: LGST image AUROC %s", category,
                 ", ".join(f"{k} {v:.1f}%" for k, v in res["auroc"].items()) or "n/a (no labels)")
        if not args.no_fused:
            res["fused"] = write_fused(args, data, res, backbone=backbone, device=device, input_size=cfg.input_size)
        results.append(res)
        del data
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in results:
        log.info("%-22s LGST image AUROC %s", r["category"], "  ".join(f"{k} {v:.1f}%" for k, v in r["auroc"].items()))


def check_segmentor_checkpoint(args, categories) -> None:
    """An explicit --segmentor-checkpoint must exist and name one category, before any work."""
    from pathlib import Path

    from common.errors import UserError

    if args.segmentor_checkpoint is None or args.no_fused or args.benchmark_speed:
        return
    if len(categories) != 1:
        raise UserError(f"--segmentor-checkpoint {args.segmentor_checkpoint} is one category's checkpoint, but "
                        f"{len(categories)} categories are selected; pass --categories with one of them")
    if not Path(args.segmentor_checkpoint).is_file():
        raise UserError(f"--segmentor-checkpoint {args.segmentor_checkpoint}: no such file; train it with "
                        f"train_segmentor.py --categories {categories[0]}, or leave the flag out")
    from common.cli import ensure_writable_dir

    ensure_writable_dir(args.ckpt_dir, "--ckpt-dir")  # the fused model is written there, also by --test-only


def write_fused(args, data, res: dict, *, backbone, device, input_size: int):
    """{ckpt-dir}/csad_{category}.pth, the fused CSAD model (methods.csad.model.CSADModel), from the segmentor
    checkpoint of this category and the LGST checkpoint just trained or used. Without a segmentor checkpoint it
    says how to get one; an incompatible default one is skipped with a warning, an explicit one is an error."""
    from pathlib import Path

    from common.cli import ensure_writable_dir
    from common.errors import CheckpointError, UserError
    from common.memory import stage
    from methods.csad.model import CSADModel, fused_path
    from models.segmentor import segmentor_path

    explicit = args.segmentor_checkpoint is not None
    seg = Path(args.segmentor_checkpoint if explicit else segmentor_path(args.ckpt_dir, data.category, input_size))
    out = fused_path(args.ckpt_dir, data.category)
    if not seg.is_file():
        log.info("%s: no segmentor checkpoint %s, so no fused CSAD model; to get %s, run train_segmentor.py "
                 "--categories %s --resolution %d (same --backbone and --weights), then CSAD.py --test-only",
                 data.category, seg, out, data.category, input_size)
        return None
    try:
        with stage("fuse", category=data.category):
            ensure_writable_dir(args.ckpt_dir, "--ckpt-dir")
            model = CSADModel.from_parts(seg, res["checkpoint"], device=device, backbone=backbone,
                                         lgst_val_scores=res.get("val_scores"),
                                         allow_unfinished=args.allow_unfinished)
            model.save(out)
    except (CheckpointError, UserError) as exc:
        if explicit:
            raise
        log.warning("%s: fused CSAD model not written: %s", data.category, exc)
        return None
    log.info("%s: fused CSAD model (segmentor %s + LGST %s) written to %s", data.category, seg, res["checkpoint"],
             out)
    return str(out)


if __name__ == "__main__":
    main()
