"""GLASS Local Anomaly Synthesis: Perlin masks, DTD texture augmentation, foreground masks, the training dataset.

Images, textures and masks arrive as sequences of PIL images (methods.base.ImageList reads files lazily, also in
DataLoader workers); reader samples or paths are wrapped into one."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from common.cli import REPO_ROOT
from dataset_readers.base import DatasetError, Sample, load_image
from dataset_readers.torch_data import IMAGENET_MEAN, IMAGENET_STD
from methods.base import ImageList

LOCAL_DTD = REPO_ROOT / "datasets" / "dtd" / "images"
MAX_MASK_TRIES = 1000


def as_images(items: Sequence[Any], mode: str = "RGB") -> Sequence[Any]:
    """Reader samples or paths -> a lazy ImageList; a sequence of PIL images (or an ImageList) is kept as it is."""
    if isinstance(items, ImageList) or not len(items):
        return items
    first = items[0]
    if isinstance(first, (str, os.PathLike)) or hasattr(first, "path"):
        return ImageList(items, mode)
    return items


def image_names(images: Sequence[Any]) -> list[str]:
    """What error messages call each image: its file for an ImageList, else its index."""
    if isinstance(images, ImageList):
        return list(images.paths)
    return [f"image {i}" for i in range(len(images))]


def default_dtd_root() -> Path:
    # Always the full DTD (47 classes, as the GLASS paper): a run must never fall back to a subset by accident.
    return LOCAL_DTD


def list_textures(root: str | os.PathLike | None) -> list[Path]:
    """DTD layout <root>/<class>/*.jpg, sorted; a missing or empty folder is a one-line error."""
    root = Path(root) if root is not None else default_dtd_root()
    files = sorted(root.glob("*/*.jpg")) if root.is_dir() else []
    if not files:
        raise DatasetError(f"no DTD textures found under {root} (expected <root>/<class>/*.jpg); download "
                           "dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and unpack it into "
                           "datasets/ (giving datasets/dtd/images/<class>/*.jpg), or pass --dtd-root DIR")
    return files


# ---------------------------------------------------------------- Perlin noise
def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient noise on a res[0] x res[1] lattice, vectorised over pixels; values roughly in [-1, 1].

    Fade 6t^5-15t^4+10t^3, unit gradients at uniform random angles, result scaled by sqrt(2).
    """
    h, w = shape
    angles = rng.uniform(0, 2 * math.pi, size=(res[0] + 1, res[1] + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.arange(h) * (res[0] / h)
    x = np.arange(w) * (res[1] / w)
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[(iy + dy)[:, None], (ix + dx)[None, :]]  # (h, w, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t):
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return math.sqrt(2) * (top * (1 - uy) + bottom * uy)


def _rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    h, w = img.shape
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def perlin_binary(shape: tuple[int, int], rng: np.random.Generator, min_scale: int = 0, max_scale: int = 6) -> np.ndarray:
    """One thresholded Perlin map: lattice 2^a x 2^b (a, b uniform in [min, max)), rotated +-90 deg, > 0.5."""
    a, b = rng.integers(min_scale, max_scale, size=2)
    noise = perlin_noise(shape, (2 ** int(a), 2 ** int(b)), rng).astype(np.float32)
    noise = _rotate(noise, rng.uniform(-90, 90))
    return (noise > 0.5).astype(np.float32)


def perlin_mask(shape: tuple[int, int], downsampling: int, rng: np.random.Generator,
                fg_mask: np.ndarray | None = None, *, min_scale: int = 0, max_scale: int = 6,
                fg_hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(mask_l (H, W), mask_s (H/ds, W/ds)), both in {0, 1}; redrawn until mask_s has a positive cell.

    The mask is one Perlin map, or the union or intersection of two (probability 1/3 each), times the foreground.
    mask_s is the max-pool with kernel = stride = downsampling: a patch is anomalous if any of its pixels is.
    """
    fg = np.ones(shape, np.float32) if fg_mask is None else fg_mask.astype(np.float32)
    for _ in range(MAX_MASK_TRIES):
        m1, m2 = perlin_binary(shape, rng, min_scale, max_scale), perlin_binary(shape, rng, min_scale, max_scale)
        u = rng.random()
        mask = np.maximum(m1, m2) if u > 2 / 3 else (m1 * m2 if u > 1 / 3 else m1)
        mask = mask * fg
        small = F.max_pool2d(torch.from_numpy(mask)[None, None], downsampling)[0, 0].numpy()
        if small.max() > 0:
            return mask, small
    raise DatasetError(f"no Perlin mask overlaps the foreground after {MAX_MASK_TRIES} tries"
                       f"{' (' + fg_hint + ')' if fg_hint else ''}; the foreground mask is (nearly) empty: fix it "
                       "or run with --fg 0")


