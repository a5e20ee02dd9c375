"""benchmark_performance.py's logic: read every score file present, fuse branches, compute the metrics, write tables.

Experiments per category:
- each family's branches and every non-empty subset of them (CSAD: patchhist, LGST; SINBAD: its per-level files
  sinbad_L{level}); single-branch methods (sinbad ensemble, glass, patchcore, sapatchcore, mean_image) alone;
- cross-method combinations given with --pairs, e.g. "CSAD+SINBAD" or "patchhist+LGST+sinbad".
A combination of several branches sums their trimmed-z-normalised scores (evaluation.fusion.fuse); one branch is
used as it is (the normalisation is affine, AUROC does not change).
Outputs (in --out-dir): score_combine_result.txt (CSAD format), benchmark_{dataset}.csv / .md / .json.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from common import atomic_write_json, atomic_write_text, get_logger
from dataset_readers import CategoryData, DatasetError, read_category, union_mask
from evaluation import metrics as M
from evaluation.fusion import fuse, subsets
from evaluation.score_files import ScoreFileError, anomaly_map_path, load_anomaly_map, load_scores, safe_category, score_path

LOG = get_logger("benchmark")
PAPER_RESULTS = Path(__file__).with_name("paper_results.json")
CSAD_BRANCHES = ("patchhist", "LGST")
SINBAD_LEVEL = re.compile(r"^sinbad_L(\d+)$")
# Names usable in --pairs for a whole family.
ALIASES = {"CSAD": CSAD_BRANCHES, "SINBAD": ("sinbad",), "GLASS": ("glass",), "PatchCore": ("patchcore",),
           "SA-PatchCore": ("sapatchcore",)}
LOCO_KINDS = (("logi", "logical_anomalies"), ("struc", "structural_anomalies"))


@dataclass
class Config:
    dataset: str
    data_root: str | None
    categories: Sequence[str]
    methods: Sequence[str]
    score_dir: Path
    out_dir: Path
    pairs: Sequence[str] = ()
    official_image_score: bool = False
    maps: bool = True
    figures: bool = True
    masks_root: str | None = None
    spro_limit: float = M.SPRO_HEADLINE_LIMIT
    limits: Sequence[float] = M.SPRO_LIMITS


@dataclass
class Row:
    category: str
    experiment: tuple[str, ...]
    values: dict[str, float] = field(default_factory=dict)  # fractions in [0, 1]
    official_json: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "+".join(self.experiment)


# --------------------------------------------------------------------------------------------- experiments

def sinbad_levels(category: str, score_dir: Path) -> list[str]:
    """Per-level SINBAD score files present for a category, by level."""
    safe = safe_category(category)
    names = set()
    for p in Path(score_dir).glob(f"{safe}_sinbad_L*_*_score.npy"):
        m = re.match(rf"^{re.escape(safe)}_(sinbad_L\d+)_[a-z]+_score\.npy$", p.name)
        if m:
            names.add(m.group(1))
    return sorted(names, key=lambda n: int(SINBAD_LEVEL.match(n).group(1)))


def experiments(category: str, methods: Sequence[str], pairs: Sequence[str], score_dir: Path) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    csad = [b for b in CSAD_BRANCHES if b in methods]
    out += subsets(csad)
    if "sinbad" in methods:
        out += subsets(sinbad_levels(category, score_dir))
    out += [(m,) for m in methods if m not in CSAD_BRANCHES and (m,) not in out]
    for pair in pairs:
        branches: list[str] = []
        for part in pair.split("+"):
            branches += list(ALIASES.get(part, (part,)))
        combo = tuple(dict.fromkeys(branches))
        if combo not in out:
            out.append(combo)
    return out


# --------------------------------------------------------------------------------------------- score loading

class Scores:
    """Loads each branch's groups once per category; a missing or refused file is logged once and remembered."""

    def __init__(self, data: CategoryData, score_dir: Path, problems: list[str]):
        self.data, self.score_dir, self.problems = data, score_dir, problems
        self.groups = data.score_groups()
        self.cache: dict[str, dict[str, np.ndarray] | None] = {}

    def branch(self, name: str) -> dict[str, np.ndarray] | None:
        if name not in self.cache:
            self.cache[name] = self._load(name)
        return self.cache[name]

    def _load(self, name: str) -> dict[str, np.ndarray] | None:
        cat = self.data.category
        out = {}
        for group, samples in self.groups.items():
            path = score_path(cat, name, group, self.score_dir)
            if not path.is_file():
                if group == "val":
                    continue  # only fusion needs it; checked there
                LOG.info("skip %s/%s: no score file %s", name, cat, path)
                return None
            try:
                out[group] = load_scores(cat, name, group, samples, self.score_dir)
            except ScoreFileError as exc:
                msg = f"REFUSED {name}/{cat}: {exc}"
                LOG.error(msg)
                self.problems.append(msg)
                return None
        return out


