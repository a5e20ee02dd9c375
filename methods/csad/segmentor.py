"""CSAD stage 2 (`Tokichan/CSAD train_segmentor.py`, `models/segmentation/`): data, LSA copy-paste, losses and the training loop of the component segmentor, and
the Patch-Histogram scoring that follows it."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_fill_holes
from tqdm import tqdm

from common import get_logger
from common.checkpoints import META_KEY, checkpoint_meta
from dataset_readers import CategoryData, Sample, image_size, load_image
from methods.knn import NonFiniteError, require_finite, weights_cause
from dataset_readers.torch_data import IMAGENET_MEAN, IMAGENET_STD, imagenet_transform, make_loader
from methods.csad import label_layout as layout
from methods.csad.patch_histogram import PatchHistogram, class_histograms
from models.feature_extractor import FeatureExtractor
from models.segmentor import ENCODER_LAYERS, Segmentor

log = get_logger("csad.segmentor")


@dataclass
class SegmentorConfig:
    resolution: int = 256
    epochs: int = 120
    sup_only_epochs: int = 50  # histogram + entropy terms join from this epoch
    batch_size: int = 4  # supervised and unsupervised batches each
    lr: float = 0.01
    weight_decay: float = 1e-5
    ce_weight: float = 0.5
    focal_weight: float = 10.0
    dice_weight: float = 1.0
    hist_weight: float = 10.0
    entropy_weight: float = 1.0
    ce_on_logits: bool = False  # official: CE applied to softmax outputs (double softmax); see docs
    fill_holes: bool = False  # breakfast_box and juice_bottle set it (CATEGORY_OVERRIDES)
    official_hole_fill: bool = False  # reproduce the official class-id permutation of the re-merge
    lsa_ratio: float = 1.0
    # official LSA: the component is never re-sampled, the mandatory paste happens even when no location was
    # accepted, and the pasted label map is warped bilinearly (wrong ids on its edges)
    official_lsa: bool = False
    min_distance: float = 0.2
    boundary: float = 0.1
    lsa_points: int = 10000
    lsa_attempts: int = 500
    min_aug_num: int = 1
    max_aug_num: int = 2
    weight_power: float = 0.0
    eval_batch: int = 16


FAST_OVERRIDES = dict(resolution=64, epochs=12, sup_only_epochs=6, lsa_points=2000, lsa_attempts=100)
CATEGORY_OVERRIDES = {
    "breakfast_box": dict(fill_holes=True),
    "juice_bottle": dict(fill_holes=True),
    "screw_bag": dict(min_distance=0.1),
}


def make_config(category: str, fast: bool = False, **overrides) -> SegmentorConfig:
    cfg = replace(SegmentorConfig(), **CATEGORY_OVERRIDES.get(category, {}))
    if fast:
        cfg = replace(cfg, **FAST_OVERRIDES)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


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

    def find_location(self, comp: Component, queue: list[Component], label: np.ndarray, background: np.ndarray,
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
            found = self.find_location(comp, queue, label, background, 0.5, mandatory=True)
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
            found = self.find_location(comp, queue, label, background, 0.9, mandatory=False)
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

def load_uint8(samples: list[Sample], size: int, desc: str = "load") -> np.ndarray:
    """(N, size, size, 3) uint8: bilinear resize without padding (the same pixels imagenet_transform sees)."""
    out = np.empty((len(samples), size, size, 3), np.uint8)
    for i, s in enumerate(tqdm(samples, desc=desc, leave=False)):
        out[i] = np.asarray(load_image(s.path).resize((size, size), Image.BILINEAR))
    return out


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
class TrainingSet:
    images: np.ndarray  # (N, R, R, 3) uint8, all training images in sorted order
    sup: np.ndarray  # indices of the supervised ("good") images
    unsup: np.ndarray  # the others
    labels: dict[int, np.ndarray]  # sup index -> (R, R) uint8 class map
    comps: dict[int, list[Component]] = field(default_factory=dict)
    backgrounds: dict[int, np.ndarray] = field(default_factory=dict)
    num_classes: int = 0


def build_training_set(data: CategoryData, masks_root: str | Path | None, cfg: SegmentorConfig) -> TrainingSet:
    """Read the stage-1 layout keyed by image stem (never by listing order) and resize it to the resolution."""
    cat, r = data.category, cfg.resolution
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
    good = sorted({position[stems_on_disk[int(i)]] for i in np.asarray(info["filtered_histogram_indices"])})
    sup = np.asarray(good, np.int64)
    unsup = np.asarray(sorted(set(range(len(train_stems))) - set(good)), np.int64)
    images = load_uint8(data.train, r, desc=f"{cat} train images")
    ts = TrainingSet(images, sup, unsup, {}, num_classes=k + 1)
    for i in sup:
        stem = train_stems[i]
        lab = layout.read_label_map(cat, stem, masks_root)
        w, h = image_size(data.train[i].path)
        if lab.shape != (h, w):
            raise layout.LayoutError(f"{layout.image_dir(cat, stem, masks_root) / layout.LABEL_MAP} is "
                                     f"{lab.shape[1]}x{lab.shape[0]} but {data.train[i].path} is {w}x{h}; the labels "
                                     "belong to other images, re-run pseudo_label.py")
        if lab.max() > k:
            raise layout.LayoutError(f"{layout.image_dir(cat, stem, masks_root) / layout.LABEL_MAP} has class "
                                     f"{lab.max()} > K={k}; re-run pseudo_label.py")
        lab = prepare_label(lab, r, cfg)
        ts.labels[int(i)] = lab
        inst_path = layout.image_dir(cat, stem, masks_root) / layout.REFINED
        inst = resize_nearest(layout.read_label_map(cat, stem, masks_root, layout.REFINED), r) \
            if inst_path.is_file() else layout.instance_map(lab)
        ts.comps[int(i)] = find_components(lab, inst)
        bg_path = layout.image_dir(cat, stem, masks_root) / layout.BACKGROUND
        ts.backgrounds[int(i)] = prepare_background(read_gray(bg_path), r) if bg_path.is_file() \
            else np.zeros((r, r), bool)
    if len(sup) < cfg.batch_size:
        raise layout.LayoutError(f"{cat}: only {len(sup)} supervised images in {layout.GOOD_INDICES}, the batch size "
                                 f"is {cfg.batch_size}; re-run pseudo_label.py with more training images")
    return ts


class Encoder:
    """Frozen encoder on the device: uint8 or [0,1] images -> normalised -> {layer1, layer3}."""

    def __init__(self, backbone: torch.nn.Module, device: torch.device):
        self.extractor = FeatureExtractor(backbone, list(ENCODER_LAYERS)).to(device).eval()
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
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
               onehot: torch.Tensor, unsup_feats: dict[str, torch.Tensor] | None, target_hist: torch.Tensor | None,
               use_unsup: bool) -> float:
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


def train_segmentor(ts: TrainingSet, encoder: Encoder, cfg: SegmentorConfig, seed: int = 42,
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
            total += train_step(model, opt, cfg, feats, onehot, unsup_feats, target, use_unsup)
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


@torch.no_grad()
def predict_samples(model: Segmentor, encoder: Encoder, samples: list[Sample], resolution: int, batch: int,
                    desc: str = "predict") -> tuple[torch.Tensor, float]:
    """Class maps for image files, and the compute throughput (images/s, encoder + head + argmax, no disk I/O)."""
    loader = make_loader(samples, imagenet_transform((resolution, resolution)), batch_size=batch)
    maps, compute = [], 0.0
    for x, _ in tqdm(loader, desc=desc, leave=False):
        x = x.to(encoder.device)
        t0 = time.perf_counter()
        m = model(encoder.extractor(x), resolution).argmax(1).to(torch.uint8)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        compute += time.perf_counter() - t0
        maps.append(m)
    return torch.cat(maps), len(samples) / max(compute, 1e-9)


PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0]], np.uint8)


def colorize(label_map: np.ndarray) -> np.ndarray:
    """Class map -> BGR image for cv2 (palette repeats after 16 classes)."""
    return PALETTE[label_map.astype(np.int64) % len(PALETTE)][..., ::-1]


def write_test_segmentation(category: str, masks_root, samples: list[Sample], maps: torch.Tensor) -> Path:
    out_dir = layout.masks_dir(category, masks_root) / "test_seg_output"
    for s, m in zip(samples, maps.cpu().numpy()):
        layout.write_png(out_dir / f"{s.defect_type}_{s.stem}.png", colorize(m))
    return out_dir


# --- one category, end to end ------------------------------------------------------------------------------------

def run_category(data: CategoryData, encoder: Encoder, backbone_name: str, cfg: SegmentorConfig, masks_root,
                 ckpt_dir, score_dir, seed: int = 42) -> dict:
    """Train, save the checkpoint, segment the test set, write the patchhist score files and params.
    One Encoder serves all categories (its hooks live on the shared backbone)."""
    from evaluation.score_files import save_group_scores, scores_for_samples
    from methods.csad.patch_histogram import METHOD, params_path
    from models.segmentor import save_segmentor, segmentor_path

    cat, r = data.category, cfg.resolution
    ts = build_training_set(data, masks_root, cfg)
    log.info("%s: %d supervised + %d unsupervised training images, %d classes, %dx%d, %d epochs", cat, len(ts.sup),
             len(ts.unsup), ts.num_classes, r, r, cfg.epochs)
    res = train_segmentor(ts, encoder, cfg, seed=seed, desc=f"{cat} segmentor")
    ckpt = segmentor_path(ckpt_dir, cat, r)
    # written once, after the last epoch: a killed run leaves no checkpoint
    meta = checkpoint_meta(method="segmentor", dataset=data.dataset, category=cat, model=encoder.extractor.backbone,
                           config=asdict(cfg), train_samples=data.train, finished=True, seed=seed)
    save_segmentor(ckpt, res.model, backbone_name, r, epochs=cfg.epochs, **{META_KEY: meta})
    log.info("%s: saved %s (final epoch %d, mean epoch %.2f s)", cat, ckpt, cfg.epochs, float(np.mean(res.epoch_times)))

    # Patch Histogram: fit on all training images (un-augmented, cached features), normalise with validation.
    ph = PatchHistogram(ts.num_classes).fit(predict_from_feats(res.model, res.train_feats, r, cfg.eval_batch))
    del res.train_feats
    groups: dict[str, np.ndarray] = {}
    if data.validation:
        val_maps, _ = predict_samples(res.model, encoder, data.validation, r, cfg.eval_batch, f"{cat} validation")
        groups["val"] = ph.set_validation(val_maps)
    else:  # no validation split: the training images stand in for the normalisation statistics
        log.warning("%s: no validation split, normalising with training-image statistics", cat)
        ph.set_validation(predict_from_feats(res.model, encoder.encode_uint8(ts.images, cfg.eval_batch), r,
                                             cfg.eval_batch))
    test_maps, ips = predict_samples(res.model, encoder, data.test, r, cfg.eval_batch, f"{cat} test")
    groups.update(scores_for_samples(ph.score(test_maps), data.test, data))
    paths = save_group_scores(data, METHOD, groups, score_dir)
    ph.save(params_path(score_dir, cat), meta=meta)
    seg_dir = write_test_segmentation(cat, masks_root, data.test, test_maps)
    log.info("%s: wrote %s, %s and %d test segmentations in %s; inference %.1f img/s", cat,
             ", ".join(p.name for p in paths), Path(params_path(score_dir, cat)).name, len(data.test), seg_dir, ips)
    from evaluation.metrics import group_aurocs  # for the log; benchmark_performance.py does the evaluation

    log.info("%s: patchhist image AUROC %s", cat, ", ".join(f"{g} {100 * a:.1f}%" for g, a in
                                                         group_aurocs(data, groups).items()) or "n/a (no labels)")
    return {"category": cat, "epoch_s": float(np.mean(res.epoch_times)), "infer_img_s": ips,
            "final_loss": res.losses[-1], "num_classes": ts.num_classes, "sup": len(ts.sup), "unsup": len(ts.unsup)}
