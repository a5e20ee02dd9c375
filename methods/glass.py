"""GLASS (ECCV 2024): adaptor + discriminator on frozen patch features, trained with Global (gradient-ascent)
and Local (Perlin/DTD) anomaly synthesis. See docs/glass.md; file names refer to the official `cqylunlun/GLASS`.

    model = GlassModel(backbone, cfg, device=device, resize=class_resize(category, cfg))
    model.fit(ImageList(data.train), textures=ImageList(list_textures(dtd_root)), dataset=..., category=...)
    pred = model.predict(ImageList(data.test))          # max patch probability; σ=4 maps, crop undone
    model.save(path, glass_meta(...)); GlassModel.load(path) / methods.base.load_model(path)

The model reads no files: the script passes the training images, the DTD textures, the optional foreground masks
and (for the official test-set epoch selection) the test images with their labels and masks.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common import get_logger
from common.checkpoints import META_KEY, checkpoint_meta
from common.config import opt
from common.errors import CheckpointError, UserError
from dataset_readers import DatasetError
from dataset_readers.torch_data import IMAGENET_MEAN, IMAGENET_STD, imagenet_transform
from methods.base import (BACKBONE_STATE_KEY, AnomalyModel, Prediction, backbone_from_checkpoint,
                          backbone_state_if_random, check_backbone, image_sizes, reduced_precision)
from methods.glass_las import LASDataset, as_images, image_names
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
    """Defaults = the official run scripts (shell/run-*.sh) and main.py; `fast()` = the tests' and demo's sizes."""
    imagesize: int = opt(288, "centre-crop size in px; also the resize of the shorter side (toothbrush/wood: "
                              "see --paper-resize)")
    resize: int = opt(288, "shorter side before the crop (set together with --imagesize)", cli=False)
    layers: tuple[str, ...] = opt(("layer2", "layer3"), "backbone layers of the patch features", cli=False)
    pretrain_dim: int = opt(1536, "per-layer and target patch-feature dimension (official pretrain = target "
                                  "embed dimension)", flag="--embed-dim", metavar="DIM")
    target_dim: int = opt(1536, "target patch-feature dimension (set together with --embed-dim)", cli=False)
    patchsize: int = opt(3, "local aggregation neighbourhood (patchsize x patchsize)", cli=False)
    pre_proj: int = opt(1, "Linear layers of the feature adaptor (pre-projection); 0: no adaptor")
    dsc_layers: int = opt(2, "discriminator depth in Linear layers")
    dsc_hidden: int = opt(1024, "discriminator hidden width")
    dsc_margin: float = opt(0.5, "score threshold of the logged p_true / p_fake", cli=False)
    meta_epochs: int = opt(640, "training epochs (official meta_epochs)", flag="--epochs", aliases=("--meta-epochs",),
                           metavar="N")
    eval_epochs: int = opt(1, "with --select-on-test: evaluate on the test set every N epochs")
    batch_size: int = opt(8, "training and inference batch size")
    lr: float = opt(1e-4, "adaptor learning rate (the discriminator's is twice it)")
    noise: float = opt(0.015, "std of the Gaussian feature noise that starts GAS")
    radius: float = opt(0.75, "quantile of the feature distances to the centre that gives the radius r_t")
    p: float = opt(0.5, "OHEM: focal loss on the LAS patches whose squared error reaches this quantile")
    step: int = opt(20, "GAS gradient-ascent steps (a truncated projection after every 5th)")
    ascent_lr: float = opt(0.001, "GAS step size (hard-coded in the official code)", cli=False)
    limit: int = opt(392, "an epoch stops once more than this many training images were seen")
    mining: int = opt(1, "1: GAS gradient ascent; 0: Gaussian noise only")
    downsampling: int = opt(8, "LAS mask pooling factor (= feature stride of the first layer)")
    beta_mean: float = opt(0.5, "mean of the LAS blend factor beta (clipped to [0.2, 0.8])", cli=False)
    beta_std: float = opt(0.1, "std of the LAS blend factor beta", cli=False)
    rand_aug: int = opt(1, "1: three of the nine official texture ops on every DTD image; 0: none")
    fg: int | None = opt(None, "foreground masks in LAS, 1 or 0; unset: per dataset (1 for mvtec_ad, visa, wfdd, "
                               "mad; 0 for mpdd, folder, LOCO)", type=int, choices=(0, 1))
    distribution: int = opt(0, "; ".join(f"{k}: {v}" for k, v in DISTRIBUTION_MODES.items()),
                            choices=sorted(DISTRIBUTION_MODES))
    official_judge_grid: bool = opt(False, "spectrogram judge: count the l2 lattice on the official off-centre "
                                           "578x578 grid (centre at 144: discs of radius > 144 are truncated)")
    select_on_test: bool = opt(False, "OFFICIAL protocol: keep the epoch with the best test I-AUROC + P-AUROC "
                                      "(test-set selection)")
    paper_resize: bool = opt(True, "toothbrush/wood: resize to 329 and crop 288 (SimpleNet's crop, kept by GLASS); "
                                   "--no-paper-resize: resize them to the crop size")
    workers: int = opt(0, "data-loader worker processes (the numbers do not depend on it)")
    cache_max_gb: float = opt(4.0, "above this size the cached training features are stored as float16")
    dtype: str = opt("fp32", "inference precision: fp32 exact; bf16/fp16 autocast (approximate)",
                     choices=("fp32", "bf16", "fp16"))

    @classmethod
    def fast(cls, **over) -> "GlassConfig":
        """64 px, 256-d, 20 epochs, 5 ascent steps: the tests' and the demo's sizes."""
        return cls(**{**FAST, **over})

    @classmethod
    def from_record(cls, record: Mapping) -> "GlassConfig":
        """The config a checkpoint stored (asdict); unknown keys are dropped, missing ones keep their default."""
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(record).items() if k in known}
        return cls(**values)


FAST = dict(imagesize=64, resize=64, pretrain_dim=256, target_dim=256, dsc_hidden=256, meta_epochs=20, step=5)


def fast_config(cfg: GlassConfig) -> GlassConfig:
    return replace(cfg, **FAST)


# Settings that do not change the trained model (speed, memory, precision, which saved epoch is scored).
NON_MODEL_KEYS = ("workers", "cache_max_gb", "select_on_test", "eval_epochs", "dtype")


# ---------------------------------------------------------------- networks
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
        """CPU copies of the trained weights (copies: on the CPU, .cpu() would share the live parameters)."""
        return {"discriminator": {k: v.detach().cpu().clone() for k, v in self.discriminator.state_dict().items()},
                "pre_projection": {k: v.detach().cpu().clone() for k, v in self.adaptor.state_dict().items()}}

    def load_state(self, ckpt: Mapping, path: Any = None) -> None:
        try:
            self.discriminator.load_state_dict(ckpt["discriminator"])
            self.adaptor.load_state_dict(ckpt["pre_projection"])
        except (KeyError, RuntimeError) as exc:
            where = f"checkpoint {path}" if path else "the checkpoint"
            raise CheckpointError(f"{where} does not fit this GLASS configuration ({str(exc).splitlines()[0]}); "
                                  "use the --fast/dimension flags it was trained with") from None


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


def glass_loss(disc: nn.Module, x: torch.Tensor, f: torch.Tensor, m: torch.Tensor, c: torch.Tensor, *, svd: int,
               cfg: GlassConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training objective (official `glass.py` `_train_discriminator`). x: normal features, f: LAS features,
    m: LAS patch labels, c: centres, all (N, D) / (N,) on one device; svd: 1 hypersphere, 0 manifold. Returns the total loss and detached logging tensors (no host syncs)."""
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
def mean_training_image(images: Sequence[Any], size: int, batch_size: int, device) -> np.ndarray:
    """Mean of per-batch mean images (images resized to exactly size x size), as 8-bit BGR."""
    loader = image_loader(as_images(images), imagenet_transform((size, size)), batch_size=batch_size)
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


