"""SINBAD, "Set Features for Fine-grained Anomaly Detection": set descriptors per pyramid level and the ensemble.

One *unit* = one (category, level, crop count). A unit cuts every image's zero-padded canvas into crops, turns each
crop into a set of element vectors (backbone cells or raw pixels), summarises the set by the empirical CDF of random
projections at fixed thresholds, and scores every crop position with its own shrunk-covariance transform + exact
1-NN to the training descriptors. `ensemble` combines the unit files as calc_anom_ensm.py does.
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.config import opt
from common.errors import UserError
from common.io import atomic_path
from dataset_readers.base import CategoryData, Sample
from dataset_readers.torch_data import IMAGENET_MEAN, IMAGENET_STD, make_loader
from evaluation.score_files import safe_category, sample_key
from methods.knn import knn, require_finite, weights_cause

DEEP_LAYERS = {7: "layer4", 14: "layer3", 28: "layer2", 56: "layer1"}  # level = cells per side at 224 px
PIXEL_LEVEL = 224
LEVELS = (7, 14, PIXEL_LEVEL)  # the paper's ensemble
CROP_RATIOS = {16: 0.25, 9: 0.5, 4: 0.7, 1: 0.99}  # crops per canvas -> crop side / canvas side
PIXEL_CROP_RATIO = 0.999  # forced for the pixel level (one crop)
UNIT_VERSION = 1


@dataclass
class SinbadConfig:
    """Defaults = the paper grid of the official launchers (`NivC/SINBAD`)."""
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
    reg_eps: float = opt(1e-5, "covariance regulariser", cli=False)
    official_thresholds: bool = opt(False, "official: re-fit thresholds on the first batch of every split, test "
                                    "included (transductive)", cli=False)
    whiten: str = opt("inv", "inv: x Sigma^-1 as the official code; inv_sqrt: Mahalanobis", choices=("inv", "inv_sqrt"))
    seed: int = opt(0, "projection seed (the script's --seed)", cli=False)
    mem_elems: int = opt(2 ** 25, "bound on projected values held at once", cli=False)
    fast: bool = opt(False, "made by the --fast preset", cli=False)

    @classmethod
    def fast_config(cls, **kw) -> "SinbadConfig":
        """Same pipeline, small canvas/crops and fewer projections/repeats (tests, demo)."""
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


def set_descriptor(elements: torch.Tensor, proj: torch.Tensor, thresholds: torch.Tensor | None, n_q: int,
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


def projection_matrix(dim: int, n_proj: int, seed: int, level: int, n_crops: int, position: int, rep: int
                      ) -> torch.Tensor:
    """Unnormalised Gaussian directions (dim, n_proj), seeded per (level, crop count, position, repeat)."""
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


# ---------------------------------------------------------------------------------------------------- one unit
def encode(samples: Sequence[Sample], level: int, n_crops: int, cfg: SinbadConfig, extractor, device: torch.device,
           projections: list[torch.Tensor], thresholds: list[torch.Tensor | None] | None = None, desc: str = ""
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stream images -> descriptors (N_img, K, R*P*Q) and the per-position thresholds (fitted on the first batch
    where `thresholds` is None)."""
    descs, thrs = encode_levels(samples, [level], n_crops, cfg, extractor, device, {level: projections},
                                None if thresholds is None else {level: thresholds}, desc)
    return descs[level], thrs[level]


def encode_levels(samples: Sequence[Sample], levels: Sequence[int], n_crops: int, cfg: SinbadConfig, extractor,
                  device: torch.device, projections: dict[int, list[torch.Tensor]],
                  thresholds: dict[int, list[torch.Tensor | None]] | None = None, desc: str = ""
                  ) -> tuple[dict[int, torch.Tensor], dict[int, list[torch.Tensor]]]:
    """`encode` for several levels that share a crop grid (the deep levels with one crop count): each image is
    read once and each crop goes through the backbone once, the extractor returning every level's layer."""
    from tqdm import tqdm

    for lv in levels:
        unit_crops(lv, n_crops, cfg)  # checks the crop count before any image is read
    thresholds = {lv: list(thresholds[lv]) if thresholds is not None else [None] * n_crops for lv in levels}
    loader = make_loader(samples, CanvasTransform(cfg.canvas), batch_size=cfg.batch_size)
    out: dict[int, list[torch.Tensor]] = {lv: [] for lv in levels}
    for canvases, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        d = describe_levels(canvases.to(device), levels, n_crops, cfg, extractor, projections, thresholds)
        for lv in levels:
            out[lv].append(d[lv])
    return {lv: torch.cat(v) for lv, v in out.items()}, thresholds


def unit_crops(level: int, n_crops: int, cfg: SinbadConfig) -> tuple[int, list[tuple[int, int]]]:
    """Crop side and corners of one unit."""
    ratio = PIXEL_CROP_RATIO if level == PIXEL_LEVEL else CROP_RATIOS[n_crops]
    side, corners = crop_grid(cfg.canvas, ratio, cfg.crop_num_edge)
    if len(corners) != n_crops:
        raise ValueError(f"crop ratio {ratio} gives {len(corners)} crops, expected {n_crops}")
    return side, corners


