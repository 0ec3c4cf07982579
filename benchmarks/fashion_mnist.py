"""What gradual self distillation, ACAM and the exits buy on Fashion-MNIST: the study.

Every arm trains with ``examples/train_gsdnet.py --dataset fashion-mnist`` and its preset (a
small ResNet-18 from scratch, 12 epochs of SGD with a one-cycle schedule, crops and flips, the
epoch picked on 6,000 validation images held out of the 60,000 training images, scored on the
official 10,000 test images), one seed per run, so arms differ only in their method flags and
share seeds, data order and recipe::

    python benchmarks/fashion_mnist.py train             # every run, resumable; one worker per core
    python benchmarks/fashion_mnist.py exits             # calibrate, export and time the exits
    python benchmarks/fashion_mnist.py report            # results JSON, docs table and plot

``train`` runs the jobs in priority order (see :data:`ARMS`, :data:`REGIMES`); two ``train``
processes share the list, each claiming a job with a lock file, and a killed study continues
where it stopped (the example's ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EXAMPLE = EXAMPLES / "train_gsdnet.py"
DEFAULT_RUNS = ROOT / "runs" / "fashion-mnist"
RESULTS = ROOT / "benchmarks" / "results" / "fashion_mnist.json"
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "fashion_mnist.png"

# The arms: the flags each adds to the preset. The methods are the example's.
ARMS = {
    "baseline": ["--method", "baseline"],
    "gsd": ["--method", "gsd"],  # the paper's loss: CE on the last classifier only
    "gsd-acam": ["--method", "gsd-acam"],
    # CE on every head and cheap heads (the projection on a 2x2 grid): the model for early exits.
    "gsd-ce": ["--method", "gsd", "--aux-ce-weight", "1", "--head-pool-size", "2"],
    "byot": ["--method", "gsd", "--teacher", "deepest"],  # BYOT's teacher: the last classifier
    # Smaller static models of the same family, trained with the same recipe.
    "small_resnet10": ["--method", "baseline", "--model", "small_resnet10"],
    "small_resnet18_narrow": ["--method", "baseline", "--model", "small_resnet18_narrow"],
}
# The full training set, and 10 % of it (6,000 images, 600 of them held out for validation).
REGIMES = {"full": [], "10pct": ["--train-limit", "6000", "--epochs", "30"]}


@dataclass(frozen=True)
class Job:
    regime: str
    arm: str
    seed: int

    def out(self, runs: Path) -> Path:
        return runs / self.regime / self.arm / f"seed{self.seed}"


def priority() -> list[Job]:
    """Every job, most needed first: seed 0 of every arm the exits need (the three methods, the
    exit model and the smaller static models), seeds 1 and 2 of the three methods, then the rest."""
    jobs = []
    for seed in (0, 1, 2):
        jobs += [Job("full", arm, seed) for arm in ("baseline", "gsd", "gsd-acam")]
        if seed == 0:
            jobs += [Job("full", arm, 0) for arm in ("gsd-ce", "small_resnet10", "small_resnet18_narrow")]
    jobs += [Job("full", "gsd-ce", seed) for seed in (1, 2)]
    jobs += [Job("10pct", arm, seed) for seed in (0, 1, 2) for arm in ("baseline", "gsd", "gsd-acam")]
    jobs += [Job("full", "byot", seed) for seed in (0, 1, 2)]
    jobs += [Job("full", arm, seed) for arm in ("small_resnet10", "small_resnet18_narrow") for seed in (1, 2)]
    return jobs


def command(job: Job, runs: Path, data_dir: Path | None, extra: list[str] = ()) -> list[str]:
    out = job.out(runs)
    argv = [sys.executable, str(EXAMPLE), "--dataset", "fashion-mnist", "--seeds", str(job.seed)]
    argv += ["--threads", "1", "--save", "final", "selected", "--output-dir", str(out)]
    argv += ARMS[job.arm] + REGIMES[job.regime] + list(extra)
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    if (out / "checkpoint.pt").is_file() or (out / "metrics.json").is_file():
        argv.append("--resume")
    return argv


def finished(job: Job, runs: Path) -> bool:
    return (job.out(runs) / "metrics.json").is_file()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(job: Job, runs: Path) -> Path | None:
    """A lock file for ``job`` with this process's id, or ``None`` when a live process holds it."""
    lock = job.out(runs).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and alive(holder):
                return None
            lock.unlink(missing_ok=True)  # its process died: take the job over
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return lock
    return None


