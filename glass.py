"""GLASS (ECCV 2024): train and test per category, write score files, TIFF maps and checkpoints.

    python glass.py                                   # MVTec AD, all classes, paper settings
    python glass.py --dataset visa --categories pcb1
    python glass.py --dataset mad_man                 # test-only with the MVTec AD checkpoints
    python glass.py --test-only --categories bottle   # score with ckpt/glass/mvtec_ad/bottle/ckpt.pth
    python glass.py --fast --dataset synthetic_loco --backbone efficientnet_lite0 --weights W
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common import atomic_write_json, get_logger, pick_device, seed_everything, set_threads
from common.checkpoints import load_checked
from common.cli import add_common_args, ensure_output_dirs, make_parser, resolve_categories
from common.config import add_config_args, config_from_args
from common.errors import guard
from common.memory import stage
from common.official import add_official_switch
from dataset_readers import DatasetError, read_category
from dataset_readers.base import GOOD, Sample, union_mask
from evaluation.score_files import safe_category, save_anomaly_maps, save_group_scores, scores_for_samples
from methods.base import ImageList, reduced_precision
from methods.glass import (FG_DEFAULT, METHOD, NON_MODEL_KEYS, TEST_ONLY_DATASETS, GlassConfig, GlassModel, _auroc,
                           class_resize, crop_of_map, distribution_judge, glass_meta, mask_at_crop,
                           mean_training_image)
from methods.glass_las import fg_masks_of, list_textures
from models.backbones import load_backbone

DATASET = "mvtec_ad"
CATEGORIES = None  # None: every category of the dataset
BACKBONE = "wide_resnet50_2"
SEED = 0
# --official: every official behaviour at once, known bugs included (docs/glass.md "Faithful, but fixed")
OFFICIAL_FLAGS = {"select_on_test": True, "official_judge_grid": True}
# On/off switches --official turns on: plain store_true flags (it sets a flag's stored constant)
SWITCHES = ("select_on_test", "official_judge_grid")
log = get_logger("glass")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_common_args(p, DATASET, CATEGORIES, BACKBONE, SEED)
    g = add_config_args(p, GlassConfig, title="GLASS settings (defaults: the official run scripts)", skip=SWITCHES)
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(GlassConfig)}
    for name in SWITCHES:  # default None: "not given" differs from "given", as for every config flag
        g.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None,
                       help=f"{helps[name]} (default off)")
    r = p.add_argument_group("GLASS run")
    r.add_argument("--dtd-root", default=None, help="DTD images/ folder (<class>/*.jpg); default datasets/dtd/images")
    r.add_argument("--fg-root", default=None, help="folder holding <category>/<image name> foreground masks; "
                                                   "default <data-root>/fg_mask")
    r.add_argument("--test-only", action="store_true",
                   help="score with the saved checkpoint (ckpt/glass/<dataset>/<category>/ckpt.pth, or ckpt_best.pth "
                        "with --select-on-test) instead of training")
    r.add_argument("--checkpoint", default=None, help="test only, with this checkpoint (.pth)")
    r.add_argument("--allow-unfinished", action="store_true",
                   help="test with a checkpoint of a training run that did not finish (warns); refused by default")
    r.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores or $OMP_NUM_THREADS)")
    add_official_switch(p, OFFICIAL_FLAGS, help_extra="numbers made with it use test-set model selection and must "
                        "be labelled so")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_config(args: argparse.Namespace) -> GlassConfig:
    """--fast preset, then every explicit flag; --imagesize also sets the resize, --embed-dim both dimensions."""
    coupled = {}
    if args.imagesize is not None:
        coupled["resize"] = args.imagesize
    if args.pretrain_dim is not None:
        coupled["target_dim"] = args.pretrain_dim
    return config_from_args(GlassConfig, args, **coupled)


@guard
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    test_only = args.test_only or args.checkpoint is not None
    # before any work: a test-only run reads --ckpt-dir (which may be read-only) and writes only scores
    ensure_output_dirs(args, *(["score_dir"] if test_only else ["score_dir", "ckpt_dir"]))
    set_threads(args.threads)
    cfg = build_config(args)
    device = pick_device(args.device)
    reduced_precision(cfg.dtype, device)  # refuses --dtype fp16 on the CPU now, not after training
    categories = resolve_categories(args, check=True)
    backbone = load_backbone(args.backbone, args.weights).to(device)
    from common.provenance import start_from_args, weights_record  # the run record every score file carries

    start_from_args("glass", args, weights_record(backbone), {"args": args, "config": cfg}, categories)
    results = []
    for category in categories:
        log.info("GLASS %s/%s on %s (scores -> %s)", args.dataset, category, device, args.score_dir)
        results.append(run_category(backbone, args.dataset, category, cfg, data_root=args.data_root,
                                    dtd_root=args.dtd_root, fg_root=args.fg_root, score_dir=args.score_dir,
                                    ckpt_dir=args.ckpt_dir, device=device, seed=args.seed,
                                    checkpoint=args.checkpoint, test_only=test_only,
                                    allow_unfinished=args.allow_unfinished))
    return results


# ---------------------------------------------------------------- one category, end to end
def ckpt_folder(ckpt_dir: str | Path, dataset: str, category: str) -> Path:
    return Path(ckpt_dir) / METHOD / dataset / safe_category(category)


def default_checkpoint(folder: Path, cfg: GlassConfig) -> Path:
    best = folder / "ckpt_best.pth"
    return best if cfg.select_on_test and best.is_file() else folder / "ckpt.pth"


class GroundTruth(Sequence):
    """The union ground-truth mask of each test sample, read when asked; None for a good image (or no masks)."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return None if s.defect_type == GOOD or not s.mask_paths else union_mask(s)


