"""CSAD stage 2: train the component segmentor on the stage-1 pseudo-labels and write the Patch-Histogram scores.

Writes, per category: {ckpt}/segmentor_{category}_{resolution}.pth (segmentor + Patch Histogram + validation
scores: methods.csad.segmentor.PatchHistModel), {masks}/{category}/test_seg_output/*.png,
{scores}/{category}_patchhist_{logi,struc,val}_score.npy (+ .json index) and {scores}/{category}_patchhist_params.npz
(the official params file).

Settings: the defaults of SegmentorConfig (official values; --fast: its fast() preset), then the category's official
values (CATEGORY_OVERRIDES), then every flag given explicitly.

    python train_segmentor.py                                    # MVTec LOCO, every category, official settings
    python train_segmentor.py --dataset synthetic_loco --labels component-maps --fast --backbone efficientnet_lite0
    python train_segmentor.py --dataset synthetic_loco --fast --backbone efficientnet_lite0 --test-only  # re-score
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import get_logger, pick_device, seed_everything, set_threads
from common.cli import REPO_ROOT, add_common_args, ensure_output_dirs, ensure_writable_dir, make_parser, resolve_categories
from common.config import add_config_args, explicit_overrides
from common.errors import UserError, guard
from common.memory import stage
from common.official import add_official_switch
from methods.csad.segmentor import SegmentorConfig

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
    p.add_argument("--official-hole-fill", action="store_true",
                   help="official hole-fill re-merge that may permute or shift class ids")
    p.add_argument("--official-lsa", action="store_true",
                   help="official LSA: the component is never re-sampled, the mandatory paste happens even where no "
                        "location was accepted, and the pasted label map is warped bilinearly (wrong ids on its edges)")
    p.add_argument("--test-only", action="store_true",
                   help="no training: score with {ckpt-dir}/segmentor_<category>_<resolution>.pth (its record must "
                        "match this run's settings)")
    p.add_argument("--checkpoint", default=None, help="test only, with this checkpoint (one category)")
    add_config_args(p, SegmentorConfig, title="stage-2 settings (a category's official values override these "
                                              "defaults; a flag given here overrides both)")
    add_official_switch(p, OFFICIAL_FLAGS, help_extra="the official CE on softmax outputs is already the default, "
                        "and the official test-set model selection is not implemented (the final epoch is kept)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def category_config(args: argparse.Namespace, category: str) -> SegmentorConfig:
    from methods.csad.segmentor import make_config

    return make_config(category, args.fast, **explicit_overrides(SegmentorConfig, args),
                       official_hole_fill=args.official_hole_fill, official_lsa=args.official_lsa)


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


def run_category(args: argparse.Namespace, category: str, *, backbone, encoder, device, test_only: bool) -> dict:
    """read -> fit -> save (or load the checkpoint) -> predict -> write, each a common.memory stage."""
    from dataset_readers import read_category
    from evaluation.score_files import save_group_scores, scores_for_samples
    from methods.base import ImageList
    from methods.csad.patch_histogram import METHOD, params_path
    from methods.csad.segmentor import PatchHistModel, read_pseudo_labels, segmentor_meta, write_test_segmentation
    from models.segmentor import segmentor_path

    seed_everything(args.seed)
    with stage("read", category=category):
        data = read_category(args.dataset, category, args.data_root)
        cfg = category_config(args, category)
        if not test_only:
            if args.labels == "component-maps":
                prepare_component_maps(args, category)
            labels = read_pseudo_labels(data, args.masks_root)
    path = Path(args.checkpoint) if args.checkpoint else Path(segmentor_path(args.ckpt_dir, category, cfg.resolution))
    meta = segmentor_meta(backbone, cfg, dataset=data.dataset, category=category, train_samples=data.train,
                          seed=args.seed)
    out = {"category": category, "checkpoint": str(path), "test_only": test_only}
    if test_only:
        from common.provenance import RANDOM

        with stage("load", category=category):
            fix = f"re-create it: python train_segmentor.py --categories {category} (without --test-only)"
            shared = None if getattr(backbone, "weights_sha256", RANDOM) == RANDOM else backbone  # random: stored
            model = PatchHistModel.load(path, device=device, expected=meta, fix=fix, backbone=shared)
            model.cfg = cfg  # equal to the checkpoint's but for the inference-only settings (dtype, eval_batch)
            meta = model.meta
        log.info("%s: test only, segmentor + Patch Histogram from %s", category, path)
    else:
        model = PatchHistModel(backbone, cfg, device=device, encoder=encoder)
        log.info("%s: training the segmentor on %s (%s labels in %s)", category, device, args.labels,
                 Path(args.masks_root) / category)
        with stage("fit", category=category):
            model.fit(ImageList(data.train), labels=labels, validation=ImageList(data.validation), seed=args.seed,
                      desc=category)
        with stage("save", category=category):  # once, after the last epoch: a killed run leaves no checkpoint
            model.save(path, meta)
        h = model.history
        log.info("%s: saved %s (final epoch %d, mean epoch %.2f s)", category, path, cfg.epochs,
                 sum(h["epoch_times"]) / len(h["epoch_times"]))
        out.update(epoch_s=sum(h["epoch_times"]) / len(h["epoch_times"]), final_loss=h["losses"][-1],
                   sup=h["sup"], unsup=h["unsup"])
    with stage("predict", category=category):
        pred = model.predict(ImageList(data.test), desc=f"{category} test")
    with stage("write", category=category):
        groups = {"val": model.val_scores} if data.validation else {}
        groups.update(scores_for_samples(pred.scores, data.test, data))
        paths = save_group_scores(data, METHOD, groups, args.score_dir)
        model.patch_histogram.save(params_path(args.score_dir, category), meta=meta)
        seg_dir = write_test_segmentation(category, args.masks_root, data.test, pred.label_maps)
    log.info("%s: wrote %s, %s and %d test segmentations in %s; inference %.1f img/s", category,
             ", ".join(p.name for p in paths), Path(params_path(args.score_dir, category)).name, len(data.test),
             seg_dir, model.last_img_s)
    from evaluation.metrics import group_aurocs  # for the log; benchmark_performance.py does the evaluation

    log.info("%s: patchhist image AUROC %s", category, ", ".join(f"{g} {100 * a:.1f}%" for g, a in
                                                              group_aurocs(data, groups).items()) or "n/a (no labels)")
    out.update(infer_img_s=model.last_img_s, num_classes=model.num_classes)
    return out


@guard
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    test_only = args.test_only or args.checkpoint is not None
    # before any work, not after training: scores, checkpoints and the segmentation PNGs under --masks-root
    ensure_output_dirs(args, "score_dir", *([] if test_only else ["ckpt_dir"]))
    if test_only or Path(args.masks_root).is_dir() or args.labels == "component-maps":
        ensure_writable_dir(args.masks_root, "--masks-root")  # a missing pseudo-label root is reported below
    categories = resolve_categories(args, check=True)
    if args.checkpoint and len(categories) != 1:
        raise UserError(f"--checkpoint names one file, but {len(categories)} categories are selected; pass one "
                        "--categories (or --test-only for each category's default checkpoint)")
    set_threads()
    from methods.csad.segmentor import Encoder
    from models.backbones import load_backbone

    device = pick_device(args.device)
    from methods.base import reduced_precision

    reduced_precision(args.dtype or SegmentorConfig().dtype, device)  # an impossible --dtype fails before any work
    seed_everything(args.seed)  # random weights (smoke tests) are drawn from the seeded generator: reproducible
    backbone = load_backbone(args.backbone, args.weights)
    from common.provenance import start_from_args, weights_record  # the run record every score file carries

    start_from_args("patchhist", args, weights_record(backbone), {"args": args}, categories)
    encoder = None if test_only else Encoder(backbone, device)  # one per backbone suffices
    results = [run_category(args, c, backbone=backbone, encoder=encoder, device=device, test_only=test_only)
               for c in categories]
    for r in results:
        if r["test_only"]:
            log.info("%s: K+1=%d, test only (%s), inference %.1f img/s", r["category"], r["num_classes"],
                     r["checkpoint"], r["infer_img_s"])
        else:
            log.info("%s: K+1=%d, %d sup / %d unsup, %.2f s/epoch, inference %.1f img/s, final loss %.4f",
                     r["category"], r["num_classes"], r["sup"], r["unsup"], r["epoch_s"], r["infer_img_s"],
                     r["final_loss"])
    return results


if __name__ == "__main__":
    main()