def train(args: argparse.Namespace) -> None:
    jobs = [
        j
        for j in priority()
        if (not args.only or j.arm in args.only) and j.regime in args.regimes and j.seed in args.seeds
    ]
    for job in jobs:
        if finished(job, args.runs):
            continue
        lock = claim(job, args.runs)
        if lock is None:
            continue
        try:
            argv = command(job, args.runs, args.data_dir, args.example_args)
            started = time.time()
            print(f"{time.strftime('%H:%M:%S')} start {job}: {' '.join(argv[1:])}", flush=True)
            with open(job.out(args.runs).with_suffix(".console"), "a") as console:
                code = subprocess.call(argv, stdout=console, stderr=subprocess.STDOUT, cwd=ROOT)
            took = (time.time() - started) / 60
            print(f"{time.strftime('%H:%M:%S')} end {job}: exit {code} after {took:.1f} min", flush=True)
        finally:
            lock.unlink(missing_ok=True)


# --- exits: calibrate, export and time in ONNX Runtime ------------------------------------------

EXIT_ARM = "gsd-ce"
# The calibration targets: at most this accuracy drop on the validation images, or at most this
# mean cost as a fraction of the model's FLOPs.
SETTINGS = {
    "drop 0.5 pt": {"max_accuracy_drop": 0.005},
    "drop 1 pt": {"max_accuracy_drop": 0.01},
    "cost 0.3": {"max_cost": 0.3},
    "cost 0.5": {"max_cost": 0.5},
    "cost 0.7": {"max_cost": 0.7},
}
# One threshold shared by every head: the trade-off curve.
SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
STATIC = ("baseline", "small_resnet10", "small_resnet18_narrow")
TIMED_IMAGES = 256  # a fixed random subset of the test images, answered in every variant
BATCHES = (1, 32)


def example_modules():
    """The training example's package (on the path), registering the small ResNets."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import gsdnet.models  # noqa: F401 (registers the small ResNets with timm)
    from gsdnet.cli import parse_args
    from gsdnet.prepare import prepare_data, run_data

    return parse_args, prepare_data, run_data


def run_splits(seed: int, data_dir: Path | None, extra: list[str] = ()):
    """``(val images, val targets, test images, test targets)`` as the run of ``seed`` saw them:
    the example's own split and evaluation transform."""
    import torch
    from torch.utils.data import DataLoader

    parse_args, prepare_data, run_data = example_modules()
    argv = ["--dataset", "fashion-mnist", "--seeds", str(seed), "--no-check-images", *extra]
    config = parse_args(argv + (["--data-dir", str(data_dir)] if data_dir else []))
    data = run_data(config, prepare_data(config), seed)

    def tensors(split):
        batches = list(DataLoader(split, batch_size=1000))
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    return (*tensors(data.val), *tensors(data.test))


def ort_accuracy(fn, images, targets, batch: int = 500) -> tuple[float, list]:
    """Test accuracy of an ONNX model or exit folder, and the exit index per image (or None)."""
    import numpy as np

    logits, where = [], []
    for i in range(0, len(images), batch):
        out = fn(images[i : i + batch])
        if hasattr(out, "exit_index"):
            logits.append(out.logits)
            where.append(out.exit_index)
        else:
            logits.append(out)
    predicted = np.concatenate(logits).argmax(1)
    return float((predicted == targets).mean()), (np.concatenate(where) if where else None)


