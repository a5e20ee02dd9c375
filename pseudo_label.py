"""CSAD stage 1: unsupervised component pseudo-labels (Grounding DINO + HQ-SAM + MeanShift + HDBSCAN).

Writes, per category and training image, datasets/masks/<category>/<stem>/{grounding_mask, grounding_background,
all_masks, refined_masks, cluster_map, filtered_cluster_map}.png + background.jpg, and
datasets/masks/<category>/info/{filtered_histogram_indices, filtered_component_histogram, raw_component_histogram,
component_num_mode, hdbscan_labels}.npy, all_component_feats.npz (descriptor cache), info.txt, image_stems.txt.

Settings: the defaults of PseudoLabelConfig (official values; --fast: its fast() preset), then the category's entry
in --config (configs/csad_pseudo_label.json), then every flag given explicitly.

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
from common.config import add_config_args, config_from_args, explicit_overrides
from common.errors import UserError, guard
from common.memory import stage
from common.official import add_official_switch
from methods.csad.pseudo_label.config import CategoryConfig, PseudoLabelConfig

DATASET = "mvtec_loco"
CATEGORIES = None  # None: every category of the dataset (the official script runs all five LOCO categories)
# Component descriptor backbone (layer4): the official code uses timm's default wide_resnet50_2 tag (racm_in1k),
# not the torchvision / tv2 weights of stages 2 and 3.
BACKBONE = "wide_resnet50_2_racm"
SEED = 0
MASKS_ROOT = REPO_ROOT / "datasets" / "masks"

# --official: every official behaviour of Tokichan/CSAD pseudo_label.py, its known bugs included.
OFFICIAL_FLAGS = {"official_background_match": True, "amg_for_no_sam": True}

log = get_logger("pseudo_label")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_common_args(p, DATASET, CATEGORIES, BACKBONE, SEED)
    p.add_argument("--masks-root", default=str(MASKS_ROOT), help="output root (default datasets/masks)")
    p.add_argument("--config", default=None, help="per-category settings (default configs/csad_pseudo_label.json)")
    p.add_argument("--bert-dir", default=None, help="local bert-base-uncased folder (default <ckpt-dir>/bert-base-uncased)")
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
    add_config_args(p, PseudoLabelConfig, title="stage-1 settings (a category's entry in --config overrides these "
                                                "defaults; a flag given here overrides both)")
    add_official_switch(p, OFFICIAL_FLAGS, help_extra="its unseeded random projection is not (--seed applies)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def category_configs(args: argparse.Namespace, categories: list[str]) -> dict[str, CategoryConfig]:
    """Per category: PseudoLabelConfig (or .fast()) + explicit flags, with the category's entry on top of the
    preset but under the explicit flags. Loaded for every category first: an unknown one fails before any work."""
    from methods.csad.pseudo_label.config import load_config

    base = config_from_args(PseudoLabelConfig, args)
    explicit = explicit_overrides(PseudoLabelConfig, args)
    return {c: load_config(c, args.config, base=base, explicit=explicit) for c in categories}


def check_weights(args: argparse.Namespace) -> None:
    """The descriptor backbone's weights exist: fail before hours of segmentation, not after."""
    if args.weights == "random":
        return
    from models.backbones import find_weights

    try:
        find_weights(args.backbone, args.weights)
    except ValueError as exc:  # an unknown backbone; missing or foreign weights are UserErrors already
        raise UserError(str(exc)) from None


