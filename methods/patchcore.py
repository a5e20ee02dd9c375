"""PatchCore (Roth et al., CVPR 2022) and SA-PatchCore (Ishida et al., IEEE Access 2023): patch embeddings,
greedy coreset, memory bank, nearest-neighbour scoring, the paper's optional reweighting, and anomaly maps.

Nothing is trained: one pass over the training images fills the memory bank, a coreset keeps a fraction of it,
and test patches are scored by their distance to the nearest bank vector.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from tqdm import tqdm

from common.errors import CheckpointError
from common.checkpoints import META_KEY, checkpoint_meta, load_checked
from common.io import save_checkpoint
from common.provenance import weights_record
from dataset_readers.base import CategoryData, Sample, image_size
from dataset_readers.torch_data import imagenet_transform, make_loader
from evaluation.score_files import save_anomaly_maps, save_group_scores, scores_for_samples
from methods.knn import check_bank, check_features, knn
from methods.maps import resized_hw, uncrop, upsample_and_smooth
from models.feature_extractor import FeatureExtractor, local_patch_features
from models.self_attention import channel_self_attention

METHODS = ("sapatchcore", "patchcore")


@dataclass
class PatchCoreConfig:
    """Every default is the official code's value for `method` (see defaults_for)."""
    method: str = "sapatchcore"
    layers: tuple[str, ...] = ("layer2", "layer3")
    resize: tuple[int, ...] = (256, 256)  # (n,) = shorter side (torchvision), (h, w) = exact size
    crop: int = 224  # 0 = no centre crop
    # PIL resize filter: SA-PatchCore's run.py resizes with Image.ANTIALIAS (= LANCZOS); patchcore-inspection uses
    # torchvision Resize's default, bilinear (PIL, antialiased)
    resample: str = "lanczos"
    # patchcore-inspection bug: PatchCore.load -> feature_dimensions runs one all-ones forward in train mode before
    # .eval(), so every BatchNorm up to the last used layer takes one momentum-0.1 update (see official_bn_update)
    official_bn_update: bool = False
    attention: bool = True  # SA-PatchCore: layer3 max pool + self-attention; False = avg pool (paper's baseline)
    pretrain_dim: int = 1024  # PatchCore only
    target_dim: int = 1024  # PatchCore only
    coreset_ratio: float = 0.01
    sampler: str = "kcenter"  # kcenter (SA-PatchCore: JL sparse projection, one start) | approx (PatchCore)
    proj_dim: int = 0  # approx: 128; kcenter: 0 = Johnson-Lindenstrauss "auto" dimension with jl_eps
    jl_eps: float = 0.9
    num_starts: int = 10  # approx sampler: random starting points
    num_nn: int = 1  # patch score = mean distance to the num_nn nearest bank vectors
    squared: bool = False  # SA-PatchCore: L2 (torch.cdist); PatchCore: squared L2 (faiss IndexFlatL2)
    reweight: bool = False  # paper's Eq. 7, anomalib-corrected form; both official codes omit it
    reweight_b: int = 9
    sigma: float = 4.0
    knn_backend: str = "auto"  # auto = faiss on CPU when installed, else torch chunks
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"], d["resize"] = list(self.layers), list(self.resize)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PatchCoreConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["layers"], kw["resize"] = tuple(kw["layers"]), tuple(kw["resize"])
        kw.setdefault("resample", "bilinear")  # banks saved before the field existed were built with bilinear
        return cls(**kw)