def shares_of(where, exits: int) -> list[float]:
    return [float((where == k).mean()) for k in range(exits)]


def with_thresholds(runtime, values: list[float], call):
    """``call`` with ``runtime``'s thresholds set to ``values`` first."""

    def run():
        runtime.set_thresholds(values)
        return call()

    return run


def measure_exits(args: argparse.Namespace) -> dict:
    """For every finished exit-model run: its exits calibrated on the validation images for each
    setting and swept with one shared threshold, and the static models, all answering the same
    test images in ONNX Runtime (1 thread), timed against the exit model's backbone exported
    whole. Writes ``exits.json`` into the runs folder."""
    import torch
    from _harness import interleaved_times, paired_ratios
    from deploy import answering, export_whole, session

    from gradual_sd import EarlyExitModel
    from gradual_sd.runtime import OnnxExitModel

    example_modules()
    from gsdnet.models import create_backbone, load_exported

    torch.set_num_threads(1)
    work = args.runs / "onnx"
    work.mkdir(parents=True, exist_ok=True)
    exit_runs = sorted((args.runs / "full" / EXIT_ARM).glob("seed*/metrics.json"))
    if not exit_runs:
        raise SystemExit(f"error: no finished {EXIT_ARM} run under {args.runs / 'full'}")
    results: dict = {"exits": [], "static": [], "refused": [], "timed_images": TIMED_IMAGES}
    statics = {}
    for arm in STATIC:
        for path in sorted((args.runs / "full" / arm).glob("seed*/model_selected.pt")):
            statics[f"{arm}/{path.parent.name}"] = path
    for metrics_path in exit_runs:
        run = metrics_path.parent
        seed = json.loads(metrics_path.read_text())["seed"]
        val_x, val_y, test_x, test_y = run_splits(seed, args.data_dir, args.example_args)
        test_np, test_t = test_x.numpy(), test_y.numpy()
        chosen = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))[:TIMED_IMAGES]
        timed = test_np[chosen.numpy()]
        model = create_backbone("small_resnet18", 10, in_chans=1)
        # The exits of the epoch picked on validation (runs before 0.3's folder names: early_exit/).
        saved = next(p for p in (run / "early_exit_selected", run / "early_exit") if p.is_dir())
        exits = EarlyExitModel.load(saved, model, example_input=test_x[:4])
        name = f"{EXIT_ARM}/seed{seed}"
        folder = exits.export_onnx(work / name, example_input=test_x[:4])
        whole = export_whole(exits.model, test_x[:2], work / f"{name}.onnx")
        heads = len(exits.stage_names)
        variants = {"exits, all disabled": [math.inf] * heads}
        for setting, target in SETTINGS.items():
            try:
                exits.calibrate((val_x, val_y), progress=False, **target)
            except ValueError as error:  # a budget below the first exit's cost
                results["refused"].append({"model": name, "setting": setting, "reason": str(error)})
                continue
            variants[setting] = [float(t) for t in exits.thresholds]
        for level in SWEEP:
            variants[f"shared {level}"] = [level] * heads
        runtime = OnnxExitModel(folder, threads=1)
        whole_fn = session(whole, 1)
        whole_accuracy, _ = ort_accuracy(whole_fn, test_np, test_t)
        static_fns = {}
        for static, path in statics.items():
            static_model, _ = load_exported(path)
            onnx_path = export_whole(static_model, test_x[:2], work / f"{static.replace('/', '-')}.onnx")
            static_fns[static] = session(onnx_path, 1)
        for batch in BATCHES:
            fns = {"whole": answering(whole_fn, timed, batch)}
            for variant, values in variants.items():
                fns[variant] = with_thresholds(runtime, values, answering(runtime, timed, batch))
            for static, fn in static_fns.items():
                fns[static] = answering(fn, timed, batch)
            ratios = paired_ratios(
                interleaved_times(fns, torch.device("cpu"), args.repeats, warmup=1, clock="cpu"), "whole"
            )
            for variant, values in variants.items():
                runtime.set_thresholds(values)
                accuracy, where = ort_accuracy(runtime, test_np, test_t)
                results["exits"].append(
                    {
                        "model": name,
                        "setting": variant,
                        "thresholds": [None if v > 1 else v for v in values],
                        "test_accuracy": accuracy,
                        "whole_model_accuracy": whole_accuracy,
                        "exit_shares": shares_of(where, heads + 1),
                        "latency_ratio": ratios[variant]["median"],
                        "latency_ratio_iqr": [ratios[variant]["q1"], ratios[variant]["q3"]],
                        "batch": batch,
                        "whole_ms_per_image": 1000 * ratios["whole"]["median_s"] / len(timed),
                    }
                )
            for static, fn in static_fns.items():
                accuracy, _ = ort_accuracy(fn, test_np, test_t)
                results["static"].append(
                    {
                        "model": static,
                        "reference": name,
                        "test_accuracy": accuracy,
                        "latency_ratio": ratios[static]["median"],
                        "latency_ratio_iqr": [ratios[static]["q1"], ratios[static]["q3"]],
                        "batch": batch,
                    }
                )
            print(f"{name}: timed at batch {batch}", flush=True)
        exits.remove()
    (args.runs / "exits.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.runs / 'exits.json'}")
    return results


