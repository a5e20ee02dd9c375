"""The whole pipeline in one command.

Default (the README's demo): generate the synthetic LOCO dataset, then run every method in --fast mode and the
benchmark, and print the combined table. With --dataset/--data-root and --full it is the paper-scale run with
each script's paper defaults.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common.cli import REPO_ROOT, SHARED_DIR

# The shared ImageNet EfficientNet-Lite0 weights make the CPU demo meaningful; without them it uses random weights.
LITE0_SHARED = SHARED_DIR / "weights" / "efficientnet-lite0-57934424.pth"
LITE0_CKPT = REPO_ROOT / "ckpt" / "efficientnet-lite0-57934424.pth"
STEPS = ("pseudo_label", "train_segmentor", "CSAD", "sinbad", "sapatchcore", "patchcore", "glass", "mean_image", "benchmark")


def demo_backbone(args) -> list[str]:
    if args.full:
        return [] if args.weights is None else ["--weights", args.weights]
    if args.weights:
        return ["--backbone", args.backbone, "--weights", args.weights]
    for path in (LITE0_CKPT, LITE0_SHARED):
        if path.is_file():
            return ["--backbone", "efficientnet_lite0", "--weights", str(path)]
    print("No EfficientNet-Lite0 weights found: the demo runs with RANDOM weights and its numbers are not meaningful.")
    return ["--backbone", "efficientnet_lite0", "--weights", "random"]


SYNTHETIC_TEXTURES = REPO_ROOT / "datasets" / "synthetic_textures"
DTD_DIRS = (REPO_ROOT / "datasets" / "dtd" / "images", SHARED_DIR / "data" / "dtd_small" / "images")


def first_dir(paths) -> str | None:
    return next((str(p) for p in paths if p.is_dir()), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic_loco")
    p.add_argument("--data-root", default=None, help="default: datasets/synthetic_loco (generated if missing)")
    p.add_argument("--categories", nargs="+", default=None)
    p.add_argument("--full", action="store_true", help="paper settings instead of --fast")
    p.add_argument("--backbone", default="efficientnet_lite0", help="demo backbone (fast mode)")
    p.add_argument("--weights", default=None)
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--score-dir", default=str(REPO_ROOT / "anomaly_score"))
    p.add_argument("--ckpt-dir", default=str(REPO_ROOT / "ckpt"))
    p.add_argument("--masks-root", default=str(REPO_ROOT / "datasets" / "masks"))
    p.add_argument("--results-dir", default=str(REPO_ROOT / "results"))
    p.add_argument("--pairs", nargs="+", default=None, help="cross-method fusions for the benchmark, e.g. LGST+sinbad")
    p.add_argument("--dtd-root", default=first_dir(DTD_DIRS),
                   help="GLASS textures; default datasets/dtd/images or the shared DTD subset, else generated textures")
    p.add_argument("--penalty-dir", default=first_dir((REPO_ROOT / "datasets" / "imagenet_penalty", *DTD_DIRS)),
                   help="LGST penalty images; default datasets/imagenet_penalty, then DTD, else generated textures")
    args = p.parse_args()

    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not args.full:
        # --fast tensors are tiny: one thread avoids OpenMP oversubscription, which on a busy 2-core machine
        # made the LGST steps up to 30x slower.
        env.setdefault("OMP_NUM_THREADS", "1")
    data_root = args.data_root or str(REPO_ROOT / "datasets" / args.dataset)
    timings: list[tuple[str, float]] = []

    def run(name: str, cmd: list[str]) -> None:
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True)
        timings.append((name, time.time() - t0))

    t_start = time.time()
    if args.dataset == "synthetic_loco" and args.data_root is None:
        run("generate", [py, "-m", "dataset_readers.synthetic_loco", "--root", data_root, "--component-maps"])

    if not args.full and (args.dtd_root is None or args.penalty_dir is None):
        # A fresh machine without DTD: procedural textures stand in, so that GLASS and LGST still run.
        run("textures", [py, "-m", "dataset_readers.synthetic_textures", "--root", str(SYNTHETIC_TEXTURES)])
        args.dtd_root = args.dtd_root or str(SYNTHETIC_TEXTURES)
        args.penalty_dir = args.penalty_dir or str(SYNTHETIC_TEXTURES)

    common = ["--dataset", args.dataset, "--data-root", data_root, "--score-dir", args.score_dir,
              "--ckpt-dir", args.ckpt_dir] + demo_backbone(args) + ([] if args.full else ["--fast"])
    if args.categories:
        common += ["--categories", *args.categories]
    masks = ["--masks-root", args.masks_root]
    stage1 = masks
    synthetic_labels = []
    if args.dataset == "synthetic_loco":
        # Stage 1 in --fast mode runs tiny random Grounding DINO / HQ-SAM models: it proves the pipeline, but its
        # labels are meaningless. The segmentor therefore trains on the generator's true component maps, and the
        # stage-1 output goes to a folder of its own.
        stage1 = ["--masks-root", str(Path(args.masks_root).with_name(Path(args.masks_root).name + "_stage1_demo"))]
        synthetic_labels = ["--labels", "component-maps"]
    # No folder in a --full run: CSAD.py stops with its own error naming what to download.
    penalty = ["--penalty-dir", args.penalty_dir] if args.penalty_dir else []
    commands = {
        "pseudo_label": [py, "pseudo_label.py", *common, *stage1],
        "train_segmentor": [py, "train_segmentor.py", *common, *masks, *synthetic_labels],
        "CSAD": [py, "CSAD.py", *common, *penalty],
        "sinbad": [py, "sinbad.py", *common],
        "sapatchcore": [py, "sapatchcore.py", *common],
        "patchcore": [py, "sapatchcore.py", *common, "--method", "patchcore"],
        "glass": [py, "glass.py", *common] + (["--dtd-root", args.dtd_root] if args.dtd_root else []),
        "mean_image": [py, "-m", "methods.mean_image", *common],  # sanity baseline: distance to the mean image
        "benchmark": [py, "benchmark_performance.py", "--dataset", args.dataset, "--data-root", data_root,
                      "--score-dir", args.score_dir, "--out-dir", args.results_dir, "--masks-root", args.masks_root]
                     + (["--categories", *args.categories] if args.categories else [])
                     + (["--pairs", *args.pairs] if args.pairs else []),
    }
    for step in STEPS:
        if step in args.steps:
            run(step, commands[step])

    total = time.time() - t_start
    print("\n=== step times")
    for name, sec in timings:
        print(f"{name:>16s}  {sec:7.1f} s")
    print(f"{'total':>16s}  {total:7.1f} s\nTables and figures: {args.results_dir}")


if __name__ == "__main__":
    main()
