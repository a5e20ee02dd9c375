"""PatchCore (Roth et al., CVPR 2022) and SA-PatchCore (Ishida et al., IEEE Access 2023): patch embeddings,
greedy coreset, memory bank, nearest-neighbour scoring, the paper's optional reweighting, and anomaly maps.

Nothing is trained: one pass over the training images fills the memory bank, a coreset keeps a fraction of it,
and test patches are scored by their distance to the nearest bank vector.

    cfg = PatchCoreConfig.preset("patchcore")              # the official defaults of one method (fast=True: tiny)
    model = PatchCoreModel(backbone, cfg, device=device)    # backbone from models.backbones.load_backbone
    model.fit(ImageList(data.train))                         # PIL images: the memory bank
    pred = model.predict(ImageList(data.test))               # Prediction(scores (N,), maps in each image's frame)
    model.save(path, bank_meta(backbone, cfg, dataset=..., category=..., train=data.train))
    model, meta = methods.base.load_model(path)              # the same numbers, bit for bit
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from tqdm import tqdm

from common.checkpoints import META_KEY, checkpoint_meta
from common.config import flag_of, opt
from common.errors import CheckpointError, UserError
from dataset_readers.base import DatasetError, image_size
from dataset_readers.torch_data import imagenet_transform
from methods.base import (BACKBONE_STATE_KEY, AnomalyModel, ImageList, Prediction, backbone_from_checkpoint,
                          backbone_state_if_random, check_backbone, image_sizes, reduced_precision)
from methods.knn import check_bank, check_features, knn
from methods.maps import resized_hw, uncrop, upsample_and_smooth
from models.feature_extractor import FeatureExtractor, local_patch_features
from models.self_attention import channel_self_attention

METHODS = ("sapatchcore", "patchcore")
RESAMPLE = {"lanczos": T.InterpolationMode.LANCZOS, "bilinear": T.InterpolationMode.BILINEAR}
SAMPLERS = ("kcenter", "approx")
# the projection each coreset sampler uses: kcenter = sparse JL with the "auto" dimension, approx = 128-d linear
SAMPLER_PROJ_DIM = {"kcenter": 0, "approx": 128}


@dataclass
class PatchCoreConfig:
    """The defaults are the official SA-PatchCore code's (IshidaKengo run.py); `preset("patchcore")` gives the
    official PatchCore's (amazon patchcore-inspection). `fast()` = the tests' and the demo's input size."""
    method: str = opt("sapatchcore", "sapatchcore or patchcore (the script's --method)", cli=False)
    layers: tuple[str, ...] = opt(("layer2", "layer3"), "backbone layers of the patch embedding", cli=False)
    resize: tuple[int, ...] = opt((256, 256), "input resize: one value = shorter side (torchvision), two = exact H W",
                                  type=int, metavar="N")
    crop: int = opt(224, "centre crop after the resize; 0 = none")
    # SA-PatchCore's run.py resizes with Image.ANTIALIAS (= LANCZOS); patchcore-inspection with torchvision Resize's
    # default, bilinear (PIL, antialiased)
    resample: str = opt("lanczos", "PIL resize filter: lanczos (SA-PatchCore run.py's Image.ANTIALIAS) or bilinear "
                        "(patchcore-inspection: torchvision Resize's default)", flag="--resize-filter",
                        choices=tuple(RESAMPLE))
    # patchcore-inspection bug: PatchCore.load -> feature_dimensions runs one all-ones forward in train mode before
    # .eval(), so every BatchNorm up to the last used layer takes one momentum-0.1 update (see official_bn_update)
    official_bn_update: bool = opt(False, "patchcore only: one train-mode forward of an all-ones image before eval, "
                                   "as patchcore-inspection's PatchCore.load (official bug: every BatchNorm up to "
                                   "layer3 takes one momentum-0.1 update; the published numbers include it)")
    attention: bool = opt(True, "sapatchcore: layer3 max pool + self-attention; --no-attention: avg pool, the "
                          "SA-PatchCore paper's PatchCore baseline")
    pretrain_dim: int = opt(1024, "patchcore: per-layer patch-feature dimension", cli=False)
    target_dim: int = opt(1024, "patchcore: patch-embedding dimension", cli=False)
    coreset_ratio: float = opt(0.01, "fraction of the training patches kept in the memory bank (1 = all)")
    sampler: str = opt("kcenter", "coreset: kcenter = sparse JL projection, one start (SA-PatchCore); approx = "
                       "128-d random linear projection, 10 starts (PatchCore)", choices=SAMPLERS)
    proj_dim: int = opt(0, "coreset projection dimension; kcenter 0 = Johnson-Lindenstrauss auto (set by --sampler)",
                        cli=False)
    jl_eps: float = opt(0.9, "kcenter: JL distortion of the auto dimension", cli=False)
    num_starts: int = opt(10, "approx: random starting points", cli=False)
    num_nn: int = opt(1, "patch score = mean distance to this many nearest bank vectors")
    distance: str = opt("l2", "patch distance: l2 (torch.cdist, SA-PatchCore) or squared (faiss IndexFlatL2, "
                        "PatchCore)", choices=("l2", "squared"))
    reweight: bool = opt(False, "the PatchCore paper's Eq. 7 image-score reweighting (both official codes: off)")
    reweight_b: int = opt(9, "neighbourhood size b of Eq. 7")
    sigma: float = opt(4.0, "Gaussian sigma of the anomaly maps", cli=False)
    knn_backend: str = opt("auto", "nearest-neighbour search: auto = faiss on the CPU when installed, else torch",
                           choices=("auto", "torch", "faiss"))
    seed: int = opt(0, "coreset projection and starts (the script's --seed)", cli=False)
    batch_size: int = opt(8, "images per forward pass (the numbers do not depend on it)")
    workers: int = opt(0, "data-loader worker processes (the numbers do not depend on them)")
    dtype: str = opt("fp32", "inference precision: fp32 exact; bf16/fp16 autocast of the backbone (approximate)",
                     choices=("fp32", "bf16", "fp16"))

    def __post_init__(self):
        self.layers, self.resize = tuple(self.layers), tuple(int(v) for v in self.resize)
        self.check()

    @property
    def squared(self) -> bool:
        """Squared L2 (PatchCore's faiss) instead of L2."""
        return self.distance == "squared"

    @squared.setter
    def squared(self, value: bool) -> None:
        self.distance = "squared" if value else "l2"

    @classmethod
    def preset(cls, method: str = "sapatchcore", *, fast: bool = False, **over) -> "PatchCoreConfig":
        """The official defaults of `method`, or with `fast` its --fast sizes; then `over`."""
        if method not in METHODS:
            raise UserError(f"unknown method '{method}'; choose from: {', '.join(METHODS)}")
        return cls(**{**METHOD_DEFAULTS[method], **(FAST[method] if fast else {}), "method": method, **over})

    @classmethod
    def fast(cls, method: str = "sapatchcore", **over) -> "PatchCoreConfig":
        """Input 128 (SA-PatchCore: 128 x 128), crop 112: 14 x 14 patches, the same code path."""
        return cls.preset(method, fast=True, **over)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"], d["resize"] = list(self.layers), list(self.resize)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "PatchCoreConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in dict(d).items() if k in known}
        kw.setdefault("resample", "bilinear")  # banks saved before the field existed were built with bilinear
        if "distance" not in kw and "squared" in d:  # banks saved before --distance became a field
            kw["distance"] = "squared" if d["squared"] else "l2"
        return cls(**kw)

    def check(self) -> None:
        """One-line refusal of a setting no run can use, naming its flag."""
        def bad(name: str, why: str) -> UserError:
            f = next(f for f in fields(self) if f.name == name)
            what = flag_of(f) if f.metadata.get("cli", True) else f"the setting '{name}'"
            return UserError(f"{what} {why} (got {_show(getattr(self, name))})")

        choices = {"method": METHODS, "resample": tuple(RESAMPLE), "sampler": SAMPLERS,
                   "distance": ("l2", "squared"), "knn_backend": ("auto", "torch", "faiss"),
                   "dtype": ("fp32", "bf16", "fp16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}")
        if len(self.resize) not in (1, 2) or min(self.resize) < 1:
            raise bad("resize", "takes one size (shorter side) or two (H W), each at least 1")
        if self.method == "sapatchcore" and len(self.layers) != 2:
            raise bad("layers", "must name exactly two layers for SA-PatchCore")
        limits = [("crop", self.crop >= 0, "must be 0 (no crop) or a size in px"),
                  ("coreset_ratio", 0 < self.coreset_ratio <= 1, "must be in (0, 1]"),
                  ("num_nn", self.num_nn >= 1, "must be at least 1"),
                  # b = 1 makes every weight 1 - softmax([d])[0] = 0: all image scores 0
                  ("reweight_b", self.reweight_b >= 2, "must be at least 2"),
                  ("batch_size", self.batch_size >= 1, "must be at least 1"),
                  ("workers", self.workers >= 0, "must be 0 or more"),
                  ("sigma", self.sigma >= 0, "must be 0 (no smoothing) or more"),
                  ("proj_dim", self.proj_dim >= 0, "must be 0 (auto) or more"),
                  ("jl_eps", 0 < self.jl_eps < 1, "must be in (0, 1)"),
                  ("num_starts", self.num_starts >= 1, "must be at least 1"),
                  ("pretrain_dim", self.pretrain_dim >= 1, "must be at least 1"),
                  ("target_dim", self.target_dim >= 1, "must be at least 1")]
        for name, ok, why in limits:
            if not ok:
                raise bad(name, why)


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


# The official PatchCore's values where they differ from SA-PatchCore's (the class defaults)
METHOD_DEFAULTS = {"sapatchcore": {},
                   "patchcore": dict(resize=(256,), crop=224, coreset_ratio=0.1, sampler="approx", proj_dim=128,
                                     distance="squared", resample="bilinear")}
FAST = {"sapatchcore": dict(resize=(128, 128), crop=112), "patchcore": dict(resize=(128,), crop=112)}
# Settings that only change the scoring (they may differ between --test-only runs) or neither the bank nor the
# numbers; every other field shapes the bank and is checked when it is loaded.
SCORING_KEYS = ("num_nn", "distance", "reweight", "reweight_b", "sigma", "knn_backend")
NON_MODEL_KEYS = SCORING_KEYS + ("batch_size", "workers", "dtype")


def defaults_for(method: str, **overrides) -> PatchCoreConfig:
    """Official defaults: SA-PatchCore (IshidaKengo run.py) or PatchCore (amazon patchcore-inspection); every
    override that is not None replaces its field (`squared=` sets the distance)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose from: {', '.join(METHODS)}")
    cfg = PatchCoreConfig.preset(method)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------- embeddings
def embed(extractor: FeatureExtractor, images: torch.Tensor, cfg: PatchCoreConfig) -> torch.Tensor:
    """Images (B, 3, H, W) -> patch embeddings (B, h, w, D) on the first layer's grid."""
    return embed_features(extractor(images), cfg)


def embed_features(out: Mapping[str, torch.Tensor], cfg: PatchCoreConfig) -> torch.Tensor:
    """The extractor's {layer: map} -> patch embeddings (B, h, w, D)."""
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
def resized_size(sample: Any, resize: Sequence[int]) -> tuple[int, int]:
    """(h, w) of an image file (a reader Sample or a path) after torchvision Resize."""
    return resized_size_of(image_size(getattr(sample, "path", sample)), resize)


def resized_size_of(size_wh: tuple[int, int], resize: Sequence[int]) -> tuple[int, int]:
    """(h, w) after torchvision Resize of an image of (width, height): one value resizes the shorter side, (h, w)
    is exact."""
    if len(resize) == 2:
        return int(resize[0]), int(resize[1])
    return resized_hw(*size_wh, int(resize[0]))


def input_size(cfg: PatchCoreConfig) -> tuple[int, int] | None:
    """(h, w) of every network input, or None when it depends on the image (no crop, shorter-side resize)."""
    if cfg.crop:
        return cfg.crop, cfg.crop
    if len(cfg.resize) == 2:
        return int(cfg.resize[0]), int(cfg.resize[1])
    return None


def transform_for(cfg: PatchCoreConfig):
    """PIL resize with cfg.resample (LANCZOS = the official SA-PatchCore's Image.ANTIALIAS), centre crop, ToTensor,
    ImageNet normalisation. The resize runs on the PIL image, as in both official codes."""
    resize = cfg.resize[0] if len(cfg.resize) == 1 else tuple(cfg.resize)
    if cfg.resample not in RESAMPLE:
        raise ValueError(f"unknown resize filter '{cfg.resample}'; choose from: {', '.join(RESAMPLE)}")
    return imagenet_transform(resize, cfg.crop or None, interpolation=RESAMPLE[cfg.resample])


# ----------------------------------------------------------------------------------------------- the BN update
# Attribute set on a backbone whose BatchNorm statistics took the update: the (h, w) of the all-ones probe. Models
# built on one backbone (one per category in a script run) share it, so the update happens once per backbone, as
# every category of the official run starts from the same file plus one update.
BN_MARK = "official_bn_update_size"
BN_STATE_KEY = "bn_buffers"  # checkpoint key: the backbone's buffers after the update


def bn_probe_size(cfg: PatchCoreConfig) -> tuple[int, int]:
    """The official probe's image size: the network input (crop, else the resize; a shorter-side resize without
    crop probes a square of that side)."""
    return input_size(cfg) or (int(cfg.resize[0]), int(cfg.resize[0]))


def official_bn_update(extractor: FeatureExtractor, cfg: PatchCoreConfig) -> None:
    """Reproduce patchcore-inspection's BatchNorm bug (`PatchCore.load` -> `NetworkFeatureAggregator.
    feature_dimensions`): one forward of torch.ones(1, 3, S, S) (S = the network input size) while the backbone is
    still in train mode, stopped after the last requested layer, before `.eval()`."""
    extractor.official_bn_update(bn_probe_size(cfg))


def ensure_bn_state(extractor: FeatureExtractor, cfg: PatchCoreConfig) -> None:
    """The backbone's BatchNorm statistics as cfg asks: updated once (official_bn_update) or as loaded; a backbone
    already updated for other settings is refused (its features would silently differ)."""
    backbone = extractor.backbone
    done = getattr(backbone, BN_MARK, None)
    want = bn_probe_size(cfg) if cfg.official_bn_update else None
    if done is not None:
        done = tuple(done)
    if done == want:
        return
    if done is None:
        official_bn_update(extractor, cfg)
        setattr(backbone, BN_MARK, want)
        return
    raise UserError(f"this backbone's BatchNorm statistics took the official update for {done[0]}x{done[1]} input; "
                    f"{'a model without --official-bn-update' if want is None else f'one for {want[0]}x{want[1]}'} "
                    "needs a freshly loaded backbone")


def _buffers(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in backbone.named_buffers()}


def _load_buffers(backbone: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    own = dict(backbone.named_buffers())
    if set(state) != set(own) or any(tuple(state[k].shape) != tuple(own[k].shape) for k in own):
        raise CheckpointError(f"{where} holds BatchNorm statistics of another backbone; re-create it with "
                              "sapatchcore.py")
    with torch.no_grad():
        for k, buf in own.items():
            buf.copy_(state[k])


# ----------------------------------------------------------------------------------------------- images
class _Transformed(torch.utils.data.Dataset):
    """(transform(images[i]), i); the images (PIL, or an ImageList decoding lazily in the workers)."""

    def __init__(self, images: Sequence[Any], transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), i


def as_images(items: Sequence[Any]) -> Sequence[Any]:
    """Reader samples or paths -> a lazy ImageList; PIL images (or an ImageList) are kept as they are."""
    if isinstance(items, ImageList) or not len(items):
        return items
    first = items[0]
    if isinstance(first, (str, os.PathLike)) or hasattr(first, "path"):
        return ImageList(items)
    return items


def image_names(images: Sequence[Any]) -> list[str]:
    """What error messages call each image: its file for an ImageList, else its index."""
    if isinstance(images, ImageList):
        return list(images.paths)
    return [f"image {i}" for i in range(len(images))]


def _batches(cfg: PatchCoreConfig, n: int, batch_size: int,
             sizes: Sequence[tuple[int, int]] | None) -> list[list[int]]:
    """Index batches in order; without a fixed input size, images of one resized size per batch (first-seen order)."""
    groups: dict[Any, list[int]] = {}
    for i in range(n):
        groups.setdefault(None if input_size(cfg) else resized_size_of(sizes[i], cfg.resize), []).append(i)
    return [idx[s:s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


def image_loader(images: Sequence[Any], cfg: PatchCoreConfig, *, batch_size: int | None = None,
                 sizes: Sequence[tuple[int, int]] | None = None) -> torch.utils.data.DataLoader:
    """In-order batches of (preprocessed images, indices). The loader has a generator of its own: the workers'
    seeds are not drawn from the global RNG."""
    if input_size(cfg) is None and sizes is None:
        sizes = image_sizes(images)
    batches = _batches(cfg, len(images), batch_size or cfg.batch_size, sizes)
    return torch.utils.data.DataLoader(_Transformed(images, transform_for(cfg)), batch_sampler=batches,
                                       num_workers=cfg.workers, generator=torch.Generator().manual_seed(0),
                                       pin_memory=torch.cuda.is_available())


def build_bank(extractor: FeatureExtractor, samples: Sequence[Any], cfg: PatchCoreConfig, device: torch.device, *,
               batch_size: int | None = None, workers: int | None = None, progress: bool = True) -> torch.Tensor:
    """All training patch embeddings (N, D) of `samples` (PIL images, reader samples or paths) on `device`, then
    the coreset of them. batch_size/workers: cfg's unless given."""
    images = as_images(samples)
    if not len(images):
        raise DatasetError("no training images: the memory bank needs train/good images")
    if workers is not None and workers != cfg.workers:
        cfg = replace(cfg, workers=workers)
    names = image_names(images)
    # With one input size every image gives the same patch count: the bank is filled in place, so its peak is the
    # bank itself, not the bank plus its per-batch chunks during a concatenation (2x at paper scale).
    fixed = input_size(cfg) is not None
    chunks, full = [], None
    for x, index in tqdm(image_loader(images, cfg, batch_size=batch_size), desc="memory bank", disable=not progress,
                         leave=False):
        e = embed(extractor, x.to(device, non_blocking=True), cfg)
        check_features(e, x, [names[i] for i in index.tolist()], extractor.backbone)  # one check per batch
        if not fixed:
            chunks.append(e.reshape(-1, e.shape[-1]))
            continue
        per = e.shape[1] * e.shape[2]
        if full is None:
            full = torch.empty(len(images) * per, e.shape[-1], dtype=e.dtype, device=e.device)
        rows = (index.to(e.device)[:, None] * per + torch.arange(per, device=e.device)).reshape(-1)
        full[rows] = e.reshape(-1, e.shape[-1])
    if not fixed:
        full = torch.cat(chunks)
        del chunks
    keep = select_coreset(full, cfg, n_images=len(images), progress=progress)
    return full[keep].contiguous()


# ----------------------------------------------------------------------------------------------- the model object
class PatchCoreModel(AnomalyModel):
    """PatchCore or SA-PatchCore (cfg.method) for one category: the frozen backbone's feature extractor, the
    config and the memory bank. With cfg.official_bn_update the backbone's BatchNorm statistics take the official
    update once (ensure_bn_state); the checkpoint stores them, so a loaded model scores identically."""

    def __init__(self, backbone: torch.nn.Module, cfg: PatchCoreConfig | None = None, *, device: Any = "cpu"):
        self.cfg = cfg if cfg is not None else PatchCoreConfig()
        self.device = torch.device(device)
        self.extractor = FeatureExtractor(backbone, self.cfg.layers).to(self.device)
        ensure_bn_state(self.extractor, self.cfg)
        self.bank: torch.Tensor | None = None
        self.n_train = 0

    @property
    def method(self) -> str:  # the REGISTRY key written into checkpoints
        return self.cfg.method

    @property
    def backbone(self) -> torch.nn.Module:
        return self.extractor.backbone

    # -------------------------------------------------------------- fit
    def fit(self, train: Sequence[Any], *, progress: bool = True) -> "PatchCoreModel":
        """Fill the memory bank with the patch embeddings of the normal images `train`, keep its coreset."""
        bank = build_bank(self.extractor, train, self.cfg, self.device, progress=progress)
        check_bank(bank)
        self.bank, self.n_train = bank, len(train)
        return self

    # -------------------------------------------------------------- inference
    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """(B, 3, H, W) CPU tensor of PIL images: resize (cfg.resample), centre crop, ImageNet normalisation."""
        tf = transform_for(self.cfg)
        return torch.stack([tf(im) for im in as_images(images)])

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, h, w, D) of a preprocessed batch; the backbone runs under cfg.dtype."""
        with reduced_precision(self.cfg.dtype, self.device):
            out = self.extractor(batch.to(self.device, non_blocking=True))
        return embed_features({k: v.float() for k, v in out.items()}, self.cfg)  # float(): a no-op in fp32

    def forward_networks(self, batch: torch.Tensor) -> torch.Tensor:
        """Backbone and patch embedding (pooling, SA-PatchCore's attention) of a preprocessed batch, no search."""
        return self.embed(batch)

    def score_embeddings(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch scores (B, h, w) and image scores (B,) of embeddings against the memory bank."""
        return score_embeddings(emb, self._bank(), self.cfg, resolve_backend(self.cfg.knn_backend, self.device))

    def _bank(self) -> torch.Tensor:
        if self.bank is None:
            raise UserError("the memory bank is empty: fit the model (or load a checkpoint) before predict")
        return self.bank

    def predict(self, images: Sequence[Any], *, maps: bool = True, progress: bool = True,
                desc: str = "predict") -> Prediction:
        """Image scores (max patch distance, optionally Eq. 7) and maps: patch scores bilinearly upsampled to the
        network input, Gaussian sigma, placed back into each image's resized frame (the crop undone)."""
        cfg = self.cfg
        bank = self._bank()
        backend = resolve_backend(cfg.knn_backend, self.device)
        images = as_images(images)
        sizes = image_sizes(images) if maps or input_size(cfg) is None else None
        names = image_names(images)
        scores = np.empty(len(images), dtype=np.float64)
        out_maps: list[np.ndarray | None] = [None] * len(images)
        for x, index in tqdm(image_loader(images, cfg, sizes=sizes), desc=desc, disable=not progress, leave=False):
            idx = index.tolist()
            emb = self.embed(x)
            check_features(emb, x, [names[i] for i in idx], self.backbone)
            patch, image = score_embeddings(emb, bank, cfg, backend)
            scores[index.numpy()] = image.double().cpu().numpy()
            if maps:
                up = upsample_and_smooth(patch, tuple(x.shape[-2:]), sigma=cfg.sigma)
                for j, i in enumerate(idx):
                    out_maps[i] = uncrop(up[j:j + 1], resized_size_of(sizes[i], cfg.resize), cfg.crop)[0]
        return Prediction(scores=scores, maps=out_maps if maps else None)

    # -------------------------------------------------------------- checkpoints
    def checkpoint(self) -> dict:
        backbone = self.backbone
        ckpt = {"bank": self._bank().cpu(), "config": self.cfg.to_dict(),
                "backbone": getattr(backbone, "backbone_name", None), "n_train": self.n_train}
        if self.cfg.official_bn_update:  # the updated statistics: load does not depend on re-running the update
            ckpt[BN_STATE_KEY] = _buffers(backbone)
        return {**ckpt, **backbone_state_if_random(backbone)}

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping, *, device: Any = "cpu", weights: Any = None,
                        backbone: torch.nn.Module | None = None, source: str | None = None,
                        fix: str = "re-create it with sapatchcore.py") -> "PatchCoreModel":
        """The fitted model. `backbone`: the already built backbone the checkpoint was made with (checked by name
        and sha256; it takes the checkpoint's BatchNorm statistics with official_bn_update), else it is rebuilt
        (methods.base.backbone_from_checkpoint, `weights` or the default file). `source`: what messages call the
        checkpoint (its path); `fix`: how to re-create it."""
        where = source or "the checkpoint"
        bank = ckpt.get("bank")
        if "config" not in ckpt or bank is None:
            raise CheckpointError(f"{where} is not a PatchCore/SA-PatchCore memory bank (no bank or config); {fix}")
        if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or not bank.is_floating_point():
            raise CheckpointError(f"{where} holds no (N, D) memory bank; {fix}")
        check_bank(bank, f"in {where}")
        cfg = PatchCoreConfig.from_dict(ckpt["config"])
        meta = ckpt.get(META_KEY) or {}
        if backbone is None or BACKBONE_STATE_KEY in ckpt:  # random weights: the checkpoint's own backbone
            backbone = backbone_from_checkpoint(ckpt, weights=weights)
        else:
            check_backbone(meta, backbone, where=where)
        bn = ckpt.get(BN_STATE_KEY)
        if cfg.official_bn_update and isinstance(bn, Mapping):
            _load_buffers(backbone, bn, where)
            setattr(backbone, BN_MARK, bn_probe_size(cfg))
        # (older banks without the statistics: ensure_bn_state runs the update again, as their runs did)
        model = cls(backbone, cfg, device=device)
        model.bank = bank.to(model.device)
        model.n_train = int(ckpt.get("n_train") or 0)
        return model


# ----------------------------------------------------------------------------------------------- records
def bank_path(ckpt_dir: str | Path, name: str, category: str) -> Path:
    return Path(ckpt_dir) / f"{name}_{category.replace('/', '__')}.pt"


def bank_meta(backbone: torch.nn.Module, cfg: PatchCoreConfig, *, dataset: str, category: str,
              train: Sequence[Any] | None = None) -> dict:
    """The provenance record of a bank built (or to be loaded) in this run: only the settings that shape the
    bank are compared on load."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in NON_MODEL_KEYS}
    return checkpoint_meta(method=cfg.method, dataset=dataset, category=category, model=backbone, config=config,
                           train_samples=train, finished=True)
