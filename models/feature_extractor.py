"""The one feature extractor (forward hooks, early stop) and PatchCore/GLASS locally aware patch features."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _Stop(Exception):
    pass


class FeatureExtractor(nn.Module):
    """Returns {layer: feature map} for the requested layers and stops the forward pass after the last one.

    Layer names are uniform across backbones ("layer1".."layer4"; see models.backbones). The backbone stays frozen
    in eval mode; gradients are off unless `with_grad` (the CSAD segmentor trains a head on top, not the backbone).
    """

    def __init__(self, backbone: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.backbone = backbone
        self.layers = list(layers)
        aliases = getattr(backbone, "layer_aliases", {})
        self._modules_by_layer = {name: backbone.get_submodule(aliases.get(name, name)) for name in self.layers}
        self._last = self._last_layer()
        self._out: dict[str, torch.Tensor] = {}
        self._running = False  # hooks act only during this extractor's own forward (several may share a backbone)
        for name, module in self._modules_by_layer.items():
            module.register_forward_hook(self._hook(name))
        self._dims: dict[str, int] | None = None

    def _last_layer(self) -> str:
        order = {id(m): i for i, m in enumerate(self.backbone.modules())}
        return max(self.layers, key=lambda n: order[id(self._modules_by_layer[n])])

    def _hook(self, name: str):
        def hook(_module, _inp, out):
            if not self._running:
                return
            self._out[name] = out
            if name == self._last:
                raise _Stop
        return hook

    def train(self, mode: bool = True):  # the backbone never leaves eval mode (frozen BatchNorm statistics)
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._out = {}
        self._running = True
        with torch.no_grad():
            try:
                self.backbone(x)
            except _Stop:
                pass
            finally:
                self._running = False
        out, self._out = self._out, {}
        return {name: out[name] for name in self.layers}

    def official_bn_update(self, size: tuple[int, int] = (224, 224)) -> None:
        """patchcore-inspection's `feature_dimensions` probe, kept for parity: one forward of an all-ones
        (1, 3, *size) image with the backbone in train mode, so every BatchNorm the (early-stopped) forward reaches
        takes one running-statistics update (momentum 0.1 for torchvision); the backbone is back in eval after."""
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
