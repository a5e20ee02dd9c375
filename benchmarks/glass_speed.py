"""GLASS speed at full settings (288 px, 1536-d, discriminator 1024, 20 ascent steps, batch 8) on a fixed number
of synthetic images: training seconds per iteration/epoch and inference images/s.

    python benchmarks/glass_speed.py                      # wide_resnet50_2 (ckpt/ weights, else random)
    python benchmarks/glass_speed.py --backbone efficientnet_lite0
Timings do not depend on the weight values, so random weights are used when the file is missing (said in the log).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import atomic_write_json, get_logger, pick_device, seed_everything, set_threads  # noqa: E402
from dataset_readers import read_category  # noqa: E402
from dataset_readers.torch_data import imagenet_transform, make_loader  # noqa: E402
from methods.glass import Glass, GlassConfig, Trainer, fast_config, predict  # noqa: E402
from methods.glass_las import LASDataset, list_textures  # noqa: E402
from models.backbones import find_weights, load_backbone  # noqa: E402

N_IMAGES = 8  # one training batch: at full settings one iteration is ~2.7 TFLOP (21 discriminator passes)
log = get_logger("glass_speed")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="wide_resnet50_2")
    p.add_argument("--weights", default=None)
    p.add_argument("--images", type=int, default=N_IMAGES, help="training and test images")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtd-root", default=None)
    p.add_argument("--fast", action="store_true", help="the --fast settings instead of the full ones")
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    set_threads(args.threads)
    seed_everything(0)
    device = pick_device(args.device)
    cfg = fast_config(GlassConfig()) if args.fast else GlassConfig()
    weights = args.weights
    if weights is None:
        try:
            find_weights(args.backbone)
        except FileNotFoundError:
            weights = "random"
            log.info("no %s weights in ckpt/: timing with random weights (same cost)", args.backbone)
    model = Glass(load_backbone(args.backbone, weights), cfg).to(device)

    from dataset_readers.synthetic_loco import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, size=cfg.imagesize, n_train=args.images, n_val=1, n_test=args.images, seed=0,
                 categories=["synth_box"])
        data = read_category("synthetic_loco", "synth_box", tmp)
        train, test = data.train[:args.images], data.test[:args.images]
        las = LASDataset(train, list_textures(args.dtd_root), cfg.resize, cfg.imagesize, cfg.downsampling)
        loader = torch.utils.data.DataLoader(las, batch_size=cfg.batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
        trainer = Trainer(model, cfg, device)
        t = time.perf_counter()
        cache = trainer.cache_features(train, cfg.resize)
        t_embed = time.perf_counter() - t
        t = time.perf_counter()
        trainer.train_epoch(loader, cache, svd=1)
        _sync(device)
        t_epoch = time.perf_counter() - t
        iters = -(-len(train) // cfg.batch_size)
        loader = make_loader(test, imagenet_transform(cfg.resize, cfg.imagesize), batch_size=8)
        imgs = torch.cat([x for x, _ in loader]).to(device)
        model.patch_scores(imgs[:2])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(imgs), cfg.batch_size):
            model.patch_scores(imgs[i:i + cfg.batch_size])
        _sync(device)
        t_model = time.perf_counter() - t
        t = time.perf_counter()
        predict(model, test, cfg, cfg.resize, device, desc="predict")
        t_predict = time.perf_counter() - t
    out = {"device": str(device), "threads": torch.get_num_threads(), "backbone": args.backbone,
           "weights": "random" if weights == "random" else str(weights or "ckpt/"), "imagesize": cfg.imagesize,
           "embed_dim": cfg.target_dim, "step": cfg.step, "batch_size": cfg.batch_size, "train_images": len(train),
           "embed_train_s": t_embed, "epoch_s": t_epoch, "iteration_s": t_epoch / iters,
           "mvtec_bottle_epoch_s_estimate": t_epoch / iters * 27,
           "inference_img_per_s_model": len(imgs) / t_model,
           "inference_img_per_s_end_to_end": len(test) / t_predict}
    log.info("GLASS speed (%s, %d threads, %s, %d px, dim %d, %d ascent steps): epoch of %d images (%d iterations) "
             "%.1f s = %.1f s/iteration (MVTec bottle, 27 iterations: ~%.0f s/epoch); inference %.2f img/s "
             "(model only), %.2f img/s (load + score)", device, out["threads"], args.backbone, cfg.imagesize,
             cfg.target_dim, cfg.step, len(train), iters, t_epoch, out["iteration_s"],
             out["mvtec_bottle_epoch_s_estimate"], out["inference_img_per_s_model"],
             out["inference_img_per_s_end_to_end"])
    if args.out:
        atomic_write_json(args.out, out)
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
