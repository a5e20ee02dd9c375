"""Speed benchmark of every method at the paper's input sizes: batch-1 latency, throughput at the best batch size,
training time and peak memory, with the published speed figures ("anchors") beside ours.

Protocol (docs/speed.md): models in eval mode under torch.inference_mode(); inputs pre-allocated on the device;
warm-up calls, then timed calls with torch.cuda.synchronize() after each on a GPU. On a CPU a time budget per
measurement lowers the number of warm-up/timed calls (never the input size); the rows say how many were made.
Timings do not depend on the weight values, so random weights are the default.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import platform
import re
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from common import atomic_write_json, atomic_write_text, get_logger, seed_everything

log = get_logger("speed")


# ----------------------------------------------------------------------------------------------- anchors
@dataclass(frozen=True)
class Anchor:
    text: str  # printed beside our numbers
    latency_ms: float | None = None
    throughput: float | None = None


# Published figures (each entry cites its paper, README or issue). None of them was measured on this project's hardware.
ANCHORS: dict[str, Anchor] = {
    "csad": Anchor("8.9 ms/img, 321.8 img/s (GPU, CSAD paper)", 8.9, 321.8),
    "lgst": Anchor("EfficientAD-S ~2 ms/img, ~600 img/s (RTX A6000, EfficientAD paper)", 2.0, 600.0),
    "glass": Anchor("~82 img/s (RTX 4090, GLASS author, issue #47)", None, 82.0),
    "patchcore": Anchor("0.22 s/img = 220 ms/img (PatchCore-10 % paper)", 220.0, None),
}

SINBAD_LEVELS = (7, 14, 224)
METHODS = ("csad", "lgst", "glass", "patchcore", "sapatchcore") + tuple(f"sinbad_l{lv}" for lv in SINBAD_LEVELS)
BACKBONE = "wide_resnet50_2"  # every method's paper backbone
CSAD_CLASSES = 6  # segmentor classes (background + components); LOCO categories have about 5-6
BANK_IMAGES = 200  # memory-bank size for the PatchCore query timing: ratio x patches x this many training images

COLUMNS = ("method", "input", "device", "dtype", "threads", "backbone", "weights",
           "latency_ms", "latency_median_ms", "latency_p95_ms", "warmup", "runs",
           "throughput_img_s", "best_batch", "batches",
           "train_s", "train_unit", "peak_infer_mib", "peak_train_mib", "memory_probe",
           "anchor", "stages", "train_notes")
NUMERIC = {"threads": int, "warmup": int, "runs": int, "best_batch": int, "latency_ms": float,
           "latency_median_ms": float, "latency_p95_ms": float, "throughput_img_s": float, "train_s": float,
           "peak_infer_mib": float, "peak_train_mib": float}


def expand_methods(names: Sequence[str]) -> list[str]:
    """'sinbad' stands for its three levels; unknown names are a one-line error."""
    out = []
    for n in names:
        group = [m for m in METHODS if m.startswith("sinbad_")] if n == "sinbad" else [n]
        for m in group:
            if m not in METHODS:
                raise ValueError(f"unknown method '{n}'; choose from: {', '.join(METHODS)}, sinbad")
            if m not in out:
                out.append(m)
    return out


# ----------------------------------------------------------------------------------------------- harness
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, device: torch.device, warmup: int, runs: int,
            budget_s: float | None = None, sync_each: bool = True) -> dict:
    """Wall-clock milliseconds per call of `fn`, synchronised on a GPU.

    Warm-up: `warmup` calls, fewer once they took budget_s/4 (at least one when warmup > 0). Timed: `runs` calls,
    fewer once they took budget_s (at least one). Returns mean/median/p95 ms and the counts actually made.
    sync_each=False reproduces timings without torch.cuda.synchronize (the official CSAD script).
    """
    done_w, t_start = 0, time.perf_counter()
    while done_w < warmup:
        fn()
        sync(device)
        done_w += 1
        if budget_s is not None and time.perf_counter() - t_start > budget_s / 4:
            break
    times: list[float] = []
    total = 0.0
    while len(times) < max(1, runs):
        t0 = time.perf_counter()
        fn()
        if sync_each:  # without it a GPU call returns once its kernels are queued
            sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
        total += times[-1] / 1000.0
        if budget_s is not None and total > budget_s:
            break
    a = np.asarray(times)
    return {"mean_ms": float(a.mean()), "median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)),
            "runs": len(times), "warmup": done_w}


def throughput(batch: int, ms_per_call: float) -> float:
    """Images per second when one call on `batch` images takes `ms_per_call`."""
    return batch * 1000.0 / ms_per_call


# ----------------------------------------------------------------------------------------------- memory
def _proc_status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS, so the next stage's allocations show up in the resident set again
    (glibc keeps freed memory mapped; without this a later method reuses an earlier one's pages unseen)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the delta may then read low
        pass


class PeakMemory:
    """Peak memory of a stage, in MiB above the level at its start.

    GPU: torch.cuda.max_memory_allocated (peak statistics reset at the start). CPU (Linux): the process's peak
    resident set (VmHWM), reset at the start through /proc/self/clear_refs; where that is refused, the rise of
    getrusage's ru_maxrss (an underestimate when an earlier stage peaked higher).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = float("nan")
        self.probe = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.probe = "cuda max_memory_allocated"
            return self
        _release_free_memory()
        self._base = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.probe = "peak RSS (VmHWM)" if self._base is not None else ""
        except OSError:
            self.probe = ""
        if not self.probe:
            self.probe = "ru_maxrss rise"
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2 ** 20
        elif self.probe == "peak RSS (VmHWM)":
            self.mib = max(0, (_proc_status_kib("VmHWM") or 0) - self._base) / 1024.0
        else:
            self.mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base) / 1024.0


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    device: torch.device
    backbone: str = BACKBONE
    weights: str = "random"
    dtype: str = "fp32"  # fp16 = torch.autocast(float16) on a GPU
    images: int = 4  # training images (GLASS epoch, memory bank, segmentor epoch, SINBAD fit)
    sinbad_images: int = 2  # SINBAD fit: every image costs 30 backbone passes per level
    bank_images: int = BANK_IMAGES
    lgst_iterations: int = 2  # timed LGST iterations (difference of two runs, see bench_lgst)
    warmup: int = 2
    runs: int = 5
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    budget_s: float | None = 10.0  # per timing; None = exact warmup/runs (GPU protocol)
    fast: bool = False
    seed: int = 0
    dtd_root: str | None = None
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    def backbone_model(self):
        import warnings

        from models.backbones import load_backbone

        with warnings.catch_warnings():  # "random weights: scores not meaningful" does not apply to timing
            warnings.simplefilter("ignore")
            return load_backbone(self.backbone, self.weights)

    def autocast(self):
        if self.dtype == "fp16":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()