def crop_of_map(m: np.ndarray, crop: int) -> np.ndarray:
    """The centre crop x crop part of a map in the resized frame (what uncrop_map placed there), e.g. for the
    crop-resolution pixel AUROC of predict()'s maps."""
    h, w = m.shape
    if (h, w) == (crop, crop):
        return m
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return m[top:top + crop, left:left + crop]


def mask_at_crop(mask: np.ndarray | None, resize: int, crop: int, binarize: bool) -> np.ndarray:
    """Official GT handling for the training-time metric: bilinear resize + crop of the (H, W) mask (None: a good
    image); VisA (binarize) > 0, the others floor (== 1)."""
    from PIL import Image
    from torchvision import transforms as T

    if mask is None:
        return np.zeros((crop, crop), dtype=bool)
    img = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    t = T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(crop), T.ToTensor()])(img)[0].numpy()
    return t > 0 if binarize else t >= 1.0


def _auroc(labels, scores) -> float:
    """Image/pixel AUROC from the evaluation module; NaN when only one class is present (e.g. a LOCO val group)."""
    from evaluation.metrics import auroc_from_groups

    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores).reshape(-1)
    if labels.all() or not labels.any():
        return float("nan")
    return auroc_from_groups(scores[~labels], scores[labels])



# ---------------------------------------------------------------- data
class _Transformed(torch.utils.data.Dataset):
    """(transform(images[i]), i): the images are PIL images, decoded lazily (in the workers) by an ImageList."""

    def __init__(self, images: Sequence[Any], transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), i


