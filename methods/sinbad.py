"""SINBAD, "Set Features for Fine-grained Anomaly Detection": set descriptors per pyramid level and the ensemble.

One *unit* = one (level, crop count). A unit cuts every image's zero-padded canvas into crops, turns each crop into
a set of element vectors (backbone cells or raw pixels), summarises the set by the empirical CDF of random
projections at fixed thresholds, and scores every crop position with its own shrunk-covariance transform + exact
1-NN to the training descriptors. `SinbadModel` fits every unit of a configuration and their ensemble
(`calc_anom_ensm.py`: validation-normalised levels, plus lambda x the pixel level):

    model = SinbadModel(backbone, SinbadConfig(), device=device)
    model.fit(ImageList(data.train), validation=ImageList(data.validation))   # the ensemble normalises by val
    pred = model.predict(ImageList(data.test))      # scores = the ensemble; extra = sinbad_L7 / _L14 / _L224
    model.save(path, meta)                          # the fitted state of every unit (see SinbadModel.checkpoint)

`ensemble` combines unit files written by separate processes (sinbad.py --units-only / --ensemble-only).
"""
from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.config import opt
from common.errors import CheckpointError, UserError
from common.io import atomic_path
from dataset_readers.base import CategoryData, Sample
from dataset_readers.torch_data import IMAGENET_MEAN, IMAGENET_STD
from evaluation.score_files import safe_category, sample_key
from methods.base import AnomalyModel, Prediction, backbone_state_if_random, reduced_precision
from methods.knn import knn, require_finite, weights_cause

DEEP_LAYERS = {7: "layer4", 14: "layer3", 28: "layer2", 56: "layer1"}  # level = cells per side at 224 px
PIXEL_LEVEL = 224
LEVELS = (7, 14, PIXEL_LEVEL)  # the paper's ensemble
CROP_RATIOS = {16: 0.25, 9: 0.5, 4: 0.7, 1: 0.99}  # crops per canvas -> crop side / canvas side
PIXEL_CROP_RATIO = 0.999  # forced for the pixel level (one crop)
UNIT_VERSION = 2  # 2: unit files carry the fit_id of their unit's checkpoint state
CKPT_FORMAT = 1


@dataclass
class SinbadConfig:
    """Defaults = the paper grid of the official launchers (`NivC/SINBAD` create_batch_array_sinbad*.py)."""
    levels: tuple[int, ...] = opt(LEVELS, "pyramid levels (7: layer4, 14: layer3, 224: pixels; 28/56: layer2/1)",
                                  flag="--levels", aliases=("--level",), choices=sorted([*DEEP_LAYERS, PIXEL_LEVEL]),
                                  metavar="LEVEL")
    crops: tuple[int, ...] = opt(tuple(CROP_RATIOS), "crops per canvas for the deep levels (16, 9, 4, 1 = crop "
                                 "ratios 0.25, 0.5, 0.7, 0.99; level 224 always one 0.999 crop)",
                                 choices=tuple(CROP_RATIOS), metavar="N")
    canvas: int = opt(1024, "canvas side (official initial_res)")
    crop_num_edge: int = opt(4, "crop grid stride = canvas // this", cli=False)
    set_res: int = opt(224, "side every crop is resized to before the backbone", flag="--crop-res")
    projections: int = opt(1000, "random projections, levels 7/14")
    pixel_projections: int = opt(10, "random projections, pixel level 224")
    quantiles: int = opt(5, "thresholds per projection")
    percentiles: tuple[float, float] = opt((1.0, 99.0), "threshold range (percentiles)", cli=False)
    shrinkage: float = opt(0.1, "covariance shrinkage, levels 7/14")
    pixel_shrinkage: float = opt(1.0, "covariance shrinkage, pixel level")
    batch_size: int = opt(32, "images per batch; the first fits the thresholds")
    pixel_reps: int = opt(100, "pixel-level repeats (median in the ensemble)")
    lambda_pixel: float = opt(0.1, "weight of the pixel level in the ensemble")
    reg_eps: float = opt(1e-5, "epsilon of the validation normalisation (calc_anom_ensm.py reg_eps)", cli=False)
    official_thresholds: bool = opt(False, "official: re-fit thresholds on the first batch of every split, test "
                                    "included (transductive)", cli=False)
    whiten: str = opt("inv", "inv: x Sigma^-1 as the official code; inv_sqrt: Mahalanobis", choices=("inv", "inv_sqrt"))
    seed: int = opt(0, "projection seed (the script's --seed)", cli=False)
    mem_elems: int = opt(2 ** 25, "bound on projected values held at once", cli=False)
    dtype: str = opt("fp32", "backbone precision at inference (fp32 = exact; bf16/fp16 autocast)",
                     choices=("fp32", "bf16", "fp16"))
    fast: bool = opt(False, "made by the --fast preset", cli=False)

    @classmethod
    def fast_config(cls, **kw) -> "SinbadConfig":
        """Same pipeline, small canvas/crops and fewer projections/repeats (tests, demo). The --fast preset
        (common.config takes `fast_config` since a field is named `fast`)."""
        base = dict(canvas=256, set_res=112, projections=64, pixel_reps=5, fast=True)
        base.update(kw)
        return cls(**base)

    def n_projections(self, level: int) -> int:
        return self.pixel_projections if level == PIXEL_LEVEL else self.projections

    def alpha(self, level: int) -> float:
        return self.pixel_shrinkage if level == PIXEL_LEVEL else self.shrinkage

    def reps(self, level: int) -> int:
        return self.pixel_reps if level == PIXEL_LEVEL else 1


def crop_counts(level: int, crops: Sequence[int] | None = None) -> list[int]:
    """Crop counts a level runs: the pixel level always uses the single 0.999 crop."""
    if level == PIXEL_LEVEL:
        return [1]
    return [int(c) for c in (crops or CROP_RATIOS)]


def units_for(cfg: SinbadConfig) -> list[tuple[int, int]]:
    """The (level, crop count) units of a configuration, in --levels then --crops order."""
    return list(dict.fromkeys((int(lv), c) for lv in cfg.levels for c in crop_counts(lv, cfg.crops)))


def unit_groups(units: Sequence[tuple[int, int]], shared: bool = True) -> list[tuple[list[int], int]]:
    """(levels, crop count) that run together: the deep levels of one crop count share their crops and backbone
    pass; the pixel level and, without `shared`, every unit run alone."""
    groups: dict[tuple, list[int]] = {}
    for lv, n_crops in units:
        key = ("deep", n_crops) if shared and lv != PIXEL_LEVEL else (lv, n_crops)
        groups.setdefault(key, []).append(lv)
    return [(levels, key[1]) for key, levels in groups.items()]


