"""CSAD stage 1: unsupervised component pseudo-labels (Grounding DINO + HQ-SAM + MeanShift + HDBSCAN).

Writes, per category and training image, datasets/masks/<category>/<stem>/{grounding_mask, grounding_background,
all_masks, refined_masks, cluster_map, filtered_cluster_map}.png + background.jpg, and
datasets/masks/<category>/info/{filtered_histogram_indices, filtered_component_histogram, raw_component_histogram,
component_num_mode, hdbscan_labels}.npy, all_component_feats.npz (descriptor cache), info.txt, image_stems.txt.

    python pseudo_label.py                                     # MVTec LOCO, every category, official settings
    python pseudo_label.py --categories pushpins --recluster --bandwidth 3.0    # reuse masks and descriptors
    python pseudo_label.py --dataset synthetic_loco --fast --backbone efficientnet_lite0 --weights W
    python pseudo_label.py --dataset synthetic_loco --from-component-maps      # true labels, no models
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import get_logger, pick_device, seed_everything, set_threads
from common.cli import REPO_ROOT, add_common_args, ensure_writable_dir, make_parser, resolve_categories
from common.errors import UserError, guard
from common.official import add_official_switch

DATASET = "mvtec_loco"
CATEGORIES = None  # None: every category of the dataset (the official script runs all five LOCO categories)
# Component descriptor backbone (layer4): the official code uses timm's default wide_resnet50_2 tag (racm_in1k),
# not the torchvision / tv2 weights of stages 2 and 3.
BACKBONE = "wide_resnet50_2_racm"
SEED = 0
MASKS_ROOT = REPO_ROOT / "datasets" / "masks"
SAM_MODEL = "vit_h"
# --fast: same code path, smaller: tiny random Grounding DINO / HQ-SAM, small inputs, few points and rotations.
# The random models' quality scores are meaningless, so --fast keeps every AMG mask (thresholds 0).
# Random descriptors have no calibrated scale: --fast doubles the bandwidth (up to 10 times) if no class survives.
FAST = dict(grounding_short_side=128, grounding_max_size=256, n_rotations=8, bandwidth_retries=10,
            sam_amg=dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0))

# --official: every official behaviour of Tokichan/CSAD pseudo_label.py, its known bugs included.
OFFICIAL_FLAGS = {"official_background_match": True, "amg_for_no_sam": True}

log = get_logger("pseudo_label")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_common_args(p, DATASET, CATEGORIES, BACKBONE, SEED)
    p.add_argument("--masks-root", default=str(MASKS_ROOT), help="output root (default datasets/masks)")
    p.add_argument("--config", default=None, help="per-category settings (default configs/csad_pseudo_label.json)")
    p.add_argument("--grounding-ckpt", default=None,
                   help="Grounding DINO SwinT-OGC file (default <ckpt-dir>/groundingdino_swint_ogc.pth); "
                        "'tiny': tiny random model (default with --fast)")
    p.add_argument("--bert-dir", default=None, help="local bert-base-uncased folder (default <ckpt-dir>/bert-base-uncased)")
    p.add_argument("--sam-model", default=SAM_MODEL, choices=["vit_h", "vit_l", "vit_b", "vit_tiny"])
    p.add_argument("--sam-ckpt", default=None,
                   help="HQ-SAM file (default <ckpt-dir>/sam_hq_<model>.pth); 'tiny': tiny random model (default "
                        "with --fast); 'random': the --sam-model architecture with random weights")
    p.add_argument("--bandwidth", type=float, default=None, help="override the category's MeanShift bandwidth")
    p.add_argument("--official-background-match", action="store_true",
                   help="official unstripped background-prompt matching (pushpins then has no grounding background)")
    p.add_argument("--amg-for-no-sam", action="store_true",
                   help="official: also run SAM automatic masks for no_sam categories (their output is discarded)")
    p.add_argument("--from-component-maps", action="store_true",
                   help="write the layout from the synthetic generator's true component maps (no models)")
    p.add_argument("--good-fraction", type=float, default=1.0,
                   help="--from-component-maps: share of images marked supervised (default all)")
    p.add_argument("--overwrite", action="store_true", help="recompute everything for the categories")
    p.add_argument("--recluster", action="store_true",
                   help="redo clustering with cached masks and descriptors (e.g. with another --bandwidth)")
    p.add_argument("--max-batch", type=int, default=1024, help="crops per backbone forward (memory bound)")
    add_official_switch(p, OFFICIAL_FLAGS, help_extra="its unseeded random projection is not (--seed applies)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def descriptor_backbone(args):
    from models.backbones import load_backbone

    return load_backbone(args.backbone, args.weights)


@guard
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    ensure_writable_dir(args.masks_root, "--masks-root")  # before hours of segmentation, not after
    set_threads()
    seed_everything(args.seed)
    from dataset_readers import read_category
    from methods.csad import label_layout as L
    from methods.csad.pseudo_label.config import load_config, prompt_words

    categories = resolve_categories(args, check=True)
    if args.from_component_maps:
        from dataset_readers import dataset_root

        root = dataset_root(args.dataset, args.data_root)
        return [{"category": c, "path": str(L.write_from_component_maps(
            root, c, args.masks_root, good_fraction=args.good_fraction, overwrite=args.overwrite))}
            for c in categories]

    configs = {c: load_config(c, args.config) for c in categories}  # fail early on an unknown category
    if args.weights != "random":  # fail before hours of segmentation, not after
        from models.backbones import find_weights

        try:
            find_weights(args.backbone, args.weights)
        except ValueError as exc:  # an unknown backbone; missing or foreign weights are UserErrors already
            raise UserError(str(exc)) from None
    device = pick_device(args.device)
    grounding_ckpt = args.grounding_ckpt or ("tiny" if args.fast else None)
    sam_ckpt = args.sam_ckpt or ("tiny" if args.fast else None)
    n_rot = FAST["n_rotations"] if args.fast else None
    cache: dict = {}
    tmp = tempfile.TemporaryDirectory(prefix="tiny_bert_")

    def make_segmenter(cfg):
        def build():
            if "segmenter" not in cache:
                from models.grounding import GroundingPredictor, load_grounding_dino, save_tiny_bert
                from models.sam_loader import load_sam
                from methods.csad.pseudo_label.segment import Segmenter

                bert = args.bert_dir
                if grounding_ckpt == "tiny" and bert is None:  # generated locally, never downloaded
                    bert = save_tiny_bert(tmp.name, prompt_words(args.config))  # the whole file: see prompt_words
                log.info("loading Grounding DINO (%s) and HQ-SAM %s (%s) on %s", grounding_ckpt or "ckpt",
                         args.sam_model, sam_ckpt or "ckpt", device)
                gd = load_grounding_dino(grounding_ckpt, bert, args.ckpt_dir, device)
                short, longest = ((FAST["grounding_short_side"], FAST["grounding_max_size"]) if args.fast else
                                  (cfg.common.get("grounding_short_side", 800), cfg.common.get("grounding_max_size", 1333)))
                sam = load_sam(args.sam_model, sam_ckpt, args.ckpt_dir, device)
                amg = dict(cfg.sam_amg)
                if args.fast:
                    amg.update(FAST["sam_amg"])
                cache["segmenter"] = Segmenter(GroundingPredictor(gd, short, longest), sam, amg,
                                               official_background_match=args.official_background_match,
                                               amg_for_no_sam=args.amg_for_no_sam)
            return cache["segmenter"]
        return build

    def make_descriptor(cfg):
        def build():
            if "descriptor" not in cache:
                from methods.csad.pseudo_label.descriptors import ComponentDescriptor

                cache["descriptor"] = ComponentDescriptor(descriptor_backbone(args), device,
                                                          cfg.common.get("crop_size", 65),
                                                          n_rot or cfg.common.get("n_rotations", 60), args.max_batch)
            return cache["descriptor"]
        return build

    from methods.csad.pseudo_label.pipeline import Options, run_category

    opts = Options(masks_root=Path(args.masks_root), seed=args.seed, overwrite=args.overwrite,
                   recluster=args.recluster, bandwidth=args.bandwidth,
                   bandwidth_retries=FAST["bandwidth_retries"] if args.fast else 0)
    summaries = []
    try:
        for cat in categories:
            seed_everything(args.seed)  # per category: its result must not depend on the categories run before it
            cfg = configs[cat]
            data = read_category(args.dataset, cat, args.data_root)
            meta = {"backbone": args.backbone, "weights": str(Path(args.weights).name) if args.weights else "default",
                    "n_rotations": n_rot or cfg.common.get("n_rotations", 60), "crop": cfg.common.get("crop_size", 65)}
            log.info("%s: %d training images -> %s", cat, len(data.train), L.masks_dir(cat, args.masks_root))
            summaries.append(run_category(data, cfg, opts, make_segmenter(cfg), make_descriptor(cfg), meta, log))
    finally:
        tmp.cleanup()
    return summaries


if __name__ == "__main__":
    main()
