"""Scoring a user's own images with a trained checkpoint (predict.py): finding the images, reading them in
chunks (an unreadable file is refused alone), and writing the CSV of scores, float TIFF maps at the original size
and overlay PNGs."""
from __future__ import annotations

import csv
import glob
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from common.errors import UserError
from common.io import atomic_path
from dataset_readers.base import IMAGE_EXTENSIONS, DatasetError, load_image

log = logging.getLogger("predict")


def collect_images(specs: Sequence[str]) -> tuple[list[Path], Path | None]:
    """Image files named by folders (searched recursively), glob patterns or files, sorted, without duplicates;
    and the common folder their output names are made relative to. Refuses a spec that matches nothing."""
    found: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            hits = [q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in q.relative_to(p).parts)]
        elif p.is_file():
            hits = [p]
        else:
            hits = [Path(q) for q in glob.glob(os.path.expanduser(spec), recursive=True)
                    if Path(q).is_file() and Path(q).suffix.lower() in IMAGE_EXTENSIONS]
        if not hits:
            raise UserError(f"--images {spec}: no image files there ({', '.join(IMAGE_EXTENSIONS)}); pass a folder, "
                            f"a glob pattern in quotes, or image files")
        found.extend(hits)
    unique = sorted({q.resolve(): q for q in found}.values(), key=lambda q: str(q.resolve()))
    base = Path(os.path.commonpath([str(q.resolve().parent) for q in unique])) if unique else None
    return unique, base


def relative_name(path: Path, base: Path | None) -> Path:
    """The output name of `path`: relative to the common folder, so same-named files in sub-folders stay apart."""
    r = path.resolve()
    return r.relative_to(base) if base is not None and r.is_relative_to(base) else Path(r.name)


def read_chunks(paths: Sequence[Path], chunk: int, workers: int = 4) -> Iterator[tuple[list[int], list[Image.Image],
                                                                                        list[tuple[int, str]]]]:
    """Chunks of (indices, decoded images, refused [(index, reason)]): each file is decoded once, in a thread
    pool (PIL releases the GIL); a file that cannot be read is refused with its reason and the rest go on."""
    def read(i: int):
        try:
            return i, load_image(paths[i]), None
        except DatasetError as exc:
            return i, None, str(exc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), chunk):
            ok_idx, images, refused = [], [], []
            for i, im, err in pool.map(read, range(start, min(start + chunk, len(paths)))):
                if im is None:
                    refused.append((i, err))
                else:
                    ok_idx.append(i)
                    images.append(im)
            yield ok_idx, images, refused


def write_map(path: Path, m: np.ndarray) -> None:
    import tifffile

    with atomic_path(path, suffix=".tiff") as tmp:
        tifffile.imwrite(tmp, np.asarray(m, dtype=np.float32))


def overlay_rgb(image: Image.Image, m: np.ndarray, lo: float, hi: float, cmap: str = "jet") -> Image.Image:
    """The image with the map in colour on top; opacity rises with the normalised score (0 at `lo`, 0.6 at
    `hi`), so normal regions stay visible and one scale serves every image of the run."""
    from matplotlib import colormaps

    v = np.clip((np.asarray(m, dtype=np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    colour = colormaps[cmap](v)[..., :3]
    alpha = (0.15 + 0.45 * v)[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    out = (1 - alpha) * base + alpha * colour
    return Image.fromarray(np.rint(out * 255).astype(np.uint8))


def write_png(path: Path, im: Image.Image) -> None:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    with atomic_path(path, suffix=".png") as tmp:
        Path(tmp).write_bytes(buf.getvalue())


def write_scores_csv(path: Path, rows: Sequence[dict], columns: Sequence[str], header: Sequence[str]) -> None:
    """CSV with '# ' provenance lines first (as the benchmark's tables)."""
    buf = io.StringIO()
    for line in header:
        buf.write(f"# {line}\n")
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()})
    with atomic_path(path, suffix=".csv") as tmp:
        Path(tmp).write_text(buf.getvalue())


def read_scores_csv(path: Path) -> list[dict]:
    lines = [ln for ln in Path(path).read_text().splitlines() if not ln.startswith("# ")]
    return list(csv.DictReader(lines))