def defaults_for(method: str, **overrides) -> PatchCoreConfig:
    """Official defaults: SA-PatchCore (IshidaKengo run.py) or PatchCore (amazon patchcore-inspection)."""
    if method == "sapatchcore":
        cfg = PatchCoreConfig(method=method)
    elif method == "patchcore":
        cfg = PatchCoreConfig(method=method, resize=(256,), crop=224, coreset_ratio=0.1, sampler="approx",
                              proj_dim=128, squared=True, resample="bilinear")
    else:
        raise ValueError(f"unknown method '{method}'; choose from: {', '.join(METHODS)}")
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------- embeddings
def embed(extractor: FeatureExtractor, images: torch.Tensor, cfg: PatchCoreConfig) -> torch.Tensor:
    """Images (B, 3, H, W) -> patch embeddings (B, h, w, D) on the first layer's grid."""
    out = extractor(images)
    feats = [out[name] for name in cfg.layers]
    if cfg.method == "patchcore":
        return local_patch_features(feats, cfg.pretrain_dim, cfg.target_dim)
    if len(feats) != 2:
        raise ValueError(f"SA-PatchCore uses exactly two layers (got {cfg.layers})")
    low, high = feats
    low = F.avg_pool2d(low, 3, stride=1, padding=1)  # zeros counted, as torch's default
    if cfg.attention:
        high = channel_self_attention(F.max_pool2d(high, 3, stride=1, padding=1))
    else:
        high = F.avg_pool2d(high, 3, stride=1, padding=1)
    # the official unfold/fold x2 replication is nearest upsampling
    high = F.interpolate(high, size=low.shape[-2:], mode="nearest")
    return torch.cat([low, high], dim=1).permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------------------------- coreset
def greedy_kcenter(points: torch.Tensor, n_select: int, start_index: int | None = None,
                   start_dists: torch.Tensor | None = None, progress: bool = True) -> torch.Tensor:
    """Greedy k-center on `points` (N, d): repeatedly take the point farthest from the selected set.

    Start either from `start_index` (it is the first selected index) or from given initial distances
    `start_dists` (N,) to a virtual set (PatchCore's approximate variant; starts are not returned).
    Each step is one batched O(N d) distance update on the device; only the n_select steps loop.
    Returns the selected indices (n_select,) in selection order.
    """
    n = len(points)
    n_select = int(min(n_select, n))
    sq_norm = (points * points).sum(1)
    points_t = points.T.contiguous()  # (d, N): the vector-matrix product streams it ~2x faster than (N, d) @ v
    selected = torch.empty(n_select, dtype=torch.long, device=points.device)

    def sq_dist_to(idx: torch.Tensor) -> torch.Tensor:
        dot = points_t[:, idx] @ points_t
        return dot.mul_(-2.0).add_(sq_norm).add_(sq_norm[idx]).clamp_min_(0.0)

    if start_dists is not None:
        min_d = start_dists.to(points.dtype) ** 2  # squared distances keep the same argmax/min order
        first = 0
    else:
        if start_index is None:
            raise ValueError("greedy_kcenter needs start_index or start_dists")
        idx = torch.as_tensor(start_index, device=points.device)
        selected[0] = idx
        min_d = sq_dist_to(idx)
        first = 1
    for i in tqdm(range(first, n_select), desc="coreset", disable=not progress, mininterval=2, leave=False):
        idx = torch.argmax(min_d)  # stays on the device: no host sync per step
        selected[i] = idx
        torch.minimum(min_d, sq_dist_to(idx), out=min_d)
    return selected


def linear_projection(dim_in: int, dim_out: int, generator: torch.Generator) -> torch.Tensor:
    """(dim_in, dim_out) random map with torch.nn.Linear's default init, U(-1/sqrt(dim_in), 1/sqrt(dim_in))."""
    bound = 1.0 / np.sqrt(dim_in)
    return torch.empty(dim_in, dim_out).uniform_(-bound, bound, generator=generator)


def sparse_jl_projection(n_points: int, dim_in: int, eps: float, dim_out: int, seed: int) -> torch.Tensor:
    """(dim_in, dim_out) sklearn SparseRandomProjection matrix (density 1/sqrt(dim_in)); dim_out 0 = JL auto."""
    import warnings

    from sklearn.exceptions import DataDimensionalityWarning
    from sklearn.random_projection import SparseRandomProjection, johnson_lindenstrauss_min_dim

    k = dim_out or int(johnson_lindenstrauss_min_dim(n_points, eps=eps))
    with warnings.catch_warnings():  # k > dim_in happens only for tiny backbones: still a valid random map
        warnings.simplefilter("ignore", DataDimensionalityWarning)
        proj = SparseRandomProjection(n_components=k, random_state=seed).fit(np.zeros((1, dim_in), np.float32))
    return torch.from_numpy(proj.components_.toarray().T.astype(np.float32))