def describe_canvases(canvases: torch.Tensor, level: int, n_crops: int, cfg: SinbadConfig, extractor,
                      projections: list[torch.Tensor], thresholds: list[torch.Tensor | None]) -> torch.Tensor:
    """Canvases (B, 3, canvas, canvas) on the device -> descriptors (B, K, R*P*Q) on the CPU. `thresholds` is
    updated in place where an entry is None (fitted on this batch). Also the benchmark's inference path."""
    return describe_levels(canvases, [level], n_crops, cfg, extractor, {level: projections}, {level: thresholds})[level]


def describe_levels(canvases: torch.Tensor, levels: Sequence[int], n_crops: int, cfg: SinbadConfig, extractor,
                    projections: dict[int, list[torch.Tensor]], thresholds: dict[int, list[torch.Tensor | None]]
                    ) -> dict[int, torch.Tensor]:
    """describe_canvases for levels with one crop grid; one backbone pass per crop serves all deep levels."""
    grids = {(side, tuple(corners)) for side, corners in (unit_crops(lv, n_crops, cfg) for lv in levels)}
    if len(grids) != 1:
        raise ValueError(f"levels {list(levels)} with {n_crops} crops do not share a crop grid")
    side, corners = grids.pop()
    per_pos: dict[int, list[torch.Tensor]] = {lv: [] for lv in levels}
    deep = any(lv != PIXEL_LEVEL for lv in levels)
    for k, (y, x) in enumerate(corners):
        sets = crops_to_sets(canvases, y, x, side, cfg.set_res)
        feats = extractor(sets) if deep else {}
        for name, v in feats.items():  # one check per crop batch; NaN would silently become finite set counts
            require_finite(v, f"SINBAD {name} features", weights_cause(extractor.backbone))
        for lv in levels:
            f = sets if lv == PIXEL_LEVEL else feats[DEEP_LAYERS[lv]]
            elements = f.flatten(2).transpose(1, 2).float()  # (B, N, C), a set per crop
            d, thresholds[lv][k] = set_descriptor(elements, projections[lv][k], thresholds[lv][k], cfg.quantiles,
                                                  cfg.percentiles, cfg.mem_elems)
            per_pos[lv].append(d.cpu())
    return {lv: torch.stack(v, 1) for lv, v in per_pos.items()}


def element_dim(level: int, extractor) -> int:
    return 3 if level == PIXEL_LEVEL else extractor.feature_dims[DEEP_LAYERS[level]]


def run_unit(data: CategoryData, level: int, n_crops: int, cfg: SinbadConfig, extractor, device: torch.device,
             logger=None) -> dict:
    """Fit and score one (level, crop count): returns per-position scores test (R, K, N_test), val (R, K, N_val)."""
    return run_units(data, [level], n_crops, cfg, extractor, device, logger)[level]


