"""Accuracies from confusion matrices, the confusion-matrix figure and the comparison table.

Accuracies are fractions in [0, 1]. Confusion matrices are ``cm[true, predicted]`` counts.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping, Sequence

import torch


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy(cm: torch.Tensor) -> float:
    return float(cm.diag().sum() / cm.sum().clamp(min=1))


def summarize(cms: Mapping[str, torch.Tensor], classes: Sequence[str], epoch: int) -> dict:
    """Metrics of one evaluation; the last entry of ``cms`` is the model's own classifier."""
    final = list(cms.values())[-1].cpu()
    per_class = final.diag().double() / final.sum(dim=1).clamp(min=1)
    return {
        "epoch": epoch,
        "accuracy": accuracy(final),
        "per_class_accuracy": {c: float(a) for c, a in zip(classes, per_class)},
        "per_head_accuracy": {head: accuracy(cm.cpu()) for head, cm in cms.items()},
        "confusion_matrix": final.tolist(),
    }


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str
) -> None:
    """Row-normalised confusion matrix with percentages in the cells (like the paper's Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.as_tensor(cm, dtype=torch.double)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(classes)), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            value = float(rates[i, j])
            ax.text(
                j,
                i,
                f"{100 * value:.0f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparison_table(runs: Mapping[str, dict], which: str = "final") -> str:
    """Markdown table: one row per method, last-classifier accuracy and every head's accuracy."""
    heads: list[str] = []
    for metrics in runs.values():
        for head in metrics[which]["per_head_accuracy"]:
            if head not in heads:
                heads.append(head)
    # The model's own classifier is every run's last head; keep it as the last column.
    last = {list(m[which]["per_head_accuracy"])[-1] for m in runs.values()}
    heads = [h for h in heads if h not in last] + sorted(last)
    lines = [
        f"| method | {which} epoch | accuracy (last classifier) | "
        + " | ".join(f"head {h}" for h in heads)
        + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in heads) + " |",
    ]
    for method, metrics in runs.items():
        result = metrics[which]
        cells = [
            f"{100 * result['per_head_accuracy'][h]:.2f}" if h in result["per_head_accuracy"] else "-"
            for h in heads
        ]
        lines.append(
            f"| {method} | {result['epoch']} | {100 * result['accuracy']:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"
