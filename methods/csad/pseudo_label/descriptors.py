"""Component descriptors "cnn_image" (`Tokichan/CSAD models/component_feature_extractor.py`): each instance is cut
out, aligned to a square crop (official 65x65), rotated to R angles (official 60), and the backbone's layer4
global-average features are averaged over the rotations. The official configs' feature_list is ["cnn_image"] in
every category, so the other features the official extractor computes (area, colour, position, Hu moments) are
never clustered; only this descriptor exists here."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from common import atomic_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def align_instance(image: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8: pixels outside the mask zeroed, cropped to the largest external contour's bounding
    box, scaled by size / (diagonal of its min-area rectangle + 1) (sides clamped to <= size), zero-padded centred."""
    m = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros((size, size, 3), np.uint8)
    if not contours:
        return out
    c = max(contours, key=cv2.contourArea)
    filled = np.zeros_like(m)
    cv2.drawContours(filled, [c], -1, 1, thickness=-1)
    x, y, w, h = cv2.boundingRect(c)
    keep = (m & filled)[y:y + h, x:x + w, None]
    crop = image[y:y + h, x:x + w] * keep
    (_, (rw, rh), _) = cv2.minAreaRect(c)
    scale = size / (math.hypot(rw, rh) + 1)
    nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    crop = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = crop
    return out


def rotate_batch(crops: torch.Tensor, n_rotations: int) -> torch.Tensor:
    """(n, C, S, S) -> (n * R, C, S, S): every crop rotated about its centre to the angles linspace(0, 360, R)
    (both ends included, as the official code), bilinear, zero fill. One grid_sample call for all."""
    n, c, s, _ = crops.shape
    ang = torch.deg2rad(torch.linspace(0, 360, n_rotations, device=crops.device, dtype=crops.dtype))
    cos, sin = torch.cos(ang), torch.sin(ang)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (R, 2, 3)
    grid = F.affine_grid(theta, (n_rotations, c, s, s), align_corners=False)  # (R, S, S, 2)
    src = crops.repeat_interleave(n_rotations, 0)
    return F.grid_sample(src, grid.repeat(n, 1, 1, 1), mode="bilinear", padding_mode="zeros", align_corners=False)


class ComponentDescriptor:
    """Rotation-averaged layer4 descriptor of aligned component crops; all rotations of all instances of an image
    go through the backbone in one batch (split into chunks of `max_batch` crops to bound memory)."""

    def __init__(self, backbone: torch.nn.Module, device: torch.device, *, crop_size: int, n_rotations: int,
                 max_batch: int, layer: str = "layer4"):
        from models.feature_extractor import FeatureExtractor

        self.extractor = FeatureExtractor(backbone.to(device), [layer])
        self.layer, self.device = layer, device
        self.crop_size, self.n_rotations, self.max_batch = crop_size, n_rotations, max_batch
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return self.extractor.feature_dims[self.layer]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, instances: np.ndarray) -> np.ndarray:
        """image (H, W, 3) uint8 RGB, instances (n, H, W) bool -> (n, dim) float32."""
        if len(instances) == 0:
            return np.zeros((0, self.dim), np.float32)
        crops = np.stack([align_instance(image, m, self.crop_size) for m in instances])
        x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        x = (rotate_batch(x, self.n_rotations) - self.mean) / self.std
        feats = torch.cat([self.extractor(chunk)[self.layer].mean((2, 3)) for chunk in x.split(self.max_batch)])
        return feats.view(len(instances), self.n_rotations, -1).mean(1).cpu().numpy().astype(np.float32)


# --- cache: info/all_component_feats.npz ---------------------------------------------------------------------------

def instances_signature(id_maps: list[np.ndarray], meta: dict) -> str:
    """Hash of the instance maps and the descriptor settings; a cache with another signature is recomputed."""
    h = hashlib.sha1(json.dumps(meta, sort_keys=True).encode())
    for m in id_maps:
        h.update(np.asarray(m.shape, np.int64).tobytes())
        h.update(np.ascontiguousarray(m).tobytes())
    return h.hexdigest()


def load_cache(path: Path, signature: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None
    return data if str(data.get("signature", "")) == signature else None


def save_cache(path: Path, signature: str, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, signature=np.asarray(signature), **arrays)
