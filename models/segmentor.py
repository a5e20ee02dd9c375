"""CSAD component segmentor: a DeepLabV3+ head on frozen encoder features (`Tokichan/CSAD models/segmentation/model.py`, `Segmentor`).

The encoder is not part of this module: `forward` takes the FeatureExtractor outputs {"layer1", "layer3"}, so one
encoder pass can feed both the segmentor and the LGST teacher.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.999  # official value (PyTorch semantics): running stats ~ those of the last training batch
LOW_LEVEL = "layer1"
HIGH_LEVEL = "layer3"
ENCODER_LAYERS = (LOW_LEVEL, HIGH_LEVEL)  # layer2 is unused by the official head


class ConvBnReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1, dilation: int = 1):
        pad = dilation * (kernel - 1) // 2
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-5, momentum=BN_MOMENTUM), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Five parallel 256-channel branches: 1x1, three dilated 3x3, image pooling; then a 1x1 projection."""

    def __init__(self, cin: int, cout: int = 256, rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([ConvBnReLU(cin, cout, 1)] + [ConvBnReLU(cin, cout, 3, r) for r in rates])
        self.pool = ConvBnReLU(cin, cout, 1)
        self.project = ConvBnReLU(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, dim=1))


class Segmentor(nn.Module):
    """DeepLabV3+ head. in_channels = (layer1 channels, layer3 channels); 256/1024 for WideResNet-50-2."""

    def __init__(self, num_classes: int, in_channels: Sequence[int] = (256, 1024)):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one component class), got {num_classes}")
        self.num_classes = int(num_classes)
        self.in_channels = tuple(int(c) for c in in_channels)
        low_ch, high_ch = self.in_channels
        self.low_level = ConvBnReLU(low_ch, 48, 1)
        self.aspp = ASPP(high_ch, 256)
        self.decoder = nn.Sequential(ConvBnReLU(256 + 48, 256, 3), ConvBnReLU(256, 256, 3))
        self.classifier = nn.Conv2d(256, self.num_classes, 1)

    def forward(self, feats: dict[str, torch.Tensor], out_size: int | tuple[int, int]) -> torch.Tensor:
        """Logits (B, num_classes, *out_size). The layer3 map is resized to out_size/16 as in the official head."""
        if isinstance(out_size, int):
            out_size = (out_size, out_size)
        low, high = feats[LOW_LEVEL], feats[HIGH_LEVEL]
        high_size = (max(1, out_size[0] // 16), max(1, out_size[1] // 16))
        if tuple(high.shape[-2:]) != high_size:
            high = F.interpolate(high, size=high_size, mode="bilinear", align_corners=False)
        x = self.aspp(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.decoder(torch.cat([x, self.low_level(low)], dim=1))
        return F.interpolate(self.classifier(x), size=out_size, mode="bilinear", align_corners=False)

    def config(self, backbone: str, resolution: int) -> dict:
        return {"num_classes": self.num_classes, "in_channels": list(self.in_channels), "backbone": backbone,
                "resolution": int(resolution), "layers": list(ENCODER_LAYERS)}


def segmentor_path(ckpt_dir: str | os.PathLike, category: str, resolution: int) -> str:
    return os.path.join(str(ckpt_dir), f"segmentor_{category.replace('/', '__')}_{resolution}.pth")


def save_segmentor(path: str | os.PathLike, model: Segmentor, backbone: str, resolution: int, **extra) -> None:
    from common.io import save_checkpoint

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"state_dict": state, "config": model.config(backbone, resolution), **extra})


def load_segmentor(path: str | os.PathLike, device: torch.device | str = "cpu") -> Segmentor:
    """The network alone, in eval mode on `device`, from a segmentor checkpoint (train_segmentor.py's also holds
    the Patch Histogram: load the whole model with methods.csad.segmentor.PatchHistModel.load). Its checkpoint
    config is in `model.ckpt_config` (num_classes, in_channels, backbone, resolution, layers)."""
    from common.io import load_checkpoint

    from common.errors import CheckpointError

    ckpt = load_checkpoint(path, map_location="cpu", hint="train it with: python train_segmentor.py --categories <category>")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a segmentor checkpoint (no state_dict/config); re-run train_segmentor.py")
    cfg = ckpt["config"]
    model = Segmentor(cfg["num_classes"], cfg["in_channels"])
    model.load_state_dict(ckpt["state_dict"])
    model.ckpt_config = dict(cfg)
    return model.to(device).eval()