def defaults_for_device(device: torch.device) -> dict:
    """GPU: the project protocol (200 warm-up, 1000 timed, batches up to 32), with a 60 s budget per timing that
    only slow methods reach (SINBAD). CPU: a few calls within a 10 s budget."""
    if device.type == "cuda":
        return dict(warmup=200, runs=1000, batch_sizes=(1, 8, 16, 32), budget_s=60.0)
    return dict(warmup=2, runs=5, batch_sizes=(1, 2, 4), budget_s=10.0)


# ----------------------------------------------------------------------------------------------- common pieces
def measure_inference(s: Settings, build: Callable[[], Callable], make_input: Callable[[int], torch.Tensor]) -> dict:
    """Batch-1 latency and peak memory (model construction included), then throughput over s.batch_sizes;
    a batch size is skipped when one call of it (predicted from the batch-1 latency) exceeds the budget."""
    def call(fn, x):
        with torch.inference_mode(), s.autocast():
            return fn(x)

    with PeakMemory(s.device) as mem:
        infer = build()
        x1 = make_input(1)
        lat = time_fn(lambda: call(infer, x1), device=s.device, warmup=s.warmup, runs=s.runs, budget_s=s.budget_s)
    del x1
    best, best_b, tried = throughput(1, lat["mean_ms"]), 1, ["1"]
    for b in s.batch_sizes:
        if b == 1:
            continue
        if s.budget_s is not None and b * lat["mean_ms"] / 1000.0 > s.budget_s:
            log.info("  batch %d skipped: one call would take about %.0f s, budget %.0f s", b,
                     b * lat["mean_ms"] / 1000.0, s.budget_s)
            continue
        try:
            xb = make_input(b)
            t = time_fn(lambda: call(infer, xb), device=s.device, warmup=max(1, s.warmup // 4),
                        runs=max(2, s.runs // 10), budget_s=s.budget_s)
            del xb
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            tried.append(f"{b}:OOM")
            break
        tried.append(str(b))
        if throughput(b, t["mean_ms"]) > best:
            best, best_b = throughput(b, t["mean_ms"]), b
    return {"latency_ms": lat["mean_ms"], "latency_median_ms": lat["median_ms"], "latency_p95_ms": lat["p95_ms"],
            "warmup": lat["warmup"], "runs": lat["runs"], "throughput_img_s": best, "best_batch": best_b,
            "batches": " ".join(tried), "peak_infer_mib": mem.mib, "memory_probe": mem.probe}


def image_input(s: Settings, size: int) -> Callable[[int], torch.Tensor]:
    g = torch.Generator().manual_seed(s.seed)
    return lambda b: torch.randn(b, 3, size, size, generator=g).to(s.device)


def synthetic_samples(s: Settings, n: int, size: int):
    """n training images of the built-in synthetic dataset (content does not change the timing)."""
    from dataset_readers import read_category
    from dataset_readers.synthetic_loco import generate

    root = s.work_dir / f"synthetic_{size}_{n}"
    generate(root, size=size, n_train=n, n_val=1, n_test=1, seed=s.seed, categories=["synth_box"])
    return read_category("synthetic_loco", "synth_box", root).train[:n]


def texture_root(s: Settings) -> Path:
    """DTD if present (--dtd-root or the default), else a few random textures: GLASS's LAS cost is the same."""
    from methods.glass_las import default_dtd_root

    root = Path(s.dtd_root) if s.dtd_root else default_dtd_root()
    if any(root.glob("*/*.jpg")):
        return root
    from PIL import Image

    root = s.work_dir / "textures"
    (root / "random").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(s.seed)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)).save(root / "random" / f"t{i}.jpg")
    log.info("  no DTD textures found: GLASS trains on %d random textures in %s (same cost)", 4, root)
    return root


def _train_stage(s: Settings, fn: Callable[[], dict]) -> dict:
    seed_everything(s.seed)
    with PeakMemory(s.device) as mem:
        out = fn()
    sync(s.device)
    out["peak_train_mib"] = mem.mib
    return out


# ----------------------------------------------------------------------------------------------- CSAD
def _lgst_config(s: Settings):
    from methods.csad.lgst import LGSTConfig

    return LGSTConfig.fast() if s.fast else LGSTConfig()


def bench_csad(s: Settings) -> dict:
    """The deployable CSAD path (methods.csad.fused_inference.FusedCSAD) + segmentor training per epoch."""
    from methods.csad.fused_inference import FusedCSAD
    from methods.csad.lgst import build_model
    from methods.csad.patch_histogram import PatchHistogram
    from models.segmentor import Segmentor

    cfg = _lgst_config(s)
    res = cfg.input_size
    g = torch.Generator().manual_seed(s.seed)

    def build():
        bb = s.backbone_model()
        # a fitted Patch Histogram (random class maps) and validation scores, so the fused score is computed
        maps = lambda n: torch.randint(0, CSAD_CLASSES, (n, res, res), generator=g)  # noqa: E731
        ph = PatchHistogram(CSAD_CLASSES).fit(maps(16))
        ph.set_validation(maps(8))
        val = {"LGST": torch.rand(8, generator=g).numpy(), "patchhist": torch.rand(8, generator=g).numpy()}
        fused = FusedCSAD(bb, Segmentor(CSAD_CLASSES, _segmentor_channels(bb)), build_model(bb, cfg, s.seed), ph,
                          val, resolution=res)
        fused = fused.to(s.device).eval()
        return lambda x: fused(x)["score"]

    row = measure_inference(s, build, image_input(s, res))
    row.update(_train_stage(s, lambda: _segmentor_epoch(s, res)))
    row.update(input=f"{res}x{res}",
               stages="one backbone pass (layer1-3) -> segmentor logits + argmax at input size, LGST teacher/student/"
                      "AE, quantile normalisation, upsampling, max; Patch Histogram (CPU) and trimmed-z fusion; "
                      "fused score to the host. Not: image decoding/resize/normalisation")
    return row


OFFICIAL_CSAD_TIMING = dict(batch=8, calls=1000)  # official benchmark_speed.py: mean of the last 500 calls


def bench_csad_official(s: Settings) -> dict:
    """--official-csad-timing: the official CSAD speed script's protocol, for comparison with the paper's figure:
    batch 8 of random 256 px inputs, 1000 calls, mean of the last 500, no torch.cuda.synchronize (on a GPU this
    times kernel queueing rather than execution), students without padding. Our students resize their 56 x 56
    maps to 64 x 64; the official ones keep 56 x 56. On a CPU the time budget shortens the run."""
    from methods.csad.fused_inference import FusedCSAD
    from methods.csad.lgst import build_model
    from models.segmentor import Segmentor

    cfg = dataclasses.replace(_lgst_config(s), padding=False)
    res, b, n = cfg.input_size, OFFICIAL_CSAD_TIMING["batch"], OFFICIAL_CSAD_TIMING["calls"]
    with PeakMemory(s.device) as mem:
        bb = s.backbone_model()
        fused = FusedCSAD(bb, Segmentor(CSAD_CLASSES, _segmentor_channels(bb)), build_model(bb, cfg, s.seed),
                          resolution=res).to(s.device).eval()
        x = image_input(s, res)(b)
        with torch.inference_mode(), s.autocast():
            t = time_fn(lambda: fused(x), device=s.device, warmup=n // 2, runs=n - n // 2, budget_s=s.budget_s,
                        sync_each=False)
        sync(s.device)
    per_img = t["mean_ms"] / b
    return {"latency_ms": per_img, "latency_median_ms": t["median_ms"] / b, "latency_p95_ms": t["p95_ms"] / b,
            "warmup": t["warmup"], "runs": t["runs"], "throughput_img_s": throughput(b, t["mean_ms"]),
            "best_batch": b, "batches": str(b), "peak_infer_mib": mem.mib, "memory_probe": mem.probe,
            "train_s": float("nan"), "train_unit": "", "input": f"{res}x{res}",
            "stages": "official protocol: batch 8, no per-call synchronisation, latency = call time / 8; "
                      "backbone + segmentor logits + LGST (no padding) maps, no Patch Histogram"}


def _segmentor_channels(backbone) -> tuple[int, int]:
    from models.feature_extractor import FeatureExtractor
    from models.segmentor import ENCODER_LAYERS

    dims = FeatureExtractor(backbone, list(ENCODER_LAYERS)).feature_dims
    return dims[ENCODER_LAYERS[0]], dims[ENCODER_LAYERS[1]]


def _segmentor_epoch(s: Settings, res: int) -> dict:
    """train_segmentor on a constructed training set: the first epoch supervised only, the second with the
    unlabelled batch, histogram and entropy losses (70 of the 120 official epochs)."""
    from methods.csad.label_layout import instance_map
    from methods.csad.segmentor import Encoder, TrainingSet, find_components, make_config, train_segmentor

    cfg = make_config("benchmark", fast=s.fast, epochs=2, sup_only_epochs=1)
    n_sup = max(s.images, cfg.batch_size)
    rng = np.random.default_rng(s.seed)
    images = rng.integers(0, 256, (2 * n_sup, res, res, 3), dtype=np.uint8)
    ts = TrainingSet(images, np.arange(n_sup), np.arange(n_sup, 2 * n_sup), {}, num_classes=CSAD_CLASSES)
    for i in range(n_sup):  # one rectangle per component class on a background
        lab = np.zeros((res, res), np.uint8)
        for c in range(1, CSAD_CLASSES):
            y, x = rng.integers(0, res * 3 // 4, 2)
            lab[y:y + res // 6, x:x + res // 6] = c
        ts.labels[i], ts.backgrounds[i] = lab, lab == 0
        ts.comps[i] = find_components(lab, instance_map(lab))
    encoder = Encoder(s.backbone_model(), s.device)
    out = train_segmentor(ts, encoder, cfg, seed=s.seed, desc="segmentor (benchmark)")
    sup_only, full = out.epoch_times
    return {"train_s": full, "train_unit": f"s/epoch of {n_sup} images",
            "train_notes": f"segmentor epoch with the unlabelled batch and all losses; supervised-only epoch "
                           f"{sup_only:.2f} s; batch {cfg.batch_size}, encoder features of the unaugmented images "
                           "cached before (not timed)"}


def bench_lgst(s: Settings) -> dict:
    """LGST alone (teacher backbone + students + AE) and its training per 1000 iterations."""
    from methods.csad.lgst import build_model

    cfg = _lgst_config(s)
    res = cfg.input_size

    def build():
        model = build_model(s.backbone_model(), cfg, s.seed).to(s.device).eval()
        return lambda x: model.anomaly_maps(x)[1].cpu()

    row = measure_inference(s, build, image_input(s, res))
    row.update(_train_stage(s, lambda: _lgst_training(s, cfg)))
    row.update(input=f"{res}x{res}",
               stages="backbone layer2+3 -> teacher projection, student, AE, both maps, quantile normalisation, "
                      "upsampling to input size, max; scores to the host. Not: image decoding/resize/normalisation")
    return row


def _lgst_training(s: Settings, cfg) -> dict:
    """methods.csad.lgst.train with 1 and 1+n iterations: the difference removes the per-run setup (teacher
    features of the training images, validation quantiles). Penalty images included, as in the official run."""
    from PIL import Image

    from methods.csad.lgst import build_model, find_penalty_images, train

    res, n = cfg.input_size, max(1, s.lgst_iterations)
    pen_dir = s.work_dir / "penalty"
    pen_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(s.seed)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (2 * res, 2 * res, 3), dtype=np.uint8)).save(pen_dir / f"p{i}.png")
    penalty = find_penalty_images(pen_dir)
    train_images = torch.from_numpy(rng.integers(0, 256, (max(s.images, cfg.batch_size), 3, res, res), dtype=np.uint8))
    val_images = torch.from_numpy(rng.integers(0, 256, (2, 3, res, res), dtype=np.uint8))
    model = build_model(s.backbone_model(), cfg, s.seed)
    seconds = []
    for iters in (1, 1 + n):
        model.cfg = dataclasses.replace(cfg, iterations=iters)
        t0 = time.perf_counter()
        train(model, train_images, val_images, device=s.device, seed=s.seed, penalty=penalty)
        sync(s.device)
        seconds.append(time.perf_counter() - t0)
    per_it = (seconds[1] - seconds[0]) / n
    note = f"{n} timed iterations (batch {cfg.batch_size} + penalty image)"
    if per_it <= 0:  # a noisy machine; fall back to the longer run's average (setup included)
        per_it = seconds[1] / (1 + n)
        note += ", setup included (noisy difference)"
    return {"train_s": per_it * 1000, "train_unit": "s/1000 iterations",
            "train_notes": f"{note}; official schedule {cfg.iterations} iterations = "
                           f"{per_it * cfg.iterations / 3600:.2f} h on this device"}


# ----------------------------------------------------------------------------------------------- GLASS
def bench_glass(s: Settings) -> dict:
    from benchmarks import glass_speed
    from methods.glass import Glass, GlassConfig, fast_config
    from methods.maps import upsample_and_smooth

    cfg = fast_config(GlassConfig()) if s.fast else GlassConfig()

    def build():
        model = Glass(s.backbone_model(), cfg).to(s.device).eval()

        def infer(x):
            patch = model.patch_scores(x)
            maps = upsample_and_smooth(patch, (cfg.imagesize, cfg.imagesize), sigma=4)
            return patch.flatten(1).amax(1).cpu(), maps
        return infer

    row = measure_inference(s, build, image_input(s, cfg.imagesize))

    def training():
        argv = ["--backbone", s.backbone, "--weights", s.weights, "--images", str(s.images), "--device",
                str(s.device), "--threads", str(torch.get_num_threads()), "--dtd-root", str(texture_root(s))]
        out = glass_speed.main(argv + (["--fast"] if s.fast else []))
        return {"train_s": out["epoch_s"], "train_unit": f"s/epoch of {out['train_images']} images",
                "train_notes": f"benchmarks/glass_speed.py: {out['iteration_s']:.2f} s/iteration at batch "
                               f"{min(out['batch_size'], out['train_images'])} ({cfg.step} ascent steps); feature caching of the normal "
                               f"images {out['embed_train_s']:.2f} s (once per run, not timed); peak memory "
                               "includes its inference check"}

    row.update(_train_stage(s, training))
    row.update(input=f"{cfg.imagesize}x{cfg.imagesize}",
               stages=f"backbone layer2+3, 3x3 aggregation to {cfg.target_dim}-d, adaptor, discriminator, max; "
                      "map upsampling + Gaussian sigma 4 (CPU) included. Not: image decoding/resize/normalisation")
    return row


# ----------------------------------------------------------------------------------------------- PatchCore
def bench_patchcore(s: Settings, method: str) -> dict:
    """PatchCore (approx. coreset 10 %, squared L2) or SA-PatchCore (k-center 1 %, self-attention)."""
    from methods.maps import upsample_and_smooth
    from methods.patchcore import build_bank, defaults_for, embed, resolve_backend, score_embeddings
    from models.feature_extractor import FeatureExtractor

    cfg = defaults_for(method)
    if s.fast:
        cfg.resize, cfg.crop = (64,) if method == "patchcore" else (64, 64), 56
    backend = resolve_backend(cfg.knn_backend, s.device)
    size = cfg.crop or cfg.resize[0]
    info = {}

    def build():
        extractor = FeatureExtractor(s.backbone_model(), cfg.layers).to(s.device)
        with torch.inference_mode():
            e = embed(extractor, torch.zeros(1, 3, size, size, device=s.device), cfg)
        _, h, w, d = e.shape
        n_bank = max(1, int(cfg.coreset_ratio * h * w * s.bank_images))
        g = torch.Generator().manual_seed(s.seed)
        bank = torch.randn(n_bank, d, generator=g).to(s.device)
        info.update(n_bank=n_bank, dim=d)

        def infer(x):
            patch, image = score_embeddings(embed(extractor, x, cfg), bank, cfg, backend)
            return image.cpu(), upsample_and_smooth(patch, (size, size), sigma=cfg.sigma)
        return infer

    row = measure_inference(s, build, image_input(s, size))

    def training():
        samples = synthetic_samples(s, s.images, 256 if not s.fast else 64)
        extractor = FeatureExtractor(s.backbone_model(), cfg.layers).to(s.device)
        t0 = time.perf_counter()
        bank = build_bank(extractor, samples, cfg, s.device, progress=False)
        sync(s.device)
        return {"train_s": time.perf_counter() - t0, "train_unit": f"s/memory bank of {len(samples)} images",
                "train_notes": f"embedding (image loading included) + {cfg.sampler} coreset "
                               f"{cfg.coreset_ratio:g} -> {len(bank)} vectors; the coreset grows ~quadratically "
                               "with the image count"}

    row.update(_train_stage(s, training))
    row.update(input=f"{size}x{size}",
               stages=f"backbone layer2+3, patch embedding ({info['dim']}-d), exact 1-NN ({backend}) against a "
                      f"{info['n_bank']}-vector bank (= {cfg.coreset_ratio:g} x {s.bank_images} training images, "
                      f"random vectors), max; map upsampling + Gaussian sigma {cfg.sigma:g} (CPU) included. "
                      "Not: image decoding/resize/crop/normalisation")
    return row


# ----------------------------------------------------------------------------------------------- SINBAD
def bench_sinbad(s: Settings, level: int) -> dict:
    """One pyramid level with all its crop counts: fit (descriptors of the training images + per-position
    shrunk-covariance model) and scoring of pre-allocated canvases."""
    from methods.knn import knn
    from methods.sinbad import (DEEP_LAYERS, PIXEL_LEVEL, ShrunkWhitener, SinbadConfig, crop_counts,
                                describe_canvases, element_dim, encode, projection_matrix)
    from models.feature_extractor import FeatureExtractor

    cfg = SinbadConfig.fast_config() if s.fast else SinbadConfig()
    counts = crop_counts(level)
    power = {"inv": -1.0, "inv_sqrt": -0.5}[cfg.whiten]
    state: dict = {}

    def fit() -> dict:
        samples = synthetic_samples(s, s.sinbad_images, 256)
        t0 = time.perf_counter()
        extractor = None if level == PIXEL_LEVEL else \
            FeatureExtractor(s.backbone_model(), [DEEP_LAYERS[level]]).to(s.device)
        reps, n_p, n_q = cfg.reps(level), cfg.n_projections(level), cfg.quantiles
        dim = element_dim(level, extractor)
        units = []
        for c in counts:
            proj = [
                torch.cat([
                    projection_matrix(dim, n_p, seed=cfg.seed, level=level, n_crops=c, position=k, rep=r)
                    for r in range(reps)
                ], 1).to(s.device) for k in range(c)
            ]
            train_d, thr = encode(samples, level, n_crops=c, cfg=cfg, extractor=extractor, device=s.device,
                                  projections=proj, desc=f"L{level} c{c} fit")
            models = []
            for r in range(reps):
                cols = slice(r * n_p * n_q, (r + 1) * n_p * n_q)
                for k in range(c):
                    w = ShrunkWhitener(train_d[:, k, cols].to(s.device), cfg.alpha(level), power)
                    models.append((r, k, cols, w, w(train_d[:, k, cols].to(s.device))))
            units.append((c, proj, thr, models))
        sync(s.device)
        state.update(extractor=extractor, units=units)
        return {"train_s": time.perf_counter() - t0, "train_unit": f"s/fit of {len(samples)} images",
                "train_notes": f"crop counts {counts}, {sum(counts)} crops/image at {cfg.set_res} px from a "
                               f"{cfg.canvas} canvas, {n_p} projections x {reps} repeats; image loading included"}

    row = _train_stage(s, fit)

    def build():
        def infer(canvases):
            total = torch.zeros(len(canvases), dtype=torch.float64)
            for c, proj, thr, models in state["units"]:
                d = describe_canvases(canvases, level, n_crops=c, cfg=cfg, extractor=state["extractor"],
                                      projections=proj, thresholds=list(thr))
                for r, k, cols, w, bank in models:
                    total += knn(w(d[:, k, cols]), bank, k=1, squared=True)[0][:, 0].cpu()
            return total
        return infer

    g = torch.Generator().manual_seed(s.seed)
    row.update(measure_inference(s, build, lambda b: torch.rand(b, 3, cfg.canvas, cfg.canvas, generator=g)
                                 .to(s.device)))
    row.update(input=f"{cfg.canvas}x{cfg.canvas} canvas, {sum(counts)} crops at {cfg.set_res}",
               stages=f"level {level}: crops, {'pixels' if level == PIXEL_LEVEL else DEEP_LAYERS[level]} sets, "
                      "CDF descriptors, shrunk-covariance transform, exact 1-NN per position and crop count; "
                      "summed. Not: image decoding and canvas construction, the ensemble arithmetic")
    return row


# ----------------------------------------------------------------------------------------------- driver
def run_method(name: str, s: Settings) -> dict:
    seed_everything(s.seed)
    if name == "csad":
        row = bench_csad(s)
    elif name == "csad_official":
        row = bench_csad_official(s)
    elif name == "lgst":
        row = bench_lgst(s)
    elif name == "glass":
        row = bench_glass(s)
    elif name in ("patchcore", "sapatchcore"):
        row = bench_patchcore(s, name)
    elif name.startswith("sinbad_l"):
        row = bench_sinbad(s, int(name[len("sinbad_l"):]))
    else:
        raise ValueError(f"unknown method '{name}'; choose from: {', '.join(METHODS)}")
    anchor = ANCHORS.get("csad" if name == "csad_official" else name)
    row.update(method=name, device=device_name(s.device), dtype=s.dtype, threads=torch.get_num_threads(),
               backbone=s.backbone, weights=s.weights, anchor=anchor.text if anchor else "")
    checked = ("latency_ms", "throughput_img_s") + (() if name == "csad_official" else ("train_s",))
    bad = [k for k in checked if not math.isfinite(float(row[k]))]
    if bad:
        raise FloatingPointError(f"{name}: non-finite {', '.join(bad)}; re-run on a less loaded machine")
    return {k: ("" if isinstance(row.get(k), float) and math.isnan(row[k]) else row.get(k, "")) for k in COLUMNS}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}".strip()


