"""benchmark_performance.py's logic: read every score file present, fuse branches, compute the metrics, write tables.

Experiments per category:
- each family's branches and every non-empty subset of them (CSAD: patchhist, LGST; SINBAD: its per-level files
  sinbad_L{level}); single-branch methods (sinbad ensemble, glass, patchcore, sapatchcore, mean_image) alone;
- cross-method combinations given with --pairs, e.g. "CSAD+SINBAD" or "patchhist+LGST+sinbad".
A combination of several branches sums their trimmed-z-normalised scores (evaluation.fusion.fuse); one branch is
used as it is (the normalisation is affine, AUROC does not change).
Outputs (in --out-dir): score_combine_result.txt (CSAD format), benchmark_{dataset}.csv / .md / .json, each
headed by how it was made (dataset, root, categories, per method the backbone + weights hash, settings, seed,
commit), taken from the run records in the score files' JSON indexes. In the txt and csv these are '# ' lines
(read_csv skips them).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from common import atomic_write_json, atomic_write_text, get_logger
from common import provenance as P
from common.errors import UserError
from dataset_readers import (DATASETS, CategoryData, DatasetError, dataset_root, list_categories, read_category,
                             union_mask)
from evaluation import metrics as M
from evaluation.fusion import fuse, subsets
from evaluation.score_files import (ScoreFileError, anomaly_map_path, load_anomaly_map, load_score_file, safe_category,
                                    score_path)

LOG = get_logger("benchmark")
PAPER_RESULTS = Path(__file__).with_name("paper_results.json")
CSAD_BRANCHES = ("patchhist", "LGST")
SINBAD_LEVEL = re.compile(r"^sinbad_L(\d+)$")
# Names usable in --pairs for a whole family.
ALIASES = {"CSAD": CSAD_BRANCHES, "SINBAD": ("sinbad",), "GLASS": ("glass",), "PatchCore": ("patchcore",),
           "SA-PatchCore": ("sapatchcore",)}
LOCO_KINDS = (("logi", "logical_anomalies"), ("struc", "structural_anomalies"))


class BenchmarkError(UserError):
    """Something the benchmark was asked for was refused or skipped (raised after the tables are written)."""


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
    # Given explicitly by the user: then a method without score files, or a category without any, is a failure.
    # The defaults ("every method / category there is") only report what is absent.
    explicit_methods: bool = False
    explicit_categories: bool = False
    requested_categories: Sequence[str] = ()


@dataclass
class Row:
    category: str
    experiment: tuple[str, ...]
    values: dict[str, float] = field(default_factory=dict)  # fractions in [0, 1]
    official_json: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)  # group -> (scores, labels) evaluated, for the ROC figure

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


def pair_combo(pair: str) -> tuple[str, ...]:
    """'CSAD+SINBAD' -> ('patchhist', 'LGST', 'sinbad'): families expanded, duplicates dropped."""
    branches: list[str] = []
    for part in pair.split("+"):
        branches += list(ALIASES.get(part, (part,)))
    return tuple(dict.fromkeys(branches))


def experiments(category: str, methods: Sequence[str], pairs: Sequence[str], score_dir: Path) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    csad = [b for b in CSAD_BRANCHES if b in methods]
    out += subsets(csad)
    if "sinbad" in methods:
        out += subsets(sinbad_levels(category, score_dir))
    out += [(m,) for m in methods if m not in CSAD_BRANCHES and (m,) not in out]
    for pair in pairs:
        combo = pair_combo(pair)
        if combo not in out:
            out.append(combo)
    return out


# --------------------------------------------------------------------------------------------- score loading

class Scores:
    """Loads each branch's groups once per category; a missing or refused file is logged once and remembered.

    `problems` collects what was refused or skipped (the exit status and the closing summary), `records` the run
    record of every score file read, per branch (the tables' provenance)."""

    def __init__(self, data: CategoryData, cfg: "Config", problems: list[str], records: dict[str, list],
                 warnings: list[str] | None = None):
        self.data, self.cfg, self.score_dir, self.problems, self.records = data, cfg, cfg.score_dir, problems, records
        self.warnings = warnings if warnings is not None else []
        self.groups = data.score_groups()
        self.cache: dict[str, dict[str, np.ndarray] | None] = {}
        self.paths: dict[str, dict[str, Path]] = {}

    def branch(self, name: str) -> dict[str, np.ndarray] | None:
        if name not in self.cache:
            self.cache[name] = self._load(name)
        return self.cache[name]

    def _load(self, name: str) -> dict[str, np.ndarray] | None:
        cat = self.data.category
        out, recs, paths = {}, [], {}
        for group, samples in self.groups.items():
            path = score_path(cat, name, group, self.score_dir)
            if not path.is_file():
                if group == "val":
                    continue  # only fusion needs it; checked there
                msg = f"skip {name}/{cat}: no score file {path}"
                if self.cfg.explicit_methods and name in self.cfg.methods:
                    msg = f"SKIPPED {name}/{cat}: no score file {path} (run the {name} script for {cat})"
                    self.problems.append(msg)
                LOG.info(msg)
                return None
            try:
                out[group], index = load_score_file(cat, name, group, samples=samples, score_dir=self.score_dir,
                                                    dataset=self.cfg.dataset)
            except ScoreFileError as exc:
                msg = f"REFUSED {name}/{cat}: {exc}"
                LOG.error(msg)
                self.problems.append(msg)
                return None
            recs.append(index["run"])
            paths[group] = path
        self.records.setdefault(name, []).extend(recs)
        self.paths[name] = paths
        return out


# --------------------------------------------------------------------------------------------- metrics

def _experiment_scores(scores: Scores, combo: tuple[str, ...], group: str) -> np.ndarray | None:
    branches = [scores.branch(b) for b in combo]
    if any(b is None for b in branches):
        return None
    if len(combo) == 1:
        return branches[0][group]
    if any("val" not in b for b in branches):
        msg = (f"skip {'+'.join(combo)}/{scores.data.category}: fusion needs validation score files (group 'val') "
               f"for every branch; missing for {', '.join(n for n, b in zip(combo, branches) if 'val' not in b)}")
        if "val" in scores.groups:  # the dataset has a validation split, so the method should have written it
            msg = "SKIPPED " + msg[len("skip "):] + " (re-run those methods)"
            scores.problems.append(msg)
        LOG.info(msg)
        return None
    return fuse({n: b[group] for n, b in zip(combo, branches)}, {n: b["val"] for n, b in zip(combo, branches)})


def _check_constant(scores: Scores, combo: tuple[str, ...], group: str, s: np.ndarray) -> None:
    """Every image with the same score gives AUROC 50 whatever the labels: a broken run, not a result."""
    if len(s) and np.ptp(s) == 0:
        name, cat = "+".join(combo), scores.data.category
        files = ", ".join(str(scores.paths.get(b, {}).get(group, b)) for b in combo)
        msg = (f"WARNING {name}/{cat}/{GROUP_NAMES.get(group, group)}: constant scores (every image {s[0]:.6g}), "
               f"so its AUROC of 50 means nothing; check the run that wrote {files}")
        LOG.warning(msg)
        scores.warnings.append(msg)


GROUP_NAMES = {"logi": "logical", "struc": "structural", "test": "test"}


def _load_maps(method: str, data: CategoryData, score_dir: Path) -> dict[str, np.ndarray] | None:
    missing = [s for s in data.test if not anomaly_map_path(method, data.category, s, score_dir).is_file()]
    if missing:
        if len(missing) < len(data.test):
            LOG.info("no localisation for %s/%s: %d of %d maps missing (first: %s)", method, data.category,
                     len(missing), len(data.test), anomaly_map_path(method, data.category, missing[0], score_dir))
        return None
    from dataset_readers.base import image_size

    maps = {}
    for s in data.test:
        m = maps[s.path] = load_anomaly_map(method, data.category, s, score_dir)
        path = anomaly_map_path(method, data.category, s, score_dir)
        w, h = image_size(s.path)  # the header only
        if m.shape != (h, w):
            raise ScoreFileError(f"{path} is {m.shape[1]}x{m.shape[0]} but its image {s.path} is {w}x{h}; maps must "
                                 f"be at the original image size (re-run {method}, it writes them so)")
        if not np.isfinite(m).all():
            raise ScoreFileError(f"{path} holds NaN or inf; re-run {method}")
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
            _check_constant(scores, combo, group, s)
            auc = M.image_auroc(s, labels)
        row.curves[group] = (s, labels)
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
        _check_constant(scores, combo, "test", s)
    row.curves["test"] = (s, labels)
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
    if not entry or not isinstance(entry, dict):
        return None
    return entry.get("mean") if category is None else (entry.get("categories") or {}).get(category)


@dataclass
class Provenance:
    """How the tables were made: the run records of every score file read, per branch."""
    dataset: str
    data_root: str | None
    categories: Sequence[str]
    records: dict[str, list]

    @property
    def random(self) -> bool:
        return P.any_random(self.records)

    @property
    def title_suffix(self) -> str:
        return f" — {P.RANDOM_TITLE}" if self.random else ""

    def title(self, what: str) -> str:
        return what + self.title_suffix

    def lines(self) -> list[str]:
        return P.summary_lines(self.dataset, self.data_root, self.categories, self.records)

    def caption(self) -> str:
        """The figures' caption: the same lines, joined."""
        return "\n".join(([P.RANDOM_TITLE] if self.random else []) + self.lines())

    def as_json(self) -> dict:
        return {"title": self.title(f"benchmark {self.dataset}"), "random_weights": self.random,
                "lines": self.lines(), "dataset": self.dataset, "data_root": self.data_root,
                "categories": list(self.categories), "commit": P.git_commit(), "runs": {
                    m: list({json.dumps(r, sort_keys=True): r for r in recs}.values()) for m, recs in self.records.items()}}


class PaperRule:
    """A published value is shown only where the dataset and protocol are the paper's (else the column is blank
    and the table says why): the paper's dataset; a category row only on that category's full official test set
    (both LOCO subsets); the Mean row only over all the paper's categories; full settings (not --fast), real
    weights, the paper's image score (not --official-image-score)."""

    def __init__(self, cfg: Config, rows: list[Row], prov: Provenance, test_sets: dict[str, dict[str, int]]):
        self.paper = load_paper(cfg.dataset)
        protocol = self.paper.get("_protocol", {})
        self.test_images = protocol.get("test_images", {})
        self.cfg, self.prov, self.test_sets = cfg, prov, test_sets
        try:
            self.official = list(protocol.get("categories") or list_categories(cfg.dataset))
        except DatasetError:
            self.official = []
        self.reasons: list[str] = []

    def _note(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def _category_ok(self, category: str) -> str | None:
        counts = self.test_sets.get(category, {})
        if self.cfg.dataset in LOCO_DATASETS and not {"logi", "struc"} <= counts.keys():
            return f"{category} lacks a logical or structural test subset"
        want = self.test_images.get(category)
        if want is not None and counts.get("test") != want:
            return f"{category} has {counts.get('test')} test images, the official test set {want}"
        return None

    def value(self, r: Row) -> float | None:
        is_mean = r.category.startswith("Mean")
        v = paper_value(self.paper, r.name, None if is_mean else r.category)
        if v is None:
            return None
        recs = [x for b in r.experiment for x in self.prov.records.get(b, [])]
        if self.cfg.official_image_score:
            self._note("--official-image-score is not the papers' image score")
            return None
        if any(x is not None and P.is_random(x) for x in recs):
            self._note("random weights")
            return None
        if any(x is not None and x.get("fast") for x in recs):
            self._note("--fast runs")
            return None
        cats = [c for c in self.cfg.categories] if is_mean else [r.category]
        if is_mean and (r.category != "Mean" or sorted(cats) != sorted(self.official)):
            self._note(f"the Mean is over {', '.join(cats)}, the paper's over all {len(self.official)} categories")
            return None
        for c in cats:
            bad = self._category_ok(c)
            if bad:
                self._note(bad + " (not the paper's protocol)")
                return None
        return v / 100


LOCO_DATASETS = ("mvtec_loco",)


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


def read_csv(path: str | Path) -> list[list[str]]:
    """Rows of a benchmark CSV (header first), without its '# ' provenance lines."""
    return [l.split(",") for l in Path(path).read_text().splitlines() if l and not l.startswith("#")]


def write_outputs(rows: list[Row], cfg: Config, is_loco: bool, prov: Provenance | None = None,
                  test_sets: dict[str, dict[str, int]] | None = None) -> dict[str, Path]:
    out = Path(cfg.out_dir)
    prov = prov or Provenance(cfg.dataset, cfg.data_root, cfg.categories, {})
    rule = PaperRule(cfg, rows, prov, test_sets or {})
    cols = columns(is_loco, cfg.limits)
    means = mean_rows(rows, cfg.categories)
    table = rows + means
    title = prov.title(f"Benchmark: {cfg.dataset}")
    comment = [f"# {title}"] + [f"# {l}" for l in prov.lines()]

    # score_combine_result.txt, CSAD format: one block per category, AUROC x100 with 3 decimals (after the
    # '# ' provenance lines).
    lines = list(comment)
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

    paper_cells = {id(r): _fmt(rule.value(r)) for r in table}
    paper_note = ("paper: the published value, shown only where the dataset and protocol are the paper's"
                  + (f"; left blank here because of: {'; '.join(rule.reasons)}" if rule.reasons else ""))

    header = ["category", "experiment"] + cols + ["paper"]
    csv_lines = comment + [f"# {paper_note}", ",".join(header)]
    for r in table:
        csv_lines.append(",".join([r.category, r.name] + [_fmt(r.values.get(c)) for c in cols] + [paper_cells[id(r)]]))
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
    md = [f"## {title}", ""] + [f"- {l}" for l in prov.lines()] + [""]
    md += ["| category | experiment | " + " | ".join(titles[c] for c in md_cols) + " | paper |",
           "|---|---|" + "---:|" * (len(md_cols) + 1)]
    for r in table:
        cells = [_fmt(r.values.get(c)) or "–" for c in md_cols] + [paper_cells[id(r)] or "–"]
        md.append(f"| {r.category} | {r.name} | " + " | ".join(cells) + " |")
    md += ["", f"*{paper_note}.*"]
    paths["md"] = out / f"benchmark_{cfg.dataset}.md"
    atomic_write_text(paths["md"], "\n".join(md) + "\n")

    # The official metrics.json key structure, per experiment and category; how it was made under "_provenance".
    js: dict = {"_provenance": prov.as_json()}
    for r in rows:
        js.setdefault(r.name, {})[r.category] = r.official_json or {k: v for k, v in r.values.items()}
    paths["json"] = out / f"benchmark_{cfg.dataset}.json"
    atomic_write_json(paths["json"], js)
    return paths


# --------------------------------------------------------------------------------------------- driver

def _test_set(data: CategoryData) -> dict[str, int]:
    groups = data.score_groups()
    return {"test": len(data.test), **{g: len(v) for g, v in groups.items()}}


def run(cfg: Config) -> tuple[list[Row], list[str]]:
    """Evaluate every experiment found; return the rows and the refused files.

    Raises BenchmarkError (after writing the tables of what could be evaluated) when anything asked for was
    refused or skipped; its message, the last line printed, names the first cause."""
    rows: list[Row] = []
    problems: list[str] = []
    warnings: list[str] = []
    records: dict[str, list] = {}
    test_sets: dict[str, dict[str, int]] = {}
    is_loco = None
    done_categories = []
    asked_pairs = {pair_combo(p) for p in cfg.pairs}  # asked for by name: a pair that cannot be evaluated fails
    for cat in cfg.categories:
        try:
            data = read_category(cfg.dataset, cat, cfg.data_root)
        except DatasetError as exc:
            root = dataset_root(cfg.dataset, cfg.data_root) if cfg.dataset in DATASETS else None
            if not cfg.explicit_categories and root is not None and root.is_dir() and not (root / cat).exists():
                # Default list: a partial download is fine, only the categories asked for by name must be there.
                LOG.info("skip category %s: %s", cat, exc)
                continue
            msg = f"SKIPPED category {cat}: {exc}"
            LOG.error(msg)
            problems.append(msg)
            if root is None or not root.is_dir():
                break  # the same for every category: say it once
            continue
        is_loco = data.is_loco
        test_sets[cat] = _test_set(data)
        scores = Scores(data, cfg, problems, records, warnings)
        present: list[Row] = []
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
                present.append(row)
            elif combo in asked_pairs and not cfg.official_image_score:
                missing = [b for b in combo if scores.branch(b) is None]
                msg = (f"SKIPPED --pairs {'+'.join(combo)}/{cat}: "
                       + (f"no usable score files for {', '.join(missing)}" if missing else "see the lines above"))
                LOG.error(msg)
                problems.append(msg)
        if present:
            done_categories.append(cat)
        elif cfg.explicit_categories and not any(p.split(":")[0].endswith(f"/{cat}") for p in problems):
            msg = f"SKIPPED category {cat}: no score files for it in {cfg.score_dir} (run the method scripts for {cat})"
            LOG.error(msg)
            problems.append(msg)
        if cfg.figures and present:
            branches = dict.fromkeys(b for r in present for b in r.experiment)
            prov = Provenance(cfg.dataset, cfg.data_root, [cat],
                              {b: [x for x in records.get(b, [])] for b in branches})
            _figures(data, present, cfg, prov)
        LOG.info("%s: evaluated %s", cat, ", ".join(r.name for r in present) or "nothing (no score files)")
    if rows:
        cfg.categories = done_categories
        prov = Provenance(cfg.dataset, cfg.data_root, done_categories, records)
        paths = write_outputs(rows, cfg, bool(is_loco), prov, test_sets)
        print(Path(paths["md"]).read_text())
        _print_csad_summary(rows, bool(is_loco))
        LOG.info("wrote %s", ", ".join(str(p) for p in paths.values()))
        if prov.random:
            LOG.warning("%s: at least one score file comes from random backbone weights", P.RANDOM_TITLE)
    _summary(problems, warnings)
    if problems:
        raise BenchmarkError(f"{len(problems)} of the requested inputs refused or skipped"
                             f"{' (tables hold the rest)' if rows else ''}; first: {problems[0]}")
    if not test_sets:  # every default category absent: the root is the wrong folder, not a missing run
        raise BenchmarkError(f"none of the {cfg.dataset} categories ({', '.join(cfg.categories)}) found under "
                             f"{dataset_root(cfg.dataset, cfg.data_root)}; check --data-root")
    if not rows:
        raise BenchmarkError(f"no score files found in {cfg.score_dir} for {cfg.dataset} "
                             f"({', '.join(cfg.categories)}); run the method scripts first")
    return rows, problems


def _summary(problems: list[str], warnings: list[str]) -> None:
    if not problems and not warnings:
        return
    LOG.info("summary: %d refused or skipped, %d warnings", len(problems), len(warnings))
    for p in problems:
        LOG.info("  %s", p)
    for w in warnings:
        LOG.info("  %s", w)


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


def _figures(data: CategoryData, rows: list[Row], cfg: Config, prov: Provenance) -> None:
    try:
        from evaluation.figures import write_figures
        from methods.csad.label_layout import masks_dir

        seg = masks_dir(data.category, cfg.masks_root) / "test_seg_output" if cfg.masks_root else None
        methods = [r.name for r in rows if len(r.experiment) == 1]
        written = write_figures(data, methods, score_dir=cfg.score_dir, out_dir=Path(cfg.out_dir) / "figures",
                                seg_dir=seg if seg is not None and seg.is_dir() else None, caption=prov.caption(),
                                title_suffix=prov.title_suffix,
                                curves={r.name: r.curves for r in rows})
        LOG.info("%s: %d figures under %s", data.category, len(written), Path(cfg.out_dir) / "figures")
    except Exception as exc:  # figures are a convenience; never lose the tables over them
        LOG.warning("WARNING %s: figures skipped (%s: %s)", data.category, type(exc).__name__, exc)