# ---------------------------------------------------------------- textures and foreground
# torchvision's random transforms draw from the global torch RNG. Drawing the same numbers, in the same order,
# from a per-item torch.Generator gives the same augmentations without touching the global RNG, whose state GLASS's
# Gaussian noise (GAS) depends on in the main process (so results would change with --workers).
def _jitter(brightness=None, contrast=None, saturation=None, hue=None):
    """T.ColorJitter: a random order of the four adjustments, each factor uniform in its range."""
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)

    def op(img, g: torch.Generator):
        order = torch.randperm(4, generator=g).tolist()
        factors = [None if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=g))
                   for r in (brightness, contrast, saturation, hue)]
        for k in order:
            if factors[k] is not None:
                img = adjust[k](img, factors[k])
        return img
    return op


def _always(fn):
    """T.RandomHorizontalFlip(p=1) and the like: applied always, after drawing (and ignoring) one number."""
    def op(img, g: torch.Generator):
        torch.rand(1, generator=g)
        return fn(img)
    return op


def _affine(lo: float, hi: float):
    """T.RandomAffine(degrees=(lo, hi)): rotation only, nearest interpolation, black fill."""
    def op(img, g: torch.Generator):
        angle = float(torch.empty(1).uniform_(lo, hi, generator=g).item())
        return TF.affine(img, angle, [0, 0], 1.0, [0.0, 0.0], interpolation=T.InterpolationMode.NEAREST, fill=0)
    return op


# The official 9 texture operations (GLASS datasets/mvtec.py rand_augmenter), in the official order.
TEXTURE_OPS = (_jitter(contrast=(0.8, 1.2)), _jitter(brightness=(0.8, 1.2)),
               _jitter(saturation=(0.8, 1.2), hue=(-0.2, 0.2)), _always(TF.hflip), _always(TF.vflip),
               _always(lambda im: TF.rgb_to_grayscale(im, num_output_channels=len(im.getbands()))),
               _always(TF.autocontrast), _always(TF.equalize), _affine(-45.0, 45.0))


def texture_transform(resize: int | tuple[int, int], crop: int, rand_aug: bool, rng: np.random.Generator):
    """Resize, then (rand_aug) 3 distinct ops of the 9, then centre crop and ImageNet normalisation.
    Returns tf(image, generator): the ops' random factors come from `generator`, never from the global RNG."""
    chosen = [TEXTURE_OPS[i] for i in rng.choice(len(TEXTURE_OPS), 3, replace=False)] if rand_aug else []
    resize_tf = T.Resize(resize, antialias=True)
    tail = T.Compose([T.CenterCrop(crop), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def tf(img, g: torch.Generator) -> torch.Tensor:
        img = resize_tf(img)
        for op in chosen:
            img = op(img, g)
        return tail(img)
    return tf


def fg_mask_path(sample: Sample | str | os.PathLike, fg_root: Path) -> Path:
    """The official layout: the mask of an image has the image's file name."""
    return Path(fg_root) / Path(getattr(sample, "path", sample)).name


def fg_mask_array(mask: Image.Image, resize: int | tuple[int, int], crop: int) -> np.ndarray:
    """Bilinear resize + centre crop of an "L" mask, then ceil: any non-zero pixel is foreground (official)."""
    tf = T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(crop), T.ToTensor()])
    return torch.ceil(tf(mask.convert("L") if mask.mode != "L" else mask)[0]).numpy()