def image_loader(images: Sequence[Any], transform: Callable, *, batch_size: int,
                 workers: int = 0) -> torch.utils.data.DataLoader:
    """In-order batches. The loader has a generator of its own (as dataset_readers.torch_data.make_loader): the
    workers' seed must not be drawn from the global RNG, whose state GAS's noise depends on."""
    return torch.utils.data.DataLoader(_Transformed(images, transform), batch_size=batch_size, shuffle=False,
                                       num_workers=workers, generator=torch.Generator().manual_seed(0),
                                       pin_memory=torch.cuda.is_available())


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
    def cache_features(self, images: Sequence[Any], resize: int) -> torch.Tensor:
        """(N, P, D) features of the training images (PIL images, or reader samples / paths)."""
        images = as_images(images)
        names = image_names(images)
        loader = image_loader(images, imagenet_transform(resize, self.cfg.imagesize), batch_size=self.cfg.batch_size,
                              workers=self.cfg.workers)
        out = None  # filled in place: no second copy during a concatenation or a float16 conversion
        for imgs, idx in tqdm(loader, desc="embed train", leave=False):
            e = self.model.embed(imgs.to(self.device))
            check_features(e, imgs, [names[int(i)] for i in idx], self.model.extractor.backbone)
            e = e.reshape(e.shape[0], -1, e.shape[-1])
            if out is None:
                gb = len(images) * e[0].numel() * 4 / 2 ** 30
                half = gb > self.cfg.cache_max_gb
                if half:
                    log.info("feature cache %.1f GB > --cache-max-gb %.1f: stored as float16", gb,
                             self.cfg.cache_max_gb)
                out = torch.empty(len(images), *e.shape[1:], dtype=torch.float16 if half else e.dtype,
                                  device=e.device)
            out[idx.to(e.device)] = e.to(out.dtype)
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
                loss, stats = glass_loss(self.model.discriminator, x, f, m, cc, svd=svd, cfg=self.cfg)
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
def predict(model: Glass, images: Sequence[Any], cfg: GlassConfig, resize: int, device, *, maps: bool = False,
            crop_maps: bool = False, desc: str = "predict") -> dict:
    """{"scores": (N,) float64 max raw patch probability, "maps": N float32 σ=4 maps in each image's resized frame
    (crop undone; with `maps`), "crop_maps": (N, crop, crop) float32 (with `crop_maps`)}. `images`: PIL images, or
    reader samples / paths. cfg.dtype other than fp32 runs the networks under autocast."""
    images = as_images(images)
    loader = image_loader(images, imagenet_transform(resize, cfg.imagesize), batch_size=cfg.batch_size,
                          workers=cfg.workers)
    scores, crops = [], []
    for imgs, _ in tqdm(loader, desc=desc, leave=False):
        with reduced_precision(cfg.dtype, device):
            s = model.patch_scores(imgs.to(device))
        s = s.float()  # a no-op in fp32
        scores.append(s.flatten(1).amax(1).cpu())
        if maps or crop_maps:
            crops.append(upsample_and_smooth(s, (cfg.imagesize, cfg.imagesize), sigma=4))
    out: dict = {"scores": torch.cat(scores).numpy().astype(np.float64) if scores else np.zeros(0)}
    bad = np.flatnonzero(~np.isfinite(out["scores"]))
    if len(bad):
        raise _nonfinite_score(model, images, int(bad[0]), n_bad=len(bad), resize=resize, cfg=cfg, device=device)
    if not (maps or crop_maps):
        return out
    at_crop = np.concatenate(crops) if crops else np.zeros((0, cfg.imagesize, cfg.imagesize), np.float32)
    if crop_maps:
        out["crop_maps"] = at_crop
    if maps:
        out["maps"] = [uncrop_map(m, w, h, resize, cfg.imagesize) for m, (w, h) in zip(at_crop, image_sizes(images))]
    return out


