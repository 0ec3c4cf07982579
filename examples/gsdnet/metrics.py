"""Accuracies from confusion matrices, the confusion-matrix figure and the comparison table.

Accuracies are fractions in [0, 1]. Confusion matrices are ``cm[true, predicted]`` counts.
Balanced accuracy is the mean per-class recall over the classes present in the split: RAF-DB and
AffectNet are imbalanced, and the field's "average accuracy" is this number when computed right.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from collections.abc import Mapping, Sequence

import torch


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy(cm: torch.Tensor) -> float:
    return float(cm.diag().sum() / cm.sum().clamp(min=1))


def balanced_accuracy(cm: torch.Tensor) -> float:
    """Mean recall over the classes that occur (rows with no sample are left out)."""
    support = cm.sum(dim=1)
    present = support > 0
    return float((cm.diag()[present].double() / support[present]).mean()) if present.any() else 0.0


def summarize(cms: Mapping[str, torch.Tensor], classes: Sequence[str], epoch: int) -> dict:
    """Metrics of one evaluation; the last entry of ``cms`` is the model's own classifier."""
    final = list(cms.values())[-1].cpu()
    per_class = final.diag().double() / final.sum(dim=1).clamp(min=1)
    return {
        "epoch": epoch,
        "accuracy": accuracy(final),
        "balanced_accuracy": balanced_accuracy(final),
        "per_class_accuracy": {c: float(a) for c, a in zip(classes, per_class)},
        "per_head_accuracy": {head: accuracy(cm.cpu()) for head, cm in cms.items()},
        "per_head_balanced_accuracy": {head: balanced_accuracy(cm.cpu()) for head, cm in cms.items()},
        "confusion_matrix": final.tolist(),
    }


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str
) -> None:
    """Row-normalised confusion matrix in percent (each true class's row sums to 100), like the
    paper's Fig. 4; the colour bar uses the same percent scale as the cells. Empty cells stay
    blank, so the confusions stand out; one under half a percent reads ``<1``, not 0. Column
    labels are slanted only when they are long enough to collide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.as_tensor(cm, dtype=torch.double)
    rates = 100 * counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=100.0)
    slanted = max(map(len, classes), default=0) > 3
    ax.set_xticks(
        range(len(classes)),
        labels=classes,
        rotation=45 if slanted else 0,
        ha="right" if slanted else "center",
    )
    ax.set_yticks(range(len(classes)), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (rows normalised to 100 %)")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if counts[i, j] == 0:
                continue
            value = float(rates[i, j])
            ax.text(
                j,
                i,
                f"{value:.0f}" if value >= 0.5 else "<1",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > 50 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_std(values: Sequence[float]) -> str:
    """``mean ± sample std`` with two decimals; the mean alone for one value."""
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def protocol_result(metrics: Mapping, which: str) -> dict:
    """A run's test metrics under protocol ``which``: ``final``, ``best`` (epoch picked on the
    test set) or ``selected`` (epoch picked on validation)."""
    return metrics["selected"]["test"] if which == "selected" else metrics[which]


def comparison_table(runs: Mapping[str, Sequence[dict]], which: str = "final") -> str:
    """Markdown table: one row per method, mean ± std over its seeds (runs) of the last
    classifier's accuracy and balanced accuracy and of every head's accuracy, in percent."""
    heads: list[str] = []
    for seeds in runs.values():
        for head in protocol_result(seeds[0], which)["per_head_accuracy"]:
            if head not in heads:
                heads.append(head)
    # The model's own classifier is every run's last head; keep it as the last column.
    last = {list(protocol_result(s[0], which)["per_head_accuracy"])[-1] for s in runs.values()}
    heads = [h for h in heads if h not in last] + sorted(last)
    lines = [
        f"| method | {which} epoch | accuracy (last classifier) | balanced accuracy | "
        + " | ".join(f"head {h}" for h in heads)
        + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in heads) + " |",
    ]
    for method, seeds in runs.items():
        results = [protocol_result(m, which) for m in seeds]
        cells = [
            mean_std([100 * r["per_head_accuracy"][h] for r in results])
            if h in results[0]["per_head_accuracy"]
            else "-"
            for h in heads
        ]
        epochs = ", ".join(str(r["epoch"]) for r in results)
        accuracy_ = mean_std([100 * r["accuracy"] for r in results])
        balanced = mean_std([100 * r["balanced_accuracy"] for r in results])
        lines.append(f"| {method} | {epochs} | {accuracy_} | {balanced} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