# ----------------------------------------------------------------------------------------------- preprocessing
def aspect_size(width: int, height: int, canvas: int) -> tuple[int, int]:
    """(H, W) with the long side = canvas, the short side truncated (`load_mvtec_loco.py` sizes)."""
    long = max(width, height)  # integer arithmetic: the long side is exactly `canvas`
    return max(1, height * canvas // long), max(1, width * canvas // long)


class CanvasTransform:
    """PIL image -> (3, canvas, canvas) in [0,1]: squash to canvas² (bilinear, PIL), nearest re-interpolation to
    the aspect-correct size, top-left on zeros (`data_to_matrices.py`). The aspect comes from the image itself, which for MVTec
    LOCO equals the official hard-coded per-class size."""

    def __init__(self, canvas: int):
        self.canvas = canvas

    def __call__(self, img: Image.Image) -> torch.Tensor:
        c = self.canvas
        h, w = aspect_size(img.width, img.height, c)
        sq = img.resize((c, c), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(sq, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = F.interpolate(x[None], size=(h, w), mode="nearest")[0]
        out = torch.zeros(3, c, c)
        out[:, :h, :w] = x
        return out


def crop_grid(canvas: int, ratio: float, edge: int = 4) -> tuple[int, list[tuple[int, int]]]:
    """Crop side and the top-left corners, row-major, of a stride canvas//edge unfold (`sinbad_single_layer.py`)."""
    side = int(canvas * ratio)
    stride = canvas // edge
    n = (canvas - side) // stride + 1
    return side, [(i * stride, j * stride) for i in range(n) for j in range(n)]


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def crops_to_sets(canvases: torch.Tensor, y: int, x: int, side: int, res: int) -> torch.Tensor:
    """One crop position of a canvas batch -> (B, 3, res, res): nearest resize, the official 8-bit round trip
    (ToPILImage truncates x*255), ImageNet normalisation."""
    crop = canvases[:, :, y:y + side, x:x + side]
    crop = F.interpolate(crop, size=(res, res), mode="nearest")
    crop = torch.floor(crop * 255.0) / 255.0
    return (crop - _MEAN.to(crop)) / _STD.to(crop)


# ---------------------------------------------------------------------------------------------- set descriptor
def percentiles(z: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Per-column percentiles of (M, P) -> (len(qs), P), numpy's default linear interpolation. torch.quantile
    refuses inputs above 2^24 values and sorting is slow, so only the needed order statistics are selected
    (np.partition on the CPU, kthvalue on a GPU)."""
    m = z.shape[0]
    pos = [(m - 1) * q / 100.0 for q in qs]
    ks = sorted({int(math.floor(p)) for p in pos} | {min(int(math.floor(p)) + 1, m - 1) for p in pos})
    if z.device.type == "cpu":
        part = np.partition(z.T.contiguous().numpy(), ks, axis=1)
        stats = {k: torch.from_numpy(part[:, k].copy()) for k in ks}
    else:
        zt = z.T.contiguous()
        stats = {k: zt.kthvalue(k + 1, dim=1).values for k in ks}
    out = []
    for p in pos:
        lo = int(math.floor(p))
        a, b = stats[lo], stats[min(lo + 1, m - 1)]
        out.append(a + (b - a) * (p - lo))
    return torch.stack(out).to(z)


def fit_thresholds(z: torch.Tensor, n_q: int, pct: tuple[float, float]) -> torch.Tensor:
    """(M, P) projected values -> (P, Q) thresholds equally spaced strictly inside [p1, p99] (`sinbad_single_layer.py`)."""
    lo, hi = percentiles(z, pct)
    steps = torch.arange(1, n_q + 1, dtype=z.dtype, device=z.device) / (n_q + 1)
    return lo[:, None] + (hi - lo)[:, None] * steps[None]


def set_descriptor(elements: torch.Tensor, proj: torch.Tensor, thresholds: torch.Tensor | None, n_q: int, *,
                   pct: tuple[float, float] = (1.0, 99.0), mem_elems: int = 2 ** 25
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """elements (B, N, C), proj (C, P) -> descriptors (B, P*Q) projection-major, thresholds (P, Q).

    f[b, p*Q+q] = fraction of the N elements whose projection p is below threshold q. Without `thresholds` they
    are fitted on this batch (all B*N elements pooled). Projections are processed in chunks so that at most
    `mem_elems` projected values exist at once, whatever the set size.
    """
    b, n, c = elements.shape
    p_total = proj.shape[1]
    chunk = max(1, min(p_total, mem_elems // max(1, b * n * (1 + n_q))))
    flat = elements.reshape(b * n, c)
    descs, thrs = [], []
    for s in range(0, p_total, chunk):
        z = flat @ proj[:, s:s + chunk]  # (B*N, Pc), one matmul for the whole crop set
        t = fit_thresholds(z, n_q, pct) if thresholds is None else thresholds[s:s + chunk].to(z)
        below = (z[:, :, None] < t[None]).view(b, n, -1, n_q)
        descs.append(below.sum(1, dtype=torch.int32).to(elements.dtype).div_(n).reshape(b, -1))
        thrs.append(t)
    return torch.cat(descs, 1), torch.cat(thrs, 0)


def projection_matrix(dim: int, n_proj: int, *, seed: int, level: int, n_crops: int, position: int, rep: int
                      ) -> torch.Tensor:
    """Unnormalised Gaussian directions (dim, n_proj), seeded per (level, crop count, position, repeat) from a CPU
    generator, so a checkpoint regenerates them instead of storing them."""
    state = np.random.SeedSequence([seed, level, n_crops, position, rep]).generate_state(1)[0]
    g = torch.Generator().manual_seed(int(state))
    return torch.randn(dim, n_proj, generator=g)


# ----------------------------------------------------------------------------------------------- density model
class ShrunkWhitener:
    """x -> x @ Sigma^p with Sigma = sklearn ShrunkCovariance(alpha) of the training rows; p = -1 (official
    "whitening") or -1/2. Built from the thin SVD of the centred data, so a 5000-D model on a few hundred images
    costs O(n D) per row instead of a D x D inverse; a singular Sigma falls back to the pseudo-inverse."""

    def __init__(self, train: torch.Tensor, alpha: float, power: float = -1.0):
        x = train.double()
        n, d = x.shape
        xc = x - x.mean(0, keepdim=True)
        _, s, vt = torch.linalg.svd(xc, full_matrices=False)
        eig_s = s ** 2 / n  # eigenvalues of the biased empirical covariance along vt
        mu = float(eig_s.sum()) / d
        iso = alpha * mu
        lam = (1.0 - alpha) * eig_s + iso
        tiny = 1e-12 * max(float(lam.max()) if len(lam) else 0.0, iso, 1e-300)
        self.iso_pow = iso ** power if iso > tiny else 0.0
        lam_pow = torch.where(lam > tiny, lam.clamp_min(tiny) ** power, torch.zeros_like(lam))
        self.vt, self.delta = vt, lam_pow - self.iso_pow

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double().to(self.vt.device)
        return self.iso_pow * x + ((x @ self.vt.T) * self.delta) @ self.vt


def nn_scores(train: torch.Tensor, queries: Sequence[torch.Tensor], alpha: float, whiten: str = "inv"
              ) -> list[torch.Tensor]:
    """Squared L2 distance of each query row to its nearest training row after the shrunk transform."""
    power = {"inv": -1.0, "inv_sqrt": -0.5}[whiten]
    w = ShrunkWhitener(train, alpha, power)
    bank = w(train)
    return [knn(w(q), bank, k=1, squared=True)[0][:, 0] for q in queries]


# ---------------------------------------------------------------------------------------------------- encoding
class _Canvases(torch.utils.data.Dataset):
    """Images (PIL images, reader Samples or paths) -> canvases; files are decoded lazily by the project's reader
    (one-line errors naming the file)."""

    def __init__(self, images: Sequence[Any], canvas: int):
        self.images, self.transform = images, CanvasTransform(canvas)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.images[i]
        if not isinstance(item, Image.Image):
            from dataset_readers.base import load_image

            item = load_image(getattr(item, "path", item))
        elif item.mode != "RGB":
            item = item.convert("RGB")
        return self.transform(item)


def canvas_loader(images: Sequence[Any], cfg: SinbadConfig) -> torch.utils.data.DataLoader:
    """Canvases in batches of cfg.batch_size, in order (the first batch is the threshold-fitting batch)."""
    return torch.utils.data.DataLoader(_Canvases(images, cfg.canvas), batch_size=cfg.batch_size, shuffle=False,
                                       num_workers=0, pin_memory=torch.cuda.is_available())


def descriptor_width(level: int, cfg: SinbadConfig) -> int:
    return cfg.reps(level) * cfg.n_projections(level) * cfg.quantiles


def encode_units(images: Sequence[Any], groups: Sequence[tuple[Sequence[int], int]], cfg: SinbadConfig, extractor,
                 device: torch.device, *, projections: Mapping[tuple[int, int], list[torch.Tensor]],
                 thresholds: Mapping[tuple[int, int], list[torch.Tensor | None]], desc: str = "",
                 sizes: dict | None = None, dtype: str = "fp32") -> dict[tuple[int, int], torch.Tensor]:
    """One pass over the images -> {(level, crops): descriptors (N_img, K, R*P*Q) on the CPU}. Each image is read
    once and each crop of a group goes through the backbone once (under `dtype`). `thresholds[unit][k]` that are
    None are fitted on the first batch (updated in place); `sizes` receives each unit's elements per set."""
    from tqdm import tqdm

    for levels, n_crops in groups:
        for lv in levels:
            unit_crops(lv, n_crops, cfg)  # checks the crop count before any image is read
    out: dict[tuple[int, int], list[torch.Tensor]] = {(lv, c): [] for levels, c in groups for lv in levels}
    for canvases in tqdm(canvas_loader(images, cfg), desc=desc, leave=False, disable=None):
        canvases = canvases.to(device)
        for levels, n_crops in groups:
            got: dict[int, int] = {}
            d = describe_levels(canvases, levels, n_crops, cfg, extractor,
                                projections={lv: projections[(lv, n_crops)] for lv in levels},
                                thresholds={lv: thresholds[(lv, n_crops)] for lv in levels}, sizes=got,
                                dtype=dtype)
            for lv in levels:
                out[(lv, n_crops)].append(d[lv])
                if sizes is not None:
                    sizes[(lv, n_crops)] = got[lv]
    return {u: torch.cat(v) if v else torch.zeros(0, u[1], descriptor_width(u[0], cfg)) for u, v in out.items()}


def encode(samples: Sequence[Sample], level: int, *, n_crops: int, cfg: SinbadConfig, extractor, device: torch.device,
           projections: list[torch.Tensor], thresholds: list[torch.Tensor | None] | None = None, desc: str = ""
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stream images -> descriptors (N_img, K, R*P*Q) and the per-position thresholds (fitted on the first batch
    where `thresholds` is None). Positional signature kept for benchmarks/speed.py."""
    descs, thrs = encode_levels(samples, [level], n_crops, cfg, extractor, device=device,
                                projections={level: projections},
                                thresholds=None if thresholds is None else {level: thresholds}, desc=desc)
    return descs[level], thrs[level]


def encode_levels(samples: Sequence[Any], levels: Sequence[int], n_crops: int, cfg: SinbadConfig, extractor, *,
                  device: torch.device, projections: dict[int, list[torch.Tensor]],
                  thresholds: dict[int, list[torch.Tensor | None]] | None = None, desc: str = ""
                  ) -> tuple[dict[int, torch.Tensor], dict[int, list[torch.Tensor]]]:
    """`encode` for several levels that share a crop grid (the deep levels with one crop count)."""
    thr = {(lv, n_crops): list(thresholds[lv]) if thresholds is not None else [None] * n_crops for lv in levels}
    descs = encode_units(samples, [(list(levels), n_crops)], cfg, extractor, device,
                         projections={(lv, n_crops): projections[lv] for lv in levels}, thresholds=thr, desc=desc)
    return {lv: descs[(lv, n_crops)] for lv in levels}, {lv: thr[(lv, n_crops)] for lv in levels}


def unit_crops(level: int, n_crops: int, cfg: SinbadConfig) -> tuple[int, list[tuple[int, int]]]:
    """Crop side and corners of one unit."""
    ratio = PIXEL_CROP_RATIO if level == PIXEL_LEVEL else CROP_RATIOS[n_crops]
    side, corners = crop_grid(cfg.canvas, ratio, cfg.crop_num_edge)
    if len(corners) != n_crops:
        raise ValueError(f"crop ratio {ratio} gives {len(corners)} crops, expected {n_crops}")
    return side, corners


def describe_canvases(canvases: torch.Tensor, level: int, *, n_crops: int, cfg: SinbadConfig, extractor,
                      projections: list[torch.Tensor], thresholds: list[torch.Tensor | None]) -> torch.Tensor:
    """Canvases (B, 3, canvas, canvas) on the device -> descriptors (B, K, R*P*Q) on the CPU. `thresholds` is
    updated in place where an entry is None (fitted on this batch)."""
    return describe_levels(canvases, [level], n_crops, cfg, extractor, projections={level: projections},
                           thresholds={level: thresholds})[level]


def describe_levels(canvases: torch.Tensor, levels: Sequence[int], n_crops: int, cfg: SinbadConfig, extractor, *,
                    projections: dict[int, list[torch.Tensor]], thresholds: dict[int, list[torch.Tensor | None]],
                    sizes: dict | None = None, dtype: str | None = None) -> dict[int, torch.Tensor]:
    """describe_canvases for levels with one crop grid; one backbone pass per crop serves all deep levels. The
    backbone runs under `dtype` (default cfg.dtype; fp32: exact); the set elements are float32 whatever the
    precision."""
    grids = {(side, tuple(corners)) for side, corners in (unit_crops(lv, n_crops, cfg) for lv in levels)}
    if len(grids) != 1:
        raise ValueError(f"levels {list(levels)} with {n_crops} crops do not share a crop grid")
    side, corners = grids.pop()
    per_pos: dict[int, list[torch.Tensor]] = {lv: [] for lv in levels}
    deep = any(lv != PIXEL_LEVEL for lv in levels)
    for k, (y, x) in enumerate(corners):
        sets = crops_to_sets(canvases, y, x, side, cfg.set_res)
        feats = {}
        if deep:
            with reduced_precision(dtype or cfg.dtype, canvases.device):
                feats = extractor(sets)
        for name, v in feats.items():  # one check per crop batch; NaN would silently become finite set counts
            require_finite(v, f"SINBAD {name} features", weights_cause(extractor.backbone))
        for lv in levels:
            f = sets if lv == PIXEL_LEVEL else feats[DEEP_LAYERS[lv]]
            elements = f.flatten(2).transpose(1, 2).float()  # (B, N, C), a set per crop
            if sizes is not None:
                sizes[lv] = int(elements.shape[1])
            d, thresholds[lv][k] = set_descriptor(elements, projections[lv][k], thresholds[lv][k], cfg.quantiles,
                                                  pct=cfg.percentiles, mem_elems=cfg.mem_elems)
            per_pos[lv].append(d.cpu())
    return {lv: torch.stack(v, 1) for lv, v in per_pos.items()}


def element_dim(level: int, extractor) -> int:
    return 3 if level == PIXEL_LEVEL else extractor.feature_dims[DEEP_LAYERS[level]]


def unit_projections(level: int, n_crops: int, cfg: SinbadConfig, dim: int) -> list[torch.Tensor]:
    """The K per-position projection matrices (dim, R*P) of a unit, on the CPU (repeats side by side)."""
    return [torch.cat([projection_matrix(dim, cfg.n_projections(level), seed=cfg.seed, level=level, n_crops=n_crops,
                                         position=k, rep=r)
                       for r in range(cfg.reps(level))], 1) for k in range(n_crops)]


_POWER = {"inv": -1.0, "inv_sqrt": -0.5}


def _sha(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().contiguous().numpy()
        h.update(np.ascontiguousarray(a).tobytes() if isinstance(a, np.ndarray) else str(a).encode())
    return h.hexdigest()


def _count_dtype(n: int) -> torch.dtype:
    return torch.uint8 if n <= 255 else torch.int16 if n <= 32767 else torch.int32


# ------------------------------------------------------------------------------------------------- the model
@dataclass
class _Unit:
    """The fitted state of one (level, crop count). Saved: the training descriptors as element counts (exact:
    a descriptor is count / n_elements), the thresholds, the validation normalisation and digests. Rebuilt on
    load: the seeded projections (checked against `projection_sha`) and the per-position shrunk-covariance
    transforms + whitened training banks (the same SVD of the same descriptors; `whitening_sha` tells whether
    they came out bit-identical)."""
    level: int
    crops: int
    n_elements: int
    counts: torch.Tensor  # (N_train, K, R*P*Q) integer
    thresholds: list  # K tensors (R*P, Q) float32
    projection_sha: str
    norm: np.ndarray | None = None  # (1,) for a deep unit, (R, 1) for the pixel level: validation mean + eps
    whitening_sha: str = ""
    fit_device: str = "cpu"
    fit_id: str = ""
    projections: list = field(default_factory=list, repr=False)
    models: list = field(default_factory=list, repr=False)  # (ShrunkWhitener, bank) per (repeat, position)

    @property
    def key(self) -> tuple[int, int]:
        return self.level, self.crops

    def train_descriptors(self) -> torch.Tensor:
        return self.counts.to(torch.float32).div_(self.n_elements)

    def identity(self) -> str:
        """Digest of the saved state: a unit file and a unit checkpoint of one fit carry the same one."""
        return _sha(self.level, self.crops, self.n_elements, self.counts, *self.thresholds, self.norm,
                    self.projection_sha)

    def state(self) -> dict:
        return {"level": self.level, "crops": self.crops, "n_elements": self.n_elements, "counts": self.counts,
                "thresholds": torch.stack([t.detach().cpu() for t in self.thresholds]),
                "norm": torch.from_numpy(np.asarray(self.norm, np.float64)), "projection_sha": self.projection_sha,
                "whitening_sha": self.whitening_sha, "fit_device": self.fit_device, "fit_id": self.fit_id}


class SinbadModel(AnomalyModel):
    """Every unit of a SinbadConfig (levels x crop counts) and their ensemble; image-level only (maps None).

    fit(train, validation=...): thresholds on the first training batch, per-position shrunk-covariance models of
    the training descriptors, then the validation scores that normalise each unit in the ensemble
    (`calc_anom_ensm.py`). predict(images): Prediction(scores = the ensemble "sinbad", extra = sinbad_L<level>).
    With cfg.official_thresholds the thresholds are re-fitted on the first batch of every predict call, as the
    official code does for every split.
    """

    method = "sinbad"

    def __init__(self, backbone=None, cfg: SinbadConfig | None = None, *, device: Any = "cpu", extractor=None):
        from models.feature_extractor import FeatureExtractor

        self.cfg = cfg if cfg is not None else SinbadConfig()
        self.device = torch.device(device)
        self.unit_keys = units_for(self.cfg)
        if not self.unit_keys:
            raise UserError("SINBAD needs at least one level; pass --levels")
        deep = sorted({lv for lv, _ in self.unit_keys if lv != PIXEL_LEVEL})
        if deep:
            if extractor is None:
                if backbone is None:
                    raise ValueError(f"SINBAD levels {deep} need a backbone")
                extractor = FeatureExtractor(backbone, [DEEP_LAYERS[lv] for lv in deep])
            missing = [lv for lv in deep if DEEP_LAYERS[lv] not in extractor.layers]
            if missing:
                raise ValueError(f"the extractor lacks the layers of levels {missing}")
            extractor = extractor.to(self.device)
        self.extractor = extractor if deep else None
        self.backbone = extractor.backbone if deep else None
        self.units: dict[tuple[int, int], _Unit] = {}
        self.validation_units: dict[tuple[int, int], np.ndarray] | None = None  # raw validation scores of fit

    # -- fitting ---------------------------------------------------------------------------------------------
    def _projections(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], str]:
        mats = unit_projections(key[0], key[1], self.cfg, element_dim(key[0], self.extractor))
        return [m.to(self.device) for m in mats], _sha(*mats)

    def _build_models(self, unit: _Unit, train_d: torch.Tensor) -> str:
        """Per (repeat, position): ShrunkWhitener + whitened bank of the training descriptors (nn_scores' model);
        returns the digest of the banks."""
        cfg, lv = self.cfg, unit.level
        dd = cfg.n_projections(lv) * cfg.quantiles
        unit.models, h = [], hashlib.sha256()
        for r in range(cfg.reps(lv)):
            cols = slice(r * dd, (r + 1) * dd)
            for k in range(unit.crops):
                x = train_d[:, k, cols].to(self.device)
                w = ShrunkWhitener(x, cfg.alpha(lv), _POWER[cfg.whiten])
                bank = w(x)
                require_finite(bank, f"SINBAD L{lv} c{unit.crops} whitened training descriptors",
                               "the training descriptors are not finite; check the images and --weights")
                h.update(bank.cpu().numpy().tobytes())
                unit.models.append((w, bank))
        return h.hexdigest()

    def fit(self, train: Sequence[Any], validation: Sequence[Any] | None = None, **kwargs) -> "SinbadModel":
        """Fit every unit on `train`; `validation` (normal images) gives the ensemble's normalisation."""
        if validation is None or len(validation) == 0:
            raise UserError("SINBAD normalises each level by its mean validation score: fit needs validation "
                            "images (sinbad.py holds out training images where a dataset has no validation split)")
        if len(train) < 2:
            raise UserError(f"SINBAD needs at least 2 training images, got {len(train)}")
        cfg, keys = self.cfg, self.unit_keys
        proj, proj_sha = {}, {}
        for key in keys:
            proj[key], proj_sha[key] = self._projections(key)
        thresholds: dict = {key: [None] * key[1] for key in keys}
        sizes: dict = {}
        train_d = encode_units(train, unit_groups(keys), cfg, self.extractor, self.device, projections=proj,
                               thresholds=thresholds, desc="SINBAD train", sizes=sizes)
        self.units = {}
        for key in keys:
            n = sizes[key]
            counts = torch.round(train_d[key] * n).to(_count_dtype(n))
            unit = _Unit(key[0], key[1], n, counts, thresholds=thresholds[key], projection_sha=proj_sha[key],
                         fit_device=self.device.type, projections=proj[key])
            if not torch.equal(unit.train_descriptors(), train_d[key]):  # the saved counts must give these bits
                raise RuntimeError(f"SINBAD L{key[0]} c{key[1]}: descriptors are not count / {n}")
            unit.whitening_sha = self._build_models(unit, train_d[key])
            self.units[key] = unit
        del train_d
        self.validation_units = self.predict_units(validation, desc="SINBAD validation", dtype="fp32")
        for key, m in unit_norms(self.validation_units, cfg).items():
            self.units[key].norm = m
            self.units[key].fit_id = self.units[key].identity()
        return self

    # -- inference -------------------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if set(self.units) != set(self.unit_keys) or any(u.norm is None for u in self.units.values()):
            raise RuntimeError("SinbadModel is not fitted: call fit() or load a checkpoint")

    def _score(self, unit: _Unit, d: torch.Tensor) -> np.ndarray:
        """Descriptors (N, K, R*P*Q) -> raw 1-NN scores (R, K, N) float64."""
        cfg, lv = self.cfg, unit.level
        reps, dd = cfg.reps(lv), cfg.n_projections(lv) * cfg.quantiles
        out = torch.zeros(reps, unit.crops, len(d), dtype=torch.float64)
        if len(d):
            for r in range(reps):
                cols = slice(r * dd, (r + 1) * dd)
                for k in range(unit.crops):
                    w, bank = unit.models[r * unit.crops + k]
                    out[r, k] = knn(w(d[:, k, cols]), bank, k=1, squared=True, bank_checked=True)[0][:, 0].cpu()
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"SINBAD L{lv} c{unit.crops}: non-finite scores; check the images and --weights")
        return out.numpy()

    def predict_units(self, images: Sequence[Any], *, desc: str = "SINBAD predict", dtype: str | None = None
                      ) -> dict[tuple[int, int], np.ndarray]:
        """Raw per-position scores {(level, crops): (R, K, N)} of `images` (what a unit file holds); the backbone
        under `dtype` (default cfg.dtype, an inference-only setting: fit always runs in fp32)."""
        if not self.units:
            raise RuntimeError("SinbadModel is not fitted: call fit() or load a checkpoint")
        official = self.cfg.official_thresholds  # the official code re-fits on the first batch of every split
        thresholds = {key: [None] * key[1] if official else list(u.thresholds) for key, u in self.units.items()}
        groups = unit_groups(list(self.units))
        d = encode_units(images, groups, self.cfg, self.extractor, self.device,
                         projections={key: u.projections for key, u in self.units.items()}, thresholds=thresholds,
                         desc=desc, dtype=dtype or self.cfg.dtype)
        return {key: self._score(u, d[key]) for key, u in self.units.items()}

    @property
    def norms(self) -> dict[tuple[int, int], np.ndarray]:
        return {key: u.norm for key, u in self.units.items()}

    def prediction_from_units(self, raw: Mapping[tuple[int, int], np.ndarray]) -> Prediction:
        self._require_fitted()
        out = combine(raw, self.norms, self.cfg)
        return Prediction(scores=out.pop("sinbad"), maps=None, extra=out)

    def predict(self, images: Sequence[Any], **kwargs) -> Prediction:
        """Ensemble scores of `images` (image-level only: maps None); per-level scores in extra."""
        self._require_fitted()
        return self.prediction_from_units(self.predict_units(images))

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Images -> canvases (B, 3, canvas, canvas) on the device (forward_networks' input)."""
        ds = _Canvases(images, self.cfg.canvas)
        return torch.stack([ds[i] for i in range(len(ds))]).to(self.device)

    def forward_networks(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The backbone passes of inference on canvases: every crop of every deep crop count (no sets, descriptors
        or 1-NN). The pixel level has no network."""
        feats = []
        if self.extractor is None:
            return feats
        deep_lv = next(lv for lv, _ in self.unit_keys if lv != PIXEL_LEVEL)
        for n_crops in dict.fromkeys(c for lv, c in self.unit_keys if lv != PIXEL_LEVEL):
            side, corners = unit_crops(deep_lv, n_crops, self.cfg)
            for y, x in corners:
                with reduced_precision(self.cfg.dtype, self.device):
                    feats.append(self.extractor(crops_to_sets(batch, y, x, side, self.cfg.set_res)))
        return feats

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint(self, units: Sequence[tuple[int, int]] | None = None) -> dict:
        """{format, config, units: [unit state], backbone state for random weights}; `units`: a subset (one
        unit's checkpoint for sinbad.py --units-only), with the configuration narrowed to it."""
        self._require_fitted()
        keys = list(self.unit_keys) if units is None else [tuple(k) for k in units]
        cfg = self.cfg if units is None else narrowed_config(self.cfg, keys)
        ckpt = {"format": CKPT_FORMAT, "config": config_record(cfg), "units": [self.units[k].state() for k in keys]}
        if any(lv != PIXEL_LEVEL for lv, _ in keys):
            ckpt.update(backbone_state_if_random(self.backbone))
        return ckpt

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "SinbadModel":
        """AnomalyModel.load, with the file named in a refusal of the checkpoint's contents."""
        try:
            return super().load(path, **kwargs)
        except CheckpointError as exc:
            if str(path) in str(exc):
                raise
            raise CheckpointError(f"{path}: {exc}") from None

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping, *, device: Any = "cpu", weights: Any = None, backbone=None,
                        **kwargs) -> "SinbadModel":
        """Rebuild a fitted model; `backbone`: an already loaded backbone, used when its weights are the
        checkpoint's (else the backbone is found by methods.base.backbone_from_checkpoint)."""
        from common.checkpoints import META_KEY
        from common.provenance import RANDOM
        from methods.base import backbone_from_checkpoint

        fix = "re-create it with sinbad.py"
        if ckpt.get("format") != CKPT_FORMAT or not isinstance(ckpt.get("units"), list):
            raise CheckpointError(f"not a SINBAD model checkpoint of this version (format {ckpt.get('format')!r}, "
                                  f"expected {CKPT_FORMAT}); {fix}")
        cfg = config_from_record(ckpt.get("config"))
        bb = None
        if any(lv != PIXEL_LEVEL for lv in cfg.levels):
            sha = (ckpt.get(META_KEY) or {}).get("weights_sha256")
            if backbone is not None and sha not in (None, RANDOM) and getattr(backbone, "weights_sha256", None) == sha:
                bb = backbone
            else:
                bb = backbone_from_checkpoint(ckpt, weights=weights)
        model = cls(bb, cfg, device=device)
        states = {(int(s["level"]), int(s["crops"])): s for s in ckpt["units"]}
        if set(states) != set(model.unit_keys):
            raise CheckpointError(f"the SINBAD checkpoint holds units {sorted(states)}, its configuration names "
                                  f"{sorted(model.unit_keys)}; {fix}")
        for key in model.unit_keys:
            model.units[key] = model._restore(states[key], fix)
        return model

    def _restore(self, s: Mapping, fix: str) -> _Unit:
        import logging

        cfg = self.cfg
        lv, c, n = int(s["level"]), int(s["crops"]), int(s["n_elements"])
        counts, thr, norm = s["counts"], s["thresholds"], s["norm"]
        width, rp = descriptor_width(lv, cfg), cfg.reps(lv) * cfg.n_projections(lv)
        norm_shape = (cfg.reps(lv), 1) if lv == PIXEL_LEVEL else (1,)
        ok = (isinstance(counts, torch.Tensor) and counts.ndim == 3 and counts.shape[1:] == (c, width)
              and len(counts) >= 2 and not counts.is_floating_point() and isinstance(thr, torch.Tensor)
              and tuple(thr.shape) == (c, rp, cfg.quantiles) and isinstance(norm, torch.Tensor)
              and tuple(norm.shape) == norm_shape)
        if not ok:
            raise CheckpointError(f"the SINBAD checkpoint's unit L{lv} c{c} does not match its configuration "
                                  f"(descriptor or threshold shapes); {fix}")
        if not (torch.isfinite(thr).all() and torch.isfinite(norm).all() and (norm > 0).all()):
            raise CheckpointError(f"the SINBAD checkpoint's unit L{lv} c{c} holds non-finite thresholds or "
                                  f"normalisation; {fix}")
        proj, proj_sha = self._projections((lv, c))
        if proj_sha != s["projection_sha"]:
            raise CheckpointError(f"the seeded projections of unit L{lv} c{c} come out differently with this "
                                  f"version of torch than when the checkpoint was made; {fix}")
        unit = _Unit(lv, c, n, counts, thresholds=list(thr.float().unbind(0)), projection_sha=proj_sha,
                     norm=norm.double().numpy(),
                     fit_device=str(s.get("fit_device")), fit_id=str(s.get("fit_id")), projections=proj)
        unit.whitening_sha = self._build_models(unit, unit.train_descriptors())
        if unit.whitening_sha != s.get("whitening_sha"):
            logging.getLogger("sinbad").warning(
                "SINBAD L%d c%d: the shrunk-covariance models rebuilt on %s differ in the last bits from the fit on "
                "%s (another device or linear-algebra library): scores can differ from the training run's in the "
                "last digits", lv, c, self.device.type, unit.fit_device)
        unit.whitening_sha = str(s.get("whitening_sha"))
        return unit

    @classmethod
    def merged(cls, models: Sequence["SinbadModel"], cfg: SinbadConfig) -> "SinbadModel":
        """One model of the units of fitted `models` that share one backbone (sinbad.py --benchmark)."""
        backbones = {id(m.backbone): m.backbone for m in models if m.backbone is not None}
        if len(backbones) > 1:
            raise ValueError("merged SINBAD models must share one backbone object")
        out = cls(next(iter(backbones.values()), None), cfg, device=models[0].device)
        out.validation_units = {}
        for m in models:
            out.units.update(m.units)
            out.validation_units.update(m.validation_units or {})
        out.units = {k: out.units[k] for k in out.unit_keys}  # KeyError: a unit of cfg no model fitted
        out.validation_units = {k: out.validation_units[k] for k in out.unit_keys}
        return out


# ----------------------------------------------------------------------------------------------- checkpoints
INFERENCE_ONLY = ("dtype",)  # config fields that may differ between the fit and a later scoring


def config_record(cfg: SinbadConfig) -> dict:
    return asdict(cfg)


def record_config(cfg: SinbadConfig) -> dict:
    """What shapes the fitted model (the checkpoint record's config, checked by --test-only)."""
    return {k: v for k, v in asdict(cfg).items() if k not in INFERENCE_ONLY}


def config_from_record(rec: Any) -> SinbadConfig:
    if not isinstance(rec, Mapping):
        raise CheckpointError("the SINBAD checkpoint has no configuration; re-create it with sinbad.py")
    kw = {}
    for f in fields(SinbadConfig):
        if f.name in rec:
            v = rec[f.name]
            kw[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
    return SinbadConfig(**kw)


def narrowed_config(cfg: SinbadConfig, units: Sequence[tuple[int, int]]) -> SinbadConfig:
    """The configuration of a subset of units (one unit: levels (L,), crops (K,))."""
    levels = tuple(dict.fromkeys(lv for lv, _ in units))
    crops = tuple(dict.fromkeys(c for lv, c in units if lv != PIXEL_LEVEL)) or (1,)
    return replace(cfg, levels=levels, crops=crops)


def checkpoint_path(ckpt_dir: str | Path, dataset: str, category: str) -> Path:
    return Path(ckpt_dir) / "sinbad" / dataset / f"{safe_category(category)}.pth"


def unit_checkpoint_path(ckpt_dir: str | Path, dataset: str, category: str, level: int, n_crops: int) -> Path:
    return Path(ckpt_dir) / "sinbad" / dataset / "units" / safe_category(category) / f"L{level}_c{n_crops}.pth"


def merge_checkpoints(ckpts: Sequence[Mapping], cfg: SinbadConfig) -> dict:
    """Unit checkpoints (sinbad.py --units-only) -> one model checkpoint of `cfg` (without its record). Refuses
    units fitted with other settings or, for random weights, with other backbone states."""
    from methods.base import BACKBONE_STATE_KEY

    want = {k: v for k, v in record_config(cfg).items() if k not in ("levels", "crops")}
    units, state = [], None
    for ck in ckpts:
        got = {k: v for k, v in record_config(config_from_record(ck.get("config"))).items() if k in want}
        diff = [f"{k}={got.get(k)} (this run: {v})" for k, v in want.items() if got.get(k) != v]
        if diff:
            raise CheckpointError(f"a unit checkpoint was fitted with other settings: {'; '.join(diff[:3])}")
        bs = ck.get(BACKBONE_STATE_KEY)
        if bs is not None:
            if state is None:
                state = bs
            elif set(bs) != set(state) or not all(torch.equal(bs[k], state[k]) for k in state):
                raise CheckpointError("the unit checkpoints were made with different random backbones")
        units.extend(ck["units"])
    out = {"format": CKPT_FORMAT, "config": config_record(cfg), "units": units}
    if state is not None:
        out[BACKBONE_STATE_KEY] = state
    return out


# ---------------------------------------------------------------------------------------------------- one unit
def timing_record(*, seconds: float, cpu_seconds: float, test_seconds: float, images: int, test_images: int,
                  device: torch.device) -> dict:
    """Time per image of a fit + test scoring (unit files, --benchmark)."""
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"seconds": seconds, "images": images, "s_per_image": seconds / max(1, images),
            "cpu_s_per_image": cpu_seconds / max(1, images),  # all threads; stable on a shared machine
            "test_s_per_image": test_seconds / max(1, test_images),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "peak_cuda_mb": peak / 2 ** 20}


def run_unit(data: CategoryData, level: int, *, n_crops: int, cfg: SinbadConfig, extractor, device=None,
             logger=None) -> dict:
    """Fit and score one (level, crop count): per-position scores test (R, K, N_test), val (R, K, N_val)."""
    return run_units(data, [level], n_crops, cfg, extractor, device=device, logger=logger)[level]


def run_units(data: CategoryData, levels: Sequence[int], n_crops: int, cfg: SinbadConfig, extractor, *,
              device=None, logger=None) -> dict[int, dict]:
    """run_unit for deep levels that share a crop count, in one pass over the images (the extractor returns every
    level's layer); each level's scores equal its own run_unit's. The timing covers the shared pass."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    model = SinbadModel(getattr(extractor, "backbone", None), narrowed_config(cfg, [(lv, n_crops) for lv in levels]),
                        device=device, extractor=extractor)
    model.fit(data.train, validation=data.validation)
    t_test = time.perf_counter()
    test = model.predict_units(data.test)
    t_test = time.perf_counter() - t_test
    timing = timing_record(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                           test_seconds=t_test, images=len(data.train) + len(data.validation) + len(data.test),
                           test_images=len(data.test), device=device)
    if len(levels) > 1:
        timing["shared_by_levels"] = list(levels)
    if logger:
        logger.info("%s L%s c%d: %.1f s (%.3f s/image, test %.3f s/image)", data.category,
                    "+".join(map(str, levels)), n_crops, timing["seconds"], timing["s_per_image"],
                    timing["test_s_per_image"])
    return {lv: {"test": test[(lv, n_crops)], "val": model.validation_units[(lv, n_crops)],
                 "weights_sha256": unit_weights_sha(lv, model.backbone), "timing": dict(timing),
                 "fit_id": model.units[(lv, n_crops)].fit_id} for lv in levels}


def unit_weights_sha(level: int, backbone) -> str | None:
    """The weights behind a deep unit, so --ensemble-only never mixes units of different weights files."""
    return None if level == PIXEL_LEVEL else getattr(backbone, "weights_sha256", None) or "RANDOM"


# ----------------------------------------------------------------------------------------------- unit files
def work_dir(score_dir: str | Path) -> Path:
    return Path(score_dir) / "sinbad_units"


def unit_path(score_dir: str | Path, category: str, level: int, n_crops: int) -> Path:
    return work_dir(score_dir) / safe_category(category) / f"L{level}_c{n_crops}.npz"


COMPAT_KEYS = ("canvas", "crop_num_edge", "set_res", "quantiles", "official_thresholds", "whiten", "seed", "fast")


def save_unit(path: Path, result: dict, data: CategoryData, cfg: SinbadConfig, meta: dict) -> None:
    info = {"version": UNIT_VERSION, "config": asdict(cfg), "timing": result["timing"],
            "weights_sha256": result.get("weights_sha256"), "fit_id": result.get("fit_id"), **meta,
            "test": [sample_key(s) for s in data.test], "val": [sample_key(s) for s in data.validation]}
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, test=result["test"], val=result["val"], info=np.array(json.dumps(info)))


class UnitFileError(UserError, FileNotFoundError):
    """A SINBAD unit file that --ensemble-only needs is missing."""


def load_unit(path: Path, data: CategoryData) -> dict:
    """A unit file, checked against the current image lists."""
    if not path.is_file():
        raise UnitFileError(f"SINBAD unit file not found: {path} (run sinbad.py for this level/crop count first, "
                            "or drop --ensemble-only)")
    try:
        with np.load(path) as z:
            test, val, info = z["test"], z["val"], json.loads(str(z["info"]))
    except Exception as exc:
        raise UserError(f"cannot read SINBAD unit file {path} ({exc}); delete it and re-run its unit") from None
    if info.get("test") != [sample_key(s) for s in data.test] or info.get("val") != [sample_key(s) for s in
                                                                                      data.validation]:
        raise UserError(f"{path} was computed on other images than {data.category} now lists; re-run its unit")
    for key, now in (("dataset", data.dataset), ("category", data.category)):
        if info.get(key) is not None and info[key] != now:
            raise UserError(f"{path} was computed for {key} {info[key]}, not {now}; re-run its unit")
    if not (np.isfinite(test).all() and np.isfinite(val).all()):
        raise UserError(f"{path} holds NaN or inf scores; delete it and re-run its unit")
    return {"test": test, "val": val, "info": info}


# -------------------------------------------------------------------------------------------------- ensemble
def grid_mean_weights(n_crops: int, edge: int = 4) -> np.ndarray:
    """Weights w (K,) such that scores (.., K) @ w = mean of the sqrt(K) grid resized to edge x edge with OpenCV
    bicubic (the official crop aggregation); resizing is linear, so impulses give the exact weights."""
    import cv2

    g = int(round(math.sqrt(n_crops)))
    if g * g != n_crops:
        raise ValueError(f"crop count {n_crops} is not a square grid")
    w = np.empty(n_crops)
    for k in range(n_crops):  # K <= 16 impulses, not a per-image loop
        imp = np.zeros((g, g), np.float64)
        imp.flat[k] = 1.0
        w[k] = cv2.resize(imp, (edge, edge), interpolation=cv2.INTER_CUBIC).mean()
    return w


def normalize_by_val(test: np.ndarray, val: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Divide by (mean validation score + eps), then add eps, along the last axis (`calc_anom_ensm.py`)."""
    m = np.asarray(val, np.float64).mean(-1, keepdims=True) + eps
    return np.asarray(test, np.float64) / m + eps, np.asarray(val, np.float64) / m + eps


def _unit_cells(key: tuple[int, int], scores: np.ndarray, cfg: SinbadConfig) -> np.ndarray:
    """Raw unit scores (R, K, N) -> the cells the ensemble normalises: the bicubic grid mean (N,) of a deep unit,
    the (R, N) repeats of the pixel level."""
    if key[0] == PIXEL_LEVEL:
        return np.asarray(scores[:, 0], np.float64)
    return np.einsum("k,kn->n", grid_mean_weights(key[1], cfg.crop_num_edge), scores[0])


def unit_norms(val_units: Mapping[tuple[int, int], np.ndarray], cfg: SinbadConfig) -> dict[tuple[int, int], np.ndarray]:
    """Per unit: mean validation score + eps ((1,) deep, (R, 1) pixel), the divisor of `normalize_by_val`."""
    return {key: np.asarray(_unit_cells(key, v, cfg), np.float64).mean(-1, keepdims=True) + cfg.reg_eps
            for key, v in val_units.items()}


def combine(units: Mapping[tuple[int, int], np.ndarray], norms: Mapping[tuple[int, int], np.ndarray],
            cfg: SinbadConfig) -> dict[str, np.ndarray]:
    """Raw unit scores {(level, crops): (R, K, N)} + their validation norms -> {sinbad_L<level>, sinbad}.

    Per deep level: each crop count's grid is reduced by the bicubic-weighted mean, normalised by its validation
    mean, and averaged over crop counts -> sinbad_L<level>. Pixel level: each repeat normalised, median over
    repeats -> sinbad_L224. sinbad = mean over deep levels + lambda * pixel score (`calc_anom_ensm.py`).
    """
    out: dict[str, np.ndarray] = {}
    deep_levels = sorted({lv for lv, _ in units if lv != PIXEL_LEVEL})
    for lv in deep_levels:
        per_scale = [np.asarray(_unit_cells((lv, c), units[(lv, c)], cfg), np.float64) / norms[(lv, c)] + cfg.reg_eps
                     for c in sorted((c for l2, c in units if l2 == lv), reverse=True)]
        out[f"sinbad_L{lv}"] = np.mean(per_scale, 0)
    pixel = f"sinbad_L{PIXEL_LEVEL}"
    if (PIXEL_LEVEL, 1) in units:
        key = (PIXEL_LEVEL, 1)
        out[pixel] = np.median(_unit_cells(key, units[key], cfg) / norms[key] + cfg.reg_eps, 0)
    if deep_levels:
        s = np.mean([out[f"sinbad_L{lv}"] for lv in deep_levels], 0)
        out["sinbad"] = s + cfg.lambda_pixel * out[pixel] if pixel in out else s
    elif pixel in out:
        out["sinbad"] = out[pixel]
    return out


def ensemble(units: dict[tuple[int, int], dict], cfg: SinbadConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{(level, n_crops): {"test": (R, K, Nt), "val": (R, K, Nv)}} -> {method: (test scores, val scores)}: `combine`
    with the norms of the units' own validation scores."""
    norms = unit_norms({k: u["val"] for k, u in units.items()}, cfg)
    test = combine({k: u["test"] for k, u in units.items()}, norms, cfg)
    val = combine({k: u["val"] for k, u in units.items()}, norms, cfg)
    return {name: (test[name], val[name]) for name in test}


def with_validation(data: CategoryData, holdout: float) -> CategoryData:
    """Datasets without a validation split (MVTec AD style): hold out evenly spaced training images, since the
    ensemble normalises by validation scores and training images score ~0 against themselves."""
    if data.validation:
        return data
    n = len(data.train)
    n_val = max(1, int(round(holdout * n)))
    if n - n_val < 2:
        raise ValueError(f"{data.category}: {n} training images are too few to hold out a validation split")
    idx = set(np.linspace(0, n - 1, n_val).round().astype(int).tolist())
    return replace(data, train=[s for i, s in enumerate(data.train) if i not in idx],
                   validation=[s for i, s in enumerate(data.train) if i in idx])


__all__ = ["SinbadConfig", "SinbadModel", "LEVELS", "PIXEL_LEVEL", "CROP_RATIOS", "DEEP_LAYERS", "crop_counts",
           "units_for", "unit_groups", "aspect_size", "CanvasTransform", "crop_grid", "crops_to_sets", "percentiles",
           "fit_thresholds", "set_descriptor", "projection_matrix", "ShrunkWhitener", "nn_scores", "encode",
           "encode_levels", "encode_units", "describe_canvases", "describe_levels", "run_unit", "run_units",
           "unit_path", "save_unit", "load_unit", "grid_mean_weights", "normalize_by_val", "unit_norms", "combine",
           "ensemble", "with_validation", "work_dir", "checkpoint_path", "unit_checkpoint_path", "merge_checkpoints",
           "record_config", "config_from_record", "narrowed_config"]
