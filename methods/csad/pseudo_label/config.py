"""CSAD stage-1 settings: `PseudoLabelConfig` holds every setting shared by the categories, with the official
Tokichan/CSAD values as its defaults (one place) and a `fast()` preset; configs/csad_pseudo_label.json holds what
is per category (prompts, thresholds, MeanShift bandwidth, ...) and may override any PseudoLabelConfig field for
its category. Precedence: PseudoLabelConfig() or .fast(), then the category's entry, then explicit flags."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

from common.config import opt
from common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "csad_pseudo_label.json"
SAM_MODELS = ("vit_h", "vit_l", "vit_b", "vit_tiny")
AMG_PREFIX = "amg_"


class PseudoLabelError(UserError, RuntimeError):
    """A stage-1 problem the user must fix; the message says what and how."""


@dataclass
class PseudoLabelConfig:
    """Stage-1 settings shared by every category (official values; per-category entries may override them)."""
    # models (official `grounding_segmentation` / `segmentation`: Grounding DINO SwinT-OGC, HQ-SAM vit_h)
    sam_model: str = opt("vit_h", "HQ-SAM architecture", choices=SAM_MODELS)
    grounding_ckpt: str | None = opt(None, "Grounding DINO SwinT-OGC file (unset: <ckpt-dir>/groundingdino_swint_"
                                           "ogc.pth); 'tiny': tiny random model", type=str, metavar="FILE")
    sam_ckpt: str | None = opt(None, "HQ-SAM file (unset: <ckpt-dir>/sam_hq_<model>.pth); 'tiny': tiny random model; "
                                     "'random': the --sam-model architecture with random weights", type=str,
                               metavar="FILE")
    # Grounding DINO input (grounded_sam.py: T.RandomResize([800], max_size=1333))
    grounding_short_side: int = opt(800, "Grounding DINO input short side")
    grounding_max_size: int = opt(1333, "Grounding DINO input longest side at most")
    # SAM automatic mask generator (hard-coded in the official `segmentation`; its YAML sam_config is not read)
    amg_points_per_side: int = opt(32, "SAM AMG points per side")
    amg_points_per_batch: int = opt(16, "SAM AMG points per batch")
    amg_pred_iou_thresh: float = opt(0.88, "SAM AMG predicted-IoU threshold")
    amg_stability_score_thresh: float = opt(0.96, "SAM AMG stability-score threshold")
    amg_stability_score_offset: float = opt(1.0, "SAM AMG stability-score offset")
    amg_box_nms_thresh: float = opt(0.7, "SAM AMG box NMS threshold")
    amg_crop_n_layers: int = opt(1, "SAM AMG crop layers")
    amg_crop_nms_thresh: float = opt(0.7, "SAM AMG cross-crop NMS threshold")
    amg_crop_overlap_ratio: float = opt(512 / 1500, "SAM AMG crop overlap ratio")
    amg_crop_n_points_downscale_factor: int = opt(1, "SAM AMG points downscale factor per crop layer")
    amg_min_mask_region_area: int = opt(500, "SAM AMG: holes and islands below this many pixels are removed")
    # instances (official filter_small_masks / merge_masks threshold 0.001)
    min_instance_fraction: float = opt(0.001, "instances must cover more than this share of the image")
    # descriptors (models/component_feature_extractor.py: target_size=65, num_rotation=60)
    crop_size: int = opt(65, "side of the aligned component crop")
    n_rotations: int = opt(60, "rotations averaged per component descriptor")
    max_batch: int = opt(1024, "crops per backbone forward (memory bound; no effect on the result)")
    # clustering (official ClassHistogram; reduce_dim / proj_dim / max_hyper from configs/class_histogram/*.yaml)
    reduce_dim: bool = opt(True, "random projection of the descriptors before MeanShift")
    proj_dim: int = opt(512, "random projection output size")
    bandwidth: float | None = opt(None, "MeanShift bandwidth (official max_hyper); unset: the category's value in "
                                        "--config", type=float)
    bandwidth_retries: int = opt(0, "double the bandwidth up to this many times when no cluster or class survives "
                                    "(random descriptors have no calibrated scale)")
    small_cluster_fraction: float = opt(0.5, "clusters need at least this many members per training image")
    hdbscan_min_fraction: float = opt(0.1, "HDBSCAN min_cluster_size as a share of the training images")
    select_fraction: float = opt(0.5, "share of an HDBSCAN cluster's size taken as supervised images")
    min_class_area: float = opt(0.001, "classes need a larger mean area share over the main HDBSCAN mode")

    @classmethod
    def fast(cls, **over) -> "PseudoLabelConfig":
        """Same code path, smaller: tiny random Grounding DINO / HQ-SAM, small inputs, few points and rotations.
        Random models' quality scores are meaningless, so every AMG mask is kept (thresholds 0)."""
        return cls(**{"grounding_ckpt": "tiny", "sam_ckpt": "tiny", "grounding_short_side": 128,
                      "grounding_max_size": 256, "amg_points_per_side": 4, "amg_pred_iou_thresh": 0.0,
                      "amg_stability_score_thresh": 0.0, "n_rotations": 8, "bandwidth_retries": 10, **over})

    def amg_params(self) -> dict:
        """Keyword arguments of segment_anything's SamAutomaticMaskGenerator."""
        params = {f.name[len(AMG_PREFIX):]: getattr(self, f.name) for f in fields(self)
                  if f.name.startswith(AMG_PREFIX)}
        return {**params, "output_mode": "binary_mask"}  # segment.py reads the masks as arrays