# --- steps: what each arm's training step costs, side by side ------------------------------------


def measure_steps(args: argparse.Namespace) -> dict:
    """Each arm's training step (forward, loss, backward, SGD step; batch 128 of the preset's
    28 px greyscale images) timed in one process against the baseline's: interleaved
    repetitions, one thread, CPU time, paired ratios. The runs' own epoch times come from a
    shared machine; these ratios do not depend on its load. Writes ``steps.json``."""
    import torch
    from _harness import interleaved_times, paired_ratios

    parse_args, _, _ = example_modules()
    from gsdnet.models import build_gsdnet

    torch.set_num_threads(1)
    images, targets = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    fns = {}
    for arm, flags in ARMS.items():
        config = parse_args(["--dataset", "fashion-mnist", *flags])
        module, _ = build_gsdnet(
            config.methods[0],
            config.model,
            10,
            img_size=config.img_size,
            in_chans=1,
            stage_names=config.stages,
            teacher=config.teacher,
            head=config.head,
            head_pool_size=config.head_pool_size,
            **config.loss_options,
        )
        module.train()
        optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        fns[arm] = training_step(module, optimizer, images, targets)
    times = interleaved_times(fns, torch.device("cpu"), args.repeats, warmup=2, clock="cpu")
    ratios = paired_ratios(times, "baseline")
    result = {arm: {k: ratios[arm][k] for k in ("median", "q1", "q3", "median_s")} for arm in ratios}
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "steps.json").write_text(json.dumps(result, indent=1) + "\n")
    for arm, stats in result.items():
        print(f"{arm}: {stats['median']:.2f}x the baseline's step ({1000 * stats['median_s']:.0f} ms)")
    return result


def training_step(module, optimizer, images, targets):
    def step():
        optimizer.zero_grad(set_to_none=True)
        module(images, targets).loss.backward()
        optimizer.step()

    return step


# --- report: the results file, the docs table and the plot --------------------------------------


