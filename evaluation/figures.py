"""Result figures, written once per run: anomaly-map overlays, ROC curves, a method comparison and CSAD segmentations.

A bounded number per method and category (default 8 images), so a full benchmark stays a few dozen files. Every
figure carries the benchmark's provenance (dataset, root, categories, per method the backbone + weights hash,
settings, seed, commit) as a caption under the panels and in the PNG's metadata (Title, Description).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.io import atomic_path
from dataset_readers.base import GOOD, CategoryData, Sample, load_image, union_mask
from evaluation.score_files import ScoreFileError, anomaly_map_path, load_anomaly_map, load_score_file, safe_category, \
    sample_key, score_path

GROUP_TITLES = {"logi": "logical", "struc": "structural", "test": "test"}
HEADLINE = "patchhist+LGST"  # CSAD's headline experiment: drawn bold in the ROC figure
MAP_CMAP = "inferno"
GT_COLOUR = "#00e5ff"  # cyan: visible on the inferno colours and on most objects


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pick_examples(samples: Sequence[Sample], n: int = 8) -> list[Sample]:
    """Evenly spread picks, a share for each defect type, good images first."""
    by_type: dict[str, list[Sample]] = {}
    for s in samples:
        by_type.setdefault(s.defect_type, []).append(s)
    types = sorted(by_type, key=lambda t: (t != GOOD, t))
    per_type = max(1, n // len(types)) if types else 0
    picked: list[Sample] = []
    for t in types:
        items = by_type[t]
        idx = np.linspace(0, len(items) - 1, min(per_type, len(items))).round().astype(int)
        picked += [items[i] for i in idx]
    return picked[:n]


def _figure(rows: int, cols: int, figsize: tuple[float, float]):
    """A constrained-layout figure: colour bars, titles and the caption get their space without overlaps."""
    plt = _plt()
    return plt.subplots(rows, cols, figsize=figsize, squeeze=False, layout="constrained")


def _save(fig, out_path: Path, title: str, caption: str, dpi: int = 90) -> Path:
    """Caption under the panels, title + caption in the PNG metadata, atomic write."""
    if caption:
        fig.supxlabel(caption, x=0.005, ha="left", fontsize=6.5, family="monospace", color="#333333")
    with atomic_path(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png",
                    metadata={"Title": title, "Description": caption, "Software": "benchmark_performance.py"})
    _plt().close(fig)
    return out_path


def _test_scores(data: CategoryData, method: str, score_dir: Path) -> dict[str, float]:
    """Image score per sample key, from the method's test-group score files (empty where none is readable)."""
    out: dict[str, float] = {}
    for g, samples in data.score_groups().items():
        if g == "val" or not score_path(data.category, method, g, score_dir).is_file():
            continue
        try:
            s, _ = load_score_file(data.category, method, g, samples=samples, score_dir=score_dir, dataset=data.dataset)
        except (ScoreFileError, FileNotFoundError):
            continue
        out.update({sample_key(x): float(v) for x, v in zip(samples, s)})
    return out


def _label_text(s: Sample) -> str:
    return "good" if not s.label else f"anomalous ({s.defect_type.replace('_anomalies', '')})"


def _panel_title(ax, s: Sample, score: float | None, prefix: str = "") -> None:
    score_txt = f"score {score:.4g}" if score is not None else "score n/a"
    ax.set_title(f"{prefix}{s.stem}: {_label_text(s)}\n{score_txt}", fontsize=7.5,
                 color="#b00020" if s.label else "#1b5e20")


def _heat(ax, m: np.ndarray, norm, cmap) -> None:
    """The map over the image, its opacity rising with the score: low scores leave the object visible."""
    rgba = cmap(norm(m))
    rgba[..., 3] = 0.75 * np.clip(norm(m), 0, 1) ** 0.8
    ax.imshow(rgba, interpolation="bilinear")