@dataclass
class CategoryConfig:
    """One category's entry (official configs/class_histogram/<category>.yaml) and its resolved settings."""
    category: str
    text_prompt: str
    background_prompt: str
    box_threshold: float
    text_threshold: float
    use_grounding_filter: bool
    no_sam: bool
    filter_hist: bool
    filter_by_combine: bool
    settings: PseudoLabelConfig


CATEGORY_KEYS = tuple(f.name for f in fields(CategoryConfig) if f.name not in ("category", "settings"))
SETTING_KEYS = tuple(f.name for f in fields(PseudoLabelConfig))
REQUIRED_KEYS = (*CATEGORY_KEYS, "bandwidth")  # every official YAML sets max_hyper
_POSITIVE = ("grounding_short_side", "grounding_max_size", "amg_points_per_side", "amg_points_per_batch",
             "crop_size", "n_rotations", "max_batch", "proj_dim", "bandwidth")
_SHARES = ("min_instance_fraction", "small_cluster_fraction", "hdbscan_min_fraction", "select_fraction",
           "min_class_area", "box_threshold", "text_threshold")


_TYPES = {"str": str, "float": float, "bool": bool, "int": int}


def _expected_type(name: str) -> type:
    """The Python type of a key's value: CategoryConfig's annotation, or the setting's declared type / default."""
    if name in CATEGORY_KEYS:
        return _TYPES[{f.name: f for f in fields(CategoryConfig)}[name].type]
    f = {f.name: f for f in fields(PseudoLabelConfig)}[name]
    return f.metadata.get("type") or type(f.default)


def _typed(name: str, value, where: str):
    """JSON value -> the key's type (an int is accepted for a float); anything else is refused naming the fix."""
    want = _expected_type(name)
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if want in (str, bool) and isinstance(value, want):
        return value
    raise PseudoLabelError(f"{where}: '{name}' must be a JSON {want.__name__}, got {json.dumps(value)}; fix the value")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise PseudoLabelError(f"config not found: {path} (restore configs/csad_pseudo_label.json from git)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PseudoLabelError(f"{path} is not valid JSON ({exc}); fix the file") from None
    except OSError as exc:
        raise PseudoLabelError(f"cannot read config {path} ({exc.strerror}); fix its permissions") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("categories", {}), dict):
        raise PseudoLabelError(f"{path} must be a JSON object with a 'categories' object; see "
                               "configs/csad_pseudo_label.json")
    extra = sorted(set(raw) - {"_doc", "categories"})
    if extra:
        raise PseudoLabelError(f"{path}: top-level key(s) {extra} are not read; shared stage-1 settings are the "
                               "defaults of pseudo_label.py (see --help): put a per-category value into that "
                               "category's entry, or pass the flag")
    return raw


