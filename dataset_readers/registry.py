"""Dataset names -> reader, default root and category list. One entry point for every script."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from .base import CategoryData, DatasetError, warn_ignored
from .mvtec_ad import MPDD_CATEGORIES, MVTEC_AD_CATEGORIES, MVTEC_TEXTURES, WFDD_CATEGORIES, read_mvtec_ad
from .mvtec_loco import LOCO_CATEGORIES, read_mvtec_loco
from .visa import VISA_CATEGORIES, read_visa

REPO_ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC_CATEGORIES = ("synth_box", "synth_bottle")


@dataclass(frozen=True)
class DatasetInfo:
    reader: Callable[..., CategoryData]
    default_root: str  # relative to the repository
    categories: tuple[str, ...]  # empty: discovered from the folder
    url: str


def _mad_categories(prefixes: tuple[str, ...], classes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{p}/{c}" for p in prefixes for c in classes)


DATASETS: dict[str, DatasetInfo] = {
    "synthetic_loco": DatasetInfo(partial(read_mvtec_loco, dataset="synthetic_loco"), "datasets/synthetic_loco",
                                  SYNTHETIC_CATEGORIES, "generate it: python -m dataset_readers.synthetic_loco"),
    "mvtec_loco": DatasetInfo(read_mvtec_loco, "datasets/mvtec_loco_anomaly_detection", LOCO_CATEGORIES,
                              "https://www.mvtec.com/company/research/datasets/mvtec-loco"),
    "mvtec_ad": DatasetInfo(partial(read_mvtec_ad, numbered=True), "datasets/mvtec_anomaly_detection", MVTEC_AD_CATEGORIES,
                            "https://www.mvtec.com/company/research/datasets/mvtec-ad"),
    "visa": DatasetInfo(read_visa, "datasets/VisA_20220922", VISA_CATEGORIES,
                        "https://github.com/amazon-science/spot-diff"),
    "mpdd": DatasetInfo(partial(read_mvtec_ad, dataset="mpdd"), "datasets/mpdd", MPDD_CATEGORIES,
                        "https://github.com/stepanje/MPDD"),
    "wfdd": DatasetInfo(partial(read_mvtec_ad, dataset="wfdd"), "datasets/wfdd", WFDD_CATEGORIES,
                        "https://github.com/cqylunlun/GLASS (WFDD link in its README)"),
    "mad_man": DatasetInfo(partial(read_mvtec_ad, dataset="mad_man", require_train=False), "datasets/MAD-man",
                           _mad_categories(tuple(f"Person_{i}" for i in range(1, 6)), MVTEC_AD_CATEGORIES),
                           "https://github.com/cqylunlun/GLASS (MAD link in its README)"),
    "mad_sys": DatasetInfo(partial(read_mvtec_ad, dataset="mad_sys", require_train=False), "datasets/MAD-sys",
                           (), "https://github.com/cqylunlun/GLASS (MAD link in its README)"),
    # Any folder in MVTec AD layout, e.g. CAD-SD laid out as <root>/<category>/{train/good,test/...,ground_truth/...};
    # defect types without a ground_truth folder are image-level only (CAD-SD has no masks).
    "folder": DatasetInfo(partial(read_mvtec_ad, dataset="folder", require_masks=False), "datasets/custom", (),
                          "your own data"),
}


def dataset_root(dataset: str, root: str | os.PathLike | None = None) -> Path:
    info = _info(dataset)
    return Path(root) if root is not None else REPO_ROOT / info.default_root


def list_categories(dataset: str, root: str | os.PathLike | None = None) -> list[str]:
    info = _info(dataset)
    if info.categories:
        return list(info.categories)
    base = dataset_root(dataset, root)
    if not base.is_dir():
        raise DatasetError(f"dataset root not found: {base} (get it from {info.url})")
    if dataset == "mad_sys":
        return [f"{b.name}/{c.name}" for b in sorted(base.iterdir()) if b.is_dir() for c in sorted(b.iterdir()) if c.is_dir()]
    return sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith((".", "fg_mask", "split_csv")))


def read_category(dataset: str, category: str, root: str | os.PathLike | None = None) -> CategoryData:
    """Read one category; errors name the missing path, an unknown category lists the valid ones."""
    info = _info(dataset)
    base = dataset_root(dataset, root)
    if not base.is_dir():
        raise DatasetError(f"dataset root not found: {base} (get {dataset} from {info.url}, or pass --data-root)")
    known = list_categories(dataset, root)
    if category not in known:
        raise DatasetError(f"unknown category '{category}' for {dataset}; choose from: {', '.join(known)}")
    data = info.reader(base, category)
    warn_ignored(data)
    return data


def _info(dataset: str) -> DatasetInfo:
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset '{dataset}'; choose from: {', '.join(DATASETS)}")
    return DATASETS[dataset]


__all__ = ["DATASETS", "SYNTHETIC_CATEGORIES", "MVTEC_TEXTURES", "dataset_root", "list_categories", "read_category"]