def _nonfinite_score(model: Glass, images: Sequence[Any], i: int, *, n_bad: int, resize: int, cfg: GlassConfig,
                     device) -> NonFiniteError:
    """Runs only after a failure: the image's features (backbone weights / image), else the trained weights."""
    name = image_names(images)[i]
    imgs = imagenet_transform(resize, cfg.imagesize)(images[i])[None]
    try:
        check_features(model.embed(imgs.to(device)), imgs, [name], model.extractor.backbone)
    except NonFiniteError as exc:
        return exc
    bad = [n for n, p in list(model.discriminator.named_parameters()) + list(model.adaptor.named_parameters())
           if not bool(torch.isfinite(p).all())]
    where = f" ({n_bad} images)" if n_bad > 1 else ""
    if bad:
        return NonFiniteError(f"GLASS score of {name}{where} is not finite: the trained discriminator/adaptor "
                              f"weights hold NaN or Inf ({bad[0]}), i.e. the training diverged; re-train with a lower "
                              f"--lr (now {cfg.lr:g})")
    return NonFiniteError(f"GLASS score of {name}{where} is not finite although its features and the model "
                          "weights are finite; re-train with a lower --lr")


# ---------------------------------------------------------------- the model object
class GlassModel(AnomalyModel):
    """GLASS for one class: the frozen backbone, the adaptor and the discriminator, the class's crop geometry
    (`resize`: 329 for toothbrush/wood, see class_resize) and its variant (`svd`: 1 hypersphere, 0 manifold,
    chosen in fit and stored in the checkpoint). Seed the global RNG (common.seed_everything) before constructing
    it: the networks' initial weights and GAS's noise come from it."""

    method = METHOD

    def __init__(self, backbone: nn.Module, cfg: GlassConfig | None = None, *, device: Any = "cpu",
                 resize: int | None = None):
        self.cfg = cfg if cfg is not None else GlassConfig()
        self.device = torch.device(device)
        self.net = Glass(backbone, self.cfg).to(self.device)
        self.resize = self.cfg.resize if resize is None else int(resize)
        self.svd: int | None = None
        self.variant_source: str | None = None
        self.epoch: int | None = None
        self.history: list[dict] = []  # per epoch: losses, radii, p_true/p_fake (+ i_auroc/p_auroc)
        self.fit_info: dict = {}

    # -------------------------------------------------------------- fit
    def fit(self, train: Sequence[Any], *, textures: Sequence[Any], fg_masks: Sequence[Any] | None = None,
            dataset: str = "", category: str = "", seed: int = 0, eval_images: Sequence[Any] | None = None,
            eval_labels: Sequence[int] | None = None, eval_masks: Sequence[Any] | None = None,
            binarize_masks: bool = False, on_epoch: Callable[[int, dict, bool], None] | None = None) -> "GlassModel":
        """Train on the normal images `train`.

        textures: the DTD images of LAS; fg_masks: one foreground mask (PIL "L" image) per training image, or None
        (no masks, --fg 0); dataset/category: the class, for the shipped variant table (classes missing from it are
        judged on `train`). With cfg.select_on_test (the official protocol), every cfg.eval_epochs the test set
        `eval_images` with `eval_labels` (1 = anomalous) and `eval_masks` ((H, W) arrays, None for a good image) is
        scored, and the model ends with the best epoch's weights. `on_epoch(epoch, entry, improved)` runs after each
        epoch with the model holding that epoch's weights (`improved`: a new best test-set epoch)."""
        cfg, device = self.cfg, self.device
        train = as_images(train)
        if not len(train):
            raise DatasetError(f"{dataset}/{category} has no training images; GLASS needs train/good (or "
                               "--checkpoint)")
        gts = labels = None
        if cfg.select_on_test:
            if eval_images is None or eval_labels is None or eval_masks is None:
                raise UserError("select_on_test chooses the epoch on the test set: pass eval_images, eval_labels and "
                                "eval_masks to fit")
            eval_images, labels = as_images(eval_images), list(eval_labels)
            gts = np.stack([mask_at_crop(m, self.resize, cfg.imagesize, binarize_masks) for m in eval_masks]) \
                if len(eval_masks) else np.zeros((0, cfg.imagesize, cfg.imagesize), bool)
            if not len(eval_images) == len(labels) == len(gts):
                raise UserError(f"fit: {len(eval_images)} eval images, {len(labels)} labels, {len(gts)} masks")
        las = LASDataset(train, textures, self.resize, cfg.imagesize, cfg.downsampling, fg_masks=fg_masks,
                         rand_aug=bool(cfg.rand_aug), beta_mean=cfg.beta_mean, beta_std=cfg.beta_std, seed=seed)
        svd, source = choose_variant(dataset, category, cfg.distribution, lambda: distribution_judge(
            mean_training_image(train, cfg.imagesize, cfg.batch_size, device), cfg.official_judge_grid)[0])
        self.svd, self.variant_source = svd, source
        log.info("%s/%s: %s variant (%s), fg masks %s, resize %d -> crop %d, %d train images, %d epochs", dataset,
                 category, ["manifold", "hypersphere"][svd], source, "on" if fg_masks is not None else "off",
                 self.resize, cfg.imagesize, len(train), cfg.meta_epochs)
        trainer = Trainer(self.net, cfg, device, seed)
        cache = trainer.cache_features(train, self.resize)
        gen = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(las, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                             num_workers=cfg.workers, pin_memory=device.type == "cuda")
        history: list[dict] = []
        best, best_epoch, best_state = -math.inf, None, None
        bar = tqdm(range(cfg.meta_epochs), desc=f"glass {category}")
        t_train = 0.0
        for epoch in bar:
            las.set_epoch(epoch)
            t = time.time()
            stats = trainer.train_epoch(loader, cache, svd)
            t_train += time.time() - t
            entry = {"epoch": epoch, **stats}
            self.epoch = epoch
            improved = False
            if cfg.select_on_test and (epoch + 1) % cfg.eval_epochs == 0:
                # Official protocol: choose the epoch on the TEST set (max I-AUROC + P-AUROC, ties keep the earlier).
                res = predict(self.net, eval_images, cfg, self.resize, device, crop_maps=True, desc="eval")
                entry.update(i_auroc=_auroc(labels, res["scores"]), p_auroc=_auroc(gts, res["crop_maps"]))
                crit = np.nan_to_num(entry["i_auroc"]) + np.nan_to_num(entry["p_auroc"])
                if crit > best:
                    best, best_epoch, best_state, improved = crit, epoch, self.net.state(), True
            if on_epoch is not None:
                on_epoch(epoch, entry, improved)
            history.append(entry)
            bar.set_postfix({k: f"{v:.3f}" for k, v in entry.items() if k in ("loss", "p_true", "p_fake", "i_auroc")})
        if best_state is not None:
            self.net.load_state(best_state)
            self.epoch = best_epoch
            log.info("%s/%s: TEST-SET model selection picked epoch %d (official protocol)", dataset, category,
                     best_epoch)
        self.history = history
        self.fit_info = {"svd": svd, "variant_source": source, "epoch": best_epoch if cfg.select_on_test else
                         cfg.meta_epochs - 1, "train_seconds_per_epoch": t_train / max(1, cfg.meta_epochs),
                         "final_loss": history[-1]["loss"] if history else None}
        return self

    # -------------------------------------------------------------- inference
    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """(B, 3, crop, crop) CPU tensor of PIL images: Resize(resize), CenterCrop, ImageNet normalisation."""
        tf = imagenet_transform(self.resize, self.cfg.imagesize)
        return torch.stack([tf(im) for im in as_images(images)])

    def forward_networks(self, batch: torch.Tensor) -> torch.Tensor:
        """Backbone, adaptor and discriminator on a preprocessed batch: (B, h, w) patch probabilities."""
        with reduced_precision(self.cfg.dtype, self.device):
            return self.net.patch_scores(batch.to(self.device))

    def predict(self, images: Sequence[Any], *, maps: bool = True) -> Prediction:
        """Image scores (max patch probability) and σ=4 maps, one per image in its resized frame, crop undone."""
        res = predict(self.net, images, self.cfg, self.resize, self.device, maps=maps, desc="predict")
        return Prediction(scores=res["scores"], maps=res.get("maps"))

    # -------------------------------------------------------------- checkpoints
    def checkpoint(self) -> dict:
        return {**self.net.state(), "epoch": self.epoch, "svd": self.svd, "variant_source": self.variant_source,
                "resize": self.resize, "config": asdict(self.cfg),
                **backbone_state_if_random(self.net.extractor.backbone)}

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping, *, device: Any = "cpu", weights: Any = None,
                        backbone: nn.Module | None = None) -> "GlassModel":
        """The fitted model. `backbone`: the already built backbone the checkpoint was made with (checked by
        name and sha256), else it is rebuilt (methods.base.backbone_from_checkpoint, `weights` or the default)."""
        missing = [k for k in ("discriminator", "pre_projection", "config") if k not in ckpt]
        if missing:
            raise CheckpointError(f"not a GLASS checkpoint (no {', '.join(missing)}); re-create it with glass.py")
        meta = ckpt.get(META_KEY) or {}
        if backbone is None or BACKBONE_STATE_KEY in ckpt:  # random weights: the checkpoint's own backbone
            backbone = backbone_from_checkpoint(ckpt, weights=weights)
        else:
            check_backbone(meta, backbone)
        cfg = GlassConfig.from_record(ckpt["config"])
        resize = ckpt.get("resize") or class_resize(str(meta.get("category", "")), cfg)  # older files: no "resize"
        model = cls(backbone, cfg, device=device, resize=resize)
        model.net.load_state(ckpt)
        model.svd, model.epoch, model.variant_source = ckpt.get("svd"), ckpt.get("epoch"), ckpt.get("variant_source")
        return model


def glass_meta(backbone: nn.Module, cfg: GlassConfig, dataset: str, category: str, train=None, *,
               finished: bool = True, **extra) -> dict:
    """The checkpoint record: only the settings that shape the trained model are compared on load."""
    config = {k: v for k, v in asdict(cfg).items() if k not in NON_MODEL_KEYS}
    return checkpoint_meta(method=METHOD, dataset=dataset, category=category, model=backbone, config=config,
                           train_samples=train, finished=finished, **extra)
