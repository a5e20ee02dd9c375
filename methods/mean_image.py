"""Sanity baseline: per-pixel distance to the mean training image.

The anomaly map is the Euclidean distance (over RGB, ImageNet-normalised) between a test image and the mean of the
training images, both resized to a small fixed resolution; the image score is the map's max (or mean). It needs no
weights and no training, so it checks the whole chain dataset -> score files -> TIFF maps -> benchmark.

    python -m methods.mean_image --dataset synthetic_loco --data-root D --score-dir S [--fast] [--image-score mean]
"""
from __future__ import annotations

import numpy as np
import torch

from common import get_logger, pick_device, seed_everything, set_threads
from common.cli import add_common_args, ensure_output_dirs, make_parser, resolve_categories
from common.errors import guard
from dataset_readers import CategoryData, read_category
from dataset_readers.torch_data import imagenet_transform, load_stack
from evaluation.score_files import save_anomaly_maps, save_group_scores, scores_for_samples

METHOD = "mean_image"
DATASET = "synthetic_loco"
CATEGORIES = None  # all categories of the dataset
RESOLUTION = 64
FAST_RESOLUTION = 32
BATCH_SIZE = 16
LOG = get_logger(METHOD)


def load_images(samples, resolution: int, device: torch.device, desc: str) -> torch.Tensor:
    return load_stack(samples, imagenet_transform((resolution, resolution)), BATCH_SIZE, desc).to(device)


def distance_maps(images: torch.Tensor, mean_image: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w), (3, h, w) -> (N, h, w) per-pixel L2 distance."""
    return (images - mean_image).pow(2).sum(1).sqrt()


def image_scores(maps: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    flat = maps.flatten(1)
    return flat.amax(1) if reduce == "max" else flat.mean(1)


def run_category(data: CategoryData, resolution: int, *, device: torch.device, score_dir: str, reduce: str = "max",
                 write_maps: bool = True) -> dict[str, np.ndarray]:
    mean_image = load_images(data.train, resolution, device, f"{data.category} train").mean(0)
    test_maps = distance_maps(load_images(data.test, resolution, device, f"{data.category} test"), mean_image)
    test = image_scores(test_maps, reduce).cpu().numpy()
    groups = scores_for_samples(test, data.test, data)
    if data.validation:
        val_maps = distance_maps(load_images(data.validation, resolution, device, f"{data.category} val"), mean_image)
        groups["val"] = image_scores(val_maps, reduce).cpu().numpy()
    paths = save_group_scores(data, METHOD, groups, score_dir)
    LOG.info("%s: wrote %s", data.category, ", ".join(str(p) for p in paths))
    from evaluation.metrics import group_aurocs  # for the log; benchmark_performance.py does the evaluation

    LOG.info("%s: image AUROC %s", data.category, ", ".join(f"{g} {100 * a:.1f}%" for g, a in
                                                        group_aurocs(data, groups).items()) or "n/a (no labels)")
    if write_maps:
        save_anomaly_maps(METHOD, data.category, data.test, maps=test_maps.cpu().numpy(), score_dir=score_dir)
        LOG.info("%s: wrote %d anomaly maps under %s/anomaly_maps/%s/%s", data.category, len(data.test), score_dir,
                 METHOD, data.category)
    return groups


@guard
def main(argv=None) -> None:
    p = make_parser(__doc__)
    add_common_args(p, DATASET, CATEGORIES)
    p.add_argument("--resolution", type=int, default=None, help=f"side length (default {RESOLUTION}, --fast {FAST_RESOLUTION})")
    p.add_argument("--image-score", choices=("max", "mean"), default="max", help="reduction of the map to one score")
    p.add_argument("--no-maps", action="store_true", help="skip the TIFF anomaly maps (disk cost at full resolution)")
    args = p.parse_args(argv)
    ensure_output_dirs(args, "score_dir")
    seed_everything(args.seed)
    set_threads()
    device = pick_device(args.device)
    resolution = args.resolution or (FAST_RESOLUTION if args.fast else RESOLUTION)
    LOG.info("mean-image baseline on %s at %d px, image score = map %s", args.dataset, resolution, args.image_score)
    from common.provenance import start_from_args  # no backbone: the record has no weights

    categories = resolve_categories(args, check=True)
    start_from_args("mean_image", args, None, {"args": args, "resolution": resolution}, categories)
    for category in categories:
        data = read_category(args.dataset, category, args.data_root)
        run_category(data, resolution, device=device, score_dir=args.score_dir, reduce=args.image_score,
                     write_maps=not args.no_maps)


if __name__ == "__main__":
    main()