def _outline(ax, s: Sample) -> None:
    if s.mask_paths:
        gt = union_mask(s)
        if gt.any():
            ax.contour(gt.astype(float), levels=[0.5], colors=GT_COLOUR, linewidths=1.0)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR at every distinct score (ties form one step), from (0, 0) to (1, 1); numpy only."""
    labels = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each tie group
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0, fp] / max(fp[-1], 1), np.r_[0, tp] / max(tp[-1], 1)


def roc_figure(data: CategoryData, curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], out_path: Path,
               caption: str = "", title_suffix: str = "") -> Path | None:
    """One panel per test group (logical / structural, or test), one ROC curve per experiment, fused ones dashed.

    curves: experiment name -> group -> (scores, labels), the scores the benchmark evaluated."""
    from evaluation.metrics import image_auroc

    by_group: dict[str, list] = {}
    for name, groups in curves.items():
        for g, (s, labels) in groups.items():
            labels = np.asarray(labels)
            if 0 < labels.sum() < len(labels):
                fpr, tpr = roc_curve(labels, s)
                by_group.setdefault(g, []).append((name, fpr, tpr, image_auroc(s, labels)))
    if not by_group:
        return None
    fig, axes = _figure(1, len(by_group), (4.6 * len(by_group), 4.8))
    for ax, (g, items) in zip(axes[0], by_group.items()):
        for name, fpr, tpr, auc in sorted(items, key=lambda t: -t[3]):
            fused = "+" in name
            ax.plot(fpr, tpr, ls="--" if fused else "-", lw=2.4 if name == HEADLINE else 1.3,
                    label=f"{name} ({100 * auc:.1f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=f"{GROUP_TITLES.get(g, g)} (AUROC %)", xlabel="false positive rate", ylabel="true positive rate",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=6.5, loc="lower right")
    title = f"ROC — {data.category}{title_suffix}"
    fig.suptitle(title, fontsize=10)
    return _save(fig, out_path, title, caption, dpi=100)


def overlay_figure(data: CategoryData, method: str, *, score_dir: Path, out_path: Path, n: int = 8,
                   caption: str = "", title_suffix: str = "") -> Path | None:
    """Test images with the method's map (colour scale shared, colour bar) and the ground-truth outline."""
    from matplotlib import cm, colors

    examples = [s for s in pick_examples(data.test, n) if anomaly_map_path(method, data.category, s, score_dir).is_file()]
    if not examples:
        return None
    maps = [load_anomaly_map(method, data.category, s, score_dir) for s in examples]
    scores = _test_scores(data, method, score_dir)
    lo, hi = np.percentile(np.concatenate([m.ravel() for m in maps]), [1, 99.5])
    norm = colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
    plt = _plt()
    cmap = plt.get_cmap(MAP_CMAP)
    cols = min(4, len(examples))
    rows = int(np.ceil(len(examples) / cols))
    fig, axes = _figure(rows, cols, (3.0 * cols + 1.0, 3.1 * rows + 1.2))
    for ax in axes.ravel()[len(examples):]:
        ax.remove()  # no empty panels
    for ax, s, m in zip(axes.ravel(), examples, maps):
        ax.imshow(np.asarray(load_image(s.path)))
        _heat(ax, m, norm, cmap)
        _outline(ax, s)
        _panel_title(ax, s, scores.get(sample_key(s)))
        ax.axis("off")
    title = f"{method} — {data.category}{title_suffix}"
    fig.suptitle(title + "  (cyan: ground truth)", fontsize=10)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=[a for a in axes.ravel()[:len(examples)]],
                 shrink=0.8, label=f"{method} anomaly map (shared scale)")
    return _save(fig, out_path, title, caption)


def comparison_figure(data: CategoryData, methods: Sequence[str], *, score_dir: Path, out_path: Path, n: int = 4,
                      caption: str = "", title_suffix: str = "") -> Path | None:
    """Every method's map of the same images side by side: one row per image (a good one, then one per defect
    type), the image with its ground-truth outline first. Each method's column has its own colour scale (1-99.5
    percentile over the shown images), since the methods' scores have different units."""
    from matplotlib import colors

    examples = pick_examples(data.test, n)
    with_maps = [m for m in methods if "+" not in m
                 and all(anomaly_map_path(m, data.category, s, score_dir).is_file() for s in examples)]
    if not with_maps or not examples:
        return None
    plt = _plt()
    cmap = plt.get_cmap(MAP_CMAP)
    maps = {m: [load_anomaly_map(m, data.category, s, score_dir) for s in examples] for m in with_maps}
    scores = {m: _test_scores(data, m, score_dir) for m in with_maps}
    cols = 1 + len(with_maps)
    fig, axes = _figure(len(examples), cols, (max(2.6 * cols, 6.5), 2.7 * len(examples) + 1.2))
    for j, m in enumerate(with_maps, start=1):
        lo, hi = np.percentile(np.concatenate([x.ravel() for x in maps[m]]), [1, 99.5])
        norm = colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
        for i, s in enumerate(examples):
            ax = axes[i, j]
            ax.imshow(np.asarray(load_image(s.path)))
            _heat(ax, maps[m][i], norm, cmap)
            _outline(ax, s)
            sc = scores[m].get(sample_key(s))
            ax.set_title(f"{m}\nscore {sc:.4g}" if sc is not None else f"{m}\nscore n/a", fontsize=7)
            ax.axis("off")
    for i, s in enumerate(examples):
        ax = axes[i, 0]
        ax.imshow(np.asarray(load_image(s.path)))
        _outline(ax, s)
        ax.set_title(f"{s.stem}: {_label_text(s)}", fontsize=7, color="#b00020" if s.label else "#1b5e20")
        ax.axis("off")
    title = f"All methods — {data.category}{title_suffix}"
    fig.suptitle(title + "\ncyan: ground truth; each method's column has its own colour scale", fontsize=9)
    return _save(fig, out_path, title, caption)