def _check_ranges(cfg: CategoryConfig, where: str, explicit: set[str]) -> None:
    values = {**dataclasses.asdict(cfg.settings), **{k: getattr(cfg, k) for k in CATEGORY_KEYS}}

    def origin(name: str) -> str:
        return f"--{name.replace('_', '-')}" if name in explicit else f"{where}: '{name}'"

    for name in _POSITIVE:
        if values[name] is not None and not values[name] > 0:
            raise PseudoLabelError(f"{origin(name)} must be > 0, got {values[name]}; fix the value")
    for name in _SHARES:
        if not 0 <= values[name] <= 1:
            raise PseudoLabelError(f"{origin(name)} must lie in [0, 1], got {values[name]}; fix the value")


def load_config(category: str, path: str | os.PathLike | None = None, *, base: PseudoLabelConfig | None = None,
                explicit: Iterable[str] = ()) -> CategoryConfig:
    """The category's entry of `path` (default configs/csad_pseudo_label.json) on top of `base` (default
    PseudoLabelConfig()); settings named in `explicit` (flags given on the command line) keep base's value."""
    path = Path(path or DEFAULT_CONFIG)
    cats = _read(path).get("categories", {})
    if category not in cats:
        raise PseudoLabelError(f"no stage-1 settings for category '{category}' in {path}; add an entry (known: "
                               f"{', '.join(sorted(cats))})")
    entry = cats[category]
    where = f"{path}, entry '{category}'"
    if not isinstance(entry, dict):
        raise PseudoLabelError(f"{path}: the entry for '{category}' must be a JSON object of settings")
    unknown = set(entry) - set(CATEGORY_KEYS) - set(SETTING_KEYS)
    if unknown:
        raise PseudoLabelError(f"{path}: unknown key(s) {sorted(unknown)} for '{category}'; valid: "
                               f"{sorted(CATEGORY_KEYS)} and the stage-1 settings {sorted(SETTING_KEYS)}")
    missing = set(REQUIRED_KEYS) - set(entry)
    if missing:
        raise PseudoLabelError(f"{path}: the entry for '{category}' lacks {sorted(missing)}; add them")
    if "sam_model" in entry and entry["sam_model"] not in SAM_MODELS:
        raise PseudoLabelError(f"{where}: 'sam_model' must be one of {', '.join(SAM_MODELS)}")
    values = {k: _typed(k, v, where) for k, v in entry.items()}
    keep = set(explicit)
    over = {k: v for k, v in values.items() if k in SETTING_KEYS and k not in keep}
    settings = dataclasses.replace(base if base is not None else PseudoLabelConfig(), **over)
    cfg = CategoryConfig(category=category, settings=settings, **{k: values[k] for k in CATEGORY_KEYS})
    _check_ranges(cfg, where, keep)
    return cfg


def prompt_words(path: str | os.PathLike | None = None) -> list[str]:
    """Every word of every category's prompts in the config file, sorted: the tiny BERT's vocabulary. Built from
    the whole file, never from the categories of one run, so that a category's --fast result does not depend on
    which other categories run with it (the vocabulary fixes the token ids and the random embedding draws)."""
    path = Path(path or DEFAULT_CONFIG)
    cats = json.loads(path.read_text()).get("categories", {}) if path.is_file() else {}
    words = set()
    for name in cats:
        cfg = load_config(name, path)
        words.update((cfg.text_prompt + " " + cfg.background_prompt).replace(".", " ").split())
    return sorted(words)


def background_terms(prompt: str, official: bool = False) -> list[str]:
    """Pieces of the background prompt tested for substring membership in a predicted phrase.

    Fixed (default): pieces are whitespace-stripped, so pushpins' " container ." matches "container(0.35)".
    official=True keeps the unstripped pieces (" container " practically never matches, so the released
    pseudo-labels have no grounding background for pushpins). Empty pieces never count in either mode.
    """
    pieces = prompt.split(".")
    return [p for p in pieces if p] if official else [p.strip() for p in pieces if p.strip()]


def is_background_phrase(phrase: str, terms: list[str]) -> bool:
    phrase = phrase.replace(" - ", "-")
    return any(t in phrase for t in terms)
