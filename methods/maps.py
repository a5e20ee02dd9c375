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


def resized_hw(w: int, h: int, resize: int) -> tuple[int, int]:
    """(H, W) after torchvision Resize(int): the shorter side becomes `resize`."""
    if w <= h:
        return int(resize * h / w), resize
    return resize, int(resize * w / h)


def uncrop(maps: np.ndarray, resized: tuple[int, int], crop: int) -> np.ndarray:
    """Place centre-crop maps (N, crop, crop) back into the resized (H, W) frame, so that resizing to the original
    image aligns with the ground truth (non-square images, resize-then-crop). The unseen margins get each map's
    minimum. No crop, or a crop that is the whole frame, returns `maps` itself."""
    h, w = resized
    if not crop or (h, w) == (crop, crop):
        return maps
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    lows = maps.reshape(len(maps), -1).min(1)[:, None, None]
    canvas = np.broadcast_to(lows, (len(maps), h, w)).astype(np.float32)
    canvas[:, max(top, 0):top + crop, max(left, 0):left + crop] = maps[:, max(-top, 0):, max(-left, 0):][:, :h, :w]
    return canvas
