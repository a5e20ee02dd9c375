"""CSAD stage 2: train the component segmentor on the stage-1 pseudo-labels and write the Patch-Histogram scores.

Writes, per category: {ckpt}/segmentor_{category}_{resolution}.pth, {masks}/{category}/test_seg_output/*.png,
{scores}/{category}_patchhist_{logi,struc,val}_score.npy (+ .json index) and {scores}/{category}_patchhist_params.npz.

    python train_segmentor.py                                    # MVTec LOCO, every category, official settings
    python train_segmentor.py --dataset synthetic_loco --labels component-maps --fast --backbone efficientnet_lite0
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import get_logger, pick_device, seed_everything, set_threads
from common.cli import REPO_ROOT, add_common_args, ensure_output_dirs, ensure_writable_dir, make_parser, resolve_categories
from common.errors import UserError, guard
from common.official import add_official_switch

DATASET = "mvtec_loco"
CATEGORIES = None  # None: every category of the dataset
BACKBONE = "wide_resnet50_2_tv2"  # timm tv2_in1k = torchvision IMAGENET1K_V2, as the official encoder
SEED = 42  # the official seed
MASKS_ROOT = REPO_ROOT / "datasets" / "masks"
GOOD_FRACTION = 0.5  # component-maps labels: supervised share (stage 1 keeps the 50 % most typical images)
# --official: every official behaviour of Tokichan/CSAD train_segmentor.py, its known bugs included. The official
# CE on softmax outputs is already the default; its test-set model selection is not implemented.
OFFICIAL_FLAGS = {"official_hole_fill": True, "official_lsa": True}

log = get_logger("train_segmentor")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_common_args(p, DATASET, CATEGORIES, BACKBONE, SEED)
    p.add_argument("--labels", choices=["pseudo", "component-maps"], default="pseudo",
                   help="pseudo: stage-1 output in --masks-root; component-maps: first convert the synthetic "
                        "generator's true component maps into that layout")
    p.add_argument("--masks-root", default=str(MASKS_ROOT), help="pseudo-label layout root (default datasets/masks)")
    p.add_argument("--good-fraction", type=float, default=GOOD_FRACTION,
                   help="component-maps only: share of training images used as the supervised set")
    p.add_argument("--ce-on-logits", action="store_true",
                   help="standard CE on logits instead of the official CE on softmax outputs")
    p.add_argument("--official-hole-fill", action="store_true",
                   help="official hole-fill re-merge that may permute or shift class ids")
    p.add_argument("--official-lsa", action="store_true",
                   help="official LSA: the component is never re-sampled, the mandatory paste happens even where no "
                        "location was accepted, and the pasted label map is warped bilinearly (wrong ids on its edges)")
    p.add_argument("--epochs", type=int, default=None, help="override the epoch count (default 120, --fast 12)")
    p.add_argument("--resolution", type=int, default=None, help="override the resolution (default 256, --fast 64)")
    add_official_switch(p, OFFICIAL_FLAGS, help_extra="the official CE on softmax outputs is already the default, "
                        "and the official test-set model selection is not implemented (the final epoch is kept)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def prepare_component_maps(args, category: str) -> None:
    """Write the true component maps as labels; refuse to replace labels that came from elsewhere."""
    from methods.csad import label_layout as layout

    out = layout.masks_dir(category, args.masks_root)
    info = out / layout.INFO / "info.txt"
    ours = info.is_file() and info.read_text().startswith("source: true component maps")
    if out.exists() and any(out.iterdir()) and not ours:
        raise UserError(f"{out} holds other pseudo-labels; pass another --masks-root for --labels component-maps")
    layout.write_from_component_maps(args.data_root or REPO_ROOT / "datasets" / args.dataset, category,
                                     args.masks_root, good_fraction=args.good_fraction, overwrite=ours)


@guard
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    # before any work, not after training: scores, checkpoints and the segmentation PNGs under --masks-root
    ensure_output_dirs(args, "score_dir", "ckpt_dir")
    if Path(args.masks_root).is_dir() or args.labels == "component-maps":  # a missing pseudo-label root is reported below
        ensure_writable_dir(args.masks_root, "--masks-root")
    categories = resolve_categories(args, check=True)
    set_threads()
    from dataset_readers import read_category
    from methods.csad.segmentor import Encoder, make_config, run_category
    from models.backbones import load_backbone

    device = pick_device(args.device)
    backbone = load_backbone(args.backbone, args.weights)
    from common.provenance import start_from_args, weights_record  # the run record every score file carries

    start_from_args("patchhist", args, weights_record(backbone), {"args": args}, categories)
    encoder = Encoder(backbone, device)
    results = []
    for category in categories:
        seed_everything(args.seed)
        data = read_category(args.dataset, category, args.data_root)
        if args.labels == "component-maps":
            prepare_component_maps(args, category)
        cfg = make_config(category, args.fast, epochs=args.epochs, resolution=args.resolution,
                          ce_on_logits=args.ce_on_logits, official_hole_fill=args.official_hole_fill,
                          official_lsa=args.official_lsa)
        log.info("%s: training the segmentor on %s (%s labels in %s)", category, device, args.labels,
                 Path(args.masks_root) / category)
        results.append(run_category(data, encoder, args.backbone, cfg, args.masks_root, args.ckpt_dir,
                                    args.score_dir, seed=args.seed))
    for r in results:
        log.info("%s: K+1=%d, %d sup / %d unsup, %.2f s/epoch, inference %.1f img/s, final loss %.4f", r["category"],
                 r["num_classes"], r["sup"], r["unsup"], r["epoch_s"], r["infer_img_s"], r["final_loss"])
    return results


if __name__ == "__main__":
    main()
