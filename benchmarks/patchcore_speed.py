"""Coreset and kNN speed of methods.patchcore on a synthetic memory bank (no data or weights needed).

Reports coreset seconds, query images/s (each image = --patches query vectors against the coreset) for the torch
and faiss backends, and the process's peak resident memory after each phase.

    python benchmarks/patchcore_speed.py                      # 200k x 1536 bank, 1 % coreset, 100 query images
    python benchmarks/patchcore_speed.py --n-bank 50000 --sampler approx --ratio 0.1
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common import get_logger, pick_device, seed_everything, set_threads  # noqa: E402
from common.io import atomic_write_json  # noqa: E402
from methods.patchcore import defaults_for, score_embeddings, select_coreset  # noqa: E402

N_BANK, DIM, RATIO, QUERY_IMAGES, PATCHES = 200_000, 1536, 0.01, 100, 784


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-bank", type=int, default=N_BANK, help="patch vectors before the coreset")
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--ratio", type=float, default=RATIO)
    p.add_argument("--sampler", choices=("kcenter", "approx"), default="kcenter")
    p.add_argument("--query-images", type=int, default=QUERY_IMAGES)
    p.add_argument("--patches", type=int, default=PATCHES, help="query vectors per image (28 x 28)")
    p.add_argument("--backends", nargs="+", default=["torch", "faiss"])
    p.add_argument("--batch-images", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fast", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", default=None, help="optional JSON file for the figures")
    args = p.parse_args(argv)
    if args.fast:
        args.n_bank, args.dim, args.query_images = 5000, 64, 4
    log = get_logger("patchcore_speed")
    set_threads(args.threads)
    seed_everything(args.seed)
    device = pick_device(args.device)
    method = "sapatchcore" if args.sampler == "kcenter" else "patchcore"
    cfg = defaults_for(method, coreset_ratio=args.ratio, squared=False)
    g = torch.Generator().manual_seed(args.seed)
    bank = torch.randn(args.n_bank, args.dim, generator=g).to(device)
    res = {"n_bank": args.n_bank, "dim": args.dim, "ratio": args.ratio, "sampler": args.sampler,
           "device": str(device), "threads": torch.get_num_threads(), "bank_gib": bank.numel() * 4 / 2 ** 30,
           "peak_rss_with_bank_gib": peak_rss_gib()}
    log.info("bank %d x %d (%.2f GiB) on %s, %d threads; peak RSS %.2f GiB", args.n_bank, args.dim, res["bank_gib"],
             device, res["threads"], res["peak_rss_with_bank_gib"])

    t0 = time.perf_counter()
    idx = select_coreset(bank, cfg, n_images=max(1, args.n_bank // args.patches))
    coreset = bank[idx].contiguous()
    if device.type == "cuda":
        torch.cuda.synchronize()
    res["coreset_s"], res["coreset_size"], res["peak_rss_after_coreset_gib"] = \
        time.perf_counter() - t0, len(coreset), peak_rss_gib()
    log.info("coreset %d of %d (%s) in %.1f s; peak RSS %.2f GiB", len(coreset), args.n_bank, args.sampler,
             res["coreset_s"], res["peak_rss_after_coreset_gib"])
    del bank

    side = int(round(args.patches ** 0.5))
    queries = torch.randn(args.query_images, side, side, args.dim, generator=g).to(device)
    for backend in args.backends:
        t0 = time.perf_counter()
        for s in range(0, args.query_images, args.batch_images):
            score_embeddings(queries[s:s + args.batch_images], coreset, cfg, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        res[f"query_{backend}_images_per_s"] = args.query_images / dt
        res[f"peak_rss_after_{backend}_gib"] = peak_rss_gib()
        log.info("%s kNN: %d images x %d patches vs %d bank vectors in %.1f s = %.1f images/s; peak RSS %.2f GiB",
                 backend, args.query_images, side * side, len(coreset), dt, args.query_images / dt, peak_rss_gib())
    if device.type == "cuda":
        res["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if args.out:
        atomic_write_json(args.out, res)
        log.info("figures written to %s", args.out)
    return res


if __name__ == "__main__":
    main()
