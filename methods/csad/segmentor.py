"""CSAD stage 2 (`Tokichan/CSAD train_segmentor.py`, `models/segmentation/`): data, LSA copy-paste, losses and the
training loop of the component segmentor, and `PatchHistModel`, the fitted segmentor + Patch Histogram behind the
`patchhist` scores.

    model = PatchHistModel(backbone, make_config(category), device=device)
    model.fit(ImageList(data.train), labels=read_pseudo_labels(data, masks_root), validation=ImageList(data.validation),
              seed=42)
    model.save(path, segmentor_meta(...))                   # one checkpoint: segmentor + Patch Histogram
    pred = PatchHistModel.load(path, device=device).predict(ImageList(data.test))   # pred.scores, pred.label_maps
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_fill_holes
from tqdm import tqdm

from common import get_logger
from common.checkpoints import META_KEY, checkpoint_meta
from common.config import opt
from common.errors import CheckpointError, NonFiniteError, UserError, require_finite, weights_cause
from dataset_readers import CategoryData, image_size
from dataset_readers.torch_data import IMAGENET_MEAN, IMAGENET_STD, imagenet_transform
from methods.base import (BACKBONE_STATE_KEY, AnomalyModel, Prediction, backbone_from_checkpoint,
                          backbone_state_if_random, batched, check_backbone, holds_state, reduced_precision)
from methods.csad import label_layout as layout
from methods.csad.patch_histogram import PatchHistogram, class_histograms
from models.feature_extractor import FeatureExtractor
from models.segmentor import ENCODER_LAYERS, Segmentor

log = get_logger("csad.segmentor")
METHOD = "segmentor"  # checkpoint meta "method" (methods.base.REGISTRY)


@dataclass
class SegmentorConfig:
    """Stage-2 settings: the official train_segmentor.py / configs/segmentor values (per-category ones in
    CATEGORY_OVERRIDES)."""
    resolution: int = opt(256, "input and label-map side (official image_size)")
    epochs: int = opt(120, "training epochs; the final epoch is kept")
    sup_only_epochs: int = opt(50, "epochs before the histogram and entropy losses join (official sup_only_epoch)")
    batch_size: int = opt(4, "training batch size, supervised and unsupervised each")
    lr: float = opt(0.01, "Adam learning rate")
    weight_decay: float = opt(1e-5, "Adam weight decay")
    ce_weight: float = opt(0.5, "CE loss weight")
    focal_weight: float = opt(10.0, "focal loss weight")
    dice_weight: float = opt(1.0, "class-balanced Dice loss weight")
    hist_weight: float = opt(10.0, "histogram loss weight (unsupervised batch)")
    entropy_weight: float = opt(1.0, "entropy loss weight (each batch)")
    ce_on_logits: bool = opt(False, "standard CE on logits instead of the official CE on softmax outputs")
    fill_holes: bool = opt(False, "hole-fill each label class at full resolution (official: breakfast_box and "
                                  "juice_bottle)")
    # the script's plain --official-* switches set these (common.official needs store_true flags)
    official_hole_fill: bool = opt(False, "official hole-fill re-merge that may permute or shift class ids", cli=False)
    official_lsa: bool = opt(False, "official LSA: no component re-sampling, forced mandatory paste, bilinear label "
                                    "warp", cli=False)
    lsa_ratio: float = opt(1.0, "probability of LSA copy-paste per supervised image")
    min_distance: float = opt(0.2, "LSA: least normalised distance of a paste from the component (screw_bag 0.1)")
    boundary: float = opt(0.1, "LSA: paste centres lie in [boundary, 1 - boundary]^2")
    lsa_points: int = opt(10000, "LSA: candidate paste centres per attempt")
    lsa_attempts: int = opt(500, "LSA: paste attempts per component")
    min_aug_num: int = opt(1, "LSA: mandatory pastes")
    max_aug_num: int = opt(2, "LSA: mandatory + optional pastes")
    weight_power: float = opt(0.0, "LSA: component sampling probability ~ area^weight_power")
    eval_batch: int = opt(16, "images per forward pass in inference")
    dtype: str = opt("fp32", "inference precision (bf16 / fp16 approximate; training is always fp32)",
                     choices=("fp32", "bf16", "fp16"))

    @classmethod
    def fast(cls, **over) -> "SegmentorConfig":
        """Same code path, smaller: 64 px, 12 epochs (histogram/entropy from epoch 6), 100 LSA attempts over 2000
        points."""
        return cls(**{"resolution": 64, "epochs": 12, "sup_only_epochs": 6, "lsa_points": 2000,
                      "lsa_attempts": 100, **over})


# Settings of inference only: they may differ between the training run and a --test-only run.
SCORING_FIELDS = ("eval_batch", "dtype")
CATEGORY_OVERRIDES = {  # the official configs/segmentor/<category>.yaml values that differ from the defaults
    "breakfast_box": dict(fill_holes=True),
    "juice_bottle": dict(fill_holes=True),
    "screw_bag": dict(min_distance=0.1),
}


def make_config(category: str, fast: bool = False, **overrides) -> SegmentorConfig:
    """SegmentorConfig() (or .fast()), then the category's official values, then `overrides` (None: not given)."""
    cfg = SegmentorConfig.fast() if fast else SegmentorConfig()
    cfg = replace(cfg, **CATEGORY_OVERRIDES.get(category, {}))
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def model_config(cfg: SegmentorConfig) -> dict:
    """The settings that shape the fitted model (checked against a --test-only run): all but SCORING_FIELDS."""
    return {k: v for k, v in asdict(cfg).items() if k not in SCORING_FIELDS}


