"""SA-PatchCore (default) and its PatchCore baseline (--method patchcore): build the memory bank of every
category, score the test and validation images, write score files, anomaly maps and the bank to ckpt/.

    python sapatchcore.py                                   # SA-PatchCore, all MVTec LOCO categories
    python sapatchcore.py --method patchcore --dataset mvtec_ad --coreset-ratio 0.01
"""
from __future__ import annotations

import argparse
import time

from common import get_logger, pick_device, seed_everything, set_threads
from common.cli import add_common_args, ensure_output_dirs, make_parser, resolve_categories
from common.errors import UserError, guard
from common.official import add_official_switch
from dataset_readers import read_category
from methods.patchcore import METHODS, defaults_for, official_bn_update, run_category
from models.backbones import load_backbone
from models.feature_extractor import FeatureExtractor

DATASET = "mvtec_loco"
CATEGORIES = None  # None = every category of the dataset
BACKBONE = "wide_resnet50_2"
SEED = 0
FAST_SIZE = {"sapatchcore": ((128, 128), 112), "patchcore": ((128,), 112)}  # --fast: (resize, crop)
# --official: every official behaviour, known bugs included (the other defaults already are the official values)
OFFICIAL_FLAGS = {"official_bn_update": True}


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_common_args(p, DATASET, CATEGORIES, BACKBONE, SEED)
    g = p.add_argument_group("method (defaults: the official code of the chosen method)")
    g.add_argument("--method", choices=METHODS, default="sapatchcore")
    g.add_argument("--coreset-ratio", type=float, default=None, help="sapatchcore 0.01, patchcore 0.1")
    g.add_argument("--sampler", choices=("kcenter", "approx"), default=None,
                   help="kcenter: sparse JL projection, one start (SA-PatchCore); approx: 128-d linear, 10 starts")
    g.add_argument("--num-nn", type=int, default=None, help="patch score = mean over this many nearest (default 1)")
    g.add_argument("--distance", choices=("l2", "squared"), default=None,
                   help="sapatchcore l2 (torch.cdist), patchcore squared (faiss IndexFlatL2)")
    g.add_argument("--reweight", action="store_true", help="paper's Eq. 7 image-score reweighting (official codes: off)")
    g.add_argument("--reweight-b", type=int, default=None, help="neighbourhood size b of Eq. 7 (default 9)")
    g.add_argument("--no-attention", action="store_true",
                   help="sapatchcore without attention (layer3 avg pool): the SA-PatchCore paper's baseline")
    g.add_argument("--resize", type=int, nargs="+", default=None,
                   help="one value: shorter side (patchcore 256); two: exact H W (sapatchcore 256 256)")
    g.add_argument("--crop", type=int, default=None, help="centre crop (224); 0 = none")
    g.add_argument("--resize-filter", choices=("lanczos", "bilinear"), default=None,
                   help="PIL resize filter: sapatchcore lanczos (run.py's Image.ANTIALIAS), patchcore bilinear "
                        "(torchvision Resize default)")
    g.add_argument("--official-bn-update", action="store_true",
                   help="patchcore only: one train-mode forward of an all-ones image before eval, as "
                        "patchcore-inspection's PatchCore.load (official bug: every BatchNorm up to layer3 takes one "
                        "momentum-0.1 update; the published numbers include it)")
    g.add_argument("--knn-backend", choices=("auto", "torch", "faiss"), default="auto")
    g.add_argument("--name", default=None, help="method name in score files (default: the method, e.g. "
                   "patchcore_p001 for a 1%% run)")
    g.add_argument("--load-bank", action="store_true", help="score with the bank saved in --ckpt-dir")
    g.add_argument("--no-maps", action="store_true", help="skip the TIFF anomaly maps")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--workers", type=int, default=0)
    add_official_switch(p, OFFICIAL_FLAGS, help_extra="only the patchcore method has an official bug to restore "
                        "(the official SA-PatchCore calls .eval() first)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@guard
def main(argv=None) -> dict:
    args = parse_args(argv)
    ensure_output_dirs(args, "score_dir", *([] if args.load_bank else ["ckpt_dir"]))  # before any work
    log = get_logger(args.method)  # patchcore logs as patchcore, not sapatchcore
    if args.official_bn_update and args.method != "patchcore":
        if not args.official:
            raise UserError("--official-bn-update reproduces patchcore-inspection only; add --method patchcore or "
                            "drop the flag (the official SA-PatchCore never runs its backbone in train mode)")
        args.official_bn_update = False  # --official with sapatchcore: the official code has no such update
    set_threads()
    seed_everything(args.seed)
    device = pick_device(args.device)
    resize, crop = (tuple(args.resize) if args.resize else None), args.crop
    if args.fast:
        fr, fc = FAST_SIZE[args.method]
        resize, crop = resize or fr, fc if crop is None else crop
    cfg = defaults_for(args.method, coreset_ratio=args.coreset_ratio, sampler=args.sampler, num_nn=args.num_nn,
                       squared=None if args.distance is None else args.distance == "squared",
                       reweight=args.reweight or None, reweight_b=args.reweight_b, resize=resize, crop=crop,
                       attention=False if args.no_attention else None, knn_backend=args.knn_backend, seed=args.seed,
                       resample=args.resize_filter, official_bn_update=args.official_bn_update or None,
                       proj_dim=128 if args.sampler == "approx" and args.method == "sapatchcore" else None)
    if args.sampler == "kcenter" and args.method == "patchcore":
        cfg.proj_dim = 0
    name = args.name or (cfg.method + ("_noattn" if not cfg.attention else ""))
    categories = resolve_categories(args, check=True)
    log.info("%s on %s (%d categories), backbone %s, device %s; scores -> %s, banks -> %s", name, args.dataset,
             len(categories), args.backbone, device, args.score_dir, args.ckpt_dir)
    backbone = load_backbone(args.backbone, args.weights)
    from common.provenance import start_from_args, weights_record  # the run record every score file carries

    start_from_args(name, args, weights_record(backbone), {"args": args, "config": cfg}, categories)
    extractor = FeatureExtractor(backbone, cfg.layers).to(device)
    if cfg.official_bn_update:  # once: every category of the official run starts from the same file + one update
        official_bn_update(extractor, cfg)
        log.info("--official-bn-update: BatchNorm statistics moved by one all-ones forward in train mode")
    results = {}
    for category in categories:
        data = read_category(args.dataset, category, args.data_root)
        t0 = time.perf_counter()
        results[category] = run_category(data, extractor, cfg, device, name, args.score_dir, args.ckpt_dir,
                                          args.backbone, load_bank=args.load_bank, maps=not args.no_maps,
                                          batch_size=args.batch_size, workers=args.workers, logger=log)
        log.info("%s/%s done in %.1f s", name, category, time.perf_counter() - t0)
    return results


if __name__ == "__main__":
    main()