def load_fg_mask(path: Path, resize: int | tuple[int, int], crop: int) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"foreground mask not found: {path}; GLASS --fg 1 needs one mask per training image "
                           f"in {path.parent}/ (download 'Foreground Mask' from the GLASS README, or make binary "
                           "masks by thresholding), or run with --fg 0")
    return fg_mask_array(load_image(path, mode="L"), resize, crop)


def fg_masks_of(samples: Sequence[Any], fg_root: Path) -> ImageList:
    """The foreground mask of every training image (<fg_root>/<image name>), checked to exist, read lazily."""
    check_fg_masks(samples, fg_root)
    return ImageList([fg_mask_path(s, fg_root) for s in samples], mode="L")


def check_fg_masks(samples: Sequence[Any], fg_root: Path) -> None:
    """Fail before training (not mid-epoch, official issue #18) when any foreground mask is missing."""
    missing = [fg_mask_path(s, fg_root) for s in samples if not fg_mask_path(s, fg_root).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(samples)} foreground masks missing, first: {missing[0]}; "
                           f"put one mask per training image in {fg_root}/ (download 'Foreground Mask' from the "
                           "GLASS README, or make binary masks by thresholding) or run with --fg 0")


# ---------------------------------------------------------------- dataset
class LASDataset(torch.utils.data.Dataset):
    """Training items (index, LAS image, mask_s). The normal image is looked up in the feature cache by index.

    `images`, `textures`: PIL images (or reader samples / paths, read lazily); `fg_masks`: one "L" foreground mask
    per image, or `fg_root`, the folder holding them by image name (checked now), or neither (no masks).
    Randomness comes from a per-item generator seeded by (seed, epoch, index) so runs are reproducible with any
    number of loader workers. Blending uses beta ~ N(mean, std) clipped to [0.2, 0.8]:
    I_aug = I (1-M) + (1-beta) T M + beta I M.
    """

    def __init__(self, images: Sequence[Any], textures: Sequence[Any], resize: int | tuple[int, int], crop: int,
                 downsampling: int = 8, *, fg_masks: Sequence[Any] | None = None, fg_root: Path | None = None,
                 rand_aug: bool = True, beta_mean: float = 0.5, beta_std: float = 0.1, seed: int = 0):
        self.images = as_images(images)
        self.textures = as_images(textures)
        if not len(self.textures):
            raise DatasetError("GLASS LAS needs DTD texture images; none were given (--dtd-root)")
        self.resize, self.crop, self.ds = resize, crop, downsampling
        if fg_masks is None and fg_root is not None:
            fg_masks = fg_masks_of(getattr(images, "paths", images), Path(fg_root))
        if fg_masks is not None and len(fg_masks) != len(self.images):
            raise DatasetError(f"{len(fg_masks)} foreground masks for {len(self.images)} training images; give one "
                               "per image or run with --fg 0")
        self.fg_masks = fg_masks
        self.rand_aug = rand_aug
        self.beta_mean, self.beta_std = beta_mean, beta_std
        self.seed, self.epoch = seed, 0
        self.image_tf = T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(crop), T.ToTensor(),
                                   T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def _fg_name(self, i: int) -> str:
        if self.fg_masks is None:
            return ""
        return str(self.fg_masks.paths[i]) if isinstance(self.fg_masks, ImageList) else f"foreground mask {i}"

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image = self.image_tf(self.images[i])
        tex = self.textures[int(rng.integers(len(self.textures)))]
        tex_tf = texture_transform(self.resize, self.crop, True, rng) if self.rand_aug else None
        # the item's own torch generator, drawn from the item's stream: the global torch RNG is never touched here
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
        texture = tex_tf(tex, gen) if tex_tf is not None else self.image_tf(tex)
        fg = None if self.fg_masks is None else fg_mask_array(self.fg_masks[i], self.resize, self.crop)
        shape = tuple(image.shape[1:])
        mask_l, mask_s = perlin_mask(shape, self.ds, rng, fg, fg_hint=self._fg_name(i))
        beta = float(np.clip(rng.normal(self.beta_mean, self.beta_std), 0.2, 0.8))
        m = torch.from_numpy(mask_l)[None]
        aug = image * (1 - m) + (1 - beta) * texture * m + beta * image * m
        return i, aug, torch.from_numpy(mask_s)