# --- losses (p = softmax of the logits) ------------------------------------------------------------------------

def ce_loss(logits: torch.Tensor, onehot: torch.Tensor, on_logits: bool = False) -> torch.Tensor:
    """Official: nn.CrossEntropyLoss(softmax(z), onehot), i.e. CE on softmax(softmax(z)); on_logits: standard CE."""
    x = logits if on_logits else logits.softmax(1)
    return -(onehot * F.log_softmax(x, dim=1)).sum(1).mean()


def focal_loss(probs: torch.Tensor, onehot: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    c = probs.shape[1]
    t = onehot.clamp(eps / (c - 1), 1.0 - eps)
    pt = (t * probs).sum(1) + eps
    return (-(1 - pt) ** gamma * pt.log()).mean()


def dice_loss(probs: torch.Tensor, onehot: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Class-balanced Dice: per (sample, class) dice, class weights 1/(batch area) normalised to sum 1."""
    inter = (probs * onehot).sum((2, 3))
    area_p, area_t = probs.sum((2, 3)), onehot.sum((2, 3))
    dice = (2 * inter + smooth) / (area_p + area_t + 2 * smooth)
    w = 1.0 / (area_t.sum(0) + 1e-5)
    w = w / w.sum()
    return (w[None] * (1 - dice)).mean()


def histogram_loss(probs: torch.Tensor, target_hist: torch.Tensor) -> torch.Tensor:
    """L1 between the mean class probabilities and a target class-fraction vector, background excluded, / batch."""
    pred = probs.mean((2, 3))
    return (pred[:, 1:] - target_hist[:, 1:]).abs().sum() / probs.shape[0]


def entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    return (-probs * torch.log(probs + 1e-5)).mean()


# --- labels ----------------------------------------------------------------------------------------------------

def fill_holes_by_class(label: np.ndarray, official: bool = False, min_area: int = 100) -> np.ndarray:
    """Official `fill_holes` (Tokichan/CSAD models/segmentation/dataloader.py): classes of <= min_area pixels are
    dropped, each remaining class mask is hole-filled, and the masks are painted in descending area order, so that
    smaller classes stay on top. Run at full resolution, before the resize.

    Default: each pixel keeps its class id. official=True reproduces the official re-merge `merge_masks`, which
    paints list positions and un-maps them with an inverted permutation, so ids can shift or permute.
    """
    areas_all = np.bincount(label.ravel(), minlength=256)
    ids = [c for c in range(1, len(areas_all)) if areas_all[c] > min_area]
    if not ids:
        return np.zeros_like(label)
    filled = [binary_fill_holes(label == c) for c in ids]
    areas = np.array([int(m.sum()) for m in filled])
    order = np.argsort(-areas, kind="stable")  # Python's stable sorted(..., reverse=True)
    out = np.zeros_like(label)
    if official:
        for rank, i in enumerate(order):
            out[filled[i]] = rank + 1
        mask_order = np.argsort(areas)[::-1]  # the official un-mapping (ties reversed, unlike the painting)
        lut = np.zeros(len(ids) + 1, label.dtype)
        lut[1:] = np.argsort(mask_order) + 1  # intended: mask_order + 1 (and then the class ids, not positions)
        return lut[out]
    for i in order:
        out[filled[i]] = ids[i]
    return out


# --- LSA copy-paste (Tokichan/CSAD models/segmentation/lsa.py) ---------------------------------------------------

@dataclass
class Component:
    ys: np.ndarray
    xs: np.ndarray
    centre: tuple[int, int]  # (x + w // 2, y + h // 2) of the bounding box, as the official cv2.boundingRect

    @property
    def area(self) -> int:
        return len(self.ys)


def intersect_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """|A n B| / min(|A|, |B|); 0 when either is empty."""
    denom = min(int(a.sum()), int(b.sum()))
    return float((a & b).sum()) / denom if denom else 0.0


def find_components(label: np.ndarray, instances: np.ndarray, min_area_frac: float = 0.001,
                    min_overlap: float = 0.9) -> list[Component]:
    """LSA candidates: instances larger than 0.1 % of the image lying on the labelled foreground (ratio > 0.9)."""
    fg = label > 0
    comps = []
    for i in np.unique(instances):
        if i == 0:
            continue
        m = instances == i
        if m.sum() <= min_area_frac * m.size or intersect_ratio(m, fg) <= min_overlap:
            continue
        ys, xs = np.nonzero(m)
        x0, y0 = int(xs.min()), int(ys.min())
        w, h = int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1
        comps.append(Component(ys, xs, (x0 + w // 2, y0 + h // 2)))
    return comps


def _affine(angle_deg: float, src: tuple[float, float], dst: tuple[float, float]) -> np.ndarray:
    """(2, 3) matrix: cv2.getRotationMatrix2D(src, angle, 1) followed by the translation src -> dst."""
    t = np.deg2rad(angle_deg)
    a, b = np.cos(t), np.sin(t)
    sx, sy = src
    return np.array([[a, b, dst[0] - a * sx - b * sy], [-b, a, dst[1] + b * sx - a * sy]])


class LabeledLSA:
    """Paste a displaced, rotated copy of a labelled component into the same image, with its label ids.

    As the official `labeled_lsa`: candidates in a random order (probability ~ area^weight_power, without
    replacement); a component with > 100 background pixels in the label map is skipped; every attempt draws a new
    target centre (10 000 uniform points, weights ~ distance^2, zero below min_distance) and a new integer angle;
    the 0/255 component mask is warped bilinearly and thresholded at > 200; a location is accepted when that mask
    covers < 50 % (mandatory paste) or < 90 % (optional paste) of the SAM background; the zero-masked image is
    warped bilinearly and pasted under the mask.

    Fixed by default (official behaviour with `official_lsa`): every 10 attempts the next component is tried (the
    official condition `attempt+1 % 10 == 0` never fires), a mandatory paste happens only at an accepted location
    (the official one pastes at its last attempt regardless), and the label map is warped with nearest neighbour
    (the official bilinear warp mixes class ids on the pasted edges).
    """

    def __init__(self, cfg: SegmentorConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng

    def _centre(self, comp: Component, size: int) -> tuple[float, float] | None:
        c = self.cfg
        pts = self.rng.uniform(c.boundary, 1 - c.boundary, size=(c.lsa_points, 2))
        d = np.linalg.norm(pts - np.asarray(comp.centre, np.float64) / size, axis=1)
        w = d ** 2 * (d >= c.min_distance)
        if w.sum() <= 0:
            return None
        x, y = pts[self.rng.choice(len(pts), p=w / w.sum())] * size
        return float(x), float(y)

    @staticmethod
    def _mask(comp: Component, size: int) -> np.ndarray:
        m = np.zeros((size, size), np.uint8)
        m[comp.ys, comp.xs] = 255
        return m

    def find_location(self, comp: Component, queue: list[Component], label: np.ndarray, background: np.ndarray, *,
                      threshold: float, mandatory: bool):
        """(matrix, component, warped bool mask) of the first accepted attempt, or None. `queue`: the components
        not yet tried, in sampling order (the fixed search takes the next valid one every 10 attempts)."""
        c, size = self.cfg, background.shape[0]
        mask = self._mask(comp, size)
        last = None
        for attempt in range(c.lsa_attempts):
            if not c.official_lsa and (attempt + 1) % 10 == 0:
                while queue:
                    nxt = queue.pop(0)
                    if self._valid(nxt, label):
                        comp, mask = nxt, self._mask(nxt, size)
                        break
            centre = self._centre(comp, size)
            angle = int(self.rng.integers(0, 360))
            if centre is None:
                continue
            mat = _affine(angle, comp.centre, centre)
            warped = cv2.warpAffine(mask, mat, (size, size), flags=cv2.INTER_LINEAR) > 200
            last = (mat, comp, warped)
            if intersect_ratio(warped, background) < threshold:
                return last
        return last if (mandatory and c.official_lsa) else None

    @staticmethod
    def _valid(comp: Component, label: np.ndarray) -> bool:
        return int((label[comp.ys, comp.xs] == 0).sum()) <= 100

    def _paste(self, image, label, img, lab, found) -> None:
        mat, comp, wm = found
        size = label.shape[0]
        src = np.zeros_like(image)
        src[comp.ys, comp.xs] = image[comp.ys, comp.xs]  # zero-masked source, as the official temp_img
        src_lab = np.zeros_like(label)
        src_lab[comp.ys, comp.xs] = label[comp.ys, comp.xs]
        wi = cv2.warpAffine(src, mat, (size, size), flags=cv2.INTER_LINEAR)
        wl = cv2.warpAffine(src_lab, mat, (size, size),
                            flags=cv2.INTER_LINEAR if self.cfg.official_lsa else cv2.INTER_NEAREST)
        img[wm], lab[wm] = wi[wm], wl[wm]

    def __call__(self, image: np.ndarray, label: np.ndarray, comps: list[Component],
                 background: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        c = self.cfg
        if not comps or self.rng.random() >= c.lsa_ratio:
            return image, label, 0
        w = np.array([cp.area for cp in comps], np.float64) ** c.weight_power
        queue = [comps[i] for i in self.rng.choice(len(comps), size=len(comps), replace=False, p=w / w.sum())]
        img, lab, pasted = image.copy(), label.copy(), 0
        done = 0
        while done < c.min_aug_num and queue:  # mandatory pastes: the next valid component until one is pasted
            comp = queue.pop(0)
            if not self._valid(comp, label):
                continue
            found = self.find_location(comp, queue, label, background, threshold=0.5, mandatory=True)
            if found is None:
                continue
            self._paste(image, label, img, lab, found)
            done += 1
            pasted += 1
        for _ in range(c.max_aug_num - c.min_aug_num):  # optional pastes: one draw each, skipped if invalid
            if not queue:
                break
            comp = queue.pop(0)
            if not self._valid(comp, label):
                continue
            found = self.find_location(comp, queue, label, background, threshold=0.9, mandatory=False)
            if found is not None:
                self._paste(image, label, img, lab, found)
                pasted += 1
        return img, lab, pasted


# --- light augmentation on the device (ShiftScaleRotate + RandomBrightnessContrast) -------------------------------

def light_augment(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B,3,H,W) in [0,1], labels (B,H,W). Each op with p=0.5: shift 0.01, scale 0.01, rotate 2 deg with a
    constant 0 border; brightness/contrast +-0.05."""
    b, dev = images.shape[0], images.device

    def u(lo, hi):
        return (torch.rand(b, generator=gen) * (hi - lo) + lo).to(dev)

    do_affine = (torch.rand(b, generator=gen) < 0.5).to(dev)
    ang, scale = torch.deg2rad(u(-2, 2)), u(0.99, 1.01)
    tx, ty = u(-0.01, 0.01) * 2, u(-0.01, 0.01) * 2  # normalised coordinates span 2
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=dev).expand(b, 2, 3)
    theta = torch.where(do_affine[:, None, None], theta, eye)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)[:, 0].long()
    do_bc = (torch.rand(b, generator=gen) < 0.5).to(dev)
    alpha, beta = u(0.95, 1.05), u(-0.05, 0.05)
    alpha, beta = torch.where(do_bc, alpha, torch.ones_like(alpha)), torch.where(do_bc, beta, torch.zeros_like(beta))
    images = (images * alpha[:, None, None, None] + beta[:, None, None, None]).clamp(0, 1)
    return images, labels


