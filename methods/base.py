"""The model interface every method implements (after patchcore-inspection's PatchCore.fit/predict/save/load).

    model = PatchCoreModel(backbone, cfg, device=device)      # networks + config, nothing read from disk
    model.fit(ImageList(data.train))                          # a sequence of PIL images (read lazily)
    pred = model.predict(ImageList(data.test))                # Prediction(scores (N,), maps or None)
    model.save("ckpt/x.pth", meta)                            # self-describing checkpoint
    model = load_model("ckpt/x.pth", device=device)           # method read from the checkpoint

A model does no file IO apart from save/load and reads no dataset: the script orchestrates (reads the data,
fits, saves, predicts, writes score files and maps). Images are any random-access sequence of PIL RGB images;
`ImageList` reads reader samples or paths lazily (in DataLoader workers when a method uses them) with the
project's robust decoder, so a corrupt file fails with its path.

Maps: `Prediction.maps[i]` is a 2-D float32 map covering the whole of image i (the crop undone), at the model's
resolution with image i's aspect ratio; writers resize it to the original size
(`evaluation.score_files.map_at_size`).
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# checkpoint meta "method" -> "module:Class". The class's `load(path, device=..., **kw)` rebuilds the model.
REGISTRY: dict[str, str] = {
    "patchcore": "methods.patchcore:PatchCoreModel",
    "sapatchcore": "methods.patchcore:PatchCoreModel",
    "glass": "methods.glass:GlassModel",
    "sinbad": "methods.sinbad:SinbadModel",
    "LGST": "methods.csad.lgst:LGSTDetector",  # CSAD stage 3 alone
    "segmentor": "methods.csad.segmentor:PatchHistModel",  # CSAD stage 2: segmentor + Patch Histogram
    "csad": "methods.csad.model:CSADModel",  # the fused CSAD: segmentor + Patch Histogram + LGST, one backbone pass
}


@dataclass
class Prediction:
    scores: np.ndarray  # (N,) float64 image scores, higher = more anomalous
    maps: list[np.ndarray] | None = None  # N float32 2-D maps in each image's frame, or None (image-level only)
    extra: dict[str, np.ndarray] | None = None  # named further image scores (e.g. CSAD's per-branch scores)


class ImageList(Sequence):
    """Lazy, picklable sequence of PIL RGB images from reader Samples or paths (dataset_readers.base.load_image:
    16-bit scaling, one-line errors naming the file)."""

    def __init__(self, items: Sequence[Any], mode: str = "RGB"):
        self.paths = [str(getattr(s, "path", s)) for s in items]
        self.mode = mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from dataset_readers.base import load_image

        if isinstance(i, slice):
            out = ImageList([], self.mode)
            out.paths = self.paths[i]
            return out
        return load_image(self.paths[i], mode=self.mode)

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) without decoding."""
        from dataset_readers.base import image_size

        return image_size(self.paths[i])


def image_sizes(images: Sequence[Any]) -> list[tuple[int, int]]:
    """(width, height) of every image: read from the header for an ImageList, else from the PIL image."""
    if isinstance(images, ImageList):
        return [images.size(i) for i in range(len(images))]
    return [im.size for im in images]


class AnomalyModel(abc.ABC):
    """fit / predict / save / load. Subclasses set `method` (the REGISTRY key written into checkpoints)."""

    method: str = ""

    @abc.abstractmethod
    def fit(self, train: Sequence[Any], **kwargs) -> "AnomalyModel":
        """Train on (or memorise) the normal images `train`; returns self."""

    @abc.abstractmethod
    def predict(self, images: Sequence[Any], **kwargs) -> Prediction:
        """Image scores and maps of `images`, batched, with a progress bar."""

    @abc.abstractmethod
    def checkpoint(self) -> dict:
        """Everything `from_checkpoint` needs (tensors + plain data; no pickled objects)."""

    @classmethod
    @abc.abstractmethod
    def from_checkpoint(cls, ckpt: Mapping, *, device: Any = "cpu", **kwargs) -> "AnomalyModel":
        """Rebuild a fitted model from `checkpoint()`'s dict (the meta record under common.checkpoints.META_KEY)."""

    def forward_networks(self, batch: Any) -> Any:
        """Only the networks' forward pass of inference on a preprocessed batch (the method's own speed limit,
        benchmarks/rehearse.py). Optional."""
        raise NotImplementedError

    def save(self, path: str | Path, meta: Mapping) -> Path:
        """Atomic write of checkpoint() with the provenance record `meta` (common.checkpoints.checkpoint_meta)."""
        from common.checkpoints import META_KEY
        from common.io import save_checkpoint

        ckpt = dict(self.checkpoint())
        ckpt[META_KEY] = dict(meta)
        save_checkpoint(path, ckpt)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, device: Any = "cpu", expected: Mapping | None = None, fix: str = "",
             allow_unfinished: bool = False, **kwargs) -> "AnomalyModel":
        """Load `path` (weights_only), check its record against `expected` when given, rebuild the model."""
        ckpt, _ = _load(path, expected, fix, allow_unfinished)
        return cls.from_checkpoint(ckpt, device=device, **kwargs)


