"""The score-file contract between the methods and benchmark_performance.py.

Image scores: {score_dir}/{category}_{method}_{group}_score.npy, group in logi | struc | val (MVTec LOCO) or
test | val (MVTec AD-style), with {same stem}.json beside it listing the images in the same order.
Anomaly maps: {score_dir}/anomaly_maps/{method}/{category}/test/{defect_type}/{stem}.tiff (float32, at the
original image size), the layout MVTec's official LOCO evaluation reads.
"""
from __future__ import annotations

from common.errors import UserError

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.io import atomic_path, atomic_save_npy, atomic_write_json
from dataset_readers.base import CategoryData, Sample

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCORE_DIR = REPO_ROOT / "anomaly_score"


class ScoreFileError(UserError, RuntimeError):
    pass


def safe_category(category: str) -> str:
    """A file-name form of a category: MAD categories are "Person_1/bottle"."""
    return category.replace("/", "__")


def score_path(category: str, method: str, group: str, score_dir: str | Path = DEFAULT_SCORE_DIR) -> Path:
    return Path(score_dir) / f"{safe_category(category)}_{method}_{group}_score.npy"


def sample_key(sample: Sample) -> str:
    """Order key independent of where the dataset lives: split/defect_type/file name."""
    return f"{sample.split}/{sample.defect_type}/{Path(sample.path).name}"


def save_scores(category: str, method: str, group: str, *, scores, samples: Sequence[Sample],
                score_dir: str | Path = DEFAULT_SCORE_DIR, dataset: str | None = None) -> Path:
    """Write the scores and their JSON index; the index carries the run record (common.provenance.current())."""
    from common.provenance import current

    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    path = score_path(category, method, group, score_dir)
    if len(scores) != len(samples):
        raise ScoreFileError(f"{method}/{category}/{group}: {len(scores)} scores for {len(samples)} images")
    if not np.isfinite(scores).all():
        bad = [samples[i].path for i in np.flatnonzero(~np.isfinite(scores))[:3]]
        raise ScoreFileError(f"{method}/{category}/{group}: non-finite scores (first: {bad}); the model diverged, "
                             "check the learning rate or the checkpoint")
    run = current()
    atomic_save_npy(path, scores)
    atomic_write_json(path.with_suffix(".json"), {
        "category": category, "dataset": dataset or (run or {}).get("dataset"), "method": method, "group": group,
        "images": [sample_key(s) for s in samples], "labels": [s.label for s in samples],
        "defect_types": [s.defect_type for s in samples], "run": run})
    return path


def save_group_scores(data: CategoryData, method: str, scores_by_group: Mapping[str, np.ndarray],
                      score_dir: str | Path = DEFAULT_SCORE_DIR) -> list[Path]:
    groups = data.score_groups()
    unknown = set(scores_by_group) - set(groups)
    if unknown:
        raise ScoreFileError(f"{method}/{data.category}: unknown score groups {sorted(unknown)}; expected {sorted(groups)}")
    return [
        save_scores(data.category, method, g, scores=s, samples=groups[g], score_dir=score_dir, dataset=data.dataset)
        for g, s in scores_by_group.items()
    ]


def scores_for_samples(test_scores: np.ndarray, test_samples: Sequence[Sample], data: CategoryData) -> dict[str, np.ndarray]:
    """Split one score per test image into the score groups (logi/struc or test), by sample identity."""
    pos = {s.path: i for i, s in enumerate(test_samples)}
    out = {}
    for g, samples in data.score_groups().items():
        if g == "val":
            continue
        out[g] = np.asarray([test_scores[pos[s.path]] for s in samples])
    return out


def read_score_array(path: Path, method: str) -> np.ndarray:
    """A 1-D float array from a .npy; a truncated, pickled, multi-dimensional or foreign file is one line naming it."""
    rerun = f"delete it and re-run {method} to write it again"
    try:
        scores = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ScoreFileError(f"{path} holds pickled objects, not plain scores (not loaded); {rerun}") from None
        raise ScoreFileError(f"{path} is not a readable .npy file (truncated or corrupt: {exc}); {rerun}") from None
    except Exception as exc:  # EOFError, OSError, UnpicklingError ...: a file that np.load cannot read
        raise ScoreFileError(f"{path} is not a readable .npy file ({type(exc).__name__}: {exc}); {rerun}") from None
    if not isinstance(scores, np.ndarray) or scores.ndim != 1:
        shape = getattr(scores, "shape", None)
        raise ScoreFileError(f"{path} holds an array of shape {shape}, expected one score per image (1-D); {rerun}")
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise ScoreFileError(f"{path} holds {scores.dtype} values, expected real numbers; {rerun}")
    return scores.astype(np.float64, copy=False)


