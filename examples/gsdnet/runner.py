"""The command behind ``examples/train_gsdnet.py``: every method and seed in turn, each run read
top to bottom (prepare data, build, train, select, report), then ``comparison.md``.

``run(args)`` returns the run's metrics dict; with several methods or seeds,
``{"runs": {method: [metrics per seed]}, "comparison": path of comparison.md}``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from . import checkpoint
from .build import build_run
from .console import Progress, close_logging, keep_log, setup_logging
from .datasets.common import DatasetSplits, ImageList
from .distributed import DistEnv, init_distributed, shutdown, stall_error
from .models import METHODS
from .prepare import RunData, prepare_data, run_data
from .report import report, stand_in_note, summary
from .runs import finished_metrics, has_state
from .selection import select
from .training import train

log = logging.getLogger(__name__)


def run_one(
    args: argparse.Namespace,
    splits: DatasetSplits,
    lists: dict[str, ImageList],
    method: str,
    seed: int,
    env: DistEnv,
    out: Path,
    progress: Progress,
) -> dict:
    started = time.time()
    remove_orphans(out, env)
    data = run_data(args, splits, lists, seed)
    built = build_run(args, method, seed, splits.classes, lists, env)
    log_start(args, splits, data, method, seed)  # after the checks: the weights loaded
    done = finished_run(args, out, built.run_info, env, progress)
    if done is not None:
        return done
    trained = train(args, built, data, splits.classes, seed, env, out, progress)
    reported = select(trained)
    return report(args, splits, data, method, seed, built, trained, reported, env, out, started)


def remove_orphans(out: Path, env: DistEnv) -> None:
    if env.is_main:
        orphans = checkpoint.remove_orphans(out)
        if orphans:
            log.info("removed %d temporary files left by a killed write in %s", len(orphans), out)


def log_start(args: argparse.Namespace, splits: DatasetSplits, data: RunData, method: str, seed: int) -> None:
    note = stand_in_note(args)
    if note:
        log.info("NOTE: %s", note)
    log.info(
        "%s; training on %d images%s; method %s%s, model %s, seed %d, classes %s",
        splits.description,
        len(data.train),
        f", validating on {len(data.val)} ({data.val_source})" if data.val is not None else "",
        method,
        " (as shipped)" if args.as_shipped else "",
        args.model,
        seed,
        splits.classes,
    )


def finished_run(
    args: argparse.Namespace, out: Path, run_info: dict, env: DistEnv, progress: Progress
) -> dict | None:
    """With --resume, the metrics of this run if it already finished (verified), else None."""
    if not args.resume:
        return None
    done = finished_metrics(out, run_info, args.epochs)
    if done is not None:
        keep_log()
        log.info("%s: finished and verified, skipped (--resume)", out)
        if env.is_main and not args.keep_checkpoint:  # a kill came before its removal
            (out / "checkpoint.pt").unlink(missing_ok=True)
        progress.total -= args.epochs
    return done


def run_dir(args: argparse.Namespace, method: str, seed: int, methods: list[str]) -> Path:
    out = args.output_dir / method if len(methods) > 1 else args.output_dir
    return out / f"seed{seed}" if len(args.seeds) > 1 else out


def run(args: argparse.Namespace) -> dict:
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = init_distributed(args.device, args.dist_timeout)
    handlers = setup_logging(args.output_dir, env)
    methods = list(METHODS) if args.method == "all" else [args.method]
    progress = Progress(len(methods) * len(args.seeds) * args.epochs)
    failed = False
    try:
        dirs = [run_dir(args, m, s, methods) for m in methods for s in args.seeds]
        if args.resume and not any(has_state(d) for d in dirs):
            raise FileNotFoundError(
                f"--resume: no checkpoint.pt or finished run under {args.output_dir} to resume from"
            )
        if env.is_main:
            checkpoint.remove_orphans(args.output_dir)
        splits, lists = prepare_data(args)
        runs = {
            method: [
                run_one(
                    args, splits, lists, method, seed, env, run_dir(args, method, seed, methods), progress
                )
                for seed in args.seeds
            ]
            for method in methods
        }
        if len(methods) == 1 and len(args.seeds) == 1:
            return runs[methods[0]][0]
        path = args.output_dir / "comparison.md"
        if env.is_main:
            text = summary(runs, args.seeds)
            checkpoint.atomic_write(path, lambda f: f.write(text.encode()))
            log.info("\n%s\ncomparison: %s", text, path)
            log.info("per-run outputs: %s", ", ".join(str(d) for d in dirs))
        return {"runs": runs, "comparison": str(path)}
    except BaseException as error:
        failed = True
        stalled = stall_error(error, env, args.dist_timeout)
        if stalled is not None:
            raise stalled from error
        raise
    finally:
        close_logging(handlers)
        shutdown(env, failed)
        torch.set_num_threads(threads)
