"""The sample record every reader returns, and checked image/mask loading."""
from __future__ import annotations

from common.errors import UserError

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

GOOD = "good"
LOGICAL = "logical_anomalies"
STRUCTURAL = "structural_anomalies"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPG", ".PNG")


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


def require_dir(path: Path, what: str, fix: str = "check --data-root and the dataset layout in the README") -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path} ({fix})")
    return path


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decode an image fully so that corrupt files fail here with their path."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"cannot read image {path} ({exc}); re-download or remove the file") from None


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask as uint8 (H, W) with its original pixel values; `size` = (W, H) it must have."""
    im = load_image(path, mode="L")
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
