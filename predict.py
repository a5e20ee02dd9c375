"""Score any folder of images with a trained checkpoint; the method is read from the checkpoint.

    python predict.py --checkpoint ckpt/sapatchcore_breakfast_box.pt --images my_photos/ --out predictions/
    python predict.py --checkpoint ckpt/csad_juice_bottle.pth --images 'shots/**/*.png' --out out/ --device cuda

Writes {out}/scores.csv (one row per image: path, score, and per-branch scores where the method has them),
{out}/maps/<name>.tiff (float32 anomaly map at the image's original size), {out}/overlays/<name>.png (the map on
the image, one colour scale for the whole run) and {out}/run.json (the checkpoint's record and this run's
settings). Works with the checkpoints of CSAD (fused: ckpt/csad_<category>.pth), LGST, the segmentor, GLASS,
SINBAD (scores only: it has no maps), SA-PatchCore and PatchCore. An unreadable image is refused in one line and
the others go on; the exit status is 1 if any was refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import atomic_write_json, get_logger, pick_device, set_threads
from common.cli import ensure_writable_dir, make_parser
from common.errors import UserError, guard

CHUNK = 64  # images decoded and scored at once (memory stays bounded for any folder size)

log = get_logger("predict")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by one of the method scripts")
    p.add_argument("--images", required=True, nargs="+", help="folders (recursive), glob patterns or image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", default=None, help="backbone weights file when it is not where training found it "
                   "(its sha256 must equal the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto (GPU when present) | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: the batch size the checkpoint was scored with)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="inference precision (default fp32; bf16 on the CPU or fp16 on a GPU are faster and "
                        "approximate: see docs/speed.md)")
    p.add_argument("--no-maps", action="store_true", help="scores only: no TIFF maps, no overlays")
    p.add_argument("--no-overlays", action="store_true", help="TIFF maps but no overlay PNGs")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="use a checkpoint of a training run that did not finish (warns)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores or $OMP_NUM_THREADS)")
    return p


def _set_dtype(model, dtype: str) -> None:
    """The model's inference precision: every model object keeps it in its config's `dtype` field (methods.base)."""
    if dtype != "fp32":
        from methods.base import reduced_precision

        reduced_precision(dtype, model.device)  # fp16 on the CPU is refused now, before any image is read
    model.cfg.dtype = dtype


def _set_batch_size(model, n: int) -> None:
    for holder in (model, getattr(model, "cfg", None)):
        if holder is not None and hasattr(holder, "batch_size"):
            holder.batch_size = n
            return
    log.warning("--batch-size: %s has no batch size setting; ignored", type(model).__name__)


@guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    from evaluation.predictions import collect_images, read_chunks

    out = ensure_writable_dir(args.out, "--out")  # before the model loads
    paths, base = collect_images(args.images)
    set_threads(args.threads)
    device = pick_device(args.device)

    from methods.base import load_model

    model, meta = load_model(args.checkpoint, device=device, allow_unfinished=args.allow_unfinished,
                             weights=args.weights)
    _set_dtype(model, args.dtype)
    if args.batch_size is not None:
        _set_batch_size(model, args.batch_size)
    log.info("%s checkpoint %s (%s/%s, backbone %s, weights %s); %d images on %s", meta.get("method"),
             args.checkpoint, meta.get("dataset"), meta.get("category"), meta.get("backbone"),
             str(meta.get("weights_sha256"))[:12], len(paths), device)

    from tqdm import tqdm

    writer = _Writer(out, base, maps=not args.no_maps)
    refused = 0
    with tqdm(total=len(paths), desc="predict", unit="img", file=sys.stderr) as bar:
        for idx, images, bad in read_chunks(paths, CHUNK):
            for i, reason in bad:
                log.error("refused %s: %s", paths[i], reason)
            refused += len(bad)
            if images:
                pred = model.predict(images)
                writer.add([paths[i] for i in idx], images, pred)
            bar.update(len(idx) + len(bad))
    writer.finish(meta, vars(args), overlays=not (args.no_maps or args.no_overlays))
    log.info("%d images scored -> %s%s", len(writer.rows), out / "scores.csv",
             f"; {refused} refused (see above)" if refused else "")
    if refused:
        raise SystemExit(1)
    return 0


class _Writer:
    """Rows of the CSV and the TIFF maps as chunks arrive; overlays at the end, on one colour scale."""

    def __init__(self, out: Path, base: Path | None, maps: bool):
        self.out, self.base, self.maps = out, base, maps
        self.rows: list[dict] = []
        self.columns = ["path", "score"]
        self.map_files: list[tuple[Path, Path]] = []  # (image, tiff)
        self.lo, self.hi = float("inf"), float("-inf")

    def add(self, paths, images, pred) -> None:
        import numpy as np

        from evaluation.predictions import relative_name, write_map
        from evaluation.score_files import map_at_size

        extra = pred.extra or {}
        for k in extra:
            if k not in self.columns:
                self.columns.append(k)
        for j, (p, im) in enumerate(zip(paths, images)):
            row = {"path": str(p), "score": float(pred.scores[j])}
            row.update({k: float(v[j]) for k, v in extra.items()})
            self.rows.append(row)
            if self.maps and pred.maps is not None:
                m = map_at_size(pred.maps[j], im.size)
                tiff = self.out / "maps" / relative_name(p, self.base).with_suffix(".tiff")
                write_map(tiff, m)
                self.map_files.append((p, tiff))
                self.lo = min(self.lo, float(np.min(m)))
                self.hi = max(self.hi, float(np.quantile(m, 0.999)))

    def finish(self, meta: dict, args: dict, overlays: bool) -> None:
        import tifffile

        from common.provenance import git_commit
        from evaluation.predictions import overlay_rgb, relative_name, write_png, write_scores_csv
        from dataset_readers.base import load_image

        header = [f"scores of {len(self.rows)} images by {meta.get('method')} from {args['checkpoint']}",
                  f"trained on {meta.get('dataset')}/{meta.get('category')}, backbone {meta.get('backbone')}, weights "
                  f"sha256 {meta.get('weights_sha256')}, checkpoint commit {meta.get('commit')}",
                  f"predict.py commit {git_commit()}, dtype {args['dtype']}"]
        write_scores_csv(self.out / "scores.csv", self.rows, self.columns, header)
        if overlays and self.map_files:
            for p, tiff in self.map_files:
                png = self.out / "overlays" / relative_name(p, self.base).with_suffix(".png")
                write_png(png, overlay_rgb(load_image(p), tifffile.imread(tiff), self.lo, self.hi))
        atomic_write_json(self.out / "run.json", {
            "checkpoint": str(args["checkpoint"]), "checkpoint_record": meta, "images": len(self.rows),
            "settings": {k: args[k] for k in ("device", "batch_size", "dtype", "no_maps", "no_overlays", "weights")},
            "overlay_scale": None if not self.map_files else [self.lo, self.hi], "commit": git_commit()})


if __name__ == "__main__":
    main()