def run_category(backbone: torch.nn.Module, dataset: str, category: str, cfg: GlassConfig, *, data_root=None,
                 dtd_root=None, fg_root=None, score_dir, ckpt_dir, device, seed: int = 0,
                 checkpoint: str | None = None, test_only: bool = False, allow_unfinished: bool = False) -> dict:
    """Read -> fit (or load) -> save -> predict -> write score files, TIFF maps and results.json."""
    seed_everything(seed)  # before the model is built: its initial weights come from the global RNG
    source_dataset = TEST_ONLY_DATASETS.get(dataset)
    training = not (checkpoint or test_only or source_dataset) and cfg.distribution != 1
    with stage("read", category=category):
        data = read_category(dataset, category, data_root)
        inputs = _fit_inputs(data, cfg, dtd_root=dtd_root, fg_root=fg_root) if training else {}
    resize = class_resize(category, cfg)
    folder = ckpt_folder(ckpt_dir, dataset, category)
    t0 = time.time()
    summary: dict = {"dataset": dataset, "category": category, "config": dataclasses.asdict(cfg), "resize": resize}

    if cfg.distribution == 1:  # judge only, no training (official mode 1); never touches the shipped tables
        with stage("judge", category=category):
            svd, info = distribution_judge(mean_training_image(ImageList(data.train), cfg.imagesize, cfg.batch_size,
                                                               device), cfg.official_judge_grid)
        summary.update(svd=svd, judge=info)
        atomic_write_json(folder / "judge.json", summary)
        log.info("%s/%s: judge says %s (%s) -> %s", dataset, category, ["manifold", "hypersphere"][svd], info,
                 folder / "judge.json")
        return summary

    if not training:
        model, path = _load(backbone, cfg, data, device, checkpoint=checkpoint, folder=folder,
                            ckpt_dir=ckpt_dir, source_dataset=source_dataset, allow_unfinished=allow_unfinished)
        summary.update(checkpoint=str(path), svd=model.svd, epoch=model.epoch)
        log.info("%s/%s: test only, weights from %s (epoch %s)", dataset, category, path, model.epoch)
    else:
        model = GlassModel(backbone, cfg, device=device, resize=resize)
        summary.update(_train(model, data, inputs, folder=folder, seed=seed))

    test = ImageList(data.test)
    with stage("predict", category=category, images=len(test)):
        pred = model.predict(test)
        val = model.predict(ImageList(data.score_groups()["val"]), maps=False).scores \
            if "val" in data.score_groups() else None
    with stage("write", category=category):
        summary.update(_write(model, data, pred, val, score_dir=score_dir))
    summary["seconds"] = time.time() - t0
    atomic_write_json(folder / "results.json", summary)
    metrics = summary["metrics"]
    log.info("%s/%s: image AUROC %s; pixel AUROC (crop) %s; scores -> %s, maps -> %s/anomaly_maps/%s/%s", dataset,
             category, ", ".join(f"{k[len('image_auroc_'):]} {100 * v:.1f}%" for k, v in metrics.items()
                                 if k.startswith("image_auroc_")) or "n/a (no labels)",
             "n/a" if metrics["pixel_auroc_crop"] is None else f"{100 * metrics['pixel_auroc_crop']:.1f}%",
             Path(summary["score_files"][0]).parent, score_dir, METHOD, category)
    return summary


def _load(backbone, cfg: GlassConfig, data, device, *, checkpoint, folder: Path, ckpt_dir, source_dataset,
          allow_unfinished: bool) -> tuple[GlassModel, Path]:
    """The checkpoint of this run's settings, checked against its record (MAD: the MVTec AD model of the class)."""
    dataset, category = data.dataset, data.category
    cls = category.split("/")[-1]
    src_dataset, src_category = (source_dataset, cls) if source_dataset else (dataset, category)
    path = Path(checkpoint) if checkpoint else default_checkpoint(
        ckpt_folder(ckpt_dir, src_dataset, src_category) if source_dataset else folder, cfg)
    hint = (f"train it first: python glass.py --dataset {src_dataset} --categories {src_category}, or pass "
            "--checkpoint")
    # MAD is scored with the MVTec AD model of the class: its record names mvtec_ad/<class> and MVTec's images
    expected = glass_meta(backbone, cfg, src_dataset, src_category, None if source_dataset else data.train)
    with stage("load", category=category):
        ckpt, _ = load_checked(path, expected, fix=f"re-train: python glass.py --dataset {src_dataset} --categories "
                               f"{src_category}", allow_unfinished=allow_unfinished, logger=log, missing_hint=hint)
        model = GlassModel.from_checkpoint(ckpt, device=device, backbone=backbone)
    # settings that do not shape the model (workers, precision, ...) are this run's
    model.cfg = dataclasses.replace(model.cfg, **{k: getattr(cfg, k) for k in NON_MODEL_KEYS})
    return model, path


