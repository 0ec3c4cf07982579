"""Report: a run's ``metrics.json``, confusion matrix and early-exit report, its console summary,
and the command's ``comparison.md``."""

from __future__ import annotations

import logging
import platform
import subprocess
import time
from pathlib import Path

import timm
import torch

import gradual_sd

from .build import BuiltRun
from .cli import MODEL_FILES
from .config import RunConfig, RunSpec
from .engine import Trained
from .exits import EXIT_OUTPUTS, exit_folders, report_exits
from .metrics import comparison_table, plot_confusion_matrix
from .prepare import RunData
from .runs import finish
from .selection import Reported

log = logging.getLogger(__name__)
EXAMPLES = Path(__file__).resolve().parents[1]
STAND_IN_NOTE = (
    "SMALL STAND-IN, NOT RAF-DB: scikit-learn's 8x8 handwritten digits, a {model} at {img_size}px "
    "from {init}; it checks the pipeline, it is not a facial-expression result"
)
# model_*.pt hold the plain model (no heads, no hooks); gsdnet lives in examples/, not installed.
LOAD_HINT = (
    "load an exported model from any directory (returns the model in eval mode and its config: "
    "classes, img_size, mean, std):\n"
    "  import sys; sys.path.insert(0, {examples!r})\n"
    "  from gsdnet.models import load_exported\n"
    "  model, config = load_exported({path!r})"
)

DEPLOY_HINT = (
    "answer images with the exits, without torch:\n  python {examples}/deploy_exits.py {folder} IMAGES..."
)


def stand_in_note(config: RunConfig) -> str | None:
    """The digits runs' warning that they are not a facial-expression result."""
    if config.dataset != "digits":
        return None
    init = config.weights or "random initialisation"
    return STAND_IN_NOTE.format(model=config.model, img_size=config.img_size, init=init)