def collect_runs(runs: Path) -> list[dict]:
    """One record per finished run: the headline (the epoch picked on validation)."""
    records = []
    for path in sorted(runs.glob("*/*/seed*/metrics.json")):
        regime, arm = path.parts[-4], path.parts[-3]
        metrics = json.loads(path.read_text())
        headline = metrics["selected"] or {"epoch": metrics["final"]["epoch"], "test": metrics["final"]}
        log = [json.loads(line) for line in (path.parent / "log.jsonl").read_text().splitlines()]
        records.append(
            {
                "method": arm,
                "seed": metrics["seed"],
                "regime": regime,
                "model": metrics["model"],
                "epochs": metrics["final"]["epoch"],
                "selected_epoch": headline["epoch"],
                "test_accuracy": headline["test"]["accuracy"],
                "final_test_accuracy": metrics["final"]["accuracy"],
                "head_accuracy": headline["test"]["per_head_accuracy"],
                "seconds": round(sum(r["seconds"] for r in log), 1),
                "seconds_per_epoch": round(statistics.median(r["seconds"] for r in log), 1),
                "args": {k: metrics["args"][k] for k in ("aux_ce_weight", "head_pool_size", "teacher")},
            }
        )
    return records


def paired(runs: list[dict], regime: str, arm: str, reference: str = "baseline") -> dict | None:
    """The paired difference of ``arm`` to ``reference`` over their shared seeds, and a paired
    t-test (two-sided)."""

    def by_seed(name):
        return {r["seed"]: r for r in runs if r["regime"] == regime and r["method"] == name}

    mine, theirs = by_seed(arm), by_seed(reference)
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    differences = [mine[s]["test_accuracy"] - theirs[s]["test_accuracy"] for s in seeds]
    mean = statistics.mean(differences)
    # One seed gives a difference but no spread and no test: both stay None.
    sd = statistics.stdev(differences) if len(seeds) > 1 else None
    p = None
    if sd is not None:
        from scipy import stats

        p = (
            float(
                stats.ttest_rel(
                    [mine[s]["test_accuracy"] for s in seeds], [theirs[s]["test_accuracy"] for s in seeds]
                ).pvalue
            )
            if sd > 0
            else (0.0 if mean else 1.0)
        )
    time_ratio = statistics.median(
        mine[s]["seconds_per_epoch"] / theirs[s]["seconds_per_epoch"] for s in seeds
    )
    return {
        "seeds": seeds,
        "differences": differences,
        "mean": mean,
        "sd": sd,
        "p_value": p,
        "epoch_time_ratio": time_ratio,
    }


def report(args: argparse.Namespace) -> None:
    """``benchmarks/results/fashion_mnist.json``, the docs section between its markers, the plot."""
    import gradual_sd

    runs = collect_runs(args.runs)
    if not runs:
        raise SystemExit(f"error: no finished run under {args.runs}")
    exits_path = args.runs / "exits.json"
    measured = json.loads(exits_path.read_text()) if exits_path.is_file() else {"exits": [], "static": []}
    steps_path = args.runs / "steps.json"
    steps = json.loads(steps_path.read_text()) if steps_path.is_file() else {}
    comparisons = {
        regime: {arm: paired(runs, regime, arm) for arm in ARMS if arm != "baseline"} for regime in REGIMES
    }
    results = {
        "dataset": "Fashion-MNIST (60,000 train, 6,000 of them held out for validation; 10,000 test)",
        "machine": f"{cpu_name()}, {os.cpu_count()} cores; one torch thread per run",
        "library_version": gradual_sd.__version__,
        "commit": commit_of(args.runs),
        "commands": {
            "train": "python benchmarks/fashion_mnist.py train",
            "exits": "python benchmarks/fashion_mnist.py exits",
            "report": "python benchmarks/fashion_mnist.py report",
            "one run": "python examples/train_gsdnet.py --dataset fashion-mnist --method gsd --seeds 0",
        },
        "arms": {arm: ARMS[arm] for arm in ARMS},
        "regimes": REGIMES,
        "runs": runs,
        "comparisons": comparisons,
        "step_time_ratio": {arm: stats["median"] for arm, stats in steps.items()},
        "exits": measured["exits"],
        "refused_settings": measured.get("refused", []),
        "static": measured["static"],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.results}")
    if measured["exits"]:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    text = tables(results)
    print(text)
    if args.docs.is_file() and MARKERS[0] in args.docs.read_text():
        update_docs(args.docs, text)
        print(f"updated {args.docs} between {MARKERS[0]} and {MARKERS[1]}")


