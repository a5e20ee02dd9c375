"""GLASS trainable networks: the feature adaptor ("pre_projection") and the patch discriminator."""
from __future__ import annotations

import torch
from torch import nn


def _xavier_linears(module: nn.Module) -> None:
    # Official init: Xavier-normal Linear weights, default biases; BatchNorm1d keeps gamma=1, beta=0.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)


class Adaptor(nn.Module):
    """`n_layers` Linear(dim -> dim) layers, no activation (pre_proj=1 is a single affine map)."""

    def __init__(self, dim: int = 1536, n_layers: int = 1):
        super().__init__()
        if n_layers < 1:
            raise ValueError("Adaptor needs n_layers >= 1 (use pre_proj=0 to run without an adaptor)")
        self.layers = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(n_layers)])
        _xavier_linears(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Discriminator(nn.Module):
    """Patch-wise MLP: (Linear -> BN -> LeakyReLU(0.2)) x (n_layers-1) -> Linear(bias=False) -> Sigmoid.

    The output is the probability that a patch is anomalous. With the defaults (2 layers, hidden 1024) the hidden
    width stays 1024; deeper variants shrink it like the official code (hidden // 1.5**i).
    """

    def __init__(self, in_dim: int = 1536, n_layers: int = 2, hidden: int = 1024):
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_dim
        for i in range(n_layers - 1):
            out = int(hidden // 1.5 ** i)
            blocks += [nn.Linear(width, out), nn.BatchNorm1d(out), nn.LeakyReLU(0.2)]
            width = out
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Linear(width, 1, bias=False)
        _xavier_linears(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.tail(self.body(x)))