def environment() -> dict:
    """Versions and the git commit, so a metrics file says what produced it."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=EXAMPLES, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=EXAMPLES, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "gradual_sd": gradual_sd.__version__,
        "git_commit": commit,
        "git_dirty": dirty if commit else None,
    }


def run_metrics(run: RunSpec, data: RunData, built: BuiltRun, trained: Trained) -> dict:
    """metrics.json's content, before the early-exit summary and the outputs' digests."""
    config = run.config
    final, best, selected = trained.final, trained.best, trained.selected
    tie_rule = "ties to the later epoch" if config.as_shipped else "ties to the earlier epoch"
    return {
        "note": stand_in_note(config),
        "dataset": config.dataset,
        "description": data.description,
        "method": run.method,
        "as_shipped": config.as_shipped,
        "model": config.model,
        "seed": run.seed,
        "loss": None if run.method == "baseline" else dict(config.loss_options, teacher=config.teacher),
        "weights": built.build_info["weights"],
        "classes": data.classes,
        "num_train_samples": len(data.train),
        "num_val_samples": len(data.val) if data.val is not None else None,
        "num_test_samples": len(data.test),
        "val_split": data.val_source,
        "eval_split": config.eval_split,
        "accuracy_units": "fraction in [0, 1]; balanced_accuracy is the mean per-class recall",
        "headline": "selected" if selected else "final",
        "final": final,
        "selected": None
        if selected is None
        else dict(selected, selected_on=f"validation accuracy of the last classifier ({tie_rule})"),
        "best": dict(
            best,
            selected_on=f"{config.eval_split} accuracy of the last classifier "
            f"(as the reference code does; optimistic; {tie_rule})",
        ),
        "dataset_notes": data.notes,
        "args": config.as_json(),
        "environment": environment(),
        "world_size": run.env.world_size,
        "wall_time_s": round(time.time() - run.started, 1),
        "run": built.identity,
    }


def report(run: RunSpec, data: RunData, built: BuiltRun, trained: Trained, reported: Reported) -> dict:
    """Write the run's reports, all of ``reported`` (the headline's model), and metrics.json
    (last, with its outputs' digests); return the metrics. Only the main process writes."""
    config, out = run.config, run.out
    metrics = run_metrics(run, data, built, trained)
    if not run.env.is_main:
        return metrics
    title = f"{run.method}, {config.dataset}, {reported.label}"
    if run.method != "baseline" and not config.as_shipped:  # early exits (gsdnet/exits.py)
        metrics["early_exit"] = report_exits(
            reported.module,
            data.test,
            data.val,
            config.batch_size,
            out,
            title,
            data.classes,
            # the exit model holds a whole model, as --save final does
            save=reported.kind if "final" in config.save else None,
            pixels=data.pixels,
        )
        if metrics["early_exit"] is not None:
            metrics["early_exit"]["epoch"] = reported.epoch
    plot_confusion_matrix(
        reported.test["confusion_matrix"], data.classes, out / "confusion_matrix.png", title
    )
    outputs = ["log.jsonl", "confusion_matrix.png", *MODEL_FILES.values(), *EXIT_OUTPUTS]
    finish(out, metrics, outputs, config.keep_checkpoint)
    log_headline(run.method, run.seed, trained)
    log_outputs(config, out, trained, reported)
    return metrics


def log_headline(method: str, seed: int, trained: Trained) -> None:
    final, best, selected = trained.final, trained.best, trained.selected
    if selected:
        log.info(
            "%s seed %d: test at the epoch picked on validation (%d): %.2f%% (balanced %.2f%%); "
            "final epoch %.2f%%; best epoch on test %d: %.2f%% (optimistic)",
            method,
            seed,
            selected["epoch"],
            100 * selected["test"]["accuracy"],
            100 * selected["test"]["balanced_accuracy"],
            100 * final["accuracy"],
            best["epoch"],
            100 * best["accuracy"],
        )
    else:
        log.info(
            "%s seed %d: final epoch %d accuracy %.2f%% (balanced %.2f%%, headline); best epoch "
            "%d %.2f%% (picked on the test set, optimistic)",
            method,
            seed,
            final["epoch"],
            100 * final["accuracy"],
            100 * final["balanced_accuracy"],
            best["epoch"],
            100 * best["accuracy"],
        )


def log_outputs(config: RunConfig, out: Path, trained: Trained, reported: Reported) -> None:
    """Which files the run wrote, the epoch each model file and exit folder holds, how to load
    an exported model, and the command that answers images with the exits."""
    epochs = {
        "final": f"epoch {trained.final['epoch']}, the last",
        "selected": f"epoch {trained.selected['epoch']}, picked on validation" if trained.selected else "",
        "best": f"epoch {trained.best['epoch']}, best on test, optimistic",
    }
    files = [
        "metrics.json",
        "log.jsonl",
        "train.log" if out == config.output_dir else None,
        "confusion_matrix.png",
    ]
    models = [
        k for k in ("final", "selected", "best") if k in config.save and (out / MODEL_FILES[k]).is_file()
    ]
    files += [f"{MODEL_FILES[k]} ({epochs[k]})" for k in models]
    pytorch, onnx = exit_folders(reported.kind)
    exits_saved = "final" in config.save and (out / onnx).is_dir()
    if exits_saved:
        files.append(f"{pytorch}/ and {onnx}/ (the exits of {epochs[reported.kind]})")
    if config.keep_checkpoint:
        files.append("checkpoint.pt")
    log.info("wrote %s: %s", out, ", ".join(f for f in files if f))
    if models:
        log.info(LOAD_HINT.format(examples=str(EXAMPLES), path=str((out / MODEL_FILES[models[0]]).resolve())))
    if exits_saved:
        log.info(DEPLOY_HINT.format(examples=str(EXAMPLES), folder=str((out / onnx).resolve())))


def summary(runs: dict[str, list[dict]], seeds: list[int]) -> str:
    """comparison.md: every protocol's table, mean +- std over seeds."""
    first = next(iter(runs.values()))[0]
    header = (
        f"{first['note'] or first['description']}\n\nSeeds {seeds}; test accuracy (%) of the last "
        "classifier and of every head, mean ± std over seeds.\n"
    )
    parts = [header]
    if first["selected"]:
        parts.append(
            f"\n**Clean protocol**: test at the epoch picked on validation ({first['val_split']}):\n\n"
            + comparison_table(runs, "selected")
        )
    parts.append("\nFinal epoch:\n\n" + comparison_table(runs, "final"))
    parts.append(
        "\nBest epoch picked on the test set (the paper's protocol, optimistic):\n\n"
        + comparison_table(runs, "best")
    )
    return "".join(parts)
