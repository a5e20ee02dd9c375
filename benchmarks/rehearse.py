"""Paper-scale rehearsal: every method's script at its paper configuration, end to end (training, checkpoint,
scoring, maps, score files), with only the iteration / epoch counts cut to a minimum and a few images, measured
per stage (wall time, CPU time, peak memory), to find crashes, shape errors and memory that grows with the
iteration count or the number of images before a paper-scale run does.

    python benchmarks/rehearse.py --data-root DATA/mvtec_loco --out OUT          # the real juice_bottle category
    python benchmarks/rehearse.py --sets synthetic --dtd-root DTD --out OUT        # generated, at --synthetic-size
    python benchmarks/rehearse.py --data-root D --methods glass patchcore --growth --out OUT
    python benchmarks/rehearse.py --data-root D --limits --out OUT                # networks alone vs predict, bf16

Every script runs in its own process with `--weights random` (the papers' backbones, HQ-SAM and Grounding DINO
are separate downloads; same architectures and widths, so shapes, memory and time are real and the scores are
meaningless). Stage 1 of CSAD needs the Grounding DINO SwinT-OGC and bert-base files: the rehearsal writes a
random-weights file of the same architecture and a BERT of bert-base's shape with a word-level vocabulary (the
real WordPiece vocabulary is part of the download) into --work-dir.

Per run: the process's CPU time and peak resident set from wait4 (children included), a 50 ms sample of the
process tree's resident set, and the stage records the scripts write when AD_STAGE_LOG names a file
(common.memory: read, fit, save, predict, write). Where a script has no stage records yet, its log lines split the
run into phases and each phase gets the sampled peak.

--growth repeats each run with 2x the iterations and with 2x the images and reports the differences of the stage
peaks (bounded memory: a change near 0 for iterations; per image: the memory each image adds).
--limits loads each method's checkpoint (methods.base.load_model) and times its networks alone
(model.forward_networks on model.preprocess(images)) against its whole predict, and fp32 against bf16.
Writes rehearsal.json (everything) and rehearsal.md (tables) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PY = sys.executable
METHODS = ("csad", "glass", "sinbad", "sapatchcore", "patchcore")
SETS = ("real", "synthetic")
REAL_CATEGORY = "juice_bottle"
SYNTH_CATEGORY = "synth_bottle"  # SAM runs on it (no_sam false), as on juice_bottle
TEST_TYPES = ("good", "logical_anomalies", "structural_anomalies")

# What the papers run (for the extrapolation to a full run).
PAPER = {
    "lgst_iterations": 60000,       # CSAD configs/mvtecloco_train.yaml
    "segmentor_epochs": 120,        # CSAD train_segmentor.py
    "glass_epochs": 640,            # GLASS run script (meta_epochs)
    "glass_batch": 8,
}
# Image counts of the full datasets: MVTec LOCO AD (Bergmann et al., IJCV 2022, Table 1) and MVTec AD (CVPR 2019).
DATASET_SIZES = {
    "mvtec_loco": {"categories": 5, "train": 1772, "validation": 304, "test": 1568,
                   "largest_train": 372, "largest_test": 341},
    "mvtec_ad": {"categories": 15, "train": 3629, "validation": 0, "test": 1725,
                 "largest_train": 391, "largest_test": 167},
}
PAPER_DATASETS = {"csad": "mvtec_loco", "glass": "mvtec_ad", "sinbad": "mvtec_loco", "sapatchcore": "mvtec_loco",
                  "patchcore": "mvtec_ad"}


# ------------------------------------------------------------------------------------------------ data
def make_subset(src: Path, dst: Path, *, n_train: int, n_val: int, n_test: int) -> Path:
    """dst/<category>: the first n images of every split of the MVTec LOCO-layout category `src` (symbolic links),
    with their ground-truth folders and, where present, the generator's component maps."""
    src, cat = Path(src), Path(dst) / Path(src).name
    if cat.exists():
        shutil.rmtree(cat)
    cat.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, cat / f.name)

    def link(rel: Path) -> None:
        if (src / rel).exists():
            (cat / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink((src / rel).resolve(), cat / rel)

    plan = [("train", "good", n_train), ("validation", "good", n_val)]
    plan += [("test", t, n_test) for t in TEST_TYPES if (src / "test" / t).is_dir()]
    for split, kind, n in plan:
        for p in sorted((src / split / kind).glob("[0-9][0-9][0-9].png"))[:n]:
            link(Path(split) / kind / p.name)
            link(Path("component_maps") / split / kind / p.name)
            if kind != "good":
                link(Path("ground_truth") / kind / p.stem)
    return cat


def generate_synthetic(root: Path, *, size: int, n_train: int, n_val: int, n_test: int, log: Callable) -> Path:
    cmd = [PY, "-m", "dataset_readers.synthetic_loco", "--root", str(root), "--size", str(size), "--n-train",
           str(n_train), "--n-val", str(n_val), "--n-test", str(n_test), "--categories", SYNTH_CATEGORY,
           "--component-maps"]
    log("generating %s", " ".join(cmd[2:]))
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return root / SYNTH_CATEGORY


def write_bert_base(folder: Path, words: Sequence[str], seed: int = 0) -> Path:
    """bert-base-uncased's architecture (12 layers, 768 wide, 30522-token embedding) with random weights and a
    word-level tokenizer over the prompt words, padded with unused tokens to bert-base's vocabulary size: the
    text encoder Grounding DINO loads from a local folder, at its real size."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = BertConfig()  # the bert-base-uncased shape
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "-", "(", ")"]
    vocab += sorted({w.lower() for w in words} - set(vocab))
    vocab += [f"[unused{i}]" for i in range(cfg.vocab_size - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    import inspect

    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    else:
        tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(cfg).save_pretrained(folder)
    return folder


def write_random_grounding(path: Path, bert_dir: Path, seed: int = 0) -> Path:
    """A Grounding DINO SwinT-OGC checkpoint with random weights (the architecture of the official file)."""
    import torch

    from models.grounding import build_grounding_dino

    if path.is_file():
        return path
    torch.manual_seed(seed)
    model = build_grounding_dino(bert_dir)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ stage 1 costs
def stage1_costs(image_path: str, *, sam_model: str, work: Path, category: str, partial: Path | None = None) -> dict:
    """CSAD stage 1's paper-setting costs on one image, from parts: the SwinT-OGC Grounding DINO forward (random
    weights, bert-base-shaped text encoder), one HQ-SAM encoder pass, one AMG decoder batch (from AMG runs with 4x4
    and 8x8 points, no crop layer) and the box decoding per box; extrapolated to the official AMG settings
    (32 x 32 points, 16 per batch, one crop layer = 1 + 4 crops)."""
    import numpy as np
    import torch
    from PIL import Image

    from common.memory import enable, stage
    from methods.csad.pseudo_label.config import PseudoLabelConfig, load_config, prompt_words
    from methods.csad.pseudo_label.segment import Segmenter
    from models.grounding import GroundingPredictor, load_grounding_dino
    from models.sam_loader import load_sam

    enable()
    img = np.asarray(Image.open(image_path).convert("RGB"))
    cfg = load_config(category)
    paper = PseudoLabelConfig()
    out: dict = {"image": image_path, "image_hw": list(img.shape[:2]), "sam_model": sam_model}

    def rec(name, fn):
        c0 = time.process_time()
        with stage(name) as r:
            res = fn()
        out[name] = {"seconds": r["seconds"], "cpu_s": time.process_time() - c0, "peak_rss_mb": r["peak_rss_mb"],
                     "rss_start_mb": r["rss_start_mb"]}
        if partial is not None:  # a later part may fail or be killed: keep what was measured
            partial.write_text(json.dumps(out, indent=1))
        return res

    bert = write_bert_base(work / "models" / "bert-base-random", prompt_words())
    gfile = write_random_grounding(work / "models" / "groundingdino_swint_ogc_random.pth", bert)
    gd = GroundingPredictor(load_grounding_dino(gfile, bert), paper.grounding_short_side, paper.grounding_max_size)
    with torch.inference_mode():
        boxes = rec("grounding_forward", lambda: gd.predict(img, cfg.text_prompt, cfg.box_threshold,
                                                             cfg.text_threshold)[0])
    out["grounding_boxes"] = len(boxes)
    del gd
    sam = load_sam(sam_model, "random")
    seg = Segmenter(None, sam, paper.amg_params())
    rec("sam_set_image", lambda: seg.predictor.set_image(img))  # one encoder pass
    h, w = img.shape[:2]
    rng = np.random.default_rng(0)
    for n in (8, 32, 256):  # 256 = 4 decoder calls of Segmenter.box_chunk: the peak stays bounded
        x0, y0 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
        b = np.stack([x0, y0, x0 + w / 4, y0 + h / 4], 1).astype(np.float32)
        rec(f"box_masks_{n}", lambda: seg.box_masks(img, b))
    for pps in (4, 8):  # AMG = one encoder pass per crop + the point batches
        amg = dict(paper.amg_params(), points_per_side=pps, crop_n_layers=0, pred_iou_thresh=0.0,
                   stability_score_thresh=0.0)
        seg = Segmenter(None, sam, amg)
        rec(f"amg_{pps}x{pps}", lambda: seg.generate(img))
    crops = 1 + sum(4 ** k for k in range(1, paper.amg_crop_n_layers + 1))  # crop layer k: (2^k)^2 crops
    batches = crops * -(-paper.amg_points_per_side ** 2 // paper.amg_points_per_batch)
    out["derived"] = {"paper_crops": crops, "paper_amg_batches": batches}
    for key in ("seconds", "cpu_s"):  # wall time and CPU time (the CPU time is the one to trust on a shared CPU)
        t_batch = (out["amg_8x8"][key] - out["amg_4x4"][key]) / 3  # 64 - 16 points = 3 more batches of 16
        t_enc = out["sam_set_image"][key]
        per_box = (out["box_masks_32"][key] - out["box_masks_8"][key]) / 24
        out["derived"][key] = {"sam_encoder_pass": t_enc, "amg_batch": t_batch, "box_decode_per_box": per_box,
                               "paper_amg_per_image": crops * t_enc + batches * t_batch,
                               "paper_per_image_without_descriptors": out["grounding_forward"][key] + t_enc
                               + crops * t_enc + batches * t_batch}
    out["derived"]["box_decode_mb_per_box"] = (out["box_masks_256"]["peak_rss_mb"]
                                               - out["box_masks_32"]["peak_rss_mb"]) / 224
    out["derived"]["box_chunk"] = Segmenter.box_chunk
    return out


# ------------------------------------------------------------------------------------------------ tensor peaks
def exec_script(script_argv: Sequence[str], tensors_json: Path | None = None) -> int:
    """Run a script as __main__ with every common.memory stage record extended by its CPU time (all threads of
    the process); with `tensors_json`, under torch.profiler's memory recording, writing the peak of the live
    tensor bytes of the whole run and of each stage there. That peak is the allocator-level counterpart of
    CUDA's max_memory_allocated: every tensor the run allocates (weights, activations, autograd buffers,
    optimizer state, features kept), without the allocator's block rounding, cuDNN workspaces or the CUDA
    context."""
    import contextlib
    import runpy

    import common.memory as cm

    original = cm.StageMeter.stage
    annotate = contextlib.nullcontext
    if tensors_json is not None:
        from torch.profiler import record_function

        annotate = lambda name: record_function(f"stage::{name}")  # noqa: E731

    @contextlib.contextmanager
    def timed(self, name, **info):
        c0 = time.process_time()
        with annotate(name):
            with original(self, name, **info) as rec:
                try:
                    yield rec
                finally:  # inside the stage: its record is written when the block ends
                    rec["cpu_s"] = time.process_time() - c0

    saved_argv, saved_path = sys.argv, list(sys.path)
    cm.StageMeter.stage = timed
    sys.argv = list(script_argv)
    sys.path.insert(0, str(Path(script_argv[0]).resolve().parent))
    code = 0
    prof = None
    if tensors_json is not None:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:
        with prof if prof is not None else contextlib.nullcontext():
            try:
                runpy.run_path(script_argv[0], run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        cm.StageMeter.stage, sys.argv, sys.path[:] = original, saved_argv, saved_path
    if prof is not None:
        res = tensor_peaks(prof.profiler.kineto_results.events())
        res["rc"] = code
        Path(tensors_json).write_text(json.dumps(res, indent=1))
    return code


def tensor_peaks(events) -> dict:
    """Peak live tensor MiB overall and per "stage::<name>" annotation, from profiler [memory] events."""
    import numpy as np

    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    stages = [(e.name()[len("stage::"):], e.start_ns(), e.end_ns()) for e in events
              if e.name().startswith("stage::")]
    t = np.array([m[0] for m in mem], dtype=np.int64)
    live = np.cumsum([m[1] for m in mem], dtype=np.int64) if mem else np.zeros(0, np.int64)
    out = {"peak_tensor_mb": float(live.max()) / 2 ** 20 if len(live) else 0.0, "stages": []}
    for name, a, b in sorted(stages, key=lambda x: x[1]):
        i, j = np.searchsorted(t, a), np.searchsorted(t, b, side="right")
        before = float(live[i - 1]) if i > 0 else 0.0
        peak = float(live[i:j].max()) if j > i else before
        out["stages"].append({"stage": name, "tensor_start_mb": before / 2 ** 20, "peak_tensor_mb": peak / 2 ** 20,
                              "seconds": (b - a) / 1e9})
    return out


# ------------------------------------------------------------------------------------------------ limits
def measure_limit(checkpoint: str, image_paths: Sequence[str], *, dtype: str = "fp32", batch: int = 4,
                  profile: bool = True) -> dict:
    """One model against its own limit, in this process: the whole `predict` of the images (decoding,
    preprocessing, networks, post-processing), then `preprocess` and `forward_networks` on the same images in
    batches of `batch` (each after one warm-up call). With `profile`, a second predict under cProfile gives the
    functions that take the time outside the networks."""
    import dataclasses

    import numpy as np
    import torch

    from methods.base import ImageList, load_model

    model, meta = load_model(checkpoint, device="cpu")
    if dtype != "fp32":
        try:
            model.cfg.dtype = dtype
        except dataclasses.FrozenInstanceError:
            model.cfg = dataclasses.replace(model.cfg, dtype=dtype)
    images = ImageList(list(image_paths))
    n = len(images)
    with torch.inference_mode():
        model.predict(images[:1])  # warm-up (first-call allocations, lazy imports)
        t0, c0 = time.perf_counter(), time.process_time()
        pred = model.predict(images)
        t_predict, c_predict = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        batches = [model.preprocess(images[i:i + batch]) for i in range(0, n, batch)]
        t_pre, c_pre = time.perf_counter() - t0, time.process_time() - c0
        model.forward_networks(batches[0])  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for b in batches:
            model.forward_networks(b)
        t_net, c_net = time.perf_counter() - t0, time.process_time() - c0
    out = {"checkpoint": str(checkpoint), "method": meta.get("method"), "dtype": dtype, "images": n, "batch": batch,
           "threads": torch.get_num_threads(), "predict_s_per_image": t_predict / n,
           "preprocess_s_per_image": t_pre / n, "networks_s_per_image": t_net / n,
           "ratio_predict_to_networks": t_predict / t_net if t_net > 0 else None,
           "predict_cpu_s_per_image": c_predict / n, "preprocess_cpu_s_per_image": c_pre / n,
           "networks_cpu_s_per_image": c_net / n,
           "cpu_ratio_predict_to_networks": c_predict / c_net if c_net > 0 else None,
           "scores": np.asarray(pred.scores, dtype=np.float64).tolist()}
    if profile:
        out["profile"] = _profile_predict(model, images)
    return out


def _profile_predict(model, images, top: int = 15) -> list[dict]:
    """The functions of one predict call with the most own time (cProfile), torch ops included by name."""
    import cProfile
    import pstats

    import torch

    prof = cProfile.Profile()
    with torch.inference_mode():
        prof.enable()
        model.predict(images)
        prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())
    rows = sorted(((v[2], v[3], k) for k, v in st.stats.items()), reverse=True)[:top]
    return [{"function": f"{Path(k[0]).name}:{k[1]}:{k[2]}", "own_s": tt, "cum_s": ct, "share": tt / total}
            for tt, ct, k in rows]


def limit_images(category_dir: Path, n: int) -> list[str]:
    """n test images of the category, taken in turn from its test types (sorted within each)."""
    per = [sorted(str(p) for p in (category_dir / "test" / t).glob("[0-9][0-9][0-9].png")) for t in TEST_TYPES]
    per = [x for x in per if x]
    out: list[str] = []
    i = 0
    while len(out) < n and any(i < len(x) for x in per):
        out += [x[i] for x in per if i < len(x)]
        i += 1
    return out[:n]


def run_limits(ckpt: Path, images: Sequence[str], *, set_name: str, method: str, env: dict, out: Path,
               timeout_s: float, log: Callable) -> list[dict]:
    """measure_limit of one checkpoint in fp32 and bf16, each in its own process; adds Spearman and speed-up."""
    res = {}
    for dtype in ("fp32", "bf16"):
        js = out / "limits" / f"{set_name}_{method}_{ckpt.stem}_{dtype}.json"
        js.parent.mkdir(parents=True, exist_ok=True)
        r = Run(set_name, method, f"limit_{dtype}", ckpt.stem,
                [PY, str(Path(__file__).resolve()), "limit", "--checkpoint", str(ckpt), "--dtype", dtype,
                 "--out", str(js), "--images", *images] + (["--no-profile"] if dtype != "fp32" else []))
        log("limit %s/%s %s %s", set_name, method, ckpt.name, dtype)
        run_process(r, env=env, log_path=js.with_suffix(".log"), timeout_s=timeout_s)
        if r.rc != 0 or not js.is_file():
            res[dtype] = {"error": r.error.splitlines()[-1] if r.error else f"exit {r.rc}", "log": r.log}
            log("  failed: %s", res[dtype]["error"])
            continue
        res[dtype] = json.loads(js.read_text())
        log("  predict %.3f s/img, networks %.3f s/img, ratio %.2f", res[dtype]["predict_s_per_image"],
            res[dtype]["networks_s_per_image"], res[dtype]["ratio_predict_to_networks"] or float("nan"))
    row = {"set": set_name, "method": method, "checkpoint": ckpt.name, **{k: v for k, v in res.items()}}
    a, b = res.get("fp32", {}), res.get("bf16", {})
    if "scores" in a and "scores" in b:
        row["spearman_bf16"] = spearman(a["scores"], b["scores"])
        row["bf16_speedup_predict"] = a["predict_s_per_image"] / b["predict_s_per_image"]
        row["bf16_speedup_networks"] = a["networks_s_per_image"] / b["networks_s_per_image"]
    return [row]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Run:
    """One script run: its command, exit status, resources and stage records."""
    set: str
    method: str
    variant: str
    step: str
    argv: list[str]
    iterations: int | None = None
    images: int | None = None
    rc: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    maxrss_mb: float = 0.0
    sampled_peak_mb: float = 0.0
    stages: list[dict] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)
    log: str = ""
    error: str = ""
    tensors: dict = field(default_factory=dict)  # exec_profiled's peaks (the "tensors" variant)


class TreeSampler(threading.Thread):
    """Resident set of a process and its descendants every `interval` seconds: [(t, MiB), ...]."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples = pid, interval, []
        self._stop_event = threading.Event()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as fh:
                        todo.extend(int(c) for c in fh.read().split())
            except OSError:
                pass
        return out

    @staticmethod
    def _rss_kib(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic(), sum(self._rss_kib(p) for p in self._tree(self.pid)) / 1024.0))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()

    def peak(self, t0: float = float("-inf"), t1: float = float("inf")) -> float:
        return max((m for t, m in self.samples if t0 <= t <= t1), default=0.0)


