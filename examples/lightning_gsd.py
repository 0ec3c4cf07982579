"""Train any timm model with gradual self distillation under PyTorch Lightning.

``GradualSelfDistillation`` is a LightningModule around a :class:`GradualSelfDistiller`: it logs
every loss term and every head's accuracy through Lightning's logger, and the
``ExportPlainModel`` callback saves the plain timm model (no heads, no hooks) when ``fit`` ends.

    python examples/lightning_gsd.py --model resnet18 --epochs 5
    python examples/lightning_gsd.py --accelerator gpu --devices 2 --strategy ddp --precision bf16-mixed

The saved file is the timm model's own state dict:
``timm.create_model("resnet18", num_classes=10, checkpoint_path="runs/lightning/model.pth")``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from timm.optim import create_optimizer_v2
from torch import nn

from frameworks_common import (
    NUM_CLASSES,
    add_common_args,
    build_distiller,
    digits_loaders,
    head_correct,
)
from gradual_sd import DistillerOutput, GradualSelfDistiller


class GradualSelfDistillation(L.LightningModule):
    """Trains ``distiller`` with AdamW (timm's parameter groups) and a per-step cosine schedule.

    Logged under ``train/`` and ``val/``: ``loss``, every term of ``DistillerOutput.losses``
    (``ce``, ``kl/<stage>``, ``feature/<stage>``...) and ``acc/<head>`` for every head.
    """

    def __init__(self, distiller: GradualSelfDistiller, lr: float = 1e-3, weight_decay: float = 0.05) -> None:
        super().__init__()
        self.distiller = distiller
        self.lr = lr
        self.weight_decay = weight_decay
        self.heads = list(distiller.head_names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's own logits, as the exported model will give them."""
        return self.distiller.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        out = self.distiller(images, targets)
        self.log_output("train", out, targets)
        return out.loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets = batch
        self.log_output("val", self.distiller(images, targets, run_heads=True), targets)

    def log_output(self, split: str, out: DistillerOutput, targets: torch.Tensor) -> None:
        correct = head_correct(out.head_logits, targets).float().mean(0)
        metrics = {**out.losses, **{f"acc/{h}": a for h, a in zip(self.heads, correct)}}
        # Validation logs epoch means over every process; per-step training values stay local.
        options = dict(batch_size=targets.shape[0], sync_dist=split == "val")
        self.log(f"{split}/loss", out.loss.detach(), prog_bar=True, **options)
        self.log_dict({f"{split}/{name}": value.detach() for name, value in metrics.items()}, **options)

    def configure_optimizers(self):
        optimizer = create_optimizer_v2(self.distiller, "adamw", lr=self.lr, weight_decay=self.weight_decay)
        steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ExportPlainModel(L.Callback):
    """When ``fit`` ends, export a copy of the distiller and save the plain model's state dict
    to ``path`` (on the main process). The copy keeps the LightningModule trainable, so a
    later ``trainer.validate`` or another ``fit`` still runs the heads. The exported model is
    kept in :attr:`model`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.model: nn.Module | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail before training, not after it.
        distiller = getattr(pl_module, "distiller", None)
        if not isinstance(distiller, GradualSelfDistiller):
            raise TypeError(
                f"ExportPlainModel needs a LightningModule whose .distiller is a GradualSelfDistiller; "
                f"{type(pl_module).__name__}.distiller is {type(distiller).__name__}"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.model = copy.deepcopy(pl_module.distiller).export()
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, self.path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    trainer = parser.add_argument_group("Lightning Trainer")
    trainer.add_argument("--accelerator", default="auto", help="cpu, gpu, auto...")
    trainer.add_argument("--devices", default="auto", help="a count, a list or auto")
    trainer.add_argument("--strategy", default="auto", help="auto or ddp (the ones tried here)")
    trainer.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed...")
    trainer.add_argument("--max-steps", type=int, default=-1, help="stop after N steps (-1: epochs)")
    trainer.add_argument("--log-every-n-steps", type=int, default=10)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/lightning"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train, validate, save ``<output-dir>/model.pth``; returns the trainer's last metrics,
    the trained LightningModule, the exported model and its path."""
    args = parse_args(argv)
    L.seed_everything(args.seed)  # identical initial weights on every process
    distiller = build_distiller(args.model, NUM_CLASSES, args.img_size)
    module = GradualSelfDistillation(distiller, lr=args.lr, weight_decay=args.weight_decay)
    train, val = digits_loaders(args.img_size, args.batch_size, args.train_limit, args.workers)
    export = ExportPlainModel(args.output_dir / "model.pth")
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        logger=CSVLogger(args.output_dir, name="logs"),
        callbacks=[export],
        enable_checkpointing=False,
        log_every_n_steps=args.log_every_n_steps,
    )
    trainer.fit(module, train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        heads = ", ".join(f"{h} {100 * metrics[f'val/acc/{h}']:.1f}%" for h in module.heads)
        print(f"validation accuracy per head: {heads}\nplain {args.model} saved to {export.path}")
    return {"metrics": metrics, "module": module, "model": export.model, "path": export.path}


if __name__ == "__main__":
    main()