MARKERS = ("<!-- fashion-mnist:begin -->", "<!-- fashion-mnist:end -->")


def update_docs(path: Path, text: str) -> None:
    """Replace what lies between the section's markers in ``path`` with ``text``."""
    page = path.read_text()
    start, end = page.index(MARKERS[0]) + len(MARKERS[0]), page.index(MARKERS[1])
    path.write_text(f"{page[:start]}\n{text.strip()}\n{page[end:]}")


def cpu_name() -> str:
    from _harness import cpu_model

    return cpu_model()


def commit_of(runs: Path) -> str | None:
    commits = set()
    for path in runs.glob("*/*/seed*/metrics.json"):
        commits.add(json.loads(path.read_text())["environment"]["git_commit"])
    return ", ".join(sorted(c for c in commits if c)) or None


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def tables(results: dict) -> str:
    """The docs section's tables, in markdown."""
    lines = []
    for regime in REGIMES:
        rows = [r for r in results["runs"] if r["regime"] == regime]
        if not rows:
            continue
        lines += [
            f"**{regime}** ({'all 54,000' if regime == 'full' else '5,400 (10 %)'} training images). "
            "Test accuracy (%) of the last classifier at the epoch picked on validation:",
            "",
            "| arm | seeds | mean ± std | each seed | vs baseline (paired) | p | heads (mean) "
            "| step time x | epoch time x |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for arm in ARMS:
            mine = sorted((r for r in rows if r["method"] == arm), key=lambda r: r["seed"])
            if not mine:
                continue
            accuracies = [r["test_accuracy"] for r in mine]
            spread = f" ± {100 * statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else ""
            heads = {}
            for r in mine:
                for head, value in r["head_accuracy"].items():
                    heads.setdefault(head, []).append(value)
            head_text = " / ".join(f"{100 * statistics.mean(v):.1f}" for v in heads.values())
            comparison = results["comparisons"][regime].get(arm)
            versus = p = ratio = "-"
            if comparison:
                versus = f"{100 * comparison['mean']:+.2f}"
                if comparison["sd"] is not None:
                    versus += f" ± {100 * comparison['sd']:.2f}"
                    p = f"{comparison['p_value']:.2f}"
                ratio = f"{comparison['epoch_time_ratio']:.2f}"
            step = results["step_time_ratio"].get(arm)
            step_text = "-" if step is None else f"{step:.2f}"
            lines.append(
                f"| {arm} | {len(mine)} | {pct(statistics.mean(accuracies))}{spread} | "
                f"{', '.join(pct(a) for a in accuracies)} | {versus} | {p} | {head_text} | "
                f"{step_text} | {ratio} |"
            )
        lines.append("")
    if results["exits"]:

        def times(rows: list[dict]) -> str:
            return " / ".join(f"{r['latency_ratio']:.2f}" for r in sorted(rows, key=lambda r: r["batch"]))

        batches = " / ".join(str(b) for b in sorted({r["batch"] for r in results["exits"]}))
        lines += [
            "Exits (ONNX Runtime, 1 thread), time against the exit model's backbone as one ONNX file:",
            "",
            f"| model | setting | test accuracy % | share per exit % | time x (batch {batches}) |",
            "|---|---|---|---|---|",
        ]
        calibrated: dict[tuple, list[dict]] = {}
        for row in results["exits"]:
            if not row["setting"].startswith("shared"):
                calibrated.setdefault((row["model"], row["setting"]), []).append(row)
        for (model, setting), rows in calibrated.items():
            shares = " / ".join(f"{100 * s:.0f}" for s in rows[0]["exit_shares"])
            lines.append(
                f"| {model} | {setting} | {pct(rows[0]['test_accuracy'])} | {shares} | {times(rows)} |"
            )
        lines += ["", f"| static model | test accuracy % | time x (batch {batches}) |", "|---|---|---|"]
        static: dict[str, list[dict]] = {}
        for row in results["static"]:
            static.setdefault(row["model"], []).append(row)
        for model, rows in static.items():
            lines.append(f"| {model} | {pct(rows[0]['test_accuracy'])} | {times(rows)} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Test accuracy against ONNX Runtime time at batch 1: the exits' calibrated points and
    their shared-threshold curve, and the static models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    rows = [r for r in results["exits"] if r["batch"] == 1]
    for model in sorted({r["model"] for r in rows}):
        curve = [r for r in rows if r["model"] == model and r["setting"].startswith("shared")]
        curve.sort(key=lambda r: r["latency_ratio"])
        ax.plot(
            [r["latency_ratio"] for r in curve],
            [100 * r["test_accuracy"] for r in curve],
            "-",
            color="tab:blue",
            alpha=0.5,
            label="exits, one shared threshold" if model == rows[0]["model"] else None,
        )
        points = [r for r in rows if r["model"] == model and r["setting"] in SETTINGS]
        ax.plot(
            [r["latency_ratio"] for r in points],
            [100 * r["test_accuracy"] for r in points],
            "o",
            color="tab:blue",
            label="exits, calibrated on validation" if model == rows[0]["model"] else None,
        )
        labels: dict[tuple, list[dict]] = {}  # settings that chose the same thresholds share a label
        for r in points:
            labels.setdefault(tuple(r["thresholds"]), []).append(r)
        for same in labels.values():
            ax.annotate(
                ", ".join(r["setting"] for r in same),
                (same[0]["latency_ratio"], 100 * same[0]["test_accuracy"]),
                xytext=(4, -3),
                textcoords="offset points",
                fontsize=7,
            )
    statics = [r for r in results["static"] if r["batch"] == 1]
    markers = {"baseline": "s", "small_resnet10": "^", "small_resnet18_narrow": "v"}
    for arm, marker in markers.items():
        mine = [r for r in statics if r["model"].startswith(arm + "/")]
        if mine:
            ax.plot(
                [r["latency_ratio"] for r in mine],
                [100 * r["test_accuracy"] for r in mine],
                marker,
                color="black",
                label=f"static {'small_resnet18' if arm == 'baseline' else arm}",
            )
    ax.set_xlabel("time per image / the exit model's whole backbone\n(ONNX Runtime, batch 1, 1 thread)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST: exits against smaller static models", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    run = sub.add_parser("train", help="train every run not finished yet, in priority order")
    run.add_argument("--data-dir", type=Path, help="the IDX files (default: the example's)")
    run.add_argument("--only", nargs="+", choices=sorted(ARMS), help="these arms only")
    run.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=sorted(REGIMES))
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="these seeds only")
    exits = sub.add_parser("exits", help="calibrate, export and time the exits and the static models")
    exits.add_argument("--data-dir", type=Path, help="the IDX files (default: the example's)")
    exits.add_argument("--repeats", type=int, default=5, help="interleaved timing repetitions")
    steps = sub.add_parser("steps", help="time each arm's training step against the baseline's")
    steps.add_argument("--repeats", type=int, default=7, help="interleaved timing repetitions")
    done = sub.add_parser("report", help="the results file, the docs tables and the plot")
    done.add_argument("--results", type=Path, default=RESULTS)
    done.add_argument("--plot", type=Path, default=PLOT)
    done.add_argument("--docs", type=Path, default=DOCS, help="the page whose section gets the tables")
    for step in (run, exits, steps, done):
        step.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="where the runs are")
        step.add_argument(
            "--example-args",
            nargs=argparse.REMAINDER,
            default=[],
            help="more flags for every run of the example (last; a smoke test's --epochs 1)",
        )
    args = parser.parse_args(argv)
    if args.step == "train":
        train(args)
    elif args.step == "exits":
        measure_exits(args)
    elif args.step == "steps":
        measure_steps(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
