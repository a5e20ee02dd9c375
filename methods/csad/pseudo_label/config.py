"""Per-category stage-1 settings, read from configs/csad_pseudo_label.json (one table, no code branches)."""
from __future__ import annotations

from common.errors import UserError

import json
import os
from dataclasses import MISSING, dataclass, field, fields
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PseudoLabelError(f"{path} is not valid JSON ({exc}); fix the file") from None
    except OSError as exc:
        raise PseudoLabelError(f"cannot read config {path} ({exc.strerror}); fix its permissions") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("categories", {}), dict):
        raise PseudoLabelError(f"{path} must be a JSON object with a 'categories' object; see "
                               "configs/csad_pseudo_label.json")
    cats = raw.get("categories", {})
    if category not in cats:
        raise PseudoLabelError(f"no stage-1 settings for category '{category}' in {path}; add an entry (known: "
                               f"{', '.join(sorted(cats))})")
    names = {f.name for f in fields(CategoryConfig)} - {"category", "common", "sam_amg"}
    entry = cats[category]
    if not isinstance(entry, dict):
        raise PseudoLabelError(f"{path}: the entry for '{category}' must be a JSON object of settings")
    unknown = set(entry) - names
    if unknown:
        raise PseudoLabelError(f"{path}: unknown key(s) {sorted(unknown)} for '{category}'; valid: {sorted(names)}")
    required = {f.name for f in fields(CategoryConfig) if f.default is MISSING and f.default_factory is MISSING}
    missing = required - {"category"} - set(entry)
    if missing:
        raise PseudoLabelError(f"{path}: the entry for '{category}' lacks {sorted(missing)}; add them")
    for key in ("common", "sam_amg"):
        if not isinstance(raw.get(key, {}), dict):
            raise PseudoLabelError(f"{path}: '{key}' must be a JSON object")
    return CategoryConfig(category=category, common=dict(raw.get("common", {})), sam_amg=dict(raw.get("sam_amg", {})),
                          **entry)


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