# --------------------------------------------------------------------------------------------- metrics

def _experiment_scores(scores: Scores, combo: tuple[str, ...], group: str) -> np.ndarray | None:
    branches = [scores.branch(b) for b in combo]
    if any(b is None for b in branches):
        return None
    if len(combo) == 1:
        return branches[0][group]
    if any("val" not in b for b in branches):
        LOG.info("skip %s/%s: fusion needs validation score files (group 'val') for every branch",
                 "+".join(combo), scores.data.category)
        return None
    return fuse({n: b[group] for n, b in zip(combo, branches)}, {n: b["val"] for n, b in zip(combo, branches)})


def _load_maps(method: str, data: CategoryData, score_dir: Path) -> dict[str, np.ndarray] | None:
    missing = [s for s in data.test if not anomaly_map_path(method, data.category, s, score_dir).is_file()]
    if missing:
        if len(missing) < len(data.test):
            LOG.info("no localisation for %s/%s: %d of %d maps missing (first: %s)", method, data.category,
                     len(missing), len(data.test), anomaly_map_path(method, data.category, missing[0], score_dir))
        return None
    maps = {s.path: load_anomaly_map(method, data.category, s, score_dir) for s in data.test}
    bad = [k for k, m in maps.items() if not np.isfinite(m).all()]
    if bad:
        raise ScoreFileError(f"NaN/inf in the anomaly map of {bad[0]} ({method}); re-run {method}")
    return maps


def evaluate_loco(data: CategoryData, combo: tuple[str, ...], scores: Scores, cfg: Config) -> Row | None:
    row = Row(data.category, combo)
    maps = _load_maps(combo[0], data, cfg.score_dir) if (len(combo) == 1 and (cfg.maps or cfg.official_image_score)) else None
    if cfg.official_image_score and maps is None:
        LOG.info("skip %s/%s in --official-image-score mode: it needs the TIFF maps", row.name, data.category)
        return None
    official = {}
    for group, kind in LOCO_KINDS:
        if group not in scores.groups:
            continue
        samples = scores.groups[group]
        labels = np.array([s.label for s in samples])
        if cfg.official_image_score:
            s = np.array([maps[x.path].max() for x in samples])
            auc = M.official_loco_image_auroc(s, labels)
        else:
            s = _experiment_scores(scores, combo, group)
            if s is None:
                return None
            auc = M.image_auroc(s, labels)
        row.values[f"auroc_{group}"] = auc
        official[kind] = auc
    if {"auroc_logi", "auroc_struc"} <= row.values.keys():
        row.values["auroc_mean"] = official["mean"] = 0.5 * (row.values["auroc_logi"] + row.values["auroc_struc"])
    row.official_json = {"classification": {"auc_roc": official}}
    if maps is not None and cfg.maps:
        sp = M.loco_spro(maps, data.test, data.defects_config, cfg.limits)
        short = {"logical_anomalies": "logi", "structural_anomalies": "struc", "mean": "mean"}
        for kind, by_limit in sp.items():
            for lim, v in by_limit.items():
                row.values[f"spro{lim:g}_{short[kind]}"] = v
        row.official_json["localization"] = {"auc_spro": {k: {str(lim): v for lim, v in d.items()} for k, d in sp.items()}}
    return row