# --- data --------------------------------------------------------------------------------------------------------

def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def images_uint8(images: Sequence[Image.Image], size: int,
                 desc: str = "load") -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(N, size, size, 3) uint8 of PIL images, bilinear resize without padding (the same pixels imagenet_transform
    sees), and each image's original (width, height)."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    sizes = []
    for i in tqdm(range(len(images)), desc=desc, leave=False):
        im = _rgb(images[i])
        sizes.append(im.size)
        out[i] = np.asarray(im.resize((size, size), Image.BILINEAR))
    return out, sizes


def resize_nearest(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) -> (size, size) with PIL NEAREST, as the official torchvision Resize(NEAREST) on a PIL image
    (cv2 INTER_NEAREST picks other source pixels: 1.7 % of a LOCO label map differs)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr, np.uint8)).resize((size, size), Image.NEAREST))


def read_gray(path: Path) -> np.ndarray:
    """uint8 (H, W) as the official `Image.open(path).convert("L")`."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except (OSError, ValueError) as exc:
        raise layout.LayoutError(f"cannot read {path} ({exc}); delete the category folder and re-run "
                                 "pseudo_label.py") from None


def prepare_label(label: np.ndarray, size: int, cfg: SegmentorConfig) -> np.ndarray:
    """Full-resolution class map -> training label: hole filling (and dropping classes of <= 100 px) at full
    resolution, then the PIL NEAREST resize, in the official order."""
    if cfg.fill_holes:
        label = fill_holes_by_class(label, official=cfg.official_hole_fill)
    return resize_nearest(label, size)


def prepare_background(background: np.ndarray, size: int) -> np.ndarray:
    """SAM background.jpg (uint8, full resolution) -> bool (size, size): PIL NEAREST resize, then every non-zero
    pixel is background, as the official intersect_ratio counts it (JPEG noise near 0 included)."""
    return resize_nearest(background, size) != 0


@dataclass
class PseudoLabels:
    """Stage-1 labels of a training set at full resolution; the model prepares them (hole filling, resize).
    `labels`, `instances` and `backgrounds` are aligned with `sup` (any sequences: read_pseudo_labels reads each
    file when it is accessed)."""
    num_classes: int  # K + 1, background included
    sup: np.ndarray  # ascending indices of the supervised ("good") training images
    labels: Sequence[np.ndarray]  # (H, W) uint8 class maps 0..K
    instances: Sequence[np.ndarray | None] | None = None  # LSA candidates (refined_masks); None: label components
    backgrounds: Sequence[np.ndarray | None] | None = None  # SAM background (non-zero = background); None: empty


class _LayoutFiles(Sequence):
    """One stage-1 file of each supervised image, read on access (a category's label maps need not all fit in
    memory at full resolution)."""

    def __init__(self, data: CategoryData, masks_root, sup: np.ndarray, kind: str, k: int):
        self.data, self.root, self.sup, self.kind, self.k = data, masks_root, sup, kind, k

    def __len__(self) -> int:
        return len(self.sup)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        cat, sample = self.data.category, self.data.train[int(self.sup[j])]
        folder = layout.image_dir(cat, sample.stem, self.root)
        if self.kind == "labels":
            lab = layout.read_label_map(cat, sample.stem, self.root)
            w, h = image_size(sample.path)
            if lab.shape != (h, w):
                raise layout.LayoutError(f"{folder / layout.LABEL_MAP} is {lab.shape[1]}x{lab.shape[0]} but "
                                         f"{sample.path} is {w}x{h}; the labels belong to other images, re-run "
                                         "pseudo_label.py")
            if lab.max() > self.k:
                raise layout.LayoutError(f"{folder / layout.LABEL_MAP} has class {lab.max()} > K={self.k}; re-run "
                                         "pseudo_label.py")
            return lab
        if self.kind == "instances":
            return layout.read_label_map(cat, sample.stem, self.root, layout.REFINED) \
                if (folder / layout.REFINED).is_file() else None
        return read_gray(folder / layout.BACKGROUND) if (folder / layout.BACKGROUND).is_file() else None


def read_pseudo_labels(data: CategoryData, masks_root: str | Path | None) -> PseudoLabels:
    """The stage-1 layout of `data.train` (methods.csad.label_layout), keyed by image stem, never by listing
    order; label files are read when fit accesses them."""
    cat = data.category
    info = layout.read_info(cat, masks_root)
    k = int(info["filtered_component_histogram"].shape[1])
    stems_on_disk = layout.list_stems(cat, masks_root)
    train_stems = [s.stem for s in data.train]
    if len(stems_on_disk) != len(train_stems) or set(stems_on_disk) != set(train_stems):
        missing = sorted(set(train_stems) - set(stems_on_disk))[:3]
        raise layout.LayoutError(f"{layout.masks_dir(cat, masks_root)} holds labels for {len(stems_on_disk)} images, "
                                 f"the dataset has {len(train_stems)} training images (missing e.g. {missing}); "
                                 "re-run pseudo_label.py for this dataset")
    # info indices refer to the label layout's stem order
    position = {stem: i for i, stem in enumerate(train_stems)}
    sup = np.asarray(sorted({position[stems_on_disk[int(i)]] for i in np.asarray(info["filtered_histogram_indices"])}),
                     np.int64)
    return PseudoLabels(k + 1, sup, *(_LayoutFiles(data, masks_root, sup, kind, k)
                                      for kind in ("labels", "instances", "backgrounds")))


@dataclass
class TrainingSet:
    images: np.ndarray  # (N, R, R, 3) uint8, all training images in sorted order
    sup: np.ndarray  # indices of the supervised ("good") images
    unsup: np.ndarray  # the others
    labels: dict[int, np.ndarray]  # sup index -> (R, R) uint8 class map
    comps: dict[int, list[Component]] = field(default_factory=dict)
    backgrounds: dict[int, np.ndarray] = field(default_factory=dict)
    num_classes: int = 0


def build_training_set(images: np.ndarray, labels: PseudoLabels, cfg: SegmentorConfig,
                       sizes: Sequence[tuple[int, int]] | None = None) -> TrainingSet:
    """Resized training images + full-resolution pseudo-labels -> the training set at the resolution.
    `sizes`: the images' original (width, height), which the label maps must have."""
    r, n, c = cfg.resolution, len(images), int(labels.num_classes)
    sup = np.asarray(labels.sup, np.int64)
    if len(labels.labels) != len(sup) or len(np.unique(sup)) != len(sup) or (len(sup) and not 0 <= sup.min() <= sup.max() < n):
        raise UserError(f"pseudo-labels: {len(labels.labels)} label maps for {len(sup)} supervised indices "
                        f"(distinct, in 0..{n - 1} expected); the labels belong to another training set")
    if len(sup) < cfg.batch_size:
        raise layout.LayoutError(f"only {len(sup)} supervised images in {layout.GOOD_INDICES}, the batch size is "
                                 f"{cfg.batch_size}; re-run pseudo_label.py with more training images")
    unsup = np.asarray(sorted(set(range(n)) - set(sup.tolist())), np.int64)
    ts = TrainingSet(images, sup, unsup, {}, num_classes=c)
    for j, i in enumerate(sup.tolist()):
        lab = np.asarray(labels.labels[j])
        if sizes is not None and lab.shape != sizes[i][::-1]:
            raise UserError(f"pseudo-label {j} is {lab.shape[1]}x{lab.shape[0]} but training image {i} is "
                            f"{sizes[i][0]}x{sizes[i][1]}; the labels belong to other images")
        if lab.max() >= c:
            raise UserError(f"pseudo-label {j} has class {lab.max()} but there are {c} classes")
        lab = prepare_label(lab, r, cfg)
        ts.labels[i] = lab
        inst = labels.instances[j] if labels.instances is not None else None
        ts.comps[i] = find_components(lab, resize_nearest(inst, r) if inst is not None else layout.instance_map(lab))
        bg = labels.backgrounds[j] if labels.backgrounds is not None else None
        ts.backgrounds[i] = prepare_background(bg, r) if bg is not None else np.zeros((r, r), bool)
    return ts