def environment(s: Settings) -> dict:
    env = {"torch": torch.__version__, "device": device_name(s.device), "threads": torch.get_num_threads(),
           "dtype": s.dtype, "weights": s.weights, "backbone": s.backbone, "warmup": s.warmup, "runs": s.runs,
           "batch_sizes": list(s.batch_sizes), "budget_s": s.budget_s, "images": s.images,
           "sinbad_images": s.sinbad_images, "bank_images": s.bank_images, "fast": s.fast,
           "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if s.device.type == "cuda":
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


# ----------------------------------------------------------------------------------------------- output
def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, typ in NUMERIC.items():
            if r.get(k, "") != "":
                r[k] = typ(float(r[k]))
    return rows


def _fmt(x, digits: int = 3) -> str:
    if x == "" or x is None:
        return "—"
    x = float(x)
    return f"{x:.{digits}g}" if abs(x) < 10 ** (digits - 1) else f"{x:.0f}"


def markdown_table(rows: Sequence[dict], env: dict | None = None) -> str:
    lines = []
    if env:
        lines.append(f"Device: {env['device']}, {env['threads']} threads, {env['dtype']}, torch {env['torch']}, "
                     f"weights: {env['weights']} (speed does not depend on weight values).")
        lines.append("")
    lines += ["| method | input | latency ms/img (p95) | throughput img/s (batch) | training | "
              "peak MiB infer / train | anchor (published) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['input']} | {_fmt(r['latency_ms'])} ({_fmt(r['latency_p95_ms'])}) | "
            f"{_fmt(r['throughput_img_s'])} ({r['best_batch']}) | {_fmt(r['train_s'])} {r['train_unit']} | "
            f"{_fmt(r['peak_infer_mib'], 4)} / {_fmt(r['peak_train_mib'], 4)} | {r['anchor'] or '—'} |")
    lines.append("")
    lines.append("Latency: mean over the timed batch-1 calls (counts per row in the CSV), after warm-up. Memory: "
                 + (rows[0]["memory_probe"] if rows else "") + " above the level at the stage start.")
    return "\n".join(lines) + "\n"


def write_outputs(rows: Sequence[dict], env: dict, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"csv": out_dir / "speed.csv", "md": out_dir / "speed.md", "json": out_dir / "speed.json"}
    write_csv(rows, paths["csv"])
    atomic_write_text(paths["md"], markdown_table(rows, env))
    atomic_write_json(paths["json"], {"environment": env, "rows": list(rows)})
    return paths