def select_coreset(bank: torch.Tensor, cfg: PatchCoreConfig, n_images: int = 1, progress: bool = True) -> torch.Tensor:
    """Indices into `bank` (N, D) of the coreset; the stored vectors stay the original D-dimensional ones."""
    n = len(bank)
    n_select = int(n * cfg.coreset_ratio)
    if cfg.coreset_ratio >= 1.0 or n_select >= n:
        return torch.arange(n, device=bank.device)
    n_select = max(1, n_select)
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.sampler == "approx":
        proj = bank if bank.shape[1] == cfg.proj_dim else bank @ linear_projection(bank.shape[1], cfg.proj_dim, g).to(bank)
        starts = torch.as_tensor(rng.choice(n, size=min(cfg.num_starts, n), replace=False), device=bank.device)
        # each point's start distance: its mean Euclidean distance to the random starts
        start_d = _pairwise_l2(proj, proj[starts]).mean(1)
        return greedy_kcenter(proj, n_select, start_dists=start_d, progress=progress)
    if cfg.sampler == "kcenter":
        proj = bank @ sparse_jl_projection(n, bank.shape[1], cfg.jl_eps, cfg.proj_dim, cfg.seed).to(bank)
        # official: index 0 of the shuffled training order = the first patch of a random training image
        start = int(rng.integers(n_images)) * (n // max(1, n_images))
        return greedy_kcenter(proj, n_select, start_index=start, progress=progress)
    raise ValueError(f"unknown coreset sampler '{cfg.sampler}'; choose approx or kcenter")


def _pairwise_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None]).clamp_min_(0.0).sqrt_()


