"""The sample record every reader returns, and checked image/mask loading."""
from __future__ import annotations

from common.errors import UserError

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

GOOD = "good"
LOGICAL = "logical_anomalies"
STRUCTURAL = "structural_anomalies"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPG", ".JPEG", ".PNG")  # .JPEG: tiny-imagenet
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # compared lower-cased


class DatasetError(UserError, RuntimeError):
    """A dataset problem the user must fix; the message names the path and the fix."""


@dataclass(frozen=True)
class Sample:
    path: str
    split: str  # train | validation | test
    defect_type: str = GOOD  # "good" or the defect folder name under test/
    mask_paths: tuple[str, ...] = ()  # LOCO: one PNG per defect; MVTec AD style: one mask

    @property
    def label(self) -> int:
        return int(self.defect_type != GOOD)

    @property
    def stem(self) -> str:
        return Path(self.path).stem


@dataclass
class CategoryData:
    dataset: str
    category: str
    root: Path  # the category folder
    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]
    defects_config: list[dict] | None = None  # MVTec LOCO only
    extra: dict = field(default_factory=dict)

    @property
    def is_loco(self) -> bool:
        return self.defects_config is not None

    def score_groups(self) -> dict[str, list[Sample]]:
        """The image lists behind each score file, in file order.

        LOCO: "logi" = test/good + logical, "struc" = test/good + structural (each only if present),
        "val" = validation/good. Other datasets: "test" = the whole test split, "val" if a validation split exists.
        """
        groups: dict[str, list[Sample]] = {}
        if self.is_loco:
            good = [s for s in self.test if s.defect_type == GOOD]
            for key, kind in (("logi", LOGICAL), ("struc", STRUCTURAL)):
                anomalous = [s for s in self.test if s.defect_type == kind]
                if anomalous:
                    groups[key] = good + anomalous
        else:
            groups["test"] = list(self.test)
        if self.validation:
            groups["val"] = list(self.validation)
        return groups