def evaluate_flat(data: CategoryData, combo: tuple[str, ...], scores: Scores, cfg: Config) -> Row | None:
    row = Row(data.category, combo)
    samples = scores.groups["test"]
    labels = np.array([s.label for s in samples])
    maps = _load_maps(combo[0], data, cfg.score_dir) if (len(combo) == 1 and (cfg.maps or cfg.official_image_score)) else None
    if cfg.official_image_score:
        if maps is None:
            LOG.info("skip %s/%s in --official-image-score mode: it needs the TIFF maps", row.name, data.category)
            return None
        s = np.array([maps[x.path].max() for x in samples])
    else:
        s = _experiment_scores(scores, combo, "test")
        if s is None:
            return None
    row.values["image_auroc"] = M.image_auroc(s, labels)
    row.values["f1_max"] = M.f1_max(s, labels)
    if maps is not None and cfg.maps:
        stack = [maps[x.path] for x in samples]
        masks = [union_mask(x) for x in samples]
        row.values["pixel_auroc"] = M.pixel_auroc(stack, masks)
        row.values["aupro"] = M.aupro(stack, masks)
    return row


# --------------------------------------------------------------------------------------------- output

def load_paper(dataset: str) -> dict:
    return json.loads(PAPER_RESULTS.read_text()).get(dataset, {})


def paper_value(paper: dict, experiment: str, category: str | None) -> float | None:
    entry = paper.get(experiment)
    if not entry:
        return None
    return entry.get("mean") if category is None else entry.get("categories", {}).get(category)


def columns(is_loco: bool, limits: Sequence[float]) -> list[str]:
    if is_loco:
        cols = ["auroc_logi", "auroc_struc", "auroc_mean"]
        cols += [f"spro{lim:g}_{k}" for lim in limits for k in ("logi", "struc", "mean")]
        return cols
    return ["image_auroc", "pixel_auroc", "aupro", "f1_max"]


def mean_rows(rows: list[Row], categories: Sequence[str]) -> list[Row]:
    """One "Mean" row per experiment: the mean over the categories where it was evaluated."""
    out = []
    for name in dict.fromkeys(r.name for r in rows):
        mine = [r for r in rows if r.name == name]
        keys = set().union(*(r.values for r in mine))
        values = {k: float(np.mean([r.values[k] for r in mine if k in r.values])) for k in keys}
        label = "Mean" if len(mine) == len(categories) else f"Mean ({len(mine)}/{len(categories)})"
        out.append(Row(label, mine[0].experiment, values))
    return out


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.3f}"


def write_outputs(rows: list[Row], cfg: Config, is_loco: bool) -> dict[str, Path]:
    out = Path(cfg.out_dir)
    paper = load_paper(cfg.dataset)
    cols = columns(is_loco, cfg.limits)
    means = mean_rows(rows, cfg.categories)
    table = rows + means

    # score_combine_result.txt, CSAD format: one block per category, AUROC x100 with 3 decimals.
    lines = []
    for cat in cfg.categories:
        mine = [r for r in rows if r.category == cat]
        if not mine:
            continue
        lines.append(f"{cat.upper()}:")
        for r in mine:
            keys = ("auroc_logi", "auroc_struc") if is_loco else ("image_auroc",)
            lines.append(f"{r.experiment!r} AUC: " + " ".join(_fmt(r.values.get(k)) or "-" for k in keys))
    paths = {"txt": out / "score_combine_result.txt"}
    atomic_write_text(paths["txt"], "\n".join(lines) + "\n")

    def paper_of(r: Row) -> float | None:
        v = paper_value(paper, r.name, None if r.category.startswith("Mean") else r.category)
        return None if v is None else v / 100

    header = ["category", "experiment"] + cols + ["paper"]
    csv_lines = [",".join(header)]
    for r in table:
        csv_lines.append(",".join([r.category, r.name] + [_fmt(r.values.get(c)) for c in cols] + [_fmt(paper_of(r))]))
    paths["csv"] = out / f"benchmark_{cfg.dataset}.csv"
    atomic_write_text(paths["csv"], "\n".join(csv_lines) + "\n")

    # Markdown: the headline columns only (all limits are in the CSV).
    lim = f"{cfg.spro_limit:g}"
    md_cols = (["auroc_logi", "auroc_struc", "auroc_mean", f"spro{lim}_logi", f"spro{lim}_struc", f"spro{lim}_mean"]
               if is_loco else cols)
    titles = {"auroc_logi": "AUROC logical", "auroc_struc": "AUROC structural", "auroc_mean": "AUROC mean",
              f"spro{lim}_logi": f"sPRO@{lim} logical", f"spro{lim}_struc": f"sPRO@{lim} structural",
              f"spro{lim}_mean": f"sPRO@{lim} mean", "image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC",
              "aupro": "AU-PRO@0.3", "f1_max": "F1-max"}
    if cfg.official_image_score:
        titles = {k: (v + " (official)" if k.startswith(("auroc", "image")) else v) for k, v in titles.items()}
    md = ["| category | experiment | " + " | ".join(titles[c] for c in md_cols) + " | paper |",
          "|---|---|" + "---:|" * (len(md_cols) + 1)]
    for r in table:
        cells = [_fmt(r.values.get(c)) or "–" for c in md_cols] + [_fmt(paper_of(r)) or "–"]
        md.append(f"| {r.category} | {r.name} | " + " | ".join(cells) + " |")
    paths["md"] = out / f"benchmark_{cfg.dataset}.md"
    atomic_write_text(paths["md"], "\n".join(md) + "\n")

    # The official metrics.json key structure, per experiment and category.
    js: dict = {}
    for r in rows:
        js.setdefault(r.name, {})[r.category] = r.official_json or {k: v for k, v in r.values.items()}
    paths["json"] = out / f"benchmark_{cfg.dataset}.json"
    atomic_write_json(paths["json"], js)
    return paths


