"""CSAD stage 3: the Local-Global Student-Teacher (LGST), `Tokichan/CSAD CSAD.py` and `models/model.py`.

Teacher: frozen backbone layer2 + layer3 -> bilinear resize to the map size -> 3x3 average pool -> a random,
frozen, seeded 1x1 conv to 512 channels -> channel normalisation with training-set statistics.
Students: models.efficientad.LocalStudent (heads "st" and "ae") and models.efficientad.AutoEncoder.
Losses: hard loss (0.999 quantile) + penalty on natural images + L_ae + L_stae; Adam, StepLR at 95 %.
Maps: (T - S_st)^2 and (AE - S_ae)^2 averaged over channels, each quantile-normalised on validation
(q0.9 / q0.995, scale 0.1), summed; the image score is the max of the map.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T
from tqdm import tqdm

from common import get_logger, load_checkpoint, save_checkpoint
from common.checkpoints import META_KEY, check_meta, checkpoint_meta
from common.config import opt
from dataset_readers.base import IMAGE_SUFFIXES, DatasetError, Sample
from dataset_readers.torch_data import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, load_stack
from models.efficientad import AutoEncoder, LocalStudent
from models.feature_extractor import FeatureExtractor
from methods.base import (BACKBONE_STATE_KEY, AnomalyModel, ImageList, Prediction, backbone_from_checkpoint,
                          backbone_state_if_random, check_backbone, holds_state, reduced_precision)
from methods.knn import NonFiniteError, require_finite, weights_cause

METHOD = "LGST"
TEACHER_LAYERS = ("layer2", "layer3")
log = get_logger("csad.lgst")


@dataclass
class LGSTConfig:
    """Official values (configs/mvtecloco_train.yaml and models/model.py); `fast()` shrinks sizes only."""
    input_size: int = opt(256, "input resolution: the whole image resized (bilinear) to a square")
    channels: int = opt(512, "teacher projection / student output channels")
    student_width: int = opt(256, "local student trunk width")
    ae_base: int = opt(64, "autoencoder base channels")
    padding: bool = opt(True, "student convolutions with padding (--no-padding: the official speed-test setting)")
    iterations: int = opt(60000, "training iterations")
    batch_size: int = opt(2, "training batch size")
    lr: float = opt(2e-4, "Adam learning rate")
    weight_decay: float = opt(1e-4, "Adam weight decay")
    lr_step_fraction: float = opt(0.95, "StepLR step at this fraction of the iterations")
    lr_gamma: float = opt(0.1, "StepLR factor")
    hard_quantile: float = opt(0.999, "hard-loss quantile of the student-teacher distances")
    q_start: float = opt(0.9, "map normalisation: lower validation quantile")
    q_end: float = opt(0.995, "map normalisation: upper validation quantile")
    map_scale: float = opt(0.1, "map normalisation: value of a map at the upper quantile")
    weight_st: float = opt(1.0, "weight of the student-teacher loss (hard loss + penalty)")
    weight_ae: float = opt(1.0, "weight of the autoencoder loss")
    weight_stae: float = opt(1.0, "weight of the student-autoencoder loss")
    eval_freq: int = opt(1000, "test evaluation interval with --select-on-test")
    official_teacher_stats: bool = opt(False, "official teacher normalisation: mean of per-batch channel means "
                                              "(batch 2, no drop_last), so with an odd image count the last image "
                                              "weighs double (off: the global mean)")
    dtype: str = opt("fp32", "inference precision (bf16 / fp16 approximate; training is always fp32); not in the "
                             "checkpoint record", choices=("fp32", "bf16", "fp16"))

    @property
    def out_size(self) -> int:
        return self.input_size // 4  # the student trunk has stride 4: 256 -> 64

    @classmethod
    def fast(cls, **overrides) -> "LGSTConfig":
        # A short schedule needs a larger step than the official 2e-4 tuned for 60k iterations.
        base = dict(input_size=128, channels=64, student_width=16, ae_base=32, iterations=1000, lr=1e-3,
                    eval_freq=100)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_dict(cls, d: dict) -> "LGSTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------- numerics

def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """numpy's default (linear) quantile of all elements; kthvalue has no size limit, unlike torch.quantile."""
    flat = x.reshape(-1)
    n = flat.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    k_top = n - lo
    if k_top <= max(2, n // 8):  # upper-tail quantiles (the hard loss, the map quantiles): a small top-k
        top = torch.topk(flat, k_top, largest=True, sorted=True).values
        v_lo, v_hi = top[-1], top[-2] if k_top >= 2 else top[-1]
    else:
        v_lo = torch.kthvalue(flat, lo + 1).values
        v_hi = torch.kthvalue(flat, hi + 1).values if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def hard_loss(distance: torch.Tensor, q: float = 0.999) -> torch.Tensor:
    """Mean of the squared errors at or above their q-quantile (EfficientAD's hard-feature loss)."""
    d_hard = quantile(distance.detach(), q)
    return distance[distance >= d_hard].mean()


def normalize_map(m: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    return scale * (m - q_a) / (q_b - q_a)


def channel_stats(features: torch.Tensor, batch_size: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over (N, H, W) of raw teacher maps (N, C, H, W): the global mean, and the sqrt
    of the mean squared deviation from it.

    batch_size: the official `teacher_normalization` (Tokichan/CSAD CSAD.py) instead: the mean of per-batch
    channel means over the shuffled training loader (this batch size, no drop_last), so when N is odd the last,
    single-image batch weighs double; the variance likewise, around that mean, over a second shuffle.
    generator: those two shuffles (None: the images in order)."""
    if batch_size is None:
        mean = features.mean(dim=(0, 2, 3), keepdim=True)
        var = ((features - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        return mean, var.sqrt()

    def mean_of_batch_means(per_image: torch.Tensor) -> torch.Tensor:  # (N, C) -> (C,)
        n = len(per_image)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        sizes = torch.full((n,), float(batch_size))
        if n % batch_size:
            sizes[n - n % batch_size:] = float(n % batch_size)
        n_batches = math.ceil(n / batch_size)
        w = torch.empty(n, dtype=per_image.dtype, device=per_image.device)
        w[order.to(per_image.device)] = (1.0 / (sizes * n_batches)).to(per_image)  # position in the shuffle
        return (w[:, None] * per_image).sum(0)

    mean = mean_of_batch_means(features.mean(dim=(2, 3)))[None, :, None, None]
    var = mean_of_batch_means(((features - mean) ** 2).mean(dim=(2, 3)))[None, :, None, None]
    return mean, var.sqrt()


def color_augment(x: torch.Tensor, generator: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """EfficientAD's AE augmentation, batched: per image one of brightness / contrast / saturation jitter with a
    factor uniform in [1-s, 1+s], as torchvision's adjust_* on float images in [0, 1] (blend, then clamp)."""
    b = x.shape[0]
    op = torch.randint(0, 3, (b,), generator=generator).to(x.device)
    f = (1 - strength + 2 * strength * torch.rand(b, generator=generator)).to(x.device).view(b, 1, 1, 1)
    gray = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    degenerate = torch.stack([torch.zeros_like(x),  # brightness
                              gray.mean(dim=(1, 2, 3), keepdim=True).expand_as(x),  # contrast
                              gray.expand_as(x)])  # saturation
    deg = degenerate[op, torch.arange(b, device=x.device)]
    return (f * x + (1 - f) * deg).clamp(0, 1)


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def imagenet_normalize(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - _MEAN.to(x01.device)) / _STD.to(x01.device)


# ----------------------------------------------------------------------------------------------- networks

class Teacher(nn.Module):
    """Backbone layer2 + layer3 -> resize to out_size -> 3x3 avg pool -> frozen random 1x1 conv (seeded)."""

    def __init__(self, extractor: FeatureExtractor | None, in_channels: int, channels: int, out_size: int,
                 seed: int = 0):
        super().__init__()
        self.extractor = extractor
        self.out_size = out_size
        with torch.random.fork_rng(devices=[]):  # the projection depends on --seed only, not on call order
            torch.manual_seed(seed)
            self.proj = nn.Conv2d(in_channels, channels, 1)
        self.proj.requires_grad_(False)

    def from_features(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        size = (self.out_size, self.out_size)
        maps = [F.interpolate(feats[k], size=size, mode="bilinear", align_corners=False) for k in TEACHER_LAYERS]
        h = F.avg_pool2d(torch.cat(maps, 1), 3, stride=1, padding=1)
        return self.proj(h)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.extractor(x))


class LGSTModel(nn.Module):
    """Teacher + local student + autoencoder, with the normalisation statistics as buffers."""

    def __init__(self, extractor: FeatureExtractor | None, teacher_in_channels: int, cfg: LGSTConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.teacher = Teacher(extractor, teacher_in_channels, cfg.channels, cfg.out_size, seed)
        self.student = LocalStudent(cfg.channels, cfg.student_width, cfg.padding, cfg.out_size)
        self.autoencoder = AutoEncoder(cfg.channels, cfg.ae_base, cfg.input_size, cfg.out_size)
        c = cfg.channels
        self.register_buffer("teacher_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, c, 1, 1))
        # q_st_start, q_st_end, q_ae_start, q_ae_end; (0, 0.1) makes the normalisation the identity
        self.register_buffer("quantiles", torch.tensor([0.0, 0.1, 0.0, 0.1]))

    def teacher_normalized(self, x: torch.Tensor | None = None, feats: dict | None = None) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher.from_features(feats) if feats is not None else self.teacher(x)
            return (t - self.teacher_mean) / self.teacher_std

    def raw_maps(self, x: torch.Tensor, feats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_st, M_ae), each (B, h, w). `feats`: backbone maps already computed (the fused inference path)."""
        t = self.teacher_normalized(x, feats)
        s_st, s_ae = self.student(x)
        ae = self.autoencoder(x)
        return ((t - s_st) ** 2).mean(1), ((ae - s_ae) ** 2).mean(1)

    def forward(self, x: torch.Tensor, feats: dict | None = None) -> torch.Tensor:
        """The LGST map at the map size (B, h, w): the sum of the two normalised maps."""
        m_st, m_ae = self.raw_maps(x, feats)
        q = self.quantiles
        s = self.cfg.map_scale
        return normalize_map(m_st, q[0], q[1], s) + normalize_map(m_ae, q[2], q[3], s)

    def anomaly_maps(self, x: torch.Tensor, feats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps upsampled to the input size and image scores (max of each map)."""
        m = F.interpolate(self.forward(x, feats)[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return m, m.flatten(1).amax(1)

    # checkpoints hold state dicts and tensors only (no pickled modules, no backbone weights)
    def checkpoint(self, backbone: str, **extra) -> dict:
        return {"config": asdict(self.cfg), "backbone": backbone, "teacher_in_channels": self.teacher.proj.in_channels,
                "teacher_proj": self.teacher.proj.state_dict(), "student": self.student.state_dict(),
                "autoencoder": self.autoencoder.state_dict(), "teacher_mean": self.teacher_mean,
                "teacher_std": self.teacher_std, "q_st_start": self.quantiles[0], "q_st_end": self.quantiles[1],
                "q_ae_start": self.quantiles[2], "q_ae_end": self.quantiles[3], **extra}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, extractor: FeatureExtractor | None) -> "LGSTModel":
        model = cls(extractor, ckpt["teacher_in_channels"], LGSTConfig.from_dict(ckpt["config"]))
        model.teacher.proj.load_state_dict(ckpt["teacher_proj"])
        model.student.load_state_dict(ckpt["student"])
        model.autoencoder.load_state_dict(ckpt["autoencoder"])
        model.teacher_mean.copy_(ckpt["teacher_mean"])
        model.teacher_std.copy_(ckpt["teacher_std"])
        model.quantiles.copy_(torch.stack([ckpt[k] for k in ("q_st_start", "q_st_end", "q_ae_start", "q_ae_end")]))
        return model


def build_model(backbone: nn.Module, cfg: LGSTConfig, seed: int) -> LGSTModel:
    extractor = FeatureExtractor(backbone, TEACHER_LAYERS)
    in_ch = sum(extractor.feature_dims[k] for k in TEACHER_LAYERS)
    return LGSTModel(extractor, in_ch, cfg, seed)


def load_model(path: str | Path, backbone: nn.Module, device: torch.device | str = "cpu", *,
               dataset: str | None = None, category: str | None = None,
               allow_unfinished: bool = False) -> tuple[LGSTModel, dict]:
    """The LGST model of `path` on `backbone`; its record must name this backbone and weights (and `dataset` /
    `category` when given)."""
    ckpt = load_checkpoint(path, hint="train it with CSAD.py")
    expected = {"backbone": getattr(backbone, "backbone_name", None), "weights_sha256":
                getattr(backbone, "weights_sha256", None) or "RANDOM", "dataset": dataset, "category": category}
    check_meta(path, ckpt, expected, fix=f"re-train it: python CSAD.py{f' --dataset {dataset}' if dataset else ''}"
               f"{f' --categories {category}' if category else ''}", allow_unfinished=allow_unfinished, logger=log)
    model = LGSTModel.from_checkpoint(ckpt, FeatureExtractor(backbone, TEACHER_LAYERS))
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------- data

def load_images(samples: Sequence[Sample], size: int, batch_size: int = 16, desc: str = "load") -> torch.Tensor:
    """uint8 (N, 3, size, size): PIL bilinear resize, kept un-normalised so the colour augmentation can run
    on the device."""
    tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                    T.PILToTensor()])
    return load_stack(samples, tf, batch_size, desc)


def to_input(x_uint8: torch.Tensor) -> torch.Tensor:
    return imagenet_normalize(x_uint8.float() / 255.0)


def find_penalty_images(folder: str | Path) -> list[Sample]:
    folder = Path(folder)
    fix = ("put natural images there (the official code uses tiny-imagenet train images), pass "
           "--penalty-dir DIR, or --no-penalty to train without the penalty")
    if not folder.is_dir():
        raise DatasetError(f"penalty image folder not found: {folder}; {fix}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"no images in penalty folder {folder}; {fix}")
    return [Sample(str(p), "penalty") for p in paths]


def penalty_loader(samples: list[Sample], size: int, iterations: int, seed: int, workers: int = 0):
    """One image per iteration: resize to 2*size, RandomGrayscale(0.3), centre crop, ImageNet normalisation
    (the official 512 -> 256 transform at input 256)."""
    tf = T.Compose([T.Resize((2 * size, 2 * size), antialias=True), T.RandomGrayscale(0.3), T.CenterCrop(size),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(ImageDataset(samples, tf), replacement=True, num_samples=iterations,
                                             generator=g)
    return torch.utils.data.DataLoader(ImageDataset(samples, tf), batch_size=1, sampler=sampler,
                                       num_workers=workers, generator=g, persistent_workers=workers > 0)


def batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches, reshuffled each epoch, incomplete last batch dropped."""
    if n < batch_size:
        raise DatasetError(f"{n} training images, fewer than the batch size {batch_size}")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


# ----------------------------------------------------------------------------------------------- training

@torch.no_grad()
def teacher_features(model: LGSTModel, images: torch.Tensor, device, batch_size: int = 16,
                     normalized: bool = False) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i:i + batch_size].to(device))
        out.append(model.teacher_normalized(x) if normalized else model.teacher(x))
    return torch.cat(out)


@torch.no_grad()
def predict(model: LGSTModel, images: torch.Tensor, device, batch_size: int = 16, *, upsample: bool = True,
            raw: bool = False, desc: str | None = None):
    """Batched inference over uint8 images. raw=True: (M_st, M_ae) at map size; else (maps, scores)."""
    model.eval()
    maps, scores, st, ae = [], [], [], []
    starts = range(0, len(images), batch_size)
    for i in (tqdm(starts, desc=desc, leave=False) if desc else starts):
        x = to_input(images[i:i + batch_size].to(device))
        if raw:
            a, b = model.raw_maps(x)
            st.append(a)
            ae.append(b)
        elif upsample:
            m, s = model.anomaly_maps(x)
            maps.append(m.cpu())
            scores.append(s.cpu())
        else:
            m = model(x)
            maps.append(m.cpu())
            scores.append(m.flatten(1).amax(1).cpu())
    if raw:
        return torch.cat(st), torch.cat(ae)
    return torch.cat(maps), torch.cat(scores)


@torch.no_grad()
def fit_quantiles(model: LGSTModel, val_images: torch.Tensor, device, batch_size: int = 16) -> None:
    """q0.9 / q0.995 of M_st and M_ae over all validation pixels at map size (EfficientAD map_normalization)."""
    cfg = model.cfg
    m_st, m_ae = predict(model, val_images, device, batch_size, raw=True)
    q = []
    for name, m in (("st", m_st), ("ae", m_ae)):
        a, b = quantile(m, cfg.q_start), quantile(m, cfg.q_end)
        if float(b - a) < 1e-6:
            warnings.warn(f"LGST: validation quantiles of M_{name} coincide ({float(a):.3g}); map left unnormalised")
            a, b = torch.zeros_like(a), torch.full_like(b, cfg.map_scale)
        q += [a, b]
    model.quantiles.copy_(torch.stack(q))


def train(model: LGSTModel, train_images: torch.Tensor, val_images: torch.Tensor, *, device, seed: int = 0,
          penalty: list[Sample] | None = None, workers: int = 0,
          evaluate: Callable[[LGSTModel], float] | None = None, batch_size_infer: int = 16) -> dict:
    """Train the students. Returns {"iteration", "selected": "final"|"test", "best_metric", "history"}.

    evaluate: if given (official --select-on-test), called every eval_freq iterations after refreshing the
    validation quantiles; the state with the highest value is restored at the end.
    """
    cfg = model.cfg
    model.to(device)
    if device.type == "cuda":
        model.teacher.extractor.backbone.to(memory_format=torch.channels_last)
    t0 = time.time()
    # The teacher is frozen: features of the un-augmented training images are computed once.
    raw = teacher_features(model, train_images, device, batch_size_infer)
    # uint8 images are always finite: non-finite teacher features come from the backbone weights
    require_finite(raw, "teacher features of the training images", weights_cause(model.teacher.extractor.backbone))
    mean, std = channel_stats(raw, cfg.batch_size if cfg.official_teacher_stats else None,
                              torch.Generator().manual_seed(seed))
    model.teacher_mean.copy_(mean)
    model.teacher_std.copy_(std)
    t_train = (raw - mean) / std
    del raw
    require_finite(t_train, "normalised teacher features", "a teacher channel is constant over the training images "
                   "(std 0); check that the training images are not all identical")
    log.info("teacher features of %d training images (%s) in %.1fs", len(train_images), tuple(t_train.shape[1:]),
             time.time() - t0)

    params = list(model.student.parameters()) + list(model.autoencoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(cfg.lr_step_fraction * cfg.iterations)),
                                            gamma=cfg.lr_gamma)
    g = torch.Generator().manual_seed(seed)
    batches = batch_indices(len(train_images), cfg.batch_size, g)
    pen_iter = iter(penalty_loader(penalty, cfg.input_size, cfg.iterations, seed, workers)) if penalty else None
    train_dev = train_images.to(device)

    best = {"metric": -math.inf, "state": None, "iteration": cfg.iterations}
    history = []
    model.student.train()
    model.autoencoder.train()
    bar = tqdm(range(1, cfg.iterations + 1), desc="LGST", mininterval=2.0)
    for it in bar:
        idx = next(batches)
        x01 = train_dev[idx].float() / 255.0
        x = imagenet_normalize(x01)
        x_aug = imagenet_normalize(color_augment(x01, g))
        t = t_train[idx.to(device)]
        t_aug = model.teacher_normalized(x_aug)
        # One student pass over [x, x_aug, penalty]: the student has no batch statistics, so this equals
        # separate passes.
        parts = [x, x_aug]
        if pen_iter is not None:
            parts.append(next(pen_iter)[0].to(device))
        s_st, s_ae = model.student(torch.cat(parts))
        b = len(idx)
        loss_hard = hard_loss((t - s_st[:b]) ** 2, cfg.hard_quantile)
        loss_pen = (s_st[2 * b:] ** 2).mean() if pen_iter is not None else torch.zeros((), device=device)
        ae = model.autoencoder(x_aug)
        loss_ae = ((t_aug - ae) ** 2).mean()
        loss_stae = ((ae - s_ae[b:2 * b]) ** 2).mean()  # not detached: gradients reach the AE too (official)
        loss = cfg.weight_st * (loss_hard + loss_pen) + cfg.weight_ae * loss_ae + cfg.weight_stae * loss_stae
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not torch.isfinite(loss):
            raise NonFiniteError(f"LGST training diverged: the loss is {loss.item()} at iteration {it} although the "
                                 f"teacher features are finite (the weights and images are fine); lower --lr "
                                 f"(now {cfg.lr:g})")
        if it % 50 == 0 or it == cfg.iterations:
            bar.set_postfix(loss=f"{loss.item():.4f}", hard=f"{loss_hard.item():.4f}", ae=f"{loss_ae.item():.4f}")
        if evaluate is not None and (it % cfg.eval_freq == 0 or it == cfg.iterations):
            fit_quantiles(model, val_images, device, batch_size_infer)
            metric = float(evaluate(model))
            history.append((it, metric))
            log.info("iteration %d: test metric %.3f", it, metric)
            if metric > best["metric"]:
                best = {"metric": metric, "iteration": it, "state": copy.deepcopy(
                    {"student": model.student.state_dict(), "autoencoder": model.autoencoder.state_dict()})}
            model.student.train()
            model.autoencoder.train()
    model.eval()
    if best["state"] is not None:
        model.student.load_state_dict(best["state"]["student"])
        model.autoencoder.load_state_dict(best["state"]["autoencoder"])
    fit_quantiles(model, val_images, device, batch_size_infer)
    log.info("trained %d iterations in %.1fs", cfg.iterations, time.time() - t0)
    return {"iteration": best["iteration"], "selected": "test" if evaluate is not None else "final",
            "best_metric": best["metric"] if evaluate is not None else None, "history": history}


def save(model: LGSTModel, path: str | Path, backbone: str, **extra) -> None:
    save_checkpoint(path, model.checkpoint(backbone, **extra))


# ----------------------------------------------------------------------------------------------- speed

@torch.no_grad()
def benchmark_latency(model: LGSTModel, device, input_size: int, *, warmup: int = 5, runs: int = 20,
                      forward: Callable | None = None) -> dict:
    """Batch-1 latency of the whole LGST inference (backbone, teacher, students, normalisation, upsampling,
    max) after warm-up, in ms per image."""
    model.eval().to(device)
    forward = forward or (lambda x: model.anomaly_maps(x)[1])
    x = torch.randn(1, 3, input_size, input_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        forward(x)
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        forward(x)
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    times = np.asarray(times)
    return {"ms_mean": float(times.mean()), "ms_median": float(np.median(times)), "runs": runs, "warmup": warmup,
            "input_size": input_size, "device": str(device), "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------- model object

def as_stack(images: Sequence[Any] | torch.Tensor, size: int, desc: str = "images") -> torch.Tensor:
    """uint8 (N, 3, size, size) of PIL images, reader samples / an ImageList (read in reader order through
    `load_images`, as training always did), or an already loaded stack (returned as is)."""
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, ImageList):
        return load_images([Sample(p, "image") for p in images.paths], size, desc=desc)
    items = list(images)
    if items and hasattr(items[0], "path"):
        return load_images(items, size, desc=desc)
    tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                    T.PILToTensor()])
    return torch.stack([tf(im.convert("RGB")) for im in items])


class LGSTDetector(AnomalyModel):
    """LGST as a model object: `LGSTModel` (teacher, student, autoencoder, statistics) on one backbone.

    Images: PIL images, reader samples, an ImageList, or uint8 stacks from `load_images` (the script loads
    train, validation and test before training, in that order: each read draws a loader seed from the global
    RNG, which the autoencoder's dropout then continues from). Maps: (input_size, input_size) per image, the
    whole image resized without a crop."""

    method = METHOD

    def __init__(self, backbone: nn.Module, cfg: LGSTConfig, *, device: Any = "cpu", seed: int = 0,
                 batch_size: int = 16, model: LGSTModel | None = None):
        self.backbone = backbone
        self.cfg = cfg
        self.device = torch.device(device)
        self.seed = seed
        self.batch_size = batch_size  # inference batch (training uses cfg.batch_size)
        self.model = model if model is not None else build_model(backbone, cfg, seed)
        self.info: dict = {"iteration": None, "selected": None, "best_metric": None, "history": []}
        # fp32 scores of the validation images (the fused CSAD normalises the LGST branch with them)
        self.val_scores: np.ndarray | None = None
        self.meta: dict = {}  # the provenance record of the checkpoint it was loaded from

    def fit(self, train: Sequence[Any] | torch.Tensor, *, validation: Sequence[Any] | torch.Tensor,
            penalty: list[Sample] | None = None, seed: int | None = None, workers: int = 0,
            evaluate: Callable[[LGSTModel], float] | None = None) -> "LGSTDetector":
        """Train the students on `train`, fit the map quantiles on `validation`. `penalty`: natural-image
        samples (None: no penalty loss). `evaluate`: official test-set selection (see `train`)."""
        seed = self.seed if seed is None else seed
        s = self.cfg.input_size
        train_x = as_stack(train, s, "train images")
        val_x = as_stack(validation, s, "validation images")
        self.info = train_students(self.model, train_x, val_x, device=self.device, seed=seed, penalty=penalty,
                                   workers=workers, evaluate=evaluate, batch_size_infer=self.batch_size)
        self.seed = seed
        self.val_scores = self.predict_stack(val_x, desc="validation", dtype="fp32")[1].numpy()
        return self

    def preprocess(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """The network input of `images`: (B, 3, s, s) ImageNet-normalised float on the device."""
        return to_input(as_stack(images, self.cfg.input_size).to(self.device))

    @torch.no_grad()
    def forward_networks(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone + teacher, student and autoencoder on a preprocessed batch: the raw (M_st, M_ae) maps."""
        self.model.eval()
        with reduced_precision(self.cfg.dtype, self.device):
            return self.model.raw_maps(batch.to(self.device))

    def predict_stack(self, images: Sequence[Any] | torch.Tensor, desc: str | None = "predict",
                      dtype: str | None = None):
        """(maps (N, s, s), scores (N,)) float32 tensors: the LGST score files' values. dtype: cfg.dtype if None."""
        x = as_stack(images, self.cfg.input_size)
        self.model.to(self.device)
        with reduced_precision(dtype or self.cfg.dtype, self.device):  # fp32: a null context, the exact numbers
            m, sc = predict(self.model, x, self.device, self.batch_size, desc=desc)
        return m.float(), sc.float()

    def predict(self, images: Sequence[Any] | torch.Tensor, *, maps: bool = True) -> Prediction:
        """Image scores (max of the map) and the LGST maps at the input size, batched with a progress bar."""
        m, sc = self.predict_stack(images)
        return Prediction(scores=sc.numpy().astype(np.float64),
                          maps=[a.astype(np.float32) for a in m.numpy()] if maps else None)

    def checkpoint(self) -> dict:
        val = {} if self.val_scores is None else {"val_scores": torch.from_numpy(
            np.array(self.val_scores, dtype=np.float32))}
        return self.model.checkpoint(getattr(self.backbone, "backbone_name", "unknown"),
                                     iteration=self.info.get("iteration"), selected=self.info.get("selected"),
                                     seed=self.seed, batch_size_infer=self.batch_size, **val,
                                     **backbone_state_if_random(self.backbone))

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping, *, device: Any = "cpu", weights: Any = None,
                        backbone: nn.Module | None = None) -> "LGSTDetector":
        """The fitted detector. `backbone`: the already built backbone the checkpoint was made with (checked by
        name and sha256; for random weights used only if it holds the checkpoint's own weights), else rebuilt by
        methods.base.backbone_from_checkpoint (`weights` or the default)."""
        from common.errors import CheckpointError

        missing = [k for k in ("student", "autoencoder", "teacher_proj", "config") if k not in ckpt]
        if missing:
            raise CheckpointError(f"not an LGST checkpoint (no {', '.join(missing)}); re-create it with CSAD.py")
        meta = ckpt.get(META_KEY) or {}
        if backbone is None or (BACKBONE_STATE_KEY in ckpt and not holds_state(backbone, ckpt[BACKBONE_STATE_KEY])):
            backbone = backbone_from_checkpoint(ckpt, weights=weights)  # random weights: the checkpoint's own
        else:
            check_backbone(meta, backbone)
        net = LGSTModel.from_checkpoint(dict(ckpt), FeatureExtractor(backbone, TEACHER_LAYERS))
        det = cls(backbone, net.cfg, device=device, seed=int(ckpt.get("seed") or 0),
                  batch_size=int(ckpt.get("batch_size_infer") or 16), model=net.to(device).eval())
        det.info = {"iteration": ckpt.get("iteration"), "selected": ckpt.get("selected"), "best_metric": None,
                    "history": []}
        if "val_scores" in ckpt:  # absent in checkpoints of older versions
            det.val_scores = ckpt["val_scores"].numpy().astype(np.float32)
        det.meta = dict(meta)
        return det


# ----------------------------------------------------------------------------------------------- one category

def group_aurocs(scores: np.ndarray, data) -> dict[str, float]:
    """Image AUROC x 100 per test score group (logi / struc, or test), for logging and --select-on-test."""
    from evaluation.metrics import group_aurocs as aurocs
    from evaluation.score_files import scores_for_samples

    return {g: 100.0 * a for g, a in aurocs(data, scores_for_samples(np.asarray(scores), data.test, data)).items()}


def checkpoint_path(ckpt_dir: str | Path, category: str) -> Path:
    return Path(ckpt_dir) / f"best_{category.replace('/', '__')}.pth"


def record(data, backbone: nn.Module, cfg: LGSTConfig, seed: int, finished: bool = True) -> dict:
    """The checkpoint record of one category's run (common.checkpoints.checkpoint_meta)."""
    config = {k: v for k, v in asdict(cfg).items() if k != "dtype"}  # inference precision: any works
    return checkpoint_meta(method=METHOD, dataset=data.dataset, category=data.category, model=backbone,
                           config=config, train_samples=data.train, finished=finished, seed=seed)


def split_validation(data, seed: int) -> tuple[list, list]:
    """(train, validation) samples. MVTec AD-style data has no validation split: EfficientAD holds out 10 % of
    train for the map quantiles."""
    train_samples, val_samples = list(data.train), list(data.validation)
    if not val_samples:
        perm = torch.randperm(len(train_samples), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, len(train_samples) // 10)
        val_samples = [train_samples[i] for i in sorted(perm[:n_val])]
        train_samples = [train_samples[i] for i in sorted(perm[n_val:])]
        log.info("%s: no validation split, %d training images held out for the map quantiles", data.category, n_val)
    return train_samples, val_samples


def run_category(data, backbone: nn.Module, cfg: LGSTConfig, device, *, seed: int = 0,
                 score_dir: str | Path = "anomaly_score", ckpt_dir: str | Path = "ckpt",
                 penalty: list[Sample] | None = None, select_on_test: bool = False, save_maps: bool = True,
                 workers: int = 0, batch_size_infer: int = 16, test_only: bool = False,
                 checkpoint: str | Path | None = None, allow_unfinished: bool = False) -> dict:
    """Train LGST on one category, write best_{category}.pth, the LGST score files and the TIFF maps.
    test_only: score with the saved checkpoint (`checkpoint`, default best_{category}.pth in `ckpt_dir`),
    checked against this run's record, and write the same score files and maps bit for bit."""
    from common import seed_everything
    from common.checkpoints import load_checked
    from common.memory import stage
    from evaluation.score_files import save_anomaly_maps, save_group_scores, scores_for_samples

    ckpt_path = Path(checkpoint) if checkpoint else checkpoint_path(ckpt_dir, data.category)
    s = cfg.input_size
    if test_only:
        fix = f"train it: python CSAD.py --dataset {data.dataset} --categories {data.category} (same settings)"
        with stage("load", category=data.category):
            ckpt, _ = load_checked(ckpt_path, record(data, backbone, cfg, seed), fix=fix,
                                   allow_unfinished=allow_unfinished, logger=log)
            det = LGSTDetector.from_checkpoint(ckpt, device=device, backbone=backbone)
            det.batch_size, det.cfg.dtype = batch_size_infer, cfg.dtype
        with stage("read", category=data.category):
            test_images = load_images(data.test, s, desc="test images")
            val_images = load_images(data.validation, s, desc="validation images") if data.validation else None
        log.info("%s: test only, %s (iteration %s)", data.category, ckpt_path, det.info["iteration"])
    else:
        seed_everything(seed)
        det = LGSTDetector(backbone, cfg, device=device, seed=seed, batch_size=batch_size_infer)
        train_samples, val_samples = split_validation(data, seed)
        with stage("read", category=data.category):  # this order: see LGSTDetector
            train_images = load_images(train_samples, s, desc="train images")
            val_images = load_images(val_samples, s, desc="validation images")
            test_images = load_images(data.test, s, desc="test images")

        evaluate = None
        if select_on_test:  # official behaviour: model selection on the test AUROC
            def evaluate(m: LGSTModel) -> float:
                return float(np.mean(list(group_aurocs(predict(m, test_images, device, batch_size_infer)[1].numpy(),
                                                       data).values())))
        with stage("fit", category=data.category):
            det.fit(train_images, validation=val_images, penalty=penalty, seed=seed, workers=workers,
                    evaluate=evaluate)
        with stage("save", category=data.category):  # written once, after training: a killed run leaves none
            det.save(ckpt_path, record(data, backbone, cfg, seed))
        log.info("%s: checkpoint written to %s", data.category, ckpt_path)

    with stage("predict", category=data.category):
        maps, scores = det.predict_stack(test_images, desc="test")
        groups = scores_for_samples(scores.numpy(), data.test, data)
        if data.validation:
            groups["val"] = det.predict_stack(val_images, desc="validation")[1].numpy()
    with stage("write", category=data.category):
        paths = save_group_scores(data, METHOD, groups, score_dir)
        log.info("%s: score files %s", data.category, ", ".join(p.name for p in paths))
        if save_maps:
            save_anomaly_maps(METHOD, data.category, data.test, maps=maps.numpy(), score_dir=score_dir)
            log.info("%s: %d anomaly maps under %s/anomaly_maps/%s/%s", data.category, len(data.test), score_dir,
                     METHOD, data.category)
    aurocs = group_aurocs(scores.numpy(), data)
    # the validation scores the fused CSAD needs: the checkpoint's (fp32), else (older checkpoints) this run's
    val_scores = det.val_scores if det.val_scores is not None else groups.get("val")
    return {"category": data.category, "auroc": aurocs, "checkpoint": str(ckpt_path), "test_only": test_only,
            "val_scores": val_scores, **det.info}


train_students = train  # LGSTDetector.fit's parameter `train` shadows the function of that name
