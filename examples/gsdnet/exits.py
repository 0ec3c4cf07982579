"""Early exits for a trained distiller: calibrate on held-out images, report and plot.

Thresholds are chosen on the validation split and reported on the evaluation split when the
dataset has a validation split distinct from the evaluated one. Otherwise (digits, RAF-DB,
AffectNet) the evaluation split is cut into two halves of alternate images: thresholds are
chosen on one half and everything is reported on the other, so no figure is measured on the
images that chose the thresholds.
"""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

from torch.utils.data import DataLoader, Dataset, Subset

from gradual_sd import EarlyExitModel, GradualSelfDistiller

from .checkpoint import atomic_write
from .datasets.common import IMAGENET, PixelFormat, log

MAX_ACCURACY_DROP = 0.005  # half a point, on the calibration images
EPOCHS = ("selected", "final")  # the epoch an exit model holds, as in model_<epoch>.pt


def exit_folders(epoch: str) -> tuple[str, str]:
    """The folders of the exit model of ``epoch`` (``"selected"``: picked on validation, or
    ``"final"``): for PyTorch, and the same exits for ONNX Runtime (examples/deploy_exits.py).
    Named as ``model_<epoch>.pt`` is, so that exits of one epoch beside a model file of another
    (``--save final`` in a run with a validation split) cannot pass for the same model."""
    return f"early_exit_{epoch}", f"early_exit_{epoch}_onnx"


EXIT_OUTPUTS = ("early_exit.md", "early_exit.png", *(f for e in EPOCHS for f in exit_folders(e)))
CAPTION = (
    "Curve: one threshold shared by every head. At 1 no sample leaves early, yet every head still "
    "runs, so the curve ends right of 1.0x: the heads' own cost. Star: the calibrated thresholds, "
    "one per head (a head may be switched off), so it need not lie on the curve."
)


def calibration_split(evaluated: Dataset, val: Dataset | None) -> tuple[Dataset, Dataset, str]:
    """(images that choose the thresholds, images that report them, how they were split)."""
    if val is not None and val is not evaluated:
        val = copy.copy(val)
        val.transform = evaluated.transform  # ImageList: only the evaluated split got one
        return val, evaluated, "thresholds chosen on the validation split, reported on the test split"
    indices = list(range(len(evaluated)))
    return (
        Subset(evaluated, indices[0::2]),
        Subset(evaluated, indices[1::2]),
        "no separate validation split: thresholds chosen on the even-numbered evaluation images, "
        "reported on the odd-numbered ones",
    )


def report_exits(
    distiller: GradualSelfDistiller,
    evaluated: Dataset,
    val: Dataset | None,
    batch_size: int,
    out: Path,
    title: str,
    classes: list[str],
    save: str | None = None,
    pixels: PixelFormat = IMAGENET,
) -> dict | None:
    """Turn the trained heads into early exits and report them; return the summary for
    metrics.json, or ``None`` when there are too few images to calibrate on some and report on
    others. Removes the distiller's hooks: call it after training.

    Args:
        distiller: The trained distiller, with the weights the report describes.
        evaluated: The evaluated split, transforms set.
        val: The validation split, if the run has one (:func:`calibration_split`).
        batch_size: The batch of the loaders and of the second latency column.
        out: The run's folder, where ``early_exit.md`` and ``early_exit.png`` go.
        title: The reports' title, which names the model's epoch.
        classes: The class names, recorded in the ONNX folder.
        save: The epoch ``distiller`` holds (``"selected"`` or ``"final"``), to also write the
            exit model (:func:`save_exit_model`) into the folders :func:`exit_folders` names.
        pixels: The images' normalisation, recorded in the ONNX folder.
    """
    calibrate_on, report_on, how = calibration_split(evaluated, val)
    if len(calibrate_on) == 0 or len(report_on) == 0:
        return None
    device = next(distiller.parameters()).device

    def loader(dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False)

    example = next(iter(loader(report_on)))[0][:4].to(device)
    exits = EarlyExitModel.from_distiller(distiller, example_input=example)
    calibrated = exits.calibrate(loader(calibrate_on), MAX_ACCURACY_DROP)
    table = exits.profile(loader(report_on), batch_sizes=(1, batch_size), repeats=3, latency_images=32)
    curve = table.pop("tradeoff")  # from the same pass over report_on as the table
    if save:
        save_exit_model(exits, out, save, title, classes, example, pixels)
    text = exit_table(table, calibrated, how, batch_size)
    atomic_write(out / "early_exit.md", lambda f: f.write(f"# Early exits: {title}\n\n{text}".encode()))
    plot_tradeoff(curve, table, out / "early_exit.png", title)
    log.info(
        "early exits of %s: accuracy %.2f%% (full model %.2f%%), FLOPs %.2fx, latency %.2fx at "
        "batch 1 and %.2fx at batch %d; wrote early_exit.md, early_exit.png%s",
        title,
        100 * table["accuracy"],
        100 * table["full_accuracy"],
        table["flops_ratio"],
        table["latency_ratio"][1],
        table["latency_ratio"][batch_size],
        batch_size,
        "".join(f", {folder}/" for folder in exit_folders(save)) if save else "",
    )
    return {
        "how": how,
        "max_accuracy_drop": MAX_ACCURACY_DROP,
        "calibration": calibrated,
        "report": table,
        "tradeoff": curve,
    }


