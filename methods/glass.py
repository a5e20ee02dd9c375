"""GLASS (ECCV 2024): adaptor + discriminator on frozen patch features, trained with Global (gradient-ascent)
and Local (Perlin/DTD) anomaly synthesis. See docs/glass.md; file names refer to the official `cqylunlun/GLASS`."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common import atomic_write_json, get_logger, save_checkpoint, seed_everything
from common.checkpoints import META_KEY, checkpoint_meta, load_checked
from common.io import load_checkpoint
from dataset_readers import DatasetError, Sample, read_category
from dataset_readers.base import GOOD, image_size, load_image
from dataset_readers.torch_data import IMAGENET_MEAN, IMAGENET_STD, imagenet_transform, make_loader
from evaluation.score_files import safe_category, save_anomaly_maps, save_group_scores, scores_for_samples
from methods.glass_las import LASDataset, list_textures
from methods.knn import NonFiniteError, check_features, weights_cause
from methods.maps import resized_hw, uncrop, upsample_and_smooth
from models.feature_extractor import FeatureExtractor, local_patch_features
from models.glass_nets import Adaptor, Discriminator

METHOD = "glass"
log = get_logger("glass")

# Shipped per-class decisions (official datasets/excel/*_distribution.xlsx): classes listed here use the
# hypersphere variant (svd=1); every other class of these datasets uses the manifold variant. Datasets absent
# from this table are judged at run time.
HYPERSPHERE = {
    "mvtec_ad": {"bottle", "cable", "pill", "screw", "transistor"},
    "visa": {"cashew", "fryum", "pcb1", "pcb2", "pcb4", "pipe_fryum"},
    "mpdd": set(),
    "wfdd": set(),
}
TABLE_CLASSES = {
    "mvtec_ad": {"bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
                 "tile", "toothbrush", "transistor", "wood", "zipper"},
    "visa": {"candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
             "pcb4", "pipe_fryum"},
    "mpdd": {"bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"},
    "wfdd": {"grey_cloth", "grid_cloth", "yellow_cloth", "pink_flower"},
}
TABLE_OF = {"mvtec_ad": "mvtec_ad", "mad_man": "mvtec_ad", "mad_sys": "mvtec_ad", "visa": "visa", "mpdd": "mpdd",
            "wfdd": "wfdd"}
# Official run scripts: --fg 1 for MVTec, VisA, WFDD and MAD; 0 for MPDD and custom data. LOCO: off (no masks).
FG_DEFAULT = {"mvtec_ad": 1, "visa": 1, "wfdd": 1, "mad_man": 1, "mad_sys": 1, "mpdd": 0, "folder": 0,
              "synthetic_loco": 0, "mvtec_loco": 0}
TEST_ONLY_DATASETS = {"mad_man": "mvtec_ad", "mad_sys": "mvtec_ad"}  # evaluated with the MVTec AD checkpoints
LARGE_RESIZE_CLASSES = {"toothbrush", "wood"}  # SimpleNet's 329 -> 288 crop, kept by GLASS
DISTRIBUTION_MODES = {0: "table (judge if missing)", 1: "judge only", 2: "manifold", 3: "hypersphere",
                      4: "opposite of table"}


@dataclass
class GlassConfig:
    imagesize: int = 288
    resize: int = 288
    layers: tuple[str, ...] = ("layer2", "layer3")
    pretrain_dim: int = 1536
    target_dim: int = 1536
    patchsize: int = 3
    pre_proj: int = 1
    dsc_layers: int = 2
    dsc_hidden: int = 1024
    dsc_margin: float = 0.5
    meta_epochs: int = 640
    eval_epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-4
    noise: float = 0.015
    radius: float = 0.75
    p: float = 0.5
    step: int = 20
    ascent_lr: float = 0.001  # hard-coded in the official code
    limit: int = 392
    mining: int = 1
    downsampling: int = 8
    beta_mean: float = 0.5
    beta_std: float = 0.1
    rand_aug: int = 1
    fg: int | None = None  # None: per-dataset default (FG_DEFAULT)
    distribution: int = 0
    official_judge_grid: bool = False  # judge's l2 lattice on the official off-centre 578x578 grid (radius > 144)
    select_on_test: bool = False
    paper_resize: bool = True  # toothbrush/wood 329 -> 288
    workers: int = 0
    cache_max_gb: float = 4.0


FAST = dict(imagesize=64, resize=64, pretrain_dim=256, target_dim=256, dsc_hidden=256, meta_epochs=20, step=5)


def fast_config(cfg: GlassConfig) -> GlassConfig:
    return replace(cfg, **FAST)


# ---------------------------------------------------------------- model
class Glass(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: GlassConfig):
        super().__init__()
        self.cfg = cfg
        self.extractor = FeatureExtractor(backbone, cfg.layers)
        self.adaptor = Adaptor(cfg.target_dim, cfg.pre_proj) if cfg.pre_proj > 0 else nn.Identity()
        self.discriminator = Discriminator(cfg.target_dim, cfg.dsc_layers, cfg.dsc_hidden)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backbone (stops after the last layer) -> (B, h, w, D) aggregated patch features."""
        feats = self.extractor(images)
        return local_patch_features([feats[k] for k in self.cfg.layers], self.cfg.pretrain_dim, self.cfg.target_dim,
                                    self.cfg.patchsize)

    @torch.no_grad()
    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) patch anomaly probabilities (eval mode: BatchNorm running statistics)."""
        was = self.training
        self.eval()
        emb = self.embed(images)
        b, h, w, d = emb.shape
        s = self.discriminator(self.adaptor(emb.reshape(-1, d))).reshape(b, h, w)
        self.train(was)
        return s

    def state(self) -> dict:
        return {"discriminator": {k: v.detach().cpu() for k, v in self.discriminator.state_dict().items()},
                "pre_projection": {k: v.detach().cpu() for k, v in self.adaptor.state_dict().items()}}

    def load_state(self, ckpt: dict, path: Path) -> None:
        try:
            self.discriminator.load_state_dict(ckpt["discriminator"])
            self.adaptor.load_state_dict(ckpt["pre_projection"])
        except (KeyError, RuntimeError) as exc:
            raise RuntimeError(f"checkpoint {path} does not fit this GLASS configuration "
                               f"({str(exc).splitlines()[0]}); use the --fast/dimension flags it was trained with") from None


# ---------------------------------------------------------------- GAS / LAS losses
def truncated_projection(g: torch.Tensor, centre: torch.Tensor, r_min, r_max) -> torch.Tensor:
    """Radially move each row of g so that ||g - centre|| lies in [r_min, r_max] (differentiable)."""
    h = g - centre
    n = h.norm(dim=1, keepdim=True)
    return centre + h * (n.clamp(min=r_min, max=r_max) / (n + 1e-10))


def focal_ohem(scores: torch.Tensor, target: torch.Tensor, p: float = 0.5, gamma: float = 2.0,
               smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on the two-class vector [1-s, s], on rows whose squared error is >= its p-quantile.

    The selection is a 0/1 weight rather than boolean indexing, so no device-to-host sync is needed.
    """
    err = (scores - target) ** 2
    keep = (err >= torch.quantile(err.detach(), p)).float()
    prob = torch.stack([1 - scores, scores], dim=1)
    onehot = F.one_hot(target.long(), 2).float().clamp(smooth, 1 - smooth)
    pt = (onehot * prob).sum(1) + smooth
    rows = -((1 - pt) ** gamma) * pt.log()
    return (rows * keep).sum() / keep.sum()