def run_process(run: Run, *, env: dict, log_path: Path, timeout_s: float) -> Run:
    """Run `run.argv` in REPO, log to log_path, fill in the resources; a timeout kills the process group."""
    stage_log = log_path.with_suffix(".stages.jsonl")
    stage_log.unlink(missing_ok=True)
    env = {**os.environ, **env, "AD_STAGE_LOG": str(stage_log), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(run.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    _CHILDREN.add(proc.pid)
    sampler = TreeSampler(proc.pid)
    sampler.start()

    def read() -> None:
        with open(log_path, "w") as fh:
            for line in proc.stdout:
                lines.append((time.monotonic(), line.rstrip("\n")))
                fh.write(line)
                fh.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killer = threading.Timer(timeout_s, lambda: _kill_group(proc.pid))
    killer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    _CHILDREN.discard(proc.pid)
    killer.cancel()
    t1 = time.monotonic()
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    sampler.stop()
    sampler.join()
    run.rc = proc.returncode
    run.wall_s = t1 - t0
    run.cpu_s = usage.ru_utime + usage.ru_stime
    run.maxrss_mb = usage.ru_maxrss / 1024.0  # KiB on Linux
    run.sampled_peak_mb = sampler.peak()
    run.log = str(log_path)
    if stage_log.is_file():
        run.stages = [json.loads(x) for x in stage_log.read_text().splitlines() if x.strip()]
    # phases: the intervals between log lines, with the sampled peak of each (the fallback without stage records)
    marks = [(t0, "start")] + [(t, s) for t, s in lines if s.strip() and not PROGRESS.search(s)] + [(t1, "end")]
    for (ta, sa), (tb, _) in zip(marks, marks[1:]):
        run.phases.append({"line": sa[:160], "start_s": ta - t0, "seconds": tb - ta, "peak_mb": sampler.peak(ta, tb)})
    if run.rc != 0:
        tail = [s for _, s in lines if s.strip()][-15:]
        run.error = ("timed out after %.0f s; " % timeout_s if run.rc in (-9, -15) else "") + "\n".join(tail)
    return run


_CHILDREN: set[int] = set()  # running script process groups, ended with the rehearsal (see _stop)


def _stop(signum, frame) -> None:
    """SIGTERM / SIGINT: end the running script's process group too (it runs in a session of its own)."""
    for pid in list(_CHILDREN):
        _kill_group(pid)
    sys.exit(128 + signum)


PROGRESS = re.compile(r"\d+%\|")  # a progress-bar line: not a phase of its own


def _kill_group(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


_HELP: dict[str, str] = {}


def script_help(script: str) -> str:
    """The script's --help text (cached): flags are looked up in it, so the rehearsal follows renamed flags."""
    if script not in _HELP:
        _HELP[script] = subprocess.run([PY, script, "--help"], cwd=REPO, capture_output=True, text=True).stdout
    return _HELP[script]


def has_flag(script: str, flag: str) -> bool:
    return any(tok.strip("[],") == flag for tok in script_help(script).split())


# ------------------------------------------------------------------------------------------------ the cases
@dataclass
class Context:
    """Where one (set, variant) runs: its data, its output folders, its iteration and image counts."""
    set: str
    variant: str
    dataset: str
    data_root: Path
    category: str
    work: Path
    iterations: int
    images: int
    dtd_root: str | None
    grounding: Path | None = None
    bert: Path | None = None
    sam_model: str = "vit_h"

    def common(self, ckpt_sub: str) -> list[str]:
        return ["--dataset", self.dataset, "--data-root", str(self.data_root), "--categories", self.category,
                "--weights", "random", "--device", "cpu", "--score-dir", str(self.work / "scores"),
                "--ckpt-dir", str(self.work / "ckpt" / ckpt_sub)]


def steps_for(method: str, c: Context) -> list[tuple[str, list[str]]]:
    """(step name, argv) of one method at its paper configuration with c.iterations iterations / epochs."""
    if method == "csad":
        masks = str(c.work / "masks")
        pseudo = [PY, "pseudo_label.py", *c.common("csad"), "--masks-root", masks, "--sam-model", c.sam_model,
                  "--sam-ckpt", "random", *STAGE1_SUBSTITUTE]
        if c.grounding is not None:
            pseudo += ["--grounding-ckpt", str(c.grounding), "--bert-dir", str(c.bert)]
        else:  # 20 queries: random SwinT-OGC weights pass all 900 queries, see STAGE1_SUBSTITUTE
            pseudo += ["--grounding-ckpt", "tiny"]
        seg = [PY, "train_segmentor.py", *c.common("csad"), "--masks-root", masks, "--epochs", str(c.iterations)]
        # train_segmentor.py's seed (the official 42; CSAD.py's own default is 0): with random weights the fused
        # model needs both parts drawn from one seeded backbone
        lgst = [PY, "CSAD.py", *c.common("csad"), "--iterations", str(c.iterations), "--seed", "42"]
        if c.dtd_root:
            lgst += ["--penalty-dir", c.dtd_root]
        else:
            lgst += ["--no-penalty"]
        return [("pseudo_label", pseudo), ("train_segmentor", seg), ("CSAD", lgst)]
    if method == "glass":
        argv = [PY, "glass.py", *c.common("glass"), "--epochs", str(c.iterations)]
        return [("glass", argv + (["--dtd-root", c.dtd_root] if c.dtd_root else []))]
    if method == "sinbad":
        return [("sinbad", [PY, "sinbad.py", *c.common("sinbad")])]
    if method in ("sapatchcore", "patchcore"):
        return [(method, [PY, "sapatchcore.py", *c.common(method), "--method", method])]
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


# Stage 1 at paper settings costs ~1 h per image on a 2-core CPU (HQ-SAM ViT-H: 1 + 4 crop encoder passes and
# 32 x 32 points per crop, 16 per decoder call), so the pipeline rehearses HQ-SAM ViT-H (random) on the full image
# with fewer points and no crop layer, and keeps every mask (random weights' quality scores are meaningless, as
# --fast does); stage1_costs() measures the per-pass and per-batch costs that extrapolate to the paper settings.
# Grounding DINO runs as the tiny random model: the random SwinT-OGC scores all 900 queries ~1.0 (every box
# passes the threshold and HQ-SAM then decodes 900 boxes, Segmenter.box_chunk per call); its own forward pass
# is in stage1_costs().
STAGE1_SUBSTITUTE = ["--amg-points-per-side", "8", "--amg-crop-n-layers", "0", "--amg-pred-iou-thresh", "0",
                     "--amg-stability-score-thresh", "0"]
ITERATIVE_STEPS = {"train_segmentor", "CSAD", "glass"}
SEGMENTOR_BATCH = 4  # train_segmentor.py's paper batch size (supervised and unsupervised each)


def widen_supervision(labels: Path, batch: int = SEGMENTOR_BATCH) -> tuple[int, int] | None:
    """Random HQ-SAM weights give meaningless components, and on a few images the HDBSCAN selection can keep fewer
    supervised images than one training batch (train_segmentor.py then refuses, as it must: the official loader
    drops the incomplete batch and would train nothing). Every training image has a label map, so the rehearsal
    supervises them all; returns (selected, all) when it did, else None."""
    import numpy as np

    from common import atomic_save_npy
    from methods.csad import label_layout as layout

    idx_file = labels / layout.INFO / layout.GOOD_INDICES
    if not idx_file.is_file():
        return None
    sup = np.load(idx_file)
    n = len(layout.list_stems(labels.name, labels.parent))
    if len(sup) >= batch or n < batch:
        return None
    atomic_save_npy(idx_file, np.arange(n, dtype=sup.dtype))
    return len(sup), n  # the steps whose cost scales with c.iterations


# ------------------------------------------------------------------------------------------------ reporting
def stage_table(runs: Sequence[Run]) -> list[dict]:
    """One row per (run, stage): the stage records, or the whole run where the script wrote none."""
    rows = []
    for r in runs:
        base = {"set": r.set, "method": r.method, "variant": r.variant, "step": r.step, "iterations": r.iterations,
                "images": r.images, "rc": r.rc}
        rows.append({**base, "stage": "(process)", "seconds": r.wall_s, "cpu_s": r.cpu_s, "peak_mb": r.maxrss_mb})
        for s in r.stages:
            rows.append({**base, "stage": s.get("stage"), "seconds": s.get("seconds"), "cpu_s": s.get("cpu_s"),
                         "peak_mb": s.get("peak_rss_mb"), "peak_cuda_mb": s.get("peak_cuda_mb")})
    return rows


def growth(runs: Sequence[Run]) -> list[dict]:
    """Per (set, method, step, stage): the peak of the base run and its changes with 2x iterations / 2x images."""
    by = {(r.set, r.method, r.variant, r.step): r for r in runs}
    out = []
    for (s, m, v, step), base in by.items():
        if v != "base":
            continue
        for other_v, key in (("iters2", "iterations"), ("images2", "images")):
            o = by.get((s, m, other_v, step))
            if o is None or o.rc != 0 or base.rc != 0:
                continue
            pairs = [("(process)", base.maxrss_mb, o.maxrss_mb, base.wall_s, o.wall_s, base.cpu_s, o.cpu_s)]
            ostages = {x["stage"]: x for x in o.stages}
            for x in base.stages:
                y = ostages.get(x["stage"])
                if y is not None:
                    pairs.append((x["stage"], x["peak_rss_mb"], y["peak_rss_mb"], x["seconds"], y["seconds"],
                                  x.get("cpu_s"), y.get("cpu_s")))
            for stage, pa, pb, ta, tb, ca, cb in pairs:
                d = (getattr(o, key) or 0) - (getattr(base, key) or 0)
                out.append({"set": s, "method": m, "step": step, "stage": stage, "vary": key,
                            "from": getattr(base, key), "to": getattr(o, key), "peak_mb_from": pa, "peak_mb_to": pb,
                            "peak_mb_per_unit": (pb - pa) / d if d else None, "seconds_from": ta, "seconds_to": tb,
                            "seconds_per_unit": (tb - ta) / d if d else None,
                            "cpu_s_per_unit": (cb - ca) / d if d and ca is not None and cb is not None else None})
    return out


def markdown(runs: Sequence[Run], grow: Sequence[dict], env: dict, limits: Sequence[dict] = ()) -> str:
    lines = [f"Rehearsal: {env['load']}; {env['threads']} threads; weights random (scores meaningless).", ""]
    lines += ["| set | method | variant | step | rc | wall s | CPU s | peak RSS MiB | stages (wall s / CPU s / peak RSS MiB) |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in runs:
        st = ", ".join(f"{s['stage']} {s['seconds']:.1f}/{s.get('cpu_s', float('nan')):.1f}/{s['peak_rss_mb']:.0f}"
                       for s in r.stages) or f"{len(r.phases)} log phases"
        if r.tensors:
            st += "; tensor peaks MiB: " + ", ".join(f"{x['stage']} {x['peak_tensor_mb']:.0f}"
                                                       for x in r.tensors.get("stages", []))
        lines.append(f"| {r.set} | {r.method} | {r.variant} | {r.step} | {r.rc} | {r.wall_s:.1f} | {r.cpu_s:.1f} | "
                     f"{r.maxrss_mb:.0f} | {st} |")
    if grow:
        lines += ["", "| set | method | step | stage | x2 of | peak MiB | change per unit MiB | s per unit |",
                  "|---|---|---|---|---|---|---:|---:|"]
        for g in grow:
            lines.append(f"| {g['set']} | {g['method']} | {g['step']} | {g['stage']} | {g['vary']} "
                         f"{g['from']}->{g['to']} | {g['peak_mb_from']:.0f} -> {g['peak_mb_to']:.0f} | "
                         f"{g['peak_mb_per_unit']:+.1f} | {g['seconds_per_unit']:+.2f} |")
    if limits:
        lines += ["", "| set | method | checkpoint | predict s/img | preprocess s/img | networks s/img | ratio | "
                      "bf16 speed-up (predict / networks) | Spearman bf16 vs fp32 |", "|---|---|---|---:|---:|---:|---:|---|---:|"]
        for x in limits:
            a = x.get("fp32", {})
            if "predict_s_per_image" not in a:
                lines.append(f"| {x['set']} | {x['method']} | {x['checkpoint']} | failed: {a.get('error', '')} |")
                continue
            bf = (f"{x['bf16_speedup_predict']:.2f} / {x['bf16_speedup_networks']:.2f}"
                  if "bf16_speedup_predict" in x else "failed")
            lines.append(f"| {x['set']} | {x['method']} | {x['checkpoint']} | {a['predict_s_per_image']:.3f} | "
                         f"{a['preprocess_s_per_image']:.3f} | {a['networks_s_per_image']:.3f} | "
                         f"{a['ratio_predict_to_networks']:.2f} | {bf} | {x.get('spearman_bf16', float('nan')):.3f} |")
    failed = [r for r in runs if r.rc != 0]
    for r in failed:
        lines += ["", f"FAILED {r.set}/{r.method}/{r.variant}/{r.step} (exit {r.rc}): "
                      f"`{shlex.join(r.argv[1:])}`", "```", r.error, "```"]
    return "\n".join(lines) + "\n"


def load_average() -> str:
    try:
        a = os.getloadavg()
        return f"load average {a[0]:.1f} / {a[1]:.1f} / {a[2]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data-root", default=None, help="MVTec LOCO root holding --category (needed for --sets real)")
    p.add_argument("--category", default=REAL_CATEGORY)
    p.add_argument("--sets", nargs="+", choices=SETS, default=None,
                   help="real (needs --data-root) and/or synthetic; default: real when --data-root, and synthetic")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--images", type=int, default=8,
                   help="training images of GLASS, PatchCore, SA-PatchCore (test/validation: --test-images per type)")
    p.add_argument("--test-images", type=int, default=2, help="test images per type and validation images")
    p.add_argument("--slow-images", type=int, default=4,
                   help="training images of SINBAD and CSAD (4: one batch of train_segmentor.py)")
    p.add_argument("--slow-test-images", type=int, default=1, help="test images per type of SINBAD and CSAD")
    p.add_argument("--iterations", type=int, default=1, help="iterations / epochs of the trained steps")
    p.add_argument("--growth", action="store_true", help="also run 2x iterations and 2x images and compare")
    p.add_argument("--synthetic-size", type=int, default=1024, help="side of the generated images")
    p.add_argument("--sam-model", default="vit_h", choices=("vit_h", "vit_l", "vit_b", "vit_tiny"))
    p.add_argument("--full-grounding", action="store_true",
                   help="stage 1 with a random SwinT-OGC file and a bert-base-shaped BERT instead of the tiny "
                        "Grounding DINO (all 900 random queries pass: tens of GB in HQ-SAM's box decoding)")
    p.add_argument("--dtd-root", default=None, help="DTD images/ folder (GLASS textures, LGST penalty images)")
    p.add_argument("--tensor-peaks", action="store_true",
                   help="also run the base configuration under torch.profiler's memory recording: peak live tensor "
                        "bytes per stage (the estimate of the GPU memory a run needs)")
    p.add_argument("--reuse-labels", action="store_true",
                   help="skip CSAD's pseudo_label step where an earlier run left its labels in --work-dir")
    p.add_argument("--limits", action="store_true",
                   help="after the runs: each checkpoint's networks alone vs its predict, fp32 and bf16")
    p.add_argument("--limits-only", action="store_true",
                   help="only --limits, on the checkpoints an earlier run left in --work-dir")
    p.add_argument("--limit-images", type=int, default=8, help="test images for --limits (spread over the types)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per script run")
    p.add_argument("--work-dir", default=None, help="scratch folder (default <tmp>/rehearsal/work)")
    p.add_argument("--out", required=True, help="folder for rehearsal.json and rehearsal.md")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import tempfile

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stage1-costs"]:
        p = argparse.ArgumentParser(prog="rehearse.py stage1-costs")
        p.add_argument("--image", required=True)
        p.add_argument("--category", default=REAL_CATEGORY)
        p.add_argument("--sam-model", default="vit_h")
        p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "rehearsal" / "work"))
        p.add_argument("--out", required=True, help="JSON file")
        a = p.parse_args(argv[1:])
        res = stage1_costs(a.image, sam_model=a.sam_model, work=Path(a.work_dir), category=a.category,
                           partial=Path(a.out))
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(json.dumps(res["derived"], indent=1))
        return res
    if argv[:1] == ["exec"]:  # exec script.py [args...]
        sys.exit(exec_script(argv[1:]))
    if argv[:1] == ["exec-profiled"]:  # exec-profiled OUT.json script.py [args...]
        sys.exit(exec_script(argv[2:], Path(argv[1])))
    if argv[:1] == ["limit"]:
        p = argparse.ArgumentParser(prog="rehearse.py limit")
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--images", nargs="+", required=True)
        p.add_argument("--dtype", default="fp32")
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--no-profile", action="store_true")
        p.add_argument("--out", required=True, help="JSON file")
        a = p.parse_args(argv[1:])
        res = measure_limit(a.checkpoint, a.images, dtype=a.dtype, batch=a.batch, profile=not a.no_profile)
        Path(a.out).write_text(json.dumps(res, indent=1))
        return res
    args = parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sets = args.sets or ((["real"] if args.data_root else []) + ["synthetic"])
    if "real" in sets and not args.data_root:
        sys.exit("error: --sets real needs --data-root (an MVTec LOCO root holding %s)" % args.category)
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / "rehearsal" / "work")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    def log(msg, *a):
        print(time.strftime("%H:%M:%S ") + "rehearse: " + (msg % a if a else msg), flush=True)

    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    grounding = bert = None
    if "csad" in args.methods and args.full_grounding:
        from methods.csad.pseudo_label.config import prompt_words

        log("writing the random bert-base and Grounding DINO SwinT-OGC files")
        bert = write_bert_base(work / "models" / "bert-base-random", prompt_words())
        grounding = write_random_grounding(work / "models" / "groundingdino_swint_ogc_random.pth", bert)

    n_max = max(method_images(m, args)[0] for m in args.methods) * (2 if args.growth else 1)
    t_max = max(method_images(m, args)[1] for m in args.methods) * (2 if args.growth else 1)
    sources = {}
    if "real" in sets:
        sources["real"] = ("mvtec_loco", Path(args.data_root) / args.category)
    if "synthetic" in sets:
        src = generate_synthetic(work / f"synthetic_{args.synthetic_size}px_{n_max}_{t_max}", size=args.synthetic_size,
                                 n_train=n_max, n_val=t_max, n_test=t_max, log=log)
        sources["synthetic"] = ("synthetic_loco", src)
    variants = [("base", 1, 1)] + ([("iters2", 2, 1), ("images2", 1, 2)] if args.growth else [])
    variants += [("tensors", 1, 1)] if args.tensor_peaks else []

    runs: list[Run] = []
    t_start = time.monotonic()
    for set_name, (dataset, src) in sources.items():
        for variant, f_iter, f_img in ([] if args.limits_only else variants):
            vdir = work / set_name / variant
            for method in args.methods:
                n, n_test = method_images(method, args)
                n, n_test = n * f_img, n_test * f_img  # fit grows with n, predict with the test images
                iters = args.iterations * f_iter
                data_root = vdir / f"data_{n}_{n_test}"
                if not data_root.is_dir():
                    make_subset(src, data_root, n_train=n, n_val=n_test, n_test=n_test)
                c = Context(set_name, variant, dataset, data_root, src.name, vdir, iters, n, args.dtd_root,
                            grounding, bert, args.sam_model)
                for step, argv in steps_for(method, c):
                    labels = vdir / "masks" / c.category
                    if step == "pseudo_label" and args.reuse_labels and (labels / "info").is_dir():
                        log("%s/%s/%s/%s: reusing the labels in %s", set_name, method, variant, step, labels)
                        _widen(labels, log)
                        continue
                    if variant == "iters2" and step not in ITERATIVE_STEPS:
                        if step == "pseudo_label":  # the base run's labels: stage 1 has no iteration count
                            _copy_tree(work / set_name / "base" / "masks", vdir / "masks")
                        continue
                    script_argv = argv
                    if variant == "tensors":
                        if step == "pseudo_label":  # its parts are profiled by stage1-costs
                            _copy_tree(work / set_name / "base" / "masks", vdir / "masks")
                            continue
                        tjson = out / "tensors" / f"{set_name}_{method}_{step}.json"
                        tjson.parent.mkdir(parents=True, exist_ok=True)
                        argv = [PY, str(Path(__file__).resolve()), "exec-profiled", str(tjson), *argv[1:]]
                    else:
                        argv = [PY, str(Path(__file__).resolve()), "exec", *argv[1:]]
                    r = Run(set_name, method, variant, step, argv, iterations=iters, images=n)
                    log("%s/%s/%s/%s: %s", set_name, method, variant, step, shlex.join(script_argv[1:]))
                    run_process(r, env=env, log_path=out / "logs" / f"{set_name}_{method}_{variant}_{step}.log",
                                timeout_s=args.timeout)
                    if variant == "tensors" and tjson.is_file():
                        r.tensors = json.loads(tjson.read_text())
                    runs.append(r)
                    log("  exit %s, %.1f s wall, %.1f s CPU, peak RSS %.0f MiB%s", r.rc, r.wall_s, r.cpu_s,
                        r.maxrss_mb, "" if r.rc == 0 else "\n" + r.error)
                    _save(out, runs, args=args)
                    if r.rc != 0:
                        break  # the method's later steps need this one's output
                    if step == "pseudo_label":
                        _widen(labels, log)
    limits = []
    if args.limits or args.limits_only:
        for set_name, (dataset, src) in sources.items():
            imgs = limit_images(src, args.limit_images)
            for method in args.methods:
                ck_dir = work / set_name / "base" / "ckpt" / method
                for ck in sorted(p for p in ck_dir.rglob("*.pt*") if p.suffix in (".pt", ".pth")):
                    limits += run_limits(ck, imgs, set_name=set_name, method=method, env=env, out=out,
                                         timeout_s=args.timeout, log=log)
                    _save(out, runs, args=args, limits=limits)
    grow = growth(runs)
    envd = {"load": load_average(), "threads": args.threads, "cpu_count": os.cpu_count(),
            "total_s": time.monotonic() - t_start}
    (out / "rehearsal.md").write_text(markdown(runs, grow, envd, limits))
    res = _save(out, runs, args=args, grow=grow, env=envd, limits=limits)
    log("written %s and %s", out / "rehearsal.json", out / "rehearsal.md")
    return res


def _widen(labels: Path, log) -> None:
    widened = widen_supervision(labels)
    if widened:
        log("  random weights selected %d supervised image(s), fewer than a training batch: the rehearsal "
            "supervises all %d training images", *widened)


def method_images(method: str, args) -> tuple[int, int]:
    """(training images, test images per type = validation images) of a method's runs: SINBAD (30 crops per
    image and deep level) and CSAD (HQ-SAM ViT-H, two encoder passes per image) on fewer."""
    if method in ("sinbad", "csad"):
        return args.slow_images, args.slow_test_images
    return args.images, args.test_images  # 8: one GLASS batch at the paper's batch size


def _copy_tree(src: Path, dst: Path) -> None:
    if src.is_dir():
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, symlinks=True)


def _save(out: Path, runs, *, args, grow=None, env=None, limits=None) -> dict:
    res = {"args": vars(args), "env": env or {"load": load_average()}, "runs": [asdict(r) for r in runs],
           "stages": stage_table(runs), "growth": grow or [], "limits": limits or []}
    tmp = out / "rehearsal.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, out / "rehearsal.json")
    return res


if __name__ == "__main__":
    main()