def list_images(folder: Path) -> list[Path]:
    """Sorted image files of a folder (sorted: the official codes rely on OS order, which differs)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES and not p.name.startswith("."))


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise DatasetError(f"cannot list folder {folder} ({exc.strerror}); fix its permissions") from None


class Ignored:
    """What a reader saw under a category folder but did not take; reported in one warning line per category."""

    def __init__(self, cat_dir: Path):
        self.cat_dir = Path(cat_dir)
        self.items: list[str] = []

    def add(self, path: Path, why: str = "") -> None:
        rel = path.relative_to(self.cat_dir).as_posix() + ("/" if path.is_dir() else "")
        self.items.append(rel + (f" ({why})" if why else ""))

    def extra_entries(self, folder: Path, keep: set[str]) -> None:
        """Every visible entry of `folder` whose name is not in `keep` (e.g. files directly in train/)."""
        if folder.is_dir():
            for p in _entries(folder):
                if not p.name.startswith(".") and p.name not in keep:
                    self.add(p)


def take_images(folder: Path, ignored: Ignored, numbered: bool = False) -> list[Path]:
    """The images of one folder, sorted; everything else goes to `ignored`.

    Taken: visible files with an image suffix (any case); with `numbered`, only all-digit stems (MVTec AD / LOCO
    name their images 000.png ...). Of files whose stems differ only in case or suffix ('000.png', '000.PNG',
    '000.jpg') only one is taken, the one with the folder's most common suffix (then the first in sorted order):
    score files and masks are keyed by stem. Hidden files (.DS_Store) are skipped without a word.
    """
    candidates = []
    for p in _entries(folder):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            ignored.add(p, "folder")
        elif p.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored.add(p, "not an image")
        elif numbered and not p.stem.isdigit():
            ignored.add(p, "not a numbered image")
        else:
            candidates.append(p)
    suffixes = [p.suffix for p in candidates]
    # sorted(set(...)): max() keeps the first of equal keys, so ties resolve the same way in every run
    common = max(sorted(set(suffixes)), key=lambda x: (suffixes.count(x), x == x.lower())) if suffixes else ""
    by_stem: dict[str, list[Path]] = {}
    for p in candidates:
        by_stem.setdefault(p.stem.lower(), []).append(p)
    taken = []
    for group in by_stem.values():
        keep = next((p for p in group if p.suffix == common), group[0])
        taken.append(keep)
        for p in group:
            if p is not keep:
                ignored.add(p, f"duplicate of {keep.name}")
    return sorted(taken)


_WARNED: set = set()


def warn_ignored(data: "CategoryData") -> None:
    """One warning line per category (once per process) listing what its reader did not take."""
    items = data.extra.get("ignored") or []
    key = (str(data.root), tuple(items))
    if not items or key in _WARNED:
        return
    _WARNED.add(key)
    shown = ", ".join(items[:5]) + (f", ... ({len(items) - 5} more)" if len(items) > 5 else "")
    logging.getLogger("dataset_readers").warning(
        "warning: %s/%s: ignored %d entr%s outside the reader's layout under %s: %s (see docs/datasets.md)",
        data.dataset, data.category, len(items), "y" if len(items) == 1 else "ies", data.root, shown)


def require_dir(path: Path, what: str, fix: str = "check --data-root and the dataset layout in the README") -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path} ({fix})")
    return path


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": how older PIL opens 16-bit greyscale PNGs


def _to_8bit(im: Image.Image, path: str | Path, keep_labels: bool = False) -> Image.Image:
    """16-bit greyscale -> 8-bit "L" by value * 255 / 65535. PIL's own convert() clips instead, which turns a
    16-bit photo all white. PIL already reduces 16-bit RGB(A) PNG/TIFF to its high byte (floor(v / 256), within 1
    of the scaled value), so only the greyscale modes need this. keep_labels (masks): a 16-bit mask whose values
    all fit in 8 bits holds labels (0/255, pixel values of defects_config.json) and is kept as it is."""
    if im.mode not in SIXTEEN_BIT_MODES and im.mode != "F":
        return im
    arr = np.asarray(im).astype(np.float64)
    if not np.isfinite(arr).all():
        raise DatasetError(f"image {path} holds NaN/Inf pixels; re-export it as an 8- or 16-bit PNG")
    if im.mode == "F":  # float images: only the [0, 1] convention is unambiguous
        if arr.min() < 0 or arr.max() > 1:
            raise DatasetError(f"image {path} is a float image with values outside [0, 1] ({arr.min():g}.."
                               f"{arr.max():g}); re-export it as an 8- or 16-bit PNG")
        arr = arr * 255.0
    elif arr.min() < 0 or arr.max() > 65535:
        raise DatasetError(f"image {path} has {im.mode} pixel values outside 0..65535; re-export it as an 8- or "
                           "16-bit PNG")
    elif not (keep_labels and arr.max() <= 255):
        arr = arr * (255.0 / 65535.0)
    return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")


def load_image(path: str | Path, mode: str = "RGB", keep_labels: bool = False) -> Image.Image:
    """Decode an image fully so that corrupt files fail here with their path; 16-bit images become 8-bit by
    scaling (see _to_8bit)."""
    try:
        with Image.open(path) as im:
            im.load()
            return _to_8bit(im, path, keep_labels).convert(mode)
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise DatasetError(f"{path} is a folder, not an image; remove or rename it") from None
    except PermissionError:
        raise DatasetError(f"cannot read image {path} (permission denied); fix its permissions") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path} ({exc}); re-download or remove the file") from None


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask as uint8 (H, W) with its original pixel values; `size` = (W, H) it must have."""
    im = load_image(path, mode="L", keep_labels=True)
    if size is not None and im.size != tuple(size):
        raise DatasetError(f"mask {path} is {im.size[0]}x{im.size[1]} but its image is {size[0]}x{size[1]}; "
                           "masks must have the image's size")
    return np.asarray(im, dtype=np.uint8)


def image_size(path: str | Path) -> tuple[int, int]:
    """(W, H) from the header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path} ({exc}); re-download or remove the file") from None


def load_sample_masks(sample: Sample) -> list[np.ndarray]:
    """The sample's ground-truth masks, each checked against the image size."""
    if not sample.mask_paths:
        return []
    size = image_size(sample.path)
    return [load_mask(p, size) for p in sample.mask_paths]


def union_mask(sample: Sample) -> np.ndarray:
    """Binary (H, W) union of all masks; all-zero for a good image."""
    masks = load_sample_masks(sample)
    if not masks:
        w, h = image_size(sample.path)
        return np.zeros((h, w), dtype=bool)
    return np.logical_or.reduce([m > 0 for m in masks])
