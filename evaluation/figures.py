"""Result figures, written once per run: anomaly-map overlays, ROC curves and CSAD segmentations.

A bounded number per method and category (default 8 images), so a full benchmark stays a few dozen files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dataset_readers.base import GOOD, CategoryData, Sample, load_image
from evaluation.score_files import anomaly_map_path, load_anomaly_map, load_scores, safe_category, score_path

GROUP_TITLES = {"logi": "logical", "struc": "structural", "test": "test"}


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


def roc_figure(data: CategoryData, methods: Sequence[str], score_dir: Path, out_path: Path) -> Path | None:
    """One panel per test group (logical / structural, or test), one ROC curve per method."""
    from sklearn.metrics import roc_curve

    from evaluation.metrics import image_auroc

    groups = [g for g in data.score_groups() if g != "val"]
    curves = {}
    for g in groups:
        samples = data.score_groups()[g]
        labels = np.array([s.label for s in samples])
        for m in methods:
            if score_path(data.category, m, g, score_dir).is_file() and 0 < labels.sum() < len(labels):
                s = load_scores(data.category, m, g, samples, score_dir)
                fpr, tpr, _ = roc_curve(labels, s)
                curves.setdefault(g, []).append((m, fpr, tpr, image_auroc(s, labels)))
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4), squeeze=False)
    for ax, (g, items) in zip(axes[0], curves.items()):
        for m, fpr, tpr, auc in items:
            ax.plot(fpr, tpr, label=f"{m} ({100 * auc:.1f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=f"{data.category}: {GROUP_TITLES.get(g, g)}", xlabel="FPR", ylabel="TPR")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def overlay_figure(data: CategoryData, method: str, score_dir: Path, out_path: Path, n: int = 8) -> Path | None:
    """Test images with the method's anomaly map overlaid; colour scale shared across the images."""
    examples = [s for s in pick_examples(data.test, n) if anomaly_map_path(method, data.category, s, score_dir).is_file()]
    if not examples:
        return None
    maps = [load_anomaly_map(method, data.category, s, score_dir) for s in examples]
    lo, hi = np.percentile(np.concatenate([m.ravel() for m in maps]), [1, 99.5])
    plt = _plt()
    cols = min(4, len(examples))
    rows = int(np.ceil(len(examples) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s, m in zip(axes.ravel(), examples, maps):
        ax.imshow(np.asarray(load_image(s.path)))
        ax.imshow(m, cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
        ax.set_title(f"{s.defect_type}/{s.stem}", fontsize=8)
    fig.suptitle(f"{method} — {data.category}")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def segmentation_figure(data: CategoryData, seg_dir: Path, out_path: Path, n: int = 8) -> Path | None:
    """CSAD: test images beside their component segmentation (PNG files named {defect_type}_{stem}.png)."""
    pairs = []
    for s in pick_examples(data.test, n):
        seg = seg_dir / f"{s.defect_type}_{s.stem}.png"
        if seg.is_file():
            pairs.append((s, seg))
    if not pairs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(pairs), 2, figsize=(5, 2.5 * len(pairs)), squeeze=False)
    for (s, seg), (a, b) in zip(pairs, axes):
        a.imshow(np.asarray(load_image(s.path)))
        b.imshow(np.asarray(load_image(seg)))
        a.set_title(f"{s.defect_type}/{s.stem}", fontsize=8)
        b.set_title("segmentation", fontsize=8)
        a.axis("off")
        b.axis("off")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def write_figures(data: CategoryData, methods: Sequence[str], score_dir: str | Path, out_dir: str | Path,
                  seg_dir: str | Path | None = None, n: int = 8) -> list[Path]:
    score_dir, out_dir = Path(score_dir), Path(out_dir)
    cat = safe_category(data.category)
    written = [roc_figure(data, methods, score_dir, out_dir / cat / "roc.png")]
    written += [overlay_figure(data, m, score_dir, out_dir / cat / f"overlay_{m}.png", n) for m in methods]
    if seg_dir is not None:
        written.append(segmentation_figure(data, Path(seg_dir), out_dir / cat / "csad_segmentation.png", n))
    return [p for p in written if p is not None]