def glass_loss(disc: nn.Module, x: torch.Tensor, f: torch.Tensor, m: torch.Tensor, c: torch.Tensor, svd: int,
               cfg: GlassConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training objective (official `glass.py` `_train_discriminator`). x: normal features, f: LAS features,
    m: LAS patch labels, c: centres,
    all (N, D) / (N,) on one device. Returns the total loss and detached logging tensors (no host syncs)."""
    n = x.shape[0]
    mb = m.bool()
    with torch.no_grad():  # r_t is a number in the official code (no gradient through the quantile)
        d_f = (f - c).norm(dim=1)
        dists = torch.cat([(x - c).norm(dim=1), torch.where(mb, torch.full_like(d_f, float("nan")), d_f)])
        r_t = torch.nanquantile(dists, cfg.radius)
    g = x + torch.randn_like(x) * cfg.noise
    for step in range(cfg.step + 1):
        s = disc(torch.cat([x, g]))[:, 0]  # joint batch: BatchNorm statistics over normal and synthetic rows
        s_x, s_g = s[:n], s[n:]
        loss_g = F.binary_cross_entropy(s_g, torch.ones_like(s_g))
        if step == cfg.step or not cfg.mining:
            break
        (grad,) = torch.autograd.grad(loss_g, g)
        g = g + cfg.ascent_lr * grad / (grad.norm(dim=1, keepdim=True) + 1e-10)  # constant shift, graph kept via g
        if (step + 1) % 5 == 0:
            g = truncated_projection(g, x, 0.5, 1.0) if svd == 0 else truncated_projection(g, c, r_t, 2 * r_t)
    bce = F.binary_cross_entropy(s_x, torch.zeros_like(s_x)) + loss_g
    if svd == 1:  # hypersphere LAS: masked LAS features pushed into [2 r_t, 4 r_t] around the centre
        f = torch.where(mb[:, None], truncated_projection(f, c, 2 * r_t, 4 * r_t), f)
    s_f = disc(f)[:, 0]
    focal = focal_ohem(s_f, m.float(), cfg.p)
    with torch.no_grad():
        stats = {"loss": (bce + focal).detach(), "bce": bce.detach(), "focal": focal.detach(), "r_t": r_t,
                 "r_g": torch.quantile((g - c).norm(dim=1), cfg.radius),
                 "p_true": (s_x < cfg.dsc_margin).float().mean(), "p_fake": (s_g >= cfg.dsc_margin).float().mean()}
    return bce + focal, stats


# ---------------------------------------------------------------- spectrogram judge (`utils.py` distribution_judge)
def lattice_count(radius: float, official_grid: bool = False) -> int:
    """Lattice points (x, y) with sqrt(x^2 + y^2) <= radius around the centre, compared as the official
    `utils.distribution_judge` does: the radius is itself the sqrt of an integer, so boundary points count (comparing
    squares drops them when sqrt(k)^2 rounds below k). The official grid is np.indices((578, 578)) with the centre at
    (144, 144), which truncates the disc for radius > 144; the default grid is centred (no truncation)."""
    if official_grid:
        yy, xx = np.indices((578, 578))
        yy, xx = yy - 144, xx - 144
    else:
        yy, xx = np.mgrid[-289:289, -289:289]
    return int((np.sqrt(xx ** 2 + yy ** 2) <= radius).sum())


def distribution_judge(mean_bgr: np.ndarray, official_grid: bool = False) -> tuple[int, dict]:
    """1 = hypersphere if the blurred mean training image has a dense, extended bright spectrum, else 0.
    `official_grid`: count the l2 lattice on the official off-centre grid (differs only for radius > 144)."""
    img = cv2.resize(mean_bgr, (289, 289))
    gray = cv2.blur(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), (39, 39))
    with np.errstate(divide="ignore"):
        mag = 20 * np.log(np.abs(np.fft.fftshift(np.fft.fft2(gray))))
    ys, xs = np.nonzero(mag > 170)
    n = len(xs)
    if n == 0:
        return 0, {"n": 0}
    cx = cy = 144
    side_x, side_y = int(np.abs(xs - cx).max()), int(np.abs(ys - cy).max())
    radius = float(np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2).max())
    l1 = n / (4 * max(side_x, 1) * max(side_y, 1))
    l2 = n / (lattice_count(radius, official_grid) + 1e-10)  # + 1e-10 as the official
    flag = int((l1 > 0.21 or l2 > 0.21) and radius > 12 and n > 60)
    return flag, {"n": n, "radius": radius, "l1_density": l1, "l2_density": l2}


@torch.no_grad()
def mean_training_image(samples: Sequence[Sample], size: int, batch_size: int, device) -> np.ndarray:
    """Mean of per-batch mean images (images resized to exactly size x size), as 8-bit BGR."""
    loader = make_loader(samples, imagenet_transform((size, size)), batch_size=batch_size)
    means = [imgs.to(device).mean(0) for imgs, _ in loader]
    mean = torch.stack(means).mean(0).cpu()
    mean = mean * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    rgb = (mean.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])


def choose_variant(dataset: str, category: str, mode: int, judge) -> tuple[int, str]:
    """(svd, where the choice came from). `judge()` runs the spectrogram test only when it is needed."""
    cls = category.split("/")[-1]
    table = TABLE_OF.get(dataset)
    known = table is not None and cls in TABLE_CLASSES[table]
    table_svd = int(cls in HYPERSPHERE[table]) if known else None
    if mode == 2:
        return 0, "forced manifold (--distribution 2)"
    if mode == 3:
        return 1, "forced hypersphere (--distribution 3)"
    if mode in (0, 4):
        if table_svd is None:  # official: exits after judging (issue #6); here: judge, then train in this run
            svd = judge()
            return (svd if mode == 0 else 1 - svd), "spectrogram judge (class not in the shipped table)"
        return (table_svd if mode == 0 else 1 - table_svd), f"shipped {table} table" + (" (inverted)" if mode == 4 else "")
    raise ValueError(f"--distribution {mode} is not a training mode; choose from {DISTRIBUTION_MODES}")


# ---------------------------------------------------------------- geometry helpers
def class_resize(category: str, cfg: GlassConfig) -> int:
    cls = category.split("/")[-1]
    if cfg.paper_resize and cls in LARGE_RESIZE_CLASSES and cfg.distribution != 1:
        return int(round(cfg.imagesize * 329 / 288))
    return cfg.resize


def uncrop_map(m: np.ndarray, w: int, h: int, resize: int, crop: int) -> np.ndarray:
    """One crop x crop map back into the Resize(resize) frame of a w x h image (see methods.maps.uncrop)."""
    return uncrop(m[None], resized_hw(w, h, resize), crop)[0]


def gt_at_crop(sample: Sample, resize: int, crop: int, binarize: bool) -> np.ndarray:
    """Official GT handling for the training-time metric: bilinear resize + crop; VisA > 0, others floor (== 1)."""
    from torchvision import transforms as T

    from dataset_readers.base import union_mask

    if sample.defect_type == GOOD or not sample.mask_paths:
        return np.zeros((crop, crop), dtype=bool)
    from PIL import Image

    mask = Image.fromarray(union_mask(sample).astype(np.uint8) * 255)
    t = T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(crop), T.ToTensor()])(mask)[0].numpy()
    return t > 0 if binarize else t >= 1.0


def _auroc(labels, scores) -> float:
    """Image/pixel AUROC from the evaluation module; NaN when only one class is present (e.g. a LOCO val group)."""
    from evaluation.metrics import auroc_from_groups

    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores).reshape(-1)
    if labels.all() or not labels.any():
        return float("nan")
    return auroc_from_groups(scores[~labels], scores[labels])


# ---------------------------------------------------------------- training
class Trainer:
    """Trains one category. Normal-image features are embedded once (frozen backbone, no augmentation) and cached
    on the device; LAS images change every step and are embedded per batch."""

    def __init__(self, model: Glass, cfg: GlassConfig, device: torch.device, seed: int = 0):
        self.model, self.cfg, self.device, self.seed = model.to(device), cfg, device, seed
        self.opt_adaptor = (torch.optim.Adam(model.adaptor.parameters(), lr=cfg.lr, weight_decay=1e-5)
                            if cfg.pre_proj > 0 else None)
        self.opt_disc = torch.optim.AdamW(model.discriminator.parameters(), lr=2 * cfg.lr)  # default wd 0.01

    @torch.no_grad()
    def cache_features(self, samples: Sequence[Sample], resize: int) -> torch.Tensor:
        loader = make_loader(samples, imagenet_transform(resize, self.cfg.imagesize), batch_size=self.cfg.batch_size,
                             workers=self.cfg.workers)
        feats = []
        for imgs, idx in tqdm(loader, desc="embed train", leave=False):
            e = self.model.embed(imgs.to(self.device))
            check_features(e, imgs, [samples[int(i)] for i in idx], self.model.extractor.backbone)
            feats.append(e.reshape(e.shape[0], -1, e.shape[-1]))
        out = torch.cat(feats)
        gb = out.numel() * 4 / 2 ** 30
        if gb > self.cfg.cache_max_gb:
            log.info("feature cache %.1f GB > --cache-max-gb %.1f: stored as float16", gb, self.cfg.cache_max_gb)
            out = out.half()
        return out

    @torch.no_grad()
    def centres(self, cache: torch.Tensor) -> torch.Tensor:
        """Per-position centre c (P, D): mean of per-batch means of adaptor(features) (official weighting)."""
        self.model.eval()
        bs = self.cfg.batch_size
        means = [self.model.adaptor(cache[i:i + bs].float()).mean(0) for i in range(0, len(cache), bs)]
        return torch.stack(means).mean(0)

    def train_epoch(self, loader, cache: torch.Tensor, svd: int) -> dict[str, float]:
        self.model.train()
        c = self.centres(cache)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        seen = iters = 0
        for idx, aug, mask_s in loader:
            x = self.model.adaptor(cache[idx.to(self.device)].float().reshape(-1, cache.shape[-1]))
            emb = self.model.embed(aug.to(self.device, non_blocking=True))
            if emb.shape[1:3] != mask_s.shape[1:]:
                raise RuntimeError(f"feature grid {tuple(emb.shape[1:3])} != LAS mask grid {tuple(mask_s.shape[1:])};"
                                   f" --downsampling must equal the stride of {self.cfg.layers[0]}")
            f = self.model.adaptor(emb.reshape(-1, emb.shape[-1]))
            m = mask_s.to(self.device).reshape(-1)
            cc = c.repeat(len(idx), 1)
            try:
                loss, stats = glass_loss(self.model.discriminator, x, f, m, cc, svd, self.cfg)
            except RuntimeError as exc:
                if "between 0 and 1" not in str(exc):
                    raise
                raise self.diverged(emb, aug, idx) from None
            if self.opt_adaptor is not None:
                self.opt_adaptor.zero_grad(set_to_none=True)
            self.opt_disc.zero_grad(set_to_none=True)
            loss.backward()
            if self.opt_adaptor is not None:
                self.opt_adaptor.step()
            self.opt_disc.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v
            iters += 1
            seen += len(idx)
            if seen > self.cfg.limit:
                break
        out = {k: float(v) / iters for k, v in sums.items()}  # one host sync per epoch
        if not math.isfinite(out.get("loss", 0.0)):
            raise self.diverged(None, None, None)
        return out

    def diverged(self, emb, aug, idx) -> NonFiniteError:
        """Name the real cause of a NaN discriminator output: the LAS images' features (weights), or training."""
        if emb is not None and not bool(torch.isfinite(emb).all()):
            return NonFiniteError(f"features of the LAS images are not finite: {weights_cause(self.model.extractor.backbone)}"
                                  if bool(torch.isfinite(aug).all()) else
                                  "the LAS images are not finite: check the DTD textures (--dtd-root) and --fg-root masks")
        return NonFiniteError(f"GLASS training diverged: the discriminator output became NaN although its input "
                              f"features are finite; lower --lr (now {self.cfg.lr:g})")


# ---------------------------------------------------------------- prediction
@torch.no_grad()
def predict(model: Glass, samples: Sequence[Sample], cfg: GlassConfig, resize: int, device, *,
            write_maps: tuple[str, str] | None = None, gt: bool = False, binarize_gt: bool = False,
            desc: str = "predict") -> dict:
    """Image scores (max raw patch probability) and, optionally, TIFF maps (σ=4 smoothing) written per batch
    so memory stays bounded (official issue #65). With `gt`, also the crop-resolution pixel AUROC."""
    loader = make_loader(samples, imagenet_transform(resize, cfg.imagesize), batch_size=cfg.batch_size,
                         workers=cfg.workers)
    scores, pix_s, pix_l = [], [], []
    for imgs, idx in tqdm(loader, desc=desc, leave=False):
        s = model.patch_scores(imgs.to(device))
        scores.append(s.flatten(1).amax(1).cpu())
        if write_maps is None and not gt:
            continue
        maps = upsample_and_smooth(s, (cfg.imagesize, cfg.imagesize), sigma=4)
        batch = [samples[int(i)] for i in idx]
        if gt:
            pix_s.append(maps.reshape(-1))
            pix_l.append(np.stack([gt_at_crop(sm, resize, cfg.imagesize, binarize_gt) for sm in batch]).reshape(-1))
        if write_maps is not None:
            score_dir, category = write_maps
            for sm, m in zip(batch, maps):
                w, h = image_size(sm.path)
                save_anomaly_maps(METHOD, category, [sm], uncrop_map(m, w, h, resize, cfg.imagesize)[None], score_dir)
    out = {"scores": torch.cat(scores).numpy().astype(np.float64)}
    bad = np.flatnonzero(~np.isfinite(out["scores"]))
    if len(bad):
        raise _nonfinite_score(model, samples[bad[0]], len(bad), resize, cfg, device)
    if gt:
        out["pixel_auroc"] = _auroc(np.concatenate(pix_l), np.concatenate(pix_s))
    return out


def _nonfinite_score(model: Glass, sample: Sample, n_bad: int, resize: int, cfg: GlassConfig, device) -> NonFiniteError:
    """Runs only after a failure: the image's features (backbone weights / image), else the trained weights."""
    imgs = imagenet_transform(resize, cfg.imagesize)(load_image(sample.path))[None]
    try:
        check_features(model.embed(imgs.to(device)), imgs, [sample], model.extractor.backbone)
    except NonFiniteError as exc:
        return exc
    bad = [n for n, p in list(model.discriminator.named_parameters()) + list(model.adaptor.named_parameters())
           if not bool(torch.isfinite(p).all())]
    where = f" ({n_bad} images)" if n_bad > 1 else ""
    if bad:
        return NonFiniteError(f"GLASS score of {sample.path}{where} is not finite: the trained discriminator/adaptor "
                              f"weights hold NaN or Inf ({bad[0]}), i.e. the training diverged; re-train with a lower "
                              f"--lr (now {cfg.lr:g})")
    return NonFiniteError(f"GLASS score of {sample.path}{where} is not finite although its features and the model "
                          "weights are finite; re-train with a lower --lr")


# Settings that do not change the trained model (speed, memory, which saved epoch is scored).
NON_MODEL_KEYS = ("workers", "cache_max_gb", "select_on_test", "eval_epochs")


def glass_meta(backbone: nn.Module, cfg: GlassConfig, dataset: str, category: str, train=None, *,
               finished: bool = True, **extra) -> dict:
    config = {k: v for k, v in asdict(cfg).items() if k not in NON_MODEL_KEYS}
    return checkpoint_meta(method=METHOD, dataset=dataset, category=category, model=backbone, config=config,
                           train_samples=train, finished=finished, **extra)


# ---------------------------------------------------------------- one category, end to end
def ckpt_folder(ckpt_dir: str | Path, dataset: str, category: str) -> Path:
    return Path(ckpt_dir) / METHOD / dataset / safe_category(category)


def run_category(backbone: nn.Module, dataset: str, category: str, cfg: GlassConfig, *, data_root=None,
                 dtd_root=None, fg_root=None, score_dir, ckpt_dir, device, seed: int = 0,
                 checkpoint: str | None = None, test_only: bool = False, allow_unfinished: bool = False) -> dict:
    seed_everything(seed)
    data = read_category(dataset, category, data_root)
    cls = category.split("/")[-1]
    resize = class_resize(category, cfg)
    model = Glass(backbone, cfg).to(device)
    folder = ckpt_folder(ckpt_dir, dataset, category)
    t0 = time.time()
    summary: dict = {"dataset": dataset, "category": category, "config": asdict(cfg), "resize": resize}

    if cfg.distribution == 1:  # judge only, no training (official mode 1); never touches the shipped tables
        svd, info = distribution_judge(mean_training_image(data.train, cfg.imagesize, cfg.batch_size, device),
                                       cfg.official_judge_grid)
        summary.update(svd=svd, judge=info)
        atomic_write_json(folder / "judge.json", summary)
        log.info("%s/%s: judge says %s (%s) -> %s", dataset, category, ["manifold", "hypersphere"][svd], info,
                 folder / "judge.json")
        return summary

    source_dataset = TEST_ONLY_DATASETS.get(dataset)
    if checkpoint or test_only or source_dataset:
        path = Path(checkpoint) if checkpoint else _default_ckpt(
            ckpt_folder(ckpt_dir, source_dataset, cls) if source_dataset else folder, cfg)
        hint = (f"train it first: python glass.py --dataset {source_dataset or dataset} --categories "
                f"{cls if source_dataset else category}, or pass --checkpoint")
        # MAD is scored with the MVTec AD model of the class: its record names mvtec_ad/<class> and MVTec's images
        expected = glass_meta(backbone, cfg, source_dataset or dataset, cls if source_dataset else category,
                              None if source_dataset else data.train)
        ckpt, _ = load_checked(path, expected, fix=f"re-train: python glass.py --dataset {source_dataset or dataset} "
                               f"--categories {cls if source_dataset else category}",
                               allow_unfinished=allow_unfinished, logger=log, missing_hint=hint)
        model.load_state(ckpt, path)
        summary.update(checkpoint=str(path), svd=ckpt.get("svd"), epoch=ckpt.get("epoch"))
        log.info("%s/%s: test only, weights from %s (epoch %s)", dataset, category, path, ckpt.get("epoch"))
    else:
        summary.update(_train(model, data, cfg, resize, dataset, category, folder, dtd_root, fg_root, device, seed))

    groups = data.score_groups()
    res = predict(model, data.test, cfg, resize, device, write_maps=(str(score_dir), category), gt=True,
                  binarize_gt=dataset == "visa", desc="test")
    by_group = scores_for_samples(res["scores"], data.test, data)
    if "val" in groups:
        by_group["val"] = predict(model, groups["val"], cfg, resize, device, desc="validation")["scores"]
    written = save_group_scores(data, METHOD, by_group, score_dir)
    metrics = {f"image_auroc_{g}": _auroc([s.label for s in groups[g]], v) for g, v in by_group.items() if g != "val"}
    metrics["pixel_auroc_crop"] = res["pixel_auroc"]
    summary.update(metrics=metrics, seconds=time.time() - t0, score_files=[str(p) for p in written])
    atomic_write_json(folder / "results.json", summary)
    log.info("%s/%s: image AUROC %s; pixel AUROC (crop) %s; scores -> %s, maps -> %s/anomaly_maps/%s/%s", dataset,
             category, ", ".join(f"{k[len('image_auroc_'):]} {100 * v:.1f}%" for k, v in metrics.items()
                                 if k.startswith("image_auroc_")) or "n/a (no labels)",
             "n/a" if metrics["pixel_auroc_crop"] is None else f"{100 * metrics['pixel_auroc_crop']:.1f}%",
             Path(written[0]).parent, score_dir, METHOD, category)
    return summary


def _default_ckpt(folder: Path, cfg: GlassConfig) -> Path:
    best = folder / "ckpt_best.pth"
    return best if cfg.select_on_test and best.is_file() else folder / "ckpt.pth"


def _train(model: Glass, data, cfg: GlassConfig, resize: int, dataset: str, category: str, folder: Path,
           dtd_root, fg_root, device, seed: int) -> dict:
    if not data.train:
        raise DatasetError(f"{dataset}/{category} has no training images; GLASS needs train/good (or --checkpoint)")
    fg = FG_DEFAULT.get(dataset, 0) if cfg.fg is None else cfg.fg
    fg_dir = None
    if fg:
        fg_dir = Path(fg_root) / category if fg_root else Path(data.root).parent / "fg_mask" / category
    textures = list_textures(dtd_root)
    las = LASDataset(data.train, textures, resize, cfg.imagesize, cfg.downsampling, fg_dir, bool(cfg.rand_aug),
                     cfg.beta_mean, cfg.beta_std, seed)
    svd, source = choose_variant(dataset, category, cfg.distribution, lambda: distribution_judge(
        mean_training_image(data.train, cfg.imagesize, cfg.batch_size, device), cfg.official_judge_grid)[0])
    log.info("%s/%s: %s variant (%s), fg=%d, resize %d -> crop %d, %d train images, %d epochs; checkpoints -> %s",
             dataset, category, ["manifold", "hypersphere"][svd], source, fg, resize, cfg.imagesize, len(data.train),
             cfg.meta_epochs, folder)
    trainer = Trainer(model, cfg, device, seed)
    cache = trainer.cache_features(data.train, resize)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(las, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda")
    history, best, best_epoch = [], -math.inf, None
    bar = tqdm(range(cfg.meta_epochs), desc=f"glass {category}")
    t_train = 0.0
    for epoch in bar:
        las.set_epoch(epoch)
        t = time.time()
        stats = trainer.train_epoch(loader, cache, svd)
        t_train += time.time() - t
        entry = {"epoch": epoch, **stats}
        # finished only with the last epoch: a run killed earlier leaves a checkpoint that --test-only refuses
        meta = glass_meta(model.extractor.backbone, cfg, dataset, category, data.train,
                          finished=epoch == cfg.meta_epochs - 1, progress=f"epoch {epoch + 1} of {cfg.meta_epochs}")
        state = {**model.state(), "epoch": epoch, "svd": svd, "config": asdict(cfg), "category": category,
                 META_KEY: meta}
        if cfg.select_on_test and (epoch + 1) % cfg.eval_epochs == 0:
            # Official protocol: choose the epoch on the TEST set (max I-AUROC + P-AUROC, ties keep the earlier).
            res = predict(model, data.test, cfg, resize, device, gt=True, binarize_gt=dataset == "visa", desc="eval")
            entry.update(i_auroc=_auroc([s.label for s in data.test], res["scores"]), p_auroc=res["pixel_auroc"])
            crit = np.nan_to_num(entry["i_auroc"]) + np.nan_to_num(entry["p_auroc"])
            if crit > best:
                best, best_epoch = crit, epoch
                save_checkpoint(folder / "ckpt_best.pth", state)
        save_checkpoint(folder / "ckpt.pth", state)
        history.append(entry)
        bar.set_postfix({k: f"{v:.3f}" for k, v in entry.items() if k in ("loss", "p_true", "p_fake", "i_auroc")})
    atomic_write_json(folder / "train_log.json", history)
    if cfg.select_on_test and best_epoch is not None:
        best_path = folder / "ckpt_best.pth"
        best_state = load_checkpoint(best_path, hint="re-train")
        best_state[META_KEY]["finished"] = True  # the selected epoch of a run that has now finished
        save_checkpoint(best_path, best_state)
        model.load_state(best_state, best_path)
        log.info("%s/%s: TEST-SET model selection picked epoch %d (official protocol)", dataset, category, best_epoch)
    return {"svd": svd, "variant_source": source, "fg": fg, "epoch": best_epoch if cfg.select_on_test else
            cfg.meta_epochs - 1, "train_seconds_per_epoch": t_train / max(1, cfg.meta_epochs),
            "final_loss": history[-1]["loss"] if history else None}
