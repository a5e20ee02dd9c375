"""Speed benchmark: batch-1 latency, throughput at the best batch size, training time and peak memory of every
method at the paper's input sizes, with the published figures beside ours. Writes speed.csv, speed.md (table)
and speed.json (table + environment) to --out-dir. Protocol and measured tables: docs/speed.md.

    OMP_NUM_THREADS=2 python benchmark_speed.py                  # all methods, CPU settings, random weights
    python benchmark_speed.py --device cuda --dtype fp16         # GPU protocol: 200 warm-up, 1000 timed calls
    python benchmark_speed.py --methods csad --official-csad-timing   # + the official script's protocol
    python benchmark_speed.py --methods csad lgst --backbone efficientnet_lite0
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.speed import BACKBONE, BANK_IMAGES, METHODS, Settings, defaults_for_device, environment, \
    expand_methods, markdown_table, run_method, write_outputs
from common import get_logger, pick_device, seed_everything, set_threads
from common.cli import ensure_writable_dir, make_parser
from common.errors import UserError, guard

OUT_DIR = Path(__file__).resolve().parent / "results" / "speed"
IMAGES = 4  # training images: one GLASS batch of 4, a 4-image memory bank, one segmentor batch
SINBAD_IMAGES = 2  # SINBAD runs 30 backbone passes per image and deep level
log = get_logger("benchmark_speed")


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help=f"any of {', '.join(METHODS)}; 'sinbad' = its three levels")
    p.add_argument("--backbone", default=BACKBONE, help="backbone for every method (default: the papers' WRN50-2)")
    p.add_argument("--weights", default="random",
                   help="backbone weights file; default random (speed does not depend on weight values)")
    p.add_argument("--images", type=int, default=IMAGES, help="training images for the training timings")
    p.add_argument("--sinbad-images", type=int, default=SINBAD_IMAGES, help="training images for the SINBAD fit")
    p.add_argument("--bank-images", type=int, default=BANK_IMAGES,
                   help="PatchCore/SA-PatchCore query timing: bank size = coreset ratio x patches x this")
    p.add_argument("--lgst-iterations", type=int, default=2, help="timed LGST training iterations")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="fp16: autocast, GPU only")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (GPU 200, CPU 2)")
    p.add_argument("--runs", type=int, default=None, help="timed batch-1 calls (GPU 1000, CPU 5)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="throughput batches (GPU 1 8 16 32, CPU 1 2 4)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds per timing before fewer calls are made (CPU 10; GPU: none); 0 = no budget")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or all cores)")
    p.add_argument("--dtd-root", default=None, help="DTD textures for GLASS training (random textures if missing)")
    p.add_argument("--official-csad-timing", action="store_true",
                   help="add a 'csad_official' row timed as the official script does (batch 8, no synchronize)")
    p.add_argument("--fast", action="store_true", help="each method's --fast sizes (tests, demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(OUT_DIR))
    return p.parse_args(argv)


@guard
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    ensure_writable_dir(args.out_dir, "--out-dir")  # before the timings, not after
    set_threads(args.threads)
    seed_everything(args.seed)
    device = pick_device(args.device)
    if args.dtype == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16 needs a GPU (--device cuda); CPU timings are fp32")
    try:
        methods = expand_methods(args.methods)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.official_csad_timing:
        methods.append("csad_official")
    d = defaults_for_device(device)
    budget = d["budget_s"] if args.budget_s is None else (args.budget_s or None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="speed_") as tmp:
        s = Settings(device=device, backbone=args.backbone, weights=args.weights, dtype=args.dtype,
                     images=args.images, sinbad_images=args.sinbad_images, bank_images=args.bank_images,
                     lgst_iterations=args.lgst_iterations,
                     warmup=d["warmup"] if args.warmup is None else args.warmup,
                     runs=d["runs"] if args.runs is None else args.runs,
                     batch_sizes=tuple(args.batch_sizes or d["batch_sizes"]), budget_s=budget, fast=args.fast,
                     seed=args.seed, dtd_root=args.dtd_root, work_dir=Path(tmp))
        log.info("speed benchmark on %s (%d threads, %s, %s weights%s): %s", device, torch.get_num_threads(),
                 args.dtype, args.weights, ", --fast sizes" if args.fast else "", ", ".join(methods))
        for m in methods:
            log.info("%s ...", m)
            row = run_method(m, s)
            rows.append(row)
            log.info("%s: %.1f ms/img, %.2f img/s at batch %d, training %s %s, peak MiB %s / %s", m,
                     row["latency_ms"], row["throughput_img_s"], row["best_batch"], row["train_s"],
                     row["train_unit"], row["peak_infer_mib"], row["peak_train_mib"])
        env = environment(s)
    paths = write_outputs(rows, env, args.out_dir)
    print(markdown_table(rows, env))
    log.info("written: %s", ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    main()