# --------------------------------------------------------------------------------------------- driver

def run(cfg: Config) -> tuple[list[Row], list[str]]:
    """Evaluate every experiment found; return the rows and the refused files."""
    rows: list[Row] = []
    problems: list[str] = []
    is_loco = None
    done_categories = []
    for cat in cfg.categories:
        try:
            data = read_category(cfg.dataset, cat, cfg.data_root)
        except DatasetError as exc:
            LOG.info("skip category %s: %s", cat, exc)
            continue
        is_loco = data.is_loco
        done_categories.append(cat)
        scores = Scores(data, cfg.score_dir, problems)
        present = []
        for combo in experiments(cat, cfg.methods, cfg.pairs, cfg.score_dir):
            evaluate = evaluate_loco if data.is_loco else evaluate_flat
            try:
                row = evaluate(data, combo, scores, cfg)
            except (M.MetricError, ScoreFileError, DatasetError) as exc:
                msg = f"REFUSED {'+'.join(combo)}/{cat}: {exc}"
                LOG.error(msg)
                problems.append(msg)
                continue
            if row is not None:
                rows.append(row)
                present.append(row.name)
        if cfg.figures and present:
            _figures(data, [r for r in present if "+" not in r], cfg)
        LOG.info("%s: evaluated %s", cat, ", ".join(present) or "nothing (no score files)")
    if not rows:
        LOG.info("no score files found in %s for %s; run the method scripts first", cfg.score_dir, cfg.dataset)
        return rows, problems
    cfg.categories = done_categories
    paths = write_outputs(rows, cfg, bool(is_loco))
    print(Path(paths["md"]).read_text())
    _print_csad_summary(rows, bool(is_loco))
    LOG.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    for p in problems:
        LOG.info("problem: %s", p)
    return rows, problems


def _print_csad_summary(rows: list[Row], is_loco: bool) -> None:
    """The closing lines of the CSAD benchmark: mean logical, mean structural and the average of all numbers."""
    if not is_loco:
        return
    for name in dict.fromkeys(r.name for r in rows):
        logi = [r.values["auroc_logi"] for r in rows if r.name == name and "auroc_logi" in r.values]
        struc = [r.values["auroc_struc"] for r in rows if r.name == name and "auroc_struc" in r.values]
        if logi and struc:
            print(f"{name}: mean logical AUC {100 * np.mean(logi):.3f}, mean structural AUC {100 * np.mean(struc):.3f}, "
                  f"Average AUC {100 * np.mean(logi + struc):.3f}")


def _figures(data: CategoryData, methods: list[str], cfg: Config) -> None:
    try:
        from evaluation.figures import write_figures
        from methods.csad.label_layout import masks_dir

        seg = masks_dir(data.category, cfg.masks_root) / "test_seg_output" if cfg.masks_root else None
        written = write_figures(data, methods, cfg.score_dir, Path(cfg.out_dir) / "figures",
                                seg if seg is not None and seg.is_dir() else None)
        LOG.info("%s: %d figures under %s", data.category, len(written), Path(cfg.out_dir) / "figures")
    except Exception as exc:  # figures are a convenience; never lose the tables over them
        LOG.info("%s: figures skipped (%s)", data.category, exc)