def _fit_inputs(data, cfg: GlassConfig, *, dtd_root, fg_root) -> dict:
    """What fit reads besides the training images: the DTD textures and the foreground masks (checked now)."""
    dataset, category = data.dataset, data.category
    if not data.train:
        raise DatasetError(f"{dataset}/{category} has no training images; GLASS needs train/good (or --checkpoint)")
    fg = FG_DEFAULT.get(dataset, 0) if cfg.fg is None else cfg.fg
    fg_masks = None
    if fg:
        fg_dir = Path(fg_root) / category if fg_root else Path(data.root).parent / "fg_mask" / category
        fg_masks = fg_masks_of(data.train, fg_dir)  # every mask checked now, not mid-epoch (official issue #18)
    return {"textures": ImageList(list_textures(dtd_root)), "fg_masks": fg_masks, "fg": fg}


def _train(model: GlassModel, data, inputs: dict, *, folder: Path, seed: int) -> dict:
    """Fit (with the test set for --select-on-test), saving a checkpoint every epoch; the training log."""
    cfg, dataset, category = model.cfg, data.dataset, data.category
    fg = inputs["fg"]
    log.info("%s/%s: fg=%d, checkpoints -> %s", dataset, category, fg, folder)
    backbone = model.net.extractor.backbone
    last = cfg.meta_epochs - 1

    def meta(epoch: int, finished: bool) -> dict:
        return glass_meta(backbone, cfg, dataset, category, data.train, finished=finished,
                          progress=f"epoch {epoch + 1} of {cfg.meta_epochs}")

    def on_epoch(epoch: int, entry: dict, improved: bool) -> None:
        # every epoch, atomically; finished only with the last: a run killed earlier leaves a checkpoint that
        # --test-only refuses. Without test-set selection the last one is saved after fit (stage "save").
        if epoch < last or cfg.select_on_test:
            model.save(folder / "ckpt.pth", meta(epoch, epoch == last))
        if improved:
            model.save(folder / "ckpt_best.pth", meta(epoch, False))

    evals = {}
    if cfg.select_on_test:
        evals = dict(eval_images=ImageList(data.test), eval_labels=[s.label for s in data.test],
                     eval_masks=GroundTruth(data.test), binarize_masks=dataset == "visa")
    with stage("fit", category=category, images=len(data.train)):
        model.fit(ImageList(data.train), textures=inputs["textures"], fg_masks=inputs["fg_masks"], dataset=dataset,
                  category=category, seed=seed, on_epoch=on_epoch, **evals)
    with stage("save", category=category):
        if not cfg.select_on_test and model.epoch is not None:
            model.save(folder / "ckpt.pth", meta(model.epoch, True))
        elif cfg.select_on_test and model.fit_info["epoch"] is not None:
            model.save(folder / "ckpt_best.pth", meta(model.epoch, True))  # the selected epoch of a finished run
        atomic_write_json(folder / "train_log.json", model.history)
    return {**model.fit_info, "fg": fg}


def _write(model: GlassModel, data, pred, val_scores, *, score_dir) -> dict:
    """Score files per group, one TIFF map per test image (original size), the crop-resolution pixel AUROC."""
    cfg, category = model.cfg, data.category
    groups = data.score_groups()
    by_group = scores_for_samples(pred.scores, data.test, data)
    if val_scores is not None:
        by_group["val"] = val_scores
    written = save_group_scores(data, METHOD, by_group, score_dir)
    for sample, m in zip(data.test, pred.maps):
        save_anomaly_maps(METHOD, category, [sample], maps=m[None], score_dir=score_dir)
    # the paper's training-time pixel AUROC: at crop resolution, GT bilinearly resized (VisA > 0, others floored)
    masks = GroundTruth(data.test)
    gts = [mask_at_crop(masks[i], model.resize, cfg.imagesize, data.dataset == "visa") for i in range(len(masks))]
    crops = [crop_of_map(m, cfg.imagesize) for m in pred.maps]
    metrics: dict[str, Any] = {f"image_auroc_{g}": _auroc([s.label for s in groups[g]], v)
                               for g, v in by_group.items() if g != "val"}
    metrics["pixel_auroc_crop"] = _auroc(np.stack(gts), np.stack(crops)) if gts else None
    return {"metrics": metrics, "score_files": [str(p) for p in written]}


if __name__ == "__main__":
    main()