def read_index(index_path: Path, method: str) -> dict:
    """The JSON index beside a score file; malformed JSON or a wrong structure is one line naming the file."""
    rerun = f"delete it and re-run {method} to write it again"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ScoreFileError(f"{index_path} is not a readable JSON index ({exc}); {rerun}") from None
    if not isinstance(index, dict) or not isinstance(index.get("images"), list):
        raise ScoreFileError(f"{index_path} is not a score-file index (no 'images' list); {rerun}")
    return index


def load_score_file(category: str, method: str, group: str, *, samples: Sequence[Sample] | None = None,
                    score_dir: str | Path = DEFAULT_SCORE_DIR, dataset: str | None = None) -> tuple[np.ndarray, dict]:
    """Scores and their index. With `samples`, refuse the file unless its index names this category, method, group
    (and `dataset`, where both are known) and lists exactly those images in that order: a renamed file from another
    category or method is refused, not reported under the wrong name. The index's 'run' is the run record
    (None for files written before records existed)."""
    path = score_path(category, method, group, score_dir)
    if not path.is_file():
        raise FileNotFoundError(f"score file not found: {path} (run the {method} script for {category} first)")
    scores = read_score_array(path, method)
    index_path = path.with_suffix(".json")
    index: dict = {}
    if samples is not None:
        if not index_path.is_file():
            raise ScoreFileError(f"{path} has no index {index_path.name}; re-run {method} to write both")
        index = read_index(index_path, method)
        for key, want in (("category", category), ("method", method), ("group", group), ("dataset", dataset)):
            have = index.get(key)
            if want is not None and have is not None and have != want:
                raise ScoreFileError(f"{index_path} was written for {key} '{have}', not '{want}' (a renamed or copied "
                                     f"file?); re-run {method} for {dataset or ''}/{category} to write its own")
        expected = [sample_key(s) for s in samples]
        if len(scores) != len(expected) or index["images"] != expected:
            raise ScoreFileError(f"{path}: {len(scores)} scores whose order does not match the dataset's "
                                 f"{len(expected)} images; re-run {method} on this dataset")
    elif index_path.is_file():
        index = read_index(index_path, method)
    if not np.isfinite(scores).all():
        raise ScoreFileError(f"{path} holds NaN or inf scores; re-run {method}")
    run = index.get("run")
    index["run"] = run if isinstance(run, dict) else None
    return scores, index


def load_scores(category: str, method: str, group: str, *, samples: Sequence[Sample] | None = None,
                score_dir: str | Path = DEFAULT_SCORE_DIR, dataset: str | None = None) -> np.ndarray:
    """Load a score file; with `samples`, refuse it unless its index matches (see load_score_file)."""
    return load_score_file(category, method, group, samples=samples, score_dir=score_dir, dataset=dataset)[0]


def anomaly_map_path(method: str, category: str, sample: Sample, score_dir: str | Path = DEFAULT_SCORE_DIR) -> Path:
    return Path(score_dir) / "anomaly_maps" / method / category / "test" / sample.defect_type / f"{sample.stem}.tiff"


def save_anomaly_maps(method: str, category: str, samples: Sequence[Sample], *, maps,
                      score_dir: str | Path = DEFAULT_SCORE_DIR, original_size: bool = True) -> None:
    """Write one float32 TIFF per test sample; maps (N, h, w) are bilinearly resized to each image's size."""
    import tifffile
    import torch

    from dataset_readers.base import image_size

    maps = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    if maps.ndim != 3 or len(maps) != len(samples):
        raise ScoreFileError(f"{method}/{category}: expected maps of shape (N={len(samples)}, h, w), got {tuple(maps.shape)}")
    for sample, m in zip(samples, maps):
        m = map_at_size(m, image_size(sample.path)) if original_size else m.numpy()
        with atomic_path(anomaly_map_path(method, category, sample, score_dir), suffix=".tiff") as tmp:
            tifffile.imwrite(tmp, m.astype(np.float32))


def map_at_size(m, size_wh: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False) resize of a 2-D map to (width, height) = the original image size; float32.
    The one resize behind every TIFF map (score files and predict.py)."""
    import torch
    import torch.nn.functional as F

    w, h = size_wh
    t = torch.as_tensor(np.asarray(m, dtype=np.float32))
    if t.shape != (h, w):
        t = F.interpolate(t[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return t.numpy()


def load_anomaly_map(method: str, category: str, sample: Sample, score_dir: str | Path = DEFAULT_SCORE_DIR) -> np.ndarray:
    import tifffile

    path = anomaly_map_path(method, category, sample, score_dir)
    if not path.is_file():
        raise FileNotFoundError(f"anomaly map not found: {path} (re-run {method} with map output)")
    try:
        m = tifffile.imread(path)
    except Exception as exc:  # truncated or not a TIFF
        raise ScoreFileError(f"{path} is not a readable TIFF map ({type(exc).__name__}: {exc}); "
                             f"delete it and re-run {method} with map output") from None
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.number):
        raise ScoreFileError(f"{path} holds a {m.dtype} array of shape {m.shape}, expected one 2-D float map; "
                             f"re-run {method} with map output")
    return m.astype(np.float32)
