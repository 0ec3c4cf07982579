"""Train any timm model with gradual self distillation in a plain loop under Hugging Face
accelerate: mixed precision and multiple processes (DDP) the way timm models are usually run.

    python examples/accelerate_gsd.py --model resnet18 --epochs 5
    accelerate launch --num_processes 2 examples/accelerate_gsd.py --mixed-precision bf16
    accelerate launch --cpu --num_processes 2 examples/accelerate_gsd.py   # two CPU processes (gloo)

Every epoch prints (and, with ``--log-with``, logs to accelerate's trackers) every loss term and
every head's accuracy, on the training and validation data. At the end the plain timm model is
exported and saved: ``timm.create_model("resnet18", num_classes=10,
checkpoint_path="runs/accelerate/model.pth")`` loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader

from frameworks_common import (
    NUM_CLASSES,
    add_common_args,
    build_distiller,
    digits_loaders,
    head_correct,
)
from gradual_sd import DistillerOutput, GradualSelfDistiller


def metric_rows(
    out: DistillerOutput, targets: torch.Tensor, heads: list[str]
) -> tuple[list[str], torch.Tensor]:
    """Column names, and one row per sample: the batch's loss terms (``loss`` first), 0/1 per
    head for a correct prediction, and a 1 that counts the sample. Rows can be gathered across
    processes; summed, they give sample-weighted means (:func:`means`)."""
    terms = torch.stack([out.loss, *out.losses.values()]).detach().float()
    correct = head_correct(out.head_logits, targets).float()
    rows = torch.cat([terms.expand(len(targets), -1), correct, torch.ones_like(correct[:, :1])], 1)
    return ["loss", *out.losses, *(f"acc/{head}" for head in heads)], rows


def means(names: list[str], sums: torch.Tensor) -> dict[str, float]:
    return dict(zip(names, (sums[:-1] / sums[-1]).tolist()))


def train_epoch(
    accelerator: Accelerator,
    distiller: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    heads: list[str],
) -> dict[str, float]:
    """One epoch; returns the means of every loss term and head accuracy over all processes."""
    distiller.train()
    sums = torch.zeros((), device=accelerator.device)
    for images, targets in loader:
        out = distiller(images, targets)
        accelerator.backward(out.loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        names, rows = metric_rows(out, targets, heads)
        sums = sums + rows.sum(0)
    # The training loader drops its last partial batch, so no sample is counted twice.
    return means(names, accelerator.reduce(sums, "sum"))


@torch.no_grad()
def evaluate(
    accelerator: Accelerator, distiller: nn.Module, loader: DataLoader, heads: list[str]
) -> dict[str, float]:
    """Loss terms and head accuracies over the whole validation set (every process's shard)."""
    distiller.eval()
    sums = torch.zeros((), device=accelerator.device)
    for images, targets in loader:
        names, rows = metric_rows(distiller(images, targets, run_heads=True), targets, heads)
        # gather_for_metrics drops the samples that accelerate repeats to even out the shards.
        sums = sums + accelerator.gather_for_metrics(rows).sum(0)
    return means(names, sums)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        help="default: accelerate's configuration (accelerate launch --mixed_precision ...)",
    )
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (gloo between processes)")
    parser.add_argument("--log-with", help="accelerate trackers, e.g. tensorboard, wandb or all")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/accelerate"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train, validate every epoch, save ``<output-dir>/model.pth``; returns the per-epoch
    metrics, the exported model and its path."""
    args = parse_args(argv)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        log_with=args.log_with,
        project_dir=args.output_dir,
    )
    set_seed(args.seed)  # identical initial weights on every process
    distiller: GradualSelfDistiller = build_distiller(args.model, NUM_CLASSES, args.img_size)
    heads = list(distiller.head_names)
    train, val = digits_loaders(args.img_size, args.batch_size, args.train_limit, args.workers)
    optimizer = create_optimizer_v2(distiller, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    # accelerate's convention: the schedule counts the steps of one process over the whole data;
    # the prepared scheduler advances once per process at every step.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train))
    model, optimizer, train, val, scheduler = accelerator.prepare(distiller, optimizer, train, val, scheduler)
    if args.log_with:
        accelerator.init_trackers("gradual-sd", config={k: str(v) for k, v in vars(args).items()})

    accelerator.print(
        f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, "
        f"mixed precision {accelerator.mixed_precision}, device {accelerator.device}"
    )
    history = []
    for epoch in range(args.epochs):
        record = {
            f"train/{k}": v
            for k, v in train_epoch(accelerator, model, optimizer, scheduler, train, heads).items()
        }
        record.update({f"val/{k}": v for k, v in evaluate(accelerator, model, val, heads).items()})
        accelerator.log(record, step=epoch)
        history.append(record)
        accelerator.print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()))

    accelerator.wait_for_everyone()
    plain = accelerator.unwrap_model(model).export()
    path = args.output_dir / "model.pth"
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
    accelerator.save({k: v.detach().cpu() for k, v in plain.state_dict().items()}, path)
    accelerator.print(f"plain {args.model} saved to {path}")
    accelerator.end_training()
    return {"history": history, "model": plain, "path": path}


if __name__ == "__main__":
    main()
