"""The one feature extractor (truncated forward, export-safe) and PatchCore/GLASS locally aware patch features."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Backbones whose forward, up to the feature layers, is these children called one after another (the head that
# follows is never run). Keyed by the exact class: a subclass may change the forward.
_PREFIX_CHILDREN = {
    "torchvision.models.resnet.ResNet": ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    "timm.models.resnet.ResNet": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    "timm.models.efficientnet.EfficientNet": ("conv_stem", "bn1", "blocks"),
}


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _children_in_call_order(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The children the forward calls, in order, when it is nothing but that chain; None when it is not known."""
    if _is_plain_sequential(module):
        return [(n, m) for n, m in module._modules.items() if m is not None]  # repeated modules run again
    names = _PREFIX_CHILDREN.get(_class_name(module))
    return None if names is None else [(n, getattr(module, n)) for n in names]


def _within(target: str, path: str) -> bool:
    return target == path or target.startswith(path + ".")


def _steps(module: nn.Module, path: str, names_at: dict[str, list[str]],
           whole: bool) -> list[tuple[nn.Module, list[str]]]:
    """`module` (at `path` in the backbone) as a list of (module, layer names captured after it) run one after
    another: all of it when `whole` or when it is itself requested, else only up to the last requested layer
    inside it."""
    inside = [t for t in names_at if t != path and (not path or t.startswith(path + "."))]
    if not inside:
        return [(module, list(names_at.get(path, [])))]
    children = _children_in_call_order(module)
    whole = whole or path in names_at  # a requested container's output is its last child's
    if children is None or (whole and not _is_plain_sequential(module)):
        raise ValueError(f"cannot take '{inside[0]}' from inside {type(module).__name__} "
                         f"('{path or 'the backbone'}'): its forward is not a known chain of its children; request "
                         f"an enclosing block instead (ResNet stages 'layer1'..'layer4', EfficientNet 'blocks.N')")

    def child_path(name: str) -> str:
        return f"{path}.{name}" if path else name

    def holds(p: str) -> bool:
        return any(_within(t, p) for t in names_at)

    missed = [t for t in inside if not any(_within(t, child_path(n)) for n, _ in children)]
    if missed:  # e.g. a classifier head
        raise ValueError(f"cannot take '{missed[0]}' from {type(module).__name__}: its features come from the "
                         f"chain {', '.join(child_path(n) for n, _ in children)}; request a layer inside it")
    last = len(children) - 1 if whole else max(i for i, (n, _) in enumerate(children) if holds(child_path(n)))
    steps: list[tuple[nn.Module, list[str]]] = []
    for i, (name, child) in enumerate(children[:last + 1]):
        if holds(child_path(name)):  # only the last needed child may stop early: later ones need its output
            steps += _steps(child, child_path(name), names_at, whole=whole or i < last)
        else:
            steps.append((child, []))
    if path in names_at:
        steps[-1][1].extend(names_at[path])
    return steps


class FeatureExtractor(nn.Module):
    """Returns {layer: feature map} for the requested layers and runs the backbone only up to the last one.

    Layer names are uniform across backbones ("layer1".."layer4"; `backbone.layer_aliases`, see models.backbones);
    any module path inside the backbone's chain of stages works too. The forward calls the backbone's own
    modules one after another (stem, stages, blocks of the last stage up to the requested one) instead of the
    backbone's forward, so the head after the last requested layer never runs (patchcore-inspection's early stop)
    and no hook or exception is involved: torch.jit.trace / torch.export record exactly this truncated pass.
    The backbone stays frozen in eval mode and gradients are off. Extractors sharing one backbone are independent.
    """

    def __init__(self, backbone: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.backbone = backbone
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("FeatureExtractor needs at least one layer")
        aliases = getattr(backbone, "layer_aliases", {})
        names_at: dict[str, list[str]] = {}
        for name in dict.fromkeys(self.layers):
            path = aliases.get(name, name)
            backbone.get_submodule(path)  # unknown names fail here, naming the missing attribute
            names_at.setdefault(path, []).append(name)
        # A plain list, not registered submodules: the modules stay registered once, under .backbone (state_dict,
        # .to(), sharing), and are the very same objects the backbone runs.
        self._steps = _steps(backbone, "", names_at, whole=False)
        self._dims: dict[str, int] | None = None

    def train(self, mode: bool = True):  # the backbone never leaves eval mode (frozen BatchNorm statistics)
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for module, names in self._steps:
                x = module(x)
                for name in names:
                    out[name] = x
        return {name: out[name] for name in self.layers}

    def official_bn_update(self, size: tuple[int, int] = (224, 224)) -> None:
        """patchcore-inspection's `feature_dimensions` probe, kept for parity: one forward of an all-ones
        (1, 3, *size) image with the backbone in train mode, so every BatchNorm the truncated forward reaches
        takes one running-statistics update (momentum 0.1 for torchvision) and the layers after the last requested
        one stay as loaded; the backbone is back in eval after."""
        p = next(self.backbone.parameters())
        self.backbone.train()
        try:
            self(torch.ones(1, 3, *size, device=p.device, dtype=p.dtype))
        finally:
            self.backbone.eval()

    @property
    def feature_dims(self) -> dict[str, int]:
        if self._dims is None:
            p = next(self.backbone.parameters())
            feats = self(torch.zeros(1, 3, 64, 64, device=p.device, dtype=p.dtype))
            self._dims = {k: v.shape[1] for k, v in feats.items()}
        return self._dims


def local_patch_features(features: Sequence[torch.Tensor], pretrain_dim: int, target_dim: int,
                         patch_size: int = 3) -> torch.Tensor:
    """PatchCore's locally aware patch features, shape (B, H, W, target_dim) on the first map's H x W grid.

    Per layer: unfold patch_size^2 neighbourhoods (zero padding), flatten channel-major, adaptive-average-pool the
    C*9 values to `pretrain_dim` (MeanMapper). Then stack the layers and pool L*pretrain_dim to `target_dim`
    (Aggregator). Later maps are bilinearly upsampled (align_corners=False) to the first grid. Upsampling and the
    channel pooling are linear maps on different axes, so pooling first on the coarse grid gives the official
    result at a fraction of the memory.
    """
    B, _, H, W = features[0].shape
    per_layer = []
    for f in features:
        b, c, h, w = f.shape
        pad = (patch_size - 1) // 2
        unfolded = F.unfold(f, kernel_size=patch_size, padding=pad)  # (B, C*k*k, h*w), channel-major
        pooled = F.adaptive_avg_pool1d(unfolded.transpose(1, 2).reshape(b * h * w, 1, -1), pretrain_dim)
        pooled = pooled.reshape(b, h, w, pretrain_dim).permute(0, 3, 1, 2)
        if (h, w) != (H, W):
            pooled = F.interpolate(pooled, size=(H, W), mode="bilinear", align_corners=False)
        per_layer.append(pooled.permute(0, 2, 3, 1).reshape(B * H * W, 1, pretrain_dim))
    stacked = torch.cat(per_layer, dim=2)  # (N, 1, L*pretrain_dim), layer-major
    return F.adaptive_avg_pool1d(stacked, target_dim).reshape(B, H, W, target_dim)