# ----------------------------------------------------------------------------------------------- scoring
def resolve_backend(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type != "cpu":
        return "torch"
    try:
        import faiss  # noqa: F401
        return "faiss"
    except ImportError:
        return "torch"


def score_embeddings(emb: torch.Tensor, bank: torch.Tensor, cfg: PatchCoreConfig,
                     backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (B, h, w, D) -> patch scores (B, h, w) and image scores (B,) (max patch score, optionally
    reweighted by Eq. 7)."""
    b, h, w, d = emb.shape
    queries = emb.reshape(-1, d)
    k = max(cfg.num_nn, 1)
    dist, idx = knn(queries, bank, k=k, squared=cfg.squared, backend=backend, bank_checked=True)
    patch = dist.mean(1).reshape(b, h * w)
    image, arg = patch.max(1)
    if cfg.reweight:
        image = image * reweight_factor(queries.reshape(b, h * w, d)[torch.arange(b), arg],
                                        idx.reshape(b, h * w, k)[torch.arange(b), arg, 0], bank, cfg.reweight_b, backend)
    return patch.reshape(b, h, w), image


def reweight_factor(test_feat: torch.Tensor, nn_index: torch.Tensor, bank: torch.Tensor, b: int,
                    backend: str = "torch") -> torch.Tensor:
    """Eq. 7 weight 1 - softmax(d)[m*] (anomalib-corrected): d = L2 distances of the arg-max test patch to the b
    nearest bank neighbours of its nearest bank vector m* (m* itself first)."""
    b = min(b, len(bank))
    _, support = knn(bank[nn_index], bank, k=b, backend=backend, bank_checked=True)  # (B, b), column 0 is m* (distance 0)
    d = torch.linalg.vector_norm(test_feat[:, None, :] - bank[support], dim=-1)
    return 1.0 - torch.softmax(d, dim=1)[:, 0]


# ----------------------------------------------------------------------------------------------- geometry
def resized_size(sample: Sample, resize: Sequence[int]) -> tuple[int, int]:
    """(h, w) after torchvision Resize: an int resizes the shorter side, (h, w) is exact."""
    if len(resize) == 2:
        return int(resize[0]), int(resize[1])
    return resized_hw(*image_size(sample.path), int(resize[0]))


# ----------------------------------------------------------------------------------------------- pipeline
@dataclass
class CategoryResult:
    test_scores: np.ndarray
    val_scores: np.ndarray | None
    bank_size: int
    paths: list[Path] = field(default_factory=list)


RESAMPLE = {"lanczos": T.InterpolationMode.LANCZOS, "bilinear": T.InterpolationMode.BILINEAR}


def transform_for(cfg: PatchCoreConfig):
    """PIL resize with cfg.resample (LANCZOS = the official SA-PatchCore's Image.ANTIALIAS), centre crop, ToTensor,
    ImageNet normalisation. The resize runs on the PIL image, as in both official codes."""
    resize = cfg.resize[0] if len(cfg.resize) == 1 else tuple(cfg.resize)
    if cfg.resample not in RESAMPLE:
        raise ValueError(f"unknown resize filter '{cfg.resample}'; choose from: {', '.join(RESAMPLE)}")
    return imagenet_transform(resize, cfg.crop or None, interpolation=RESAMPLE[cfg.resample])


def official_bn_update(extractor: FeatureExtractor, cfg: PatchCoreConfig) -> None:
    """Reproduce patchcore-inspection's BatchNorm bug (`PatchCore.load` -> `NetworkFeatureAggregator.
    feature_dimensions`): one forward of torch.ones(1, 3, S, S) (S = the network input size) while the backbone is
    still in train mode, stopped after the last requested layer, before `.eval()`."""
    if cfg.crop:
        size = (cfg.crop, cfg.crop)
    elif len(cfg.resize) == 2:
        size = (int(cfg.resize[0]), int(cfg.resize[1]))
    else:
        size = (int(cfg.resize[0]), int(cfg.resize[0]))
    extractor.official_bn_update(size)


def build_bank(extractor: FeatureExtractor, samples: Sequence[Sample], cfg: PatchCoreConfig, device: torch.device,
               batch_size: int = 8, workers: int = 0, progress: bool = True) -> torch.Tensor:
    """All training patch embeddings (N, D) on `device`, then the coreset of them."""
    if not samples:
        raise RuntimeError("no training images: the memory bank needs train/good images")
    loader = make_loader(samples, transform_for(cfg), batch_size=batch_size, workers=workers)
    chunks = []
    for images, index in tqdm(loader, desc="memory bank", disable=not progress, leave=False):
        e = embed(extractor, images.to(device, non_blocking=True), cfg)
        check_features(e, images, [samples[i] for i in index.tolist()], extractor.backbone)  # one check per batch
        chunks.append(e.reshape(-1, e.shape[-1]))
    full = torch.cat(chunks)
    del chunks
    keep = select_coreset(full, cfg, n_images=len(samples), progress=progress)
    return full[keep].contiguous()


def score_samples(extractor: FeatureExtractor, samples: Sequence[Sample], bank: torch.Tensor, cfg: PatchCoreConfig,
                  device: torch.device, batch_size: int = 8, workers: int = 0, progress: bool = True,
                  map_writer=None, desc: str = "scoring") -> np.ndarray:
    """Image scores (N,); `map_writer(samples, patch_scores)` receives each batch's (B, h, w) patch scores.
    `bank` must be finite (check_bank): it is not re-scanned per batch."""
    backend = resolve_backend(cfg.knn_backend, device)
    loader = make_loader(samples, transform_for(cfg), batch_size=batch_size, workers=workers)
    scores = np.empty(len(samples), dtype=np.float64)
    for images, index in tqdm(loader, desc=desc, disable=not progress, leave=False):
        batch = [samples[i] for i in index.tolist()]
        emb = embed(extractor, images.to(device, non_blocking=True), cfg)
        check_features(emb, images, batch, extractor.backbone)
        patch, image = score_embeddings(emb, bank, cfg, backend)
        scores[index.numpy()] = image.double().cpu().numpy()
        if map_writer is not None:
            map_writer(batch, patch)
    return scores


def write_maps(method: str, category: str, samples: Sequence[Sample], patch: torch.Tensor, cfg: PatchCoreConfig,
               score_dir: str | Path) -> None:
    """Patch scores -> bilinear to the network input + Gaussian sigma, back into the image frame, TIFF files."""
    h, w = (cfg.crop, cfg.crop) if cfg.crop else resized_size(samples[0], cfg.resize)
    maps = upsample_and_smooth(patch, (h, w), sigma=cfg.sigma)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        by_size.setdefault(resized_size(s, cfg.resize), []).append(i)
    for size, idx in by_size.items():
        save_anomaly_maps(method, category, [samples[i] for i in idx], uncrop(maps[idx], size, cfg.crop), score_dir)


def bank_path(ckpt_dir: str | Path, name: str, category: str) -> Path:
    return Path(ckpt_dir) / f"{name}_{category.replace('/', '__')}.pt"


# Settings that only change the scoring (they may differ between --load-bank runs); every other field shapes
# the bank and is checked when it is loaded.
SCORING_KEYS = ("num_nn", "squared", "reweight", "reweight_b", "sigma", "knn_backend")


def bank_meta(data: CategoryData, extractor: FeatureExtractor, cfg: PatchCoreConfig, backbone: str) -> dict:
    """The provenance record of a bank built (or to be loaded) for `data` in this run."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in SCORING_KEYS}
    return checkpoint_meta(method=cfg.method, dataset=data.dataset, category=data.category,
                           weights=weights_record(extractor.backbone, backbone=backbone), config=config,
                           train_samples=data.train, finished=True)


def run_category(data: CategoryData, extractor: FeatureExtractor, cfg: PatchCoreConfig, device: torch.device,
                 name: str, score_dir: str | Path, ckpt_dir: str | Path, backbone: str, load_bank: bool = False,
                 maps: bool = True, batch_size: int = 8, workers: int = 0, progress: bool = True,
                 logger: logging.Logger | None = None) -> CategoryResult:
    """Fill (or load) the memory bank, score test and validation images, write score files and maps."""
    log = logger or logging.getLogger(__name__)
    ckpt = bank_path(ckpt_dir, name, data.category)
    meta = bank_meta(data, extractor, cfg, backbone)
    if load_bank:
        fix = f"rebuild it: run without --load-bank to build the {name} memory bank of {data.category}"
        state, _ = load_checked(ckpt, meta, fix=fix, logger=log)
        if not isinstance(state.get("bank"), torch.Tensor) or state["bank"].ndim != 2:
            raise CheckpointError(f"{ckpt} holds no (N, D) memory bank; {fix}")
        bank = state["bank"].to(device)
        check_bank(bank, f"in {ckpt}")
        log.info("loaded memory bank %s (%d x %d)", ckpt, *bank.shape)
    else:
        log.info("%s/%s: embedding %d training images, coreset ratio %g (%s)", name, data.category,
                 len(data.train), cfg.coreset_ratio, cfg.sampler)
        bank = build_bank(extractor, data.train, cfg, device, batch_size, workers, progress)
        check_bank(bank)
        save_checkpoint(ckpt, {"bank": bank.cpu(), "config": cfg.to_dict(), "backbone": backbone,
                               "category": data.category, "n_train": len(data.train), META_KEY: meta})
        log.info("memory bank %d x %d written to %s", *bank.shape, ckpt)

    writer = (lambda s, p: write_maps(name, data.category, s, p, cfg, score_dir)) if maps else None
    test_scores = score_samples(extractor, data.test, bank, cfg, device, batch_size, workers, progress, writer, "test")
    groups = scores_for_samples(test_scores, data.test, data)
    val_scores = None
    if data.validation:
        val_scores = score_samples(extractor, data.validation, bank, cfg, device, batch_size, workers, progress,
                                   desc="validation")
        groups["val"] = val_scores
    paths = save_group_scores(data, name, groups, score_dir)
    log.info("%s/%s: scores written to %s%s", name, data.category, ", ".join(p.name for p in paths),
             f"; maps under {Path(score_dir) / 'anomaly_maps' / name / data.category}" if maps else "")
    from evaluation.metrics import group_aurocs  # for the log; benchmark_performance.py does the evaluation

    aurocs = group_aurocs(data, groups)
    log.info("%s/%s: image AUROC %s", name, data.category,
             ", ".join(f"{g} {100 * a:.1f}%" for g, a in aurocs.items()) or "n/a (no labels)")
    return CategoryResult(test_scores, val_scores, len(bank), paths)