class Encoder:
    """Frozen encoder on the device: uint8 or [0,1] images -> normalised -> {layer1, layer3}."""

    def __init__(self, backbone: torch.nn.Module, device: torch.device | str):
        self.device = torch.device(device)
        self.extractor = FeatureExtractor(backbone, list(ENCODER_LAYERS)).to(self.device).eval()
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.channels = tuple(self.extractor.feature_dims[k] for k in ENCODER_LAYERS)

    def __call__(self, images01: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.extractor((images01 - self.mean) / self.std)

    def encode_uint8(self, images: np.ndarray, batch: int) -> dict[str, torch.Tensor]:
        feats: dict[str, list[torch.Tensor]] = {k: [] for k in ENCODER_LAYERS}
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s:s + batch]).to(self.device).permute(0, 3, 1, 2).float() / 255
            for k, v in self(x).items():
                feats[k].append(v)
        return {k: torch.cat(v) for k, v in feats.items()}


def _take(feats: dict[str, torch.Tensor], idx) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in feats.items()}


# --- training ----------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    model: Segmentor
    epoch_times: list[float]
    losses: list[float]
    train_feats: dict[str, torch.Tensor]


def train_step(model: Segmentor, opt: torch.optim.Optimizer, cfg: SegmentorConfig, sup_feats: dict[str, torch.Tensor],
               onehot: torch.Tensor, *, unsup_feats: dict[str, torch.Tensor] | None = None,
               target_hist: torch.Tensor | None = None, use_unsup: bool = False) -> float:
    """One official training step (Tokichan/CSAD models/segmentation/segmentor.py `train_one_epoch`): two train-mode
    passes, segmentor(sup) then segmentor(unsup), in every epoch. Each pass normalises with its own batch
    statistics, and both move the BatchNorm running statistics (momentum 0.999: the eval statistics are those of
    the last unsupervised batch). Before `sup_only_epochs` the unsupervised output is unused (no graph is kept)."""
    r = cfg.resolution
    ls = model(sup_feats, r)
    lu = None
    if unsup_feats is not None:
        with torch.set_grad_enabled(use_unsup):
            lu = model(unsup_feats, r)
    ps = ls.softmax(1)
    loss = (cfg.ce_weight * ce_loss(ls, onehot, cfg.ce_on_logits) + cfg.focal_weight * focal_loss(ps, onehot)
            + cfg.dice_weight * dice_loss(ps, onehot))
    if use_unsup and lu is not None:
        pu = lu.softmax(1)
        loss = loss + cfg.hist_weight * histogram_loss(pu, target_hist) + cfg.entropy_weight * (
            entropy_loss(pu) + entropy_loss(ps))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_segmentor(ts: TrainingSet, encoder: Encoder, cfg: SegmentorConfig, *, seed: int,
                    desc: str = "segmentor") -> TrainResult:
    dev, r, bs = encoder.device, cfg.resolution, cfg.batch_size
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    lsa = LabeledLSA(cfg, rng)
    model = Segmentor(ts.num_classes, encoder.channels).to(dev)
    # fused: same Adam update, one kernel instead of a Python loop over parameters (40x faster on CPU)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=dev.type in ("cpu", "cuda"))
    # Frozen encoder: un-augmented features never change, so every training image is encoded once.
    t0 = time.perf_counter()
    with torch.no_grad():
        train_feats = encoder.encode_uint8(ts.images, cfg.eval_batch)
    for k, v in train_feats.items():  # uint8 images are finite: non-finite features come from the weights
        require_finite(v, f"encoder {k} features of the training images", weights_cause(encoder.extractor.backbone))
    log.info("%s: cached encoder features of %d training images in %.1f s", desc, len(ts.images), time.perf_counter() - t0)
    sup_labels = torch.from_numpy(np.stack([ts.labels[int(i)] for i in ts.sup])).to(dev).long()
    sup_hists = class_histograms(sup_labels, ts.num_classes, 1, keep_background=True)
    unsup_stream: list[int] = []
    iters = len(ts.sup) // bs
    epoch_times, losses = [], []
    bar = tqdm(range(cfg.epochs), desc=desc, leave=False)
    for epoch in bar:
        t_epoch = time.perf_counter()
        model.train()
        use_unsup = epoch >= cfg.sup_only_epochs and len(ts.unsup) > 0
        perm = rng.permutation(len(ts.sup))
        total = 0.0
        for it in range(iters):
            pos = perm[it * bs:(it + 1) * bs]
            imgs, labs = [], []
            for p in pos:
                i = int(ts.sup[p])
                im, lb, _ = lsa(ts.images[i], ts.labels[i], ts.comps[i], ts.backgrounds[i])
                imgs.append(im)
                labs.append(lb)
            x = torch.from_numpy(np.stack(imgs)).to(dev).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(np.stack(labs)).to(dev).long()
            x, y = light_augment(x, y, gen)
            feats = encoder(x)  # augmented images need a fresh (batched) pass
            unsup_feats = target = None
            if len(ts.unsup):  # the official loop draws an unsupervised batch in every epoch
                while len(unsup_stream) < bs:
                    pass_ = rng.permutation(ts.unsup).tolist()
                    # shuffle + drop_last, as the official loader (kept whole when there are fewer than bs)
                    unsup_stream += pass_[:len(pass_) // bs * bs] if len(pass_) >= bs else pass_
                u_idx, unsup_stream = unsup_stream[:bs], unsup_stream[bs:]
                unsup_feats = _take(train_feats, torch.as_tensor(u_idx, device=dev))
                target = sup_hists[torch.randint(len(sup_hists), (len(u_idx),), generator=gen).to(dev)]
            onehot = F.one_hot(y, ts.num_classes).permute(0, 3, 1, 2).float()
            total += train_step(model, opt, cfg, feats, onehot, unsup_feats=unsup_feats, target_hist=target,
                                use_unsup=use_unsup)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        epoch_times.append(time.perf_counter() - t_epoch)
        losses.append(total / max(iters, 1))
        if not math.isfinite(losses[-1]):
            raise NonFiniteError(f"{desc}: training diverged, the loss is {losses[-1]} at epoch {epoch} although the "
                                 f"encoder features are finite (the weights and images are fine); lower --lr "
                                 f"(now {cfg.lr:g})")
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return TrainResult(model, epoch_times, losses, train_feats)


@torch.no_grad()
def predict_from_feats(model: Segmentor, feats: dict[str, torch.Tensor], resolution: int, batch: int) -> torch.Tensor:
    """Argmax class maps (N, R, R) uint8 on the device."""
    n = next(iter(feats.values())).shape[0]
    out = [model(_take(feats, slice(s, s + batch)), resolution).argmax(1).to(torch.uint8) for s in range(0, n, batch)]
    return torch.cat(out)




# --- the model: segmentor + Patch Histogram -------------------------------------------------------------------------

@dataclass
class PatchHistPrediction(Prediction):
    label_maps: np.ndarray | None = None  # (N, R, R) uint8 argmax class maps at the model's resolution


class PatchHistModel(AnomalyModel):
    """CSAD stage 2 as one model: the component segmentor on the frozen encoder (`.segmentor`, forward
    ({"layer1", "layer3"} features, resolution) -> logits), the Patch Histogram fitted on the label maps of all
    training images (`.patch_histogram`, `.score(label_maps)`), and the validation patchhist scores that normalise
    it in fusion (`.val_scores`). Image scores: `predict`; no anomaly maps (`maps` is None), the label maps ride
    along in `PatchHistPrediction.label_maps`.

    `encoder`: an Encoder of `backbone` to share between models (its device is used; one Encoder's truncated
    pass serves all of them)."""

    method = METHOD

    def __init__(self, backbone: torch.nn.Module, cfg: SegmentorConfig | None = None, *, device: Any = "cpu",
                 encoder: Encoder | None = None):
        if encoder is not None and encoder.extractor.backbone is not backbone:
            raise ValueError("the encoder wraps another backbone than `backbone`")
        self.cfg = cfg if cfg is not None else SegmentorConfig()
        self.encoder = encoder if encoder is not None else Encoder(backbone, device)
        self.device = self.encoder.device
        self.segmentor: Segmentor | None = None
        self.patch_histogram: PatchHistogram | None = None
        self.val_scores: np.ndarray | None = None
        self.history: dict[str, Any] = {}  # fit's diagnostics: epoch times, losses, set sizes
        self.meta: dict[str, Any] = {}  # the provenance record of the checkpoint it was loaded from
        self.last_img_s = 0.0  # predict's throughput: encoder + head + argmax, no image decoding

    # --- settings read by other code (predict.py, FusedCSAD, CSADModel) ---
    @property
    def backbone(self) -> torch.nn.Module:
        return self.encoder.extractor.backbone

    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    @property
    def batch_size(self) -> int:
        """Images per forward pass in inference (cfg.eval_batch)."""
        return self.cfg.eval_batch

    @batch_size.setter
    def batch_size(self, n: int) -> None:
        self.cfg = replace(self.cfg, eval_batch=int(n))

    @property
    def num_classes(self) -> int:
        self._require_fitted()
        return self.segmentor.num_classes

    def _require_fitted(self) -> None:
        if self.segmentor is None or self.patch_histogram is None:
            raise RuntimeError("PatchHistModel: call fit() or load a checkpoint first")

    # --- fit ---
    def fit(self, train: Sequence[Image.Image], *, labels: PseudoLabels, validation: Sequence[Image.Image] | None = None,
            seed: int, desc: str = "segmentor") -> "PatchHistModel":
        """Train the segmentor on `labels` (the pseudo-labels of `train`), fit the Patch Histogram on the label maps
        of all training images (un-augmented) and normalise it with those of `validation` (the training images
        when there is none, with a warning). `desc` prefixes logs and progress bars (e.g. the category)."""
        cfg, r = self.cfg, self.cfg.resolution
        images, sizes = images_uint8(train, r, desc=f"{desc} train images")
        ts = build_training_set(images, labels, cfg, sizes=sizes)
        log.info("%s: %d supervised + %d unsupervised training images, %d classes, %dx%d, %d epochs", desc,
                 len(ts.sup), len(ts.unsup), ts.num_classes, r, r, cfg.epochs)
        res = train_segmentor(ts, self.encoder, cfg, seed=seed, desc=f"{desc} segmentor")
        self.segmentor = res.model
        # Patch Histogram: all training images (the cached un-augmented features), normalised with validation.
        train_maps = predict_from_feats(res.model, res.train_feats, r, cfg.eval_batch)
        del res.train_feats
        ph = PatchHistogram(ts.num_classes).fit(train_maps)
        if validation is not None and len(validation):
            val_maps, _ = self._label_maps(validation, desc=f"{desc} validation", dtype="fp32")
        else:  # no validation split: the training images stand in for the normalisation statistics
            log.warning("%s: no validation split, normalising with training-image statistics", desc)
            val_maps = train_maps
        self.val_scores = ph.set_validation(val_maps)
        self.patch_histogram = ph
        self.history = {"epoch_times": res.epoch_times, "losses": res.losses, "num_classes": ts.num_classes,
                        "sup": len(ts.sup), "unsup": len(ts.unsup)}
        return self

    # --- inference ---
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """ImageNet-normalised (B, 3, R, R) batch on the device (bilinear resize, no padding)."""
        transform = imagenet_transform((self.resolution, self.resolution))
        return torch.stack([transform(_rgb(images[i])) for i in range(len(images))]).to(self.device)

    @torch.no_grad()
    def forward_networks(self, batch: torch.Tensor) -> torch.Tensor:
        """Encoder + segmentor head on a preprocessed batch: logits (B, C, R, R)."""
        self._require_fitted()
        with reduced_precision(self.cfg.dtype, self.device):
            return self.segmentor(self.encoder.extractor(batch), self.resolution)

    @torch.no_grad()
    def label_maps_from_features(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Argmax class maps (B, R, R) uint8 on the features' device from backbone features holding "layer1" and
        "layer3" (one backbone pass can feed other heads too)."""
        self._require_fitted()
        with reduced_precision(self.cfg.dtype, self.device):
            logits = self.segmentor({k: feats[k] for k in ENCODER_LAYERS}, self.resolution)
        return logits.argmax(1).to(torch.uint8)

    def score_label_maps(self, label_maps: torch.Tensor | np.ndarray) -> np.ndarray:
        """float64 patchhist scores of (N, R, R) class maps."""
        self._require_fitted()
        return np.asarray(self.patch_histogram.score(torch.as_tensor(label_maps)), np.float64)

    @torch.no_grad()
    def _label_maps(self, images: Sequence[Image.Image], *, desc: str, dtype: str) -> tuple[torch.Tensor, float]:
        """(N, R, R) uint8 class maps on the device, and the compute seconds (encoder + head + argmax)."""
        r = self.resolution
        out, compute = [torch.empty((0, r, r), dtype=torch.uint8, device=self.device)], 0.0
        for idx in tqdm(batched(len(images), self.cfg.eval_batch), desc=desc, leave=False):
            x = self.preprocess([images[i] for i in idx])
            t0 = time.perf_counter()
            with reduced_precision(dtype, self.device):
                logits = self.segmentor(self.encoder.extractor(x), r)
            out.append(logits.argmax(1).to(torch.uint8))
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            compute += time.perf_counter() - t0
        return torch.cat(out), compute

    def predict(self, images: Sequence[Image.Image], *, desc: str = "predict") -> PatchHistPrediction:
        """patchhist scores (float64) and label maps of `images`, in batches of cfg.eval_batch."""
        self._require_fitted()
        maps, compute = self._label_maps(images, desc=desc, dtype=self.cfg.dtype)
        self.last_img_s = len(images) / max(compute, 1e-9)
        return PatchHistPrediction(scores=self.score_label_maps(maps), maps=None, label_maps=maps.cpu().numpy())

    # --- checkpoint ---
    def checkpoint(self) -> dict:
        """Segmentor state + its network config ("state_dict", "config": what models.segmentor.load_segmentor
        reads), the full SegmentorConfig, the Patch Histogram, the validation scores, and the backbone state for
        random weights. Add the provenance record with save(path, segmentor_meta(...))."""
        self._require_fitted()
        name = getattr(self.backbone, "backbone_name", type(self.backbone).__name__)
        return {"state_dict": {k: v.detach().cpu() for k, v in self.segmentor.state_dict().items()},
                "config": self.segmentor.config(name, self.resolution), "segmentor_config": asdict(self.cfg),
                "patch_histogram": self.patch_histogram.state(),
                "val_scores": torch.from_numpy(np.array(self.val_scores, dtype=np.float64)),
                **backbone_state_if_random(self.backbone)}

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping, *, device: Any = "cpu", backbone: torch.nn.Module | None = None,
                        weights: str | Path | None = None) -> "PatchHistModel":
        """The fitted model. `backbone`: an already built backbone to share (it must be the one the checkpoint
        was made with); else it is rebuilt (models.backbones.load_backbone, `weights` or the default file)."""
        fix = "re-create it with train_segmentor.py for this category"
        if "state_dict" in ckpt and "patch_histogram" not in ckpt:
            raise CheckpointError(f"this segmentor checkpoint holds no Patch Histogram (an older version kept it in "
                                  f"*_patchhist_params.npz); {fix}")
        missing = [k for k in ("state_dict", "config", "segmentor_config", "patch_histogram", "val_scores")
                   if k not in ckpt]
        if missing:
            raise CheckpointError(f"not a segmentor checkpoint (no {', '.join(missing)}); {fix}")
        if backbone is None:
            backbone = backbone_from_checkpoint(ckpt, weights=weights)
        else:
            _check_shared_backbone(ckpt, backbone)
        known = {f.name for f in fields(SegmentorConfig)}
        model = cls(backbone, SegmentorConfig(**{k: v for k, v in ckpt["segmentor_config"].items() if k in known}),
                    device=device)
        net = ckpt["config"]
        if tuple(net["in_channels"]) != tuple(model.encoder.channels):
            raise CheckpointError(f"the segmentor takes {tuple(net['in_channels'])} layer1/layer3 channels, the "
                                  f"backbone gives {model.encoder.channels}; {fix}")
        seg = Segmentor(net["num_classes"], net["in_channels"])
        seg.load_state_dict(dict(ckpt["state_dict"]))
        model.segmentor = seg.to(model.device).eval()
        model.patch_histogram = PatchHistogram.from_state(ckpt["patch_histogram"], fix=fix)
        model.val_scores = ckpt["val_scores"].numpy().astype(np.float64)
        model.meta = dict(ckpt.get(META_KEY) or {})
        return model

    @classmethod
    def load(cls, path: str | Path, *, device: Any = "cpu", expected: Mapping | None = None, fix: str = "",
             allow_unfinished: bool = False, **kwargs) -> "PatchHistModel":
        """AnomalyModel.load; a problem inside the checkpoint names the file too."""
        try:
            return super().load(path, device=device, expected=expected, fix=fix, allow_unfinished=allow_unfinished,
                                **kwargs)
        except CheckpointError as exc:
            if str(path) in str(exc):
                raise
            raise CheckpointError(f"{path}: {exc}") from None


def _check_shared_backbone(ckpt: Mapping, backbone: torch.nn.Module) -> None:
    """A passed-in backbone must be the checkpoint's: same name and weights (by sha256, or by the stored state for
    random weights)."""
    from common.provenance import RANDOM

    meta = ckpt.get(META_KEY) or {}
    check_backbone(meta, backbone, role="shared", fix="pass the backbone built with those weights")
    if meta.get("weights_sha256") == RANDOM and BACKBONE_STATE_KEY in ckpt:
        if not holds_state(backbone, ckpt[BACKBONE_STATE_KEY]):
            raise CheckpointError("the checkpoint was made with other random backbone weights than the shared "
                                  "backbone's; pass backbone=None to rebuild them from the checkpoint")


def segmentor_meta(backbone: torch.nn.Module, cfg: SegmentorConfig, *, dataset: str, category: str,
                   train_samples: Sequence[Any], seed: int | None = None) -> dict:
    """The checkpoint record of a finished run (common.checkpoints.checkpoint_meta); its config leaves out the
    inference-only settings, so --test-only may change them."""
    extra = {} if seed is None else {"seed": seed}
    return checkpoint_meta(method=METHOD, dataset=dataset, category=category, model=backbone,
                           config=model_config(cfg), train_samples=train_samples, finished=True, **extra)


# --- outputs ----------------------------------------------------------------------------------------------------

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0]], np.uint8)


def colorize(label_map: np.ndarray) -> np.ndarray:
    """Class map -> BGR image for cv2 (palette repeats after 16 classes)."""
    return PALETTE[label_map.astype(np.int64) % len(PALETTE)][..., ::-1]


def write_test_segmentation(category: str, masks_root, samples: Sequence[Any], maps: np.ndarray | torch.Tensor) -> Path:
    """{masks_root}/{category}/test_seg_output/{defect_type}_{stem}.png: colour class maps, as the official code."""
    out_dir = layout.masks_dir(category, masks_root) / "test_seg_output"
    for s, m in zip(samples, np.asarray(maps.cpu() if isinstance(maps, torch.Tensor) else maps)):
        layout.write_png(out_dir / f"{s.defect_type}_{s.stem}.png", colorize(m))
    return out_dir
