"""Procedural texture images in the DTD layout (<root>/<class>/<name>.jpg), deterministic from a seed.

The stand-in for DTD (GLASS's anomaly textures) and for the LGST penalty images on a machine that has neither,
so the demo runs end to end; real runs use DTD and ImageNet images.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common.io import atomic_path

KINDS = ("blotchy", "striped", "chequered", "dotted", "wavy", "grainy")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid: value noise in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None] + rows[:, i + 1] * f[None]


def texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    freq = rng.uniform(6, 20)
    if kind == "blotchy":
        v = _smooth_noise(rng, size, int(rng.integers(3, 8)))
    elif kind == "striped":
        v = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * freq * u))
    elif kind == "chequered":
        w = yy * np.cos(angle) - xx * np.sin(angle)
        v = ((np.floor(freq * u) + np.floor(freq * w)) % 2).astype(np.float32)
    elif kind == "dotted":
        w = yy * np.cos(angle) - xx * np.sin(angle)
        v = ((np.sin(2 * np.pi * freq * u) * np.sin(2 * np.pi * freq * w)) > 0.5).astype(np.float32)
    elif kind == "wavy":
        v = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + 4 * _smooth_noise(rng, size, 4))
    else:  # grainy
        v = rng.random((size, size)) * 0.6 + 0.4 * _smooth_noise(rng, size, 16)
    c0, c1 = rng.random(3), rng.random(3)
    img = c0[None, None] * (1 - v[..., None]) + c1[None, None] * v[..., None]
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def generate(root: str | Path, per_class: int = 12, size: int = 256, seed: int = 0) -> Path:
    """Write len(KINDS) x per_class JPEGs; existing files are kept (a complete folder is left untouched)."""
    root = Path(root)
    for k, kind in enumerate(KINDS):
        for i in range(per_class):
            path = root / kind / f"{kind}_{i:04d}.jpg"
            if path.is_file():
                continue
            rng = np.random.default_rng([seed, k, i])
            with atomic_path(path) as tmp:
                Image.fromarray(texture(kind, rng, size)).save(tmp, format="JPEG", quality=92)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent / "datasets" / "synthetic_textures"))
    p.add_argument("--per-class", type=int, default=12)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from common.cli import ensure_writable_dir
    from common.errors import UserError

    try:
        ensure_writable_dir(args.root, "--root")
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    t0 = time.time()
    root = generate(args.root, args.per_class, args.size, args.seed)
    print(f"{len(KINDS) * args.per_class} synthetic textures in {root} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
