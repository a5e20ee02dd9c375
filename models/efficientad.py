"""EfficientAD-style networks used by CSAD's LGST branch (`Tokichan/CSAD models/model.py`).

LocalStudent: a PDN-medium-like CNN with two 1x1 heads ("st" predicts the teacher, "ae" predicts the
autoencoder). AutoEncoder: EfficientAD's autoencoder (base 64) with CSAD's 512 x 64 x 64 output.

Both take `width`/`base` and `out_size` arguments so --fast runs the same networks at a smaller size; the
defaults are the official ones (input 256 -> 64 x 64 maps, 512 channels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LocalStudent(nn.Module):
    """conv k4 -> avgpool -> conv k4 -> avgpool -> conv k1 -> conv k3 -> conv k4, ReLU after each, then two heads.

    The trunk has stride 4: an input of size s gives (s/4) x (s/4) with padding=True (official setting); the
    result is bilinearly resized to `out_size` (identity at the official sizes).
    """

    def __init__(self, out_channels: int = 512, width: int = 256, padding: bool = True, out_size: int = 64):
        super().__init__()
        p = 1 if padding else 0
        w1, w2 = width, 2 * width
        self.out_size = out_size
        self.trunk = nn.Sequential(
            nn.Conv2d(3, w1, 4, padding=3 * p), nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=1 * p),
            nn.Conv2d(w1, w2, 4, padding=3 * p), nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=1 * p),
            nn.Conv2d(w2, w2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(w2, w2, 3, padding=1 * p), nn.ReLU(inplace=True),
            nn.Conv2d(w2, w2, 4), nn.ReLU(inplace=True),
        )
        self.conv_st = nn.Conv2d(w2, out_channels, 1)
        self.conv_ae = nn.Conv2d(w2, out_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        if h.shape[-1] != self.out_size or h.shape[-2] != self.out_size:
            h = F.interpolate(h, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return self.conv_st(h), self.conv_ae(h)


# EfficientAD's decoder sizes for a 64-ish output; scaled for other output sizes (identity at out_size 64).
_DECODER_SIZES = (3, 8, 15, 32, 63, 127)


class AutoEncoder(nn.Module):
    """Encoder: five stride-2 convs (k4 p1) to in_size/32, then a conv with kernel in_size/32 to a 1x1 bottleneck
    (k8 at the official 256 input). Decoder: six (bilinear resize, conv k4 p2, ReLU, Dropout 0.2) steps, a resize
    to `out_size`, conv k3 + ReLU, conv k3 to `out_channels`."""

    def __init__(self, out_channels: int = 512, base: int = 64, in_size: int = 256, out_size: int = 64,
                 dropout: float = 0.2):
        super().__init__()
        if in_size % 32 or in_size < 32:
            raise ValueError(f"AutoEncoder input size must be a multiple of 32, got {in_size}")
        half = base // 2
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.encoder = nn.Sequential(
            nn.Conv2d(3, half, 4, 2, 1), relu(),
            nn.Conv2d(half, half, 4, 2, 1), relu(),
            nn.Conv2d(half, base, 4, 2, 1), relu(),
            nn.Conv2d(base, base, 4, 2, 1), relu(),
            nn.Conv2d(base, base, 4, 2, 1), relu(),
            nn.Conv2d(base, base, in_size // 32),
        )
        scale = out_size / 64
        self.sizes = [max(1, round(s * scale)) for s in _DECODER_SIZES]
        self.out_size = out_size
        self.decoder_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(base, base, 4, 1, 2), relu(), nn.Dropout(dropout)) for _ in self.sizes)
        self.head = nn.Sequential(nn.Conv2d(base, base, 3, 1, 1), relu(), nn.Conv2d(base, out_channels, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        for size, block in zip(self.sizes, self.decoder_blocks):
            h = block(F.interpolate(h, size=size, mode="bilinear", align_corners=False))
        h = F.interpolate(h, size=self.out_size, mode="bilinear", align_corners=False)
        return self.head(h)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