def segmentation_figure(data: CategoryData, seg_dir: Path, *, out_path: Path, n: int = 8, caption: str = "",
                        title_suffix: str = "") -> Path | None:
    """CSAD: test images, their component segmentation ({defect_type}_{stem}.png, colours from the segmentor's
    palette) and the two blended, with a legend of the classes shown."""
    from matplotlib.patches import Patch

    from methods.csad.segmentor import PALETTE

    pairs = []
    for s in pick_examples(data.test, n):
        seg = seg_dir / f"{s.defect_type}_{s.stem}.png"
        if seg.is_file():
            pairs.append((s, seg))
    if not pairs:
        return None
    plt = _plt()
    fig, axes = _figure(len(pairs), 3, (7.5, 2.5 * len(pairs) + 1.4))
    seen: set[int] = set()
    for (s, seg), (a, b, c) in zip(pairs, axes):
        img = np.asarray(load_image(s.path))
        lab = np.asarray(load_image(seg))
        # Which palette entry each pixel is: the legend names the classes present.
        ids = np.argmin(((lab[..., None, :].astype(np.int32) - PALETTE[None, None].astype(np.int32)) ** 2).sum(-1), -1)
        seen |= set(np.unique(ids).tolist())
        a.imshow(img)
        b.imshow(lab, interpolation="nearest")
        if lab.shape[:2] != img.shape[:2]:
            from PIL import Image

            lab = np.asarray(Image.fromarray(lab).resize(img.shape[1::-1], Image.NEAREST))
        c.imshow((0.55 * img + 0.45 * lab).astype(np.uint8))
        a.set_title(f"{s.stem}: {_label_text(s)}", fontsize=7.5, color="#b00020" if s.label else "#1b5e20")
        b.set_title("segmentation", fontsize=7.5)
        c.set_title("blended", fontsize=7.5)
        for ax in (a, b, c):
            ax.axis("off")
    handles = [Patch(color=PALETTE[k] / 255, label="background" if k == 0 else f"class {k}") for k in sorted(seen)]
    fig.legend(handles=handles, loc="outside lower center", fontsize=7.5, ncol=min(8, len(handles)), frameon=False,
               title="classes (colour = segmentor class id)", title_fontsize=7.5)
    title = f"CSAD segmentation — {data.category}{title_suffix}"
    fig.suptitle(title, fontsize=10)
    return _save(fig, out_path, title, caption)


def write_figures(data: CategoryData, methods: Sequence[str], *, score_dir: str | Path, out_dir: str | Path,
                  seg_dir: str | Path | None = None, n: int = 8,
                  curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], caption: str = "",
                  title_suffix: str = "") -> list[Path]:
    """ROC (every experiment in `curves`, fused ones included), one overlay per single-branch method with maps,
    the side-by-side comparison, and the CSAD segmentation where seg_dir is given."""
    score_dir, out_dir = Path(score_dir), Path(out_dir)
    cat = safe_category(data.category)
    single = [m for m in methods if "+" not in m]
    kw = dict(caption=caption, title_suffix=title_suffix)
    written = [roc_figure(data, curves, out_dir / cat / "roc.png", **kw)]
    written += [
        overlay_figure(data, m, score_dir=score_dir, out_path=out_dir / cat / f"overlay_{m}.png", n=n, **kw)
        for m in single
    ]
    written.append(
        comparison_figure(data, single, score_dir=score_dir, out_path=out_dir / cat / "all_methods.png", **kw))
    if seg_dir is not None:
        written.append(
            segmentation_figure(data, Path(seg_dir), out_path=out_dir / cat / "csad_segmentation.png", n=n, **kw))
    return [p for p in written if p is not None]
