"""Anomaly-map post-processing shared by the patch-based methods."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def upsample_and_smooth(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """(N, h, w) patch scores -> (N, H, W) maps: bilinear upsampling (align_corners=False), then the
    scipy Gaussian filter (sigma, truncate 4, mode 'reflect') on each map, as PatchCore and GLASS do."""
    maps = F.interpolate(patch_scores[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    maps = maps.cpu().numpy()
    if sigma > 0:
        maps = gaussian_filter(maps, sigma=(0, sigma, sigma))  # sigma 0 on the batch axis: maps stay independent
    return maps.astype(np.float32)
