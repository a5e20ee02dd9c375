"""Per-category stage-1 settings, read from configs/csad_pseudo_label.json (one table, no code branches)."""
from __future__ import annotations

from common.errors import UserError

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "csad_pseudo_label.json"


class PseudoLabelError(UserError, RuntimeError):
    """A stage-1 problem the user must fix; the message says what and how."""


@dataclass
class CategoryConfig:
    category: str
    text_prompt: str
    background_prompt: str
    box_threshold: float
    text_threshold: float
    use_grounding_filter: bool
    no_sam: bool
    bandwidth: float
    filter_hist: bool
    filter_by_combine: bool = True
    common: dict = field(default_factory=dict)
    sam_amg: dict = field(default_factory=dict)


def load_config(category: str, path: str | os.PathLike | None = None) -> CategoryConfig:
    path = Path(path or DEFAULT_CONFIG)
    if not path.is_file():
        raise PseudoLabelError(f"config not found: {path} (restore configs/csad_pseudo_label.json from git)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PseudoLabelError(f"{path} is not valid JSON ({exc}); fix the file") from None
    cats = raw.get("categories", {})
    if category not in cats:
        raise PseudoLabelError(f"no stage-1 settings for category '{category}' in {path}; add an entry (known: "
                               f"{', '.join(sorted(cats))})")
    names = {f.name for f in fields(CategoryConfig)} - {"category", "common", "sam_amg"}
    entry = cats[category]
    unknown = set(entry) - names
    if unknown:
        raise PseudoLabelError(f"{path}: unknown key(s) {sorted(unknown)} for '{category}'; valid: {sorted(names)}")
    return CategoryConfig(category=category, common=dict(raw.get("common", {})), sam_amg=dict(raw.get("sam_amg", {})),
                          **entry)


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
