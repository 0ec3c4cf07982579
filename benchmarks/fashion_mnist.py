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
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_gsdnet.py"
DEFAULT_RUNS = ROOT / "runs" / "fashion-mnist"

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
    """Every job, most needed first: three paired seeds of the three methods, the exit model
    and a smaller static model, then the rest."""
    jobs = []
    for seed in (0, 1, 2):
        jobs += [Job("full", arm, seed) for arm in ("baseline", "gsd", "gsd-acam")]
        if seed == 0:
            jobs += [Job("full", "gsd-ce", 0), Job("full", "small_resnet10", 0)]
    jobs += [Job("full", "gsd-ce", seed) for seed in (1, 2)]
    jobs += [Job("full", "small_resnet18_narrow", 0)]
    jobs += [Job("10pct", arm, seed) for seed in (0, 1, 2) for arm in ("baseline", "gsd", "gsd-acam")]
    jobs += [Job("full", "byot", seed) for seed in (0, 1, 2)]
    jobs += [Job("full", arm, seed) for arm in ("small_resnet10", "small_resnet18_narrow") for seed in (1, 2)]
    return jobs


def command(job: Job, runs: Path, data_dir: Path | None) -> list[str]:
    out = job.out(runs)
    argv = [sys.executable, str(EXAMPLE), "--dataset", "fashion-mnist", "--seeds", str(job.seed)]
    argv += ["--threads", "1", "--save", "final", "selected", "--output-dir", str(out)]
    argv += ARMS[job.arm] + REGIMES[job.regime]
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
    jobs = [j for j in priority() if (not args.only or j.arm in args.only) and j.regime in args.regimes]
    for job in jobs:
        if finished(job, args.runs):
            continue
        lock = claim(job, args.runs)
        if lock is None:
            continue
        try:
            argv = command(job, args.runs, args.data_dir)
            started = time.time()
            print(f"{time.strftime('%H:%M:%S')} start {job}: {' '.join(argv[1:])}", flush=True)
            with open(job.out(args.runs).with_suffix(".console"), "a") as console:
                code = subprocess.call(argv, stdout=console, stderr=subprocess.STDOUT, cwd=ROOT)
            took = (time.time() - started) / 60
            print(f"{time.strftime('%H:%M:%S')} end {job}: exit {code} after {took:.1f} min", flush=True)
        finally:
            lock.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    run = sub.add_parser("train", help="train every run not finished yet, in priority order")
    run.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="where the runs go")
    run.add_argument("--data-dir", type=Path, help="the IDX files (default: the example's)")
    run.add_argument("--only", nargs="+", choices=sorted(ARMS), help="these arms only")
    run.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=sorted(REGIMES))
    args = parser.parse_args(argv)
    if args.step == "train":
        train(args)


if __name__ == "__main__":
    main()