def _load(path, expected, fix, allow_unfinished) -> tuple[dict, dict]:
    from common.checkpoints import check_meta, load_checked
    from common.errors import CheckpointError
    from common.io import load_checkpoint

    fix = fix or "re-create it by training the method again"
    if expected is not None:
        return load_checked(path, expected, fix=fix, allow_unfinished=allow_unfinished)
    if not Path(path).is_file():
        load_checkpoint(path, hint=fix)  # raises the one-line missing-file error
    ckpt = load_checkpoint(path, map_location="cpu", hint=fix)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} is not a checkpoint of this project (it holds a {type(ckpt).__name__}); {fix}")
    return dict(ckpt), check_meta(path, ckpt, {}, fix=fix, allow_unfinished=allow_unfinished)


def model_class(method: str) -> type[AnomalyModel]:
    from common.errors import CheckpointError

    if method not in REGISTRY:
        raise CheckpointError(f"checkpoint method {method!r} has no model class; known: {', '.join(REGISTRY)}")
    module, name = REGISTRY[method].split(":")
    return getattr(importlib.import_module(module), name)


def load_model(path: str | Path, *, device: Any = "cpu", allow_unfinished: bool = False,
               **kwargs) -> tuple[AnomalyModel, dict]:
    """Any method's checkpoint -> (fitted model, its provenance record); the method is read from the record."""
    ckpt, meta = _load(path, None, "", allow_unfinished)
    cls = model_class(str(meta.get("method")))
    return cls.from_checkpoint(ckpt, device=device, **kwargs), meta


def batched(n: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def reduced_precision(dtype: str, device: Any) -> Callable:
    """Context for optional reduced-precision inference: 'fp32' (default, exact), 'bf16' (CPU or GPU autocast),
    'fp16' (GPU autocast). Refuses fp16 on the CPU in one line."""
    import contextlib

    import torch

    from common.errors import UserError

    dev = torch.device(device)
    if dtype in (None, "fp32", "float32"):
        return contextlib.nullcontext()
    if dtype == "fp16" and dev.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA device; use --dtype bf16 on the CPU")
    if dtype not in ("bf16", "fp16"):
        raise UserError(f"unknown --dtype {dtype!r}; use fp32, bf16 or fp16")
    return torch.autocast(dev.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


# --- the backbone of a checkpoint -------------------------------------------------------------------------------
# Checkpoints store the backbone's name and weights sha256, not its weights (a WRN50-2 is 270 MB); load finds the
# same file again (ckpt/, $AD_WEIGHTS_DIR, the packaged Lite0, or --weights) and checks its hash. Random weights
# cannot be found again, so a random-weights checkpoint carries the backbone's state (smoke tests and the demo).
BACKBONE_STATE_KEY = "backbone_state"


def backbone_state_if_random(backbone: Any) -> dict:
    """{BACKBONE_STATE_KEY: state_dict} for a random-weights backbone, else {} (merge into checkpoint())."""
    from common.provenance import RANDOM

    if getattr(backbone, "weights_sha256", RANDOM) != RANDOM:
        return {}
    return {BACKBONE_STATE_KEY: {k: v.detach().cpu() for k, v in backbone.state_dict().items()}}


def backbone_from_checkpoint(ckpt: Mapping, *, weights: str | Path | None = None) -> Any:
    """The frozen backbone a checkpoint was made with (models.backbones.load_backbone), verified by sha256."""
    import warnings

    from common.checkpoints import META_KEY
    from common.errors import CheckpointError
    from common.provenance import RANDOM
    from models.backbones import load_backbone

    meta = ckpt.get(META_KEY) or {}
    name, sha = meta.get("backbone"), meta.get("weights_sha256")
    if not name:
        raise CheckpointError("the checkpoint names no backbone; re-create it with this version of the project")
    if sha == RANDOM:
        state = ckpt.get(BACKBONE_STATE_KEY)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"the checkpoint was made with random {name} weights but does not carry them; "
                                  f"re-create it with this version of the project, or train with real weights")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_backbone(name, "random")
        model.load_state_dict(dict(state))
        return model
    model = load_backbone(name, weights)
    if model.weights_sha256 != sha:
        raise CheckpointError(f"the checkpoint was made with {name} weights sha256 {str(sha)[:12]}… "
                              f"({meta.get('weights_file')}), but {model.weights_file} has "
                              f"{model.weights_sha256[:12]}…; pass the original file with --weights")
    return model


def holds_state(backbone: Any, state: Mapping) -> bool:
    """Whether `backbone` holds exactly these (random-weights) tensors."""
    import torch

    own = backbone.state_dict()
    return all(k in own and torch.equal(own[k].detach().cpu(), v) for k, v in state.items())


def check_backbone(meta: Mapping, backbone: Any, *, where: str = "the checkpoint", role: str = "given",
                   fix: str = "pass the original file with --weights") -> None:
    """Refuse a passed-in backbone that is not the one the checkpoint record names (backbone name, weights
    sha256), in one CheckpointError line: `where` names the checkpoint, `role` the backbone, `fix` what to do."""
    from common.errors import CheckpointError

    name, sha = meta.get("backbone"), meta.get("weights_sha256")
    have_name, have_sha = getattr(backbone, "backbone_name", None), getattr(backbone, "weights_sha256", None)
    if name and have_name and name != have_name:
        raise CheckpointError(f"{where} was made with backbone {name}, the {role} backbone is {have_name}")
    if sha and have_sha and sha != have_sha:
        raise CheckpointError(f"{where} was made with {name} weights sha256 {str(sha)[:12]}…, the {role} backbone "
                              f"has {str(have_sha)[:12]}…; {fix}")