def run_units(data: CategoryData, levels: Sequence[int], n_crops: int, cfg: SinbadConfig, extractor,
              device: torch.device, logger=None) -> dict[int, dict]:
    """run_unit for deep levels that share a crop count, in one pass over the images (the extractor returns every
    level's layer); each level's scores equal its own run_unit's. The timing covers the shared pass."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    n_q = cfg.quantiles
    projections = {lv: [torch.cat([projection_matrix(element_dim(lv, extractor), cfg.n_projections(lv), cfg.seed, lv,
                                                     n_crops, k, r) for r in range(cfg.reps(lv))], 1).to(device)
                        for k in range(n_crops)] for lv in levels}
    tag = f"{data.category} L{'+'.join(map(str, levels))} c{n_crops}"
    train_d, thr = encode_levels(data.train, levels, n_crops, cfg, extractor, device, projections,
                                 desc=f"{tag} train")
    frozen = None if cfg.official_thresholds else thr
    val_d = encode_levels(data.validation, levels, n_crops, cfg, extractor, device, projections, frozen,
                          f"{tag} val")[0]
    t_test = time.perf_counter()
    test_d = encode_levels(data.test, levels, n_crops, cfg, extractor, device, projections, frozen,
                           f"{tag} test")[0]
    t_test = time.perf_counter() - t_test
    out = {}
    for lv in levels:
        reps, dd = cfg.reps(lv), cfg.n_projections(lv) * n_q
        test_s = torch.zeros(reps, n_crops, len(data.test), dtype=torch.float64)
        val_s = torch.zeros(reps, n_crops, len(data.validation), dtype=torch.float64)
        for r in range(reps):
            cols = slice(r * dd, (r + 1) * dd)
            for k in range(n_crops):
                st, sv = nn_scores(train_d[lv][:, k, cols].to(device), [test_d[lv][:, k, cols], val_d[lv][:, k, cols]],
                                   cfg.alpha(lv), cfg.whiten)
                test_s[r, k], val_s[r, k] = st.cpu(), sv.cpu()
        for name, s in (("test", test_s), ("validation", val_s)):
            if not torch.isfinite(s).all():
                raise FloatingPointError(f"SINBAD {data.category} L{lv} c{n_crops}: non-finite {name} scores; check "
                                         "the images and --weights")
        # the weights behind a deep unit, so --ensemble-only never mixes units of different weights files
        sha = None if lv == PIXEL_LEVEL else getattr(extractor.backbone, "weights_sha256", None) or "RANDOM"
        out[lv] = {"test": test_s.numpy(), "val": val_s.numpy(), "weights_sha256": sha}
    seconds = time.perf_counter() - t0
    n_img = len(data.train) + len(data.validation) + len(data.test)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    cpu = time.process_time() - c0  # all threads; stable where the wall clock is shared with other jobs
    timing = {"seconds": seconds, "images": n_img, "s_per_image": seconds / max(1, n_img),
              "cpu_s_per_image": cpu / max(1, n_img),
              "test_s_per_image": t_test / max(1, len(data.test)),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
              "peak_cuda_mb": peak / 2 ** 20}
    if len(levels) > 1:
        timing["shared_by_levels"] = list(levels)
    if logger:
        logger.info("%s: %.1f s (%.3f s/image, test %.3f s/image, CPU %.3f s/image), peak RSS %.0f MB", tag,
                    seconds, timing["s_per_image"], timing["test_s_per_image"], timing["cpu_s_per_image"],
                    timing["peak_rss_mb"])
    for lv in levels:
        out[lv]["timing"] = dict(timing)
    return out


# ----------------------------------------------------------------------------------------------- unit files
def work_dir(score_dir: str | Path) -> Path:
    return Path(score_dir) / "sinbad_units"


def unit_path(score_dir: str | Path, category: str, level: int, n_crops: int) -> Path:
    return work_dir(score_dir) / safe_category(category) / f"L{level}_c{n_crops}.npz"


COMPAT_KEYS = ("canvas", "crop_num_edge", "set_res", "quantiles", "official_thresholds", "whiten", "seed", "fast")


def save_unit(path: Path, result: dict, data: CategoryData, cfg: SinbadConfig, meta: dict) -> None:
    info = {"version": UNIT_VERSION, "config": asdict(cfg), "timing": result["timing"],
            "weights_sha256": result.get("weights_sha256"), **meta,
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


def ensemble(units: dict[tuple[int, int], dict], cfg: SinbadConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{(level, n_crops): {"test": (R, K, Nt), "val": (R, K, Nv)}} -> {method: (test scores, val scores)}.

    Per deep level: each crop count's grid is reduced by the bicubic-weighted mean, normalised by its validation
    mean, and averaged over crop counts -> sinbad_L<level>. Pixel level: each repeat normalised, median over
    repeats -> sinbad_L224. sinbad = mean over deep levels + lambda * pixel score.
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    deep_levels = sorted({lv for lv, _ in units if lv != PIXEL_LEVEL})
    for lv in deep_levels:
        per_scale_t, per_scale_v = [], []
        for n_crops in sorted((c for l2, c in units if l2 == lv), reverse=True):
            u = units[(lv, n_crops)]
            w = grid_mean_weights(n_crops, cfg.crop_num_edge)
            t, v = normalize_by_val(np.einsum("k,kn->n", w, u["test"][0]), np.einsum("k,kn->n", w, u["val"][0]),
                                    cfg.reg_eps)
            per_scale_t.append(t)
            per_scale_v.append(v)
        out[f"sinbad_L{lv}"] = (np.mean(per_scale_t, 0), np.mean(per_scale_v, 0))
    if (PIXEL_LEVEL, 1) in units:
        u = units[(PIXEL_LEVEL, 1)]
        t, v = normalize_by_val(u["test"][:, 0], u["val"][:, 0], cfg.reg_eps)  # (R, N) each
        out[f"sinbad_L{PIXEL_LEVEL}"] = (np.median(t, 0), np.median(v, 0))
    if deep_levels:
        t = np.mean([out[f"sinbad_L{lv}"][0] for lv in deep_levels], 0)
        v = np.mean([out[f"sinbad_L{lv}"][1] for lv in deep_levels], 0)
        if f"sinbad_L{PIXEL_LEVEL}" in out:
            pt, pv = out[f"sinbad_L{PIXEL_LEVEL}"]
            t, v = t + cfg.lambda_pixel * pt, v + cfg.lambda_pixel * pv
        out["sinbad"] = (t, v)
    elif f"sinbad_L{PIXEL_LEVEL}" in out:
        out["sinbad"] = out[f"sinbad_L{PIXEL_LEVEL}"]
    return out


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


__all__ = ["SinbadConfig", "LEVELS", "PIXEL_LEVEL", "CROP_RATIOS", "DEEP_LAYERS", "crop_counts", "aspect_size",
           "CanvasTransform", "crop_grid", "crops_to_sets", "percentiles", "fit_thresholds", "set_descriptor",
           "projection_matrix", "ShrunkWhitener", "nn_scores", "encode", "encode_levels", "describe_levels",
           "run_unit", "run_units", "unit_path", "save_unit",
           "load_unit", "grid_mean_weights", "normalize_by_val", "ensemble", "with_validation", "work_dir"]