class Models:
    """Loads every model once per run, when a category first needs it (a complete category loads nothing), and
    builds each category's segmenter / descriptor from them (settings may differ per category)."""

    def __init__(self, args: argparse.Namespace, device):
        self.args, self.device = args, device
        self._tmp = tempfile.TemporaryDirectory(prefix="tiny_bert_")
        self._cache: dict = {}

    def close(self) -> None:
        self._tmp.cleanup()

    def _grounding_and_sam(self, s: PseudoLabelConfig):
        key = ("models", s.grounding_ckpt, s.sam_model, s.sam_ckpt)
        if key not in self._cache:
            from models.grounding import load_grounding_dino, save_tiny_bert
            from models.sam_loader import load_sam
            from methods.csad.pseudo_label.config import prompt_words

            a = self.args
            bert = a.bert_dir
            if s.grounding_ckpt == "tiny" and bert is None:  # generated locally, never downloaded
                bert = save_tiny_bert(self._tmp.name, prompt_words(a.config))  # the whole file: see prompt_words
            log.info("loading Grounding DINO (%s) and HQ-SAM %s (%s) on %s", s.grounding_ckpt or "ckpt",
                     s.sam_model, s.sam_ckpt or "ckpt", self.device)
            gd = load_grounding_dino(s.grounding_ckpt, bert, a.ckpt_dir, self.device)
            sam = load_sam(s.sam_model, s.sam_ckpt, a.ckpt_dir, self.device)
            self._cache[key] = gd, sam
        return self._cache[key]

    def segmenter(self, s: PseudoLabelConfig):
        amg = s.amg_params()
        key = ("segmenter", s.grounding_ckpt, s.sam_model, s.sam_ckpt, s.grounding_short_side,
               s.grounding_max_size, tuple(sorted(amg.items())))
        if key not in self._cache:
            from models.grounding import GroundingPredictor
            from methods.csad.pseudo_label.segment import Segmenter

            gd, sam = self._grounding_and_sam(s)
            self._cache[key] = Segmenter(GroundingPredictor(gd, s.grounding_short_side, s.grounding_max_size), sam,
                                         amg, official_background_match=self.args.official_background_match,
                                         amg_for_no_sam=self.args.amg_for_no_sam)
        return self._cache[key]

    def descriptor(self, s: PseudoLabelConfig):
        if "backbone" not in self._cache:
            from models.backbones import load_backbone

            self._cache["backbone"] = load_backbone(self.args.backbone, self.args.weights)
        key = ("descriptor", s.crop_size, s.n_rotations, s.max_batch)
        if key not in self._cache:
            from methods.csad.pseudo_label.descriptors import ComponentDescriptor

            self._cache[key] = ComponentDescriptor(self._cache["backbone"], self.device, crop_size=s.crop_size,
                                                   n_rotations=s.n_rotations, max_batch=s.max_batch)
        return self._cache[key]


def descriptor_meta(args: argparse.Namespace, s: PseudoLabelConfig) -> dict:
    """What the descriptors depend on besides the instance maps (part of the cache signature)."""
    return {"backbone": args.backbone, "weights": str(Path(args.weights).name) if args.weights else "default",
            "n_rotations": s.n_rotations, "crop": s.crop_size}


def label_category(args: argparse.Namespace, cfg: CategoryConfig, models: Models) -> dict:
    from dataset_readers import read_category
    from methods.csad import label_layout as L
    from methods.csad.pseudo_label.pipeline import Options, run_category

    cat = cfg.category
    seed_everything(args.seed)  # per category: its result must not depend on the categories run before it
    with stage("read", category=cat):
        data = read_category(args.dataset, cat, args.data_root)
    log.info("%s: %d training images -> %s", cat, len(data.train), L.masks_dir(cat, args.masks_root))
    opts = Options(masks_root=Path(args.masks_root), seed=args.seed, overwrite=args.overwrite,
                   recluster=args.recluster)
    return run_category(data, cfg, opts, make_segmenter=lambda: models.segmenter(cfg.settings),
                        make_descriptor=lambda: models.descriptor(cfg.settings),
                        descriptor_meta=descriptor_meta(args, cfg.settings), log=log)


def write_true_labels(args: argparse.Namespace, categories: list[str]) -> list[dict]:
    """--from-component-maps: the layout from the synthetic generator's true component maps (no models)."""
    from dataset_readers import dataset_root
    from methods.csad import label_layout as L

    root = dataset_root(args.dataset, args.data_root)
    return [{"category": c, "path": str(L.write_from_component_maps(
        root, c, args.masks_root, good_fraction=args.good_fraction, overwrite=args.overwrite))}
        for c in categories]


@guard
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    ensure_writable_dir(args.masks_root, "--masks-root")  # before hours of segmentation, not after
    set_threads()
    seed_everything(args.seed)
    categories = resolve_categories(args, check=True)
    if args.from_component_maps:
        return write_true_labels(args, categories)
    configs = category_configs(args, categories)
    check_weights(args)
    models = Models(args, pick_device(args.device))
    try:
        return [label_category(args, configs[c], models) for c in categories]
    finally:
        models.close()


if __name__ == "__main__":
    main()