def save_exit_model(
    exits: EarlyExitModel,
    out: Path,
    epoch: str,
    title: str,
    classes: list[str],
    example,
    pixels: PixelFormat = IMAGENET,
) -> None:
    """Write the calibrated exit model of ``epoch`` into ``out``: ``early_exit_<epoch>/`` for
    PyTorch (:meth:`EarlyExitModel.load`) and ``early_exit_<epoch>_onnx/`` for ONNX Runtime
    (``gradual_sd.runtime.OnnxExitModel``, ``examples/deploy_exits.py``), with the class names,
    the input normalisation the evaluation transform applies and ``title`` (which names the
    epoch) in its manifest."""
    pytorch, onnx = exit_folders(epoch)
    exits.save(out / pytorch)
    metadata = {
        "mean": list(pixels.mean),
        "std": list(pixels.std),
        "resize": list(example.shape[-2:]),
        "model": title,
    }
    exits.export_onnx(out / onnx, example_input=example, class_names=classes, metadata=metadata)


def exit_table(table: dict, calibrated: dict, how: str, batch_size: int) -> str:
    """Markdown: one row per exit, then the totals against the full model."""
    pct = lambda v: "-" if v != v else f"{100 * v:.1f}"  # noqa: E731 (nan: no sample left there)
    lines = [
        f"{how}; {table['samples']} report images. Calibrated for at most "
        f"{100 * MAX_ACCURACY_DROP:.1f} points lost on the calibration images "
        f"({100 * calibrated['accuracy']:.2f} % vs {100 * calibrated['full_accuracy']:.2f} % there).",
        "",
        f"| exit | threshold | share % | accuracy % | ECE % | head alone % | FLOPs x | "
        f"latency x (batch 1) | latency x (batch {batch_size}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table["exits"]:
        threshold = "-" if row["threshold"] is None or row["threshold"] > 1 else f"{row['threshold']:.3f}"
        latency = row["latency_ratio"]
        lines.append(
            f"| {row['exit']} | {threshold} | {pct(row['share'])} | {pct(row['accuracy'])} | "
            f"{pct(row['ece'])} | {pct(row['head_accuracy_all'])} | {row['flops_ratio']:.2f} | "
            f"{latency[1]:.2f} | {latency[batch_size]:.2f} |"
        )
    latency = table["latency_ratio"]
    lines += [
        "",
        f"With exits: accuracy {100 * table['accuracy']:.2f} % (full model "
        f"{100 * table['full_accuracy']:.2f} %), mean FLOPs {table['flops_ratio']:.2f}x, latency "
        f"{latency[1]:.2f}x at batch 1 and {latency[batch_size]:.2f}x at batch {batch_size} of the "
        "plain model's (medians of 3 interleaved repetitions; FLOPs x and latency x per exit: "
        "every sample forced to leave there, its own head included).",
        "",
    ]
    return "\n".join(lines)


def plot_tradeoff(curve: list[dict], table: dict, path: Path, title: str) -> None:
    """Accuracy against mean FLOPs (relative to the full model), one threshold for every head
    swept from 0 to 1, with the calibrated point marked and :data:`CAPTION` under the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    ax.plot(
        [p["flops_ratio"] for p in curve],
        [100 * p["accuracy"] for p in curve],
        "o-",
        markersize=3,
        label="one threshold shared by every head (0 to 1)",
    )
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.plot([1.0], [100 * table["full_accuracy"]], "ks", label="full model, no heads")
    ax.plot(
        [table["flops_ratio"]],
        [100 * table["accuracy"]],
        "r*",
        markersize=12,
        label="calibrated: one threshold per head",
    )
    ax.set_xlabel("mean FLOPs relative to the full model")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.02, 0.02, textwrap.fill(CAPTION, 95), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
