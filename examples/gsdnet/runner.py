"""The command behind ``examples/train_gsdnet.py``: every method and seed in turn, each run read
top to bottom (prepare data, build, train, select, report), then ``comparison.md``.

``run(config)`` returns the run's metrics dict; with several methods or seeds,
``{"runs": {method: [metrics per seed]}, "comparison": path of comparison.md}``.
"""

from __future__ import annotations

import logging
import time

import torch

from . import checkpoint
from .build import build_run
from .config import RunConfig, RunSpec
from .console import Progress, close_logging, keep_log, setup_logging
from .distributed import DistEnv, init_distributed, peer_error, shutdown
from .prepare import PreparedData, RunData, prepare_data, run_data
from .report import report, stand_in_note, summary
from .runs import finished_metrics, has_state
from .selection import select
from .training import train

log = logging.getLogger(__name__)


def run_one(run: RunSpec, prepared: PreparedData, progress: Progress) -> dict:
    """One run's steps; its metrics (those of the finished run, with --resume, if it is one)."""
    remove_orphans(run)
    data = run_data(run.config, prepared, run.seed)
    built = build_run(run, prepared)
    log_start(run, data)  # after the checks: the weights loaded
    done = finished_run(run, built.identity, progress)
    if done is not None:
        return done
    trained = train(run, built, data, progress)
    reported = select(trained)
    return report(run, data, built, trained, reported)


def remove_orphans(run: RunSpec) -> None:
    if run.env.is_main:
        orphans = checkpoint.remove_orphans(run.out)
        if orphans:
            log.info("removed %d temporary files left by a killed write in %s", len(orphans), run.out)


def log_start(run: RunSpec, data: RunData) -> None:
    note = stand_in_note(run.config)
    if note:
        log.info("NOTE: %s", note)
    log.info(
        "%s; training on %d images%s; method %s%s, model %s, seed %d, classes %s",
        data.description,
        len(data.train),
        f", validating on {len(data.val)} ({data.val_source})" if data.val is not None else "",
        run.method,
        " (as shipped)" if run.config.as_shipped else "",
        run.config.model,
        run.seed,
        data.classes,
    )


def finished_run(run: RunSpec, identity: dict, progress: Progress) -> dict | None:
    """With --resume, the metrics of this run if it already finished (verified), else None."""
    config = run.config
    if not config.resume:
        return None
    done = finished_metrics(run.out, identity, config.epochs)
    if done is not None:
        keep_log()
        log.info("%s: finished and verified, skipped (--resume)", run.out)
        if run.env.is_main and not config.keep_checkpoint:  # a kill came before its removal
            (run.out / "checkpoint.pt").unlink(missing_ok=True)
        progress.total -= config.epochs
    return done


def run(config: RunConfig) -> dict:
    """Every run of the command in turn, then ``comparison.md`` when there are several."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    env = init_distributed(config.device, config.dist_timeout)
    handlers = setup_logging(config.output_dir, env)
    progress = Progress(len(config.methods) * len(config.seeds) * config.epochs)
    failed = False
    try:
        runs = run_all(config, env, progress)
        if len(config.run_dirs()) == 1:  # one method, one seed: its metrics
            return runs[config.methods[0]][0]
        path = config.output_dir / "comparison.md"
        if env.is_main:
            text = summary(runs, list(config.seeds))
            checkpoint.atomic_write(path, lambda f: f.write(text.encode()))
            log.info("\n%s\ncomparison: %s", text, path)
            log.info("per-run outputs: %s", ", ".join(str(d) for d in config.run_dirs()))
        return {"runs": runs, "comparison": str(path)}
    except BaseException as error:
        failed = True
        explained = peer_error(error, env, config.dist_timeout)
        if explained is not None:
            raise explained from error
        raise
    finally:
        close_logging(handlers)
        shutdown(env, failed)
        torch.set_num_threads(threads)


def run_all(config: RunConfig, env: DistEnv, progress: Progress) -> dict[str, list[dict]]:
    """``{method: [metrics per seed]}``; with --resume, refused when there is nothing to resume."""
    if config.resume and not any(has_state(d) for d in config.run_dirs()):
        raise FileNotFoundError(
            f"--resume: no checkpoint.pt or finished run under {config.output_dir} to resume from"
        )
    if env.is_main:
        checkpoint.remove_orphans(config.output_dir)
    prepared = prepare_data(config)
    return {
        method: [
            run_one(RunSpec(config, method, seed, env, started=time.time()), prepared, progress)
            for seed in config.seeds
        ]
        for method in config.methods
    }
