"""Training and evaluation: one process or many under ``torchrun``, CPU or CUDA (AMP).

Reproducibility: every epoch reseeds all random generators from ``(seed, epoch, rank)`` and the
samplers shuffle with ``seed + epoch``, so a run resumed from the checkpoint of epoch ``k``
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from gradual_sd import GradualSelfDistiller

from . import checkpoint
from .datasets.common import log
from .distributed import DistEnv, WeightedShardSampler, all_reduce, broadcast_buffers, shard_indices
from .metrics import confusion_matrix, summarize
from .models import plain_model


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf loss; the last good checkpoint was kept."""


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def classifier_name(model: nn.Module) -> str:
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier)


def head_names(module: nn.Module) -> list[str]:
    """Evaluation heads, shallow to deep; the last is the model's own classifier."""
    if isinstance(module, GradualSelfDistiller):
        return [*module.stage_names, module.classifier_name]
    return [classifier_name(module)]


def train_loader(
    dataset, weights: torch.Tensor | None, batch_size: int, workers: int, env: DistEnv, seed: int
) -> DataLoader:
    if batch_size % env.world_size:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the {env.world_size} processes")
    if weights is not None:
        sampler = WeightedShardSampler(weights, env.rank, env.world_size, seed)
    else:
        sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True, seed=seed)
    per_process = batch_size // env.world_size
    return DataLoader(
        dataset,
        batch_size=per_process,
        sampler=sampler,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        drop_last=single_sample_remainder(len(sampler), per_process),
        persistent_workers=False,
    )


def single_sample_remainder(samples: int, batch_size: int) -> bool:
    """Whether the last batch would hold one sample, which training-mode BatchNorm rejects once
    the maps are 1x1. Only that batch is dropped: a small --train-limit keeps every image, where
    dropping any partial batch left 100 images with one step of 64 per epoch."""
    return samples > batch_size and samples % batch_size == 1


def eval_loader(dataset, batch_size: int, workers: int, env: DistEnv) -> DataLoader:
    shard = Subset(dataset, shard_indices(len(dataset), env))
    return DataLoader(
        shard,
        batch_size=max(1, batch_size // env.world_size),
        shuffle=False,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
    )


@dataclass
class Trainer:
    """Owns the model, optimizer, schedule and scaler, and runs epochs on them."""

    module: nn.Module  # the plain model or a GradualSelfDistiller
    env: DistEnv
    lr: float
    weight_decay: float
    lr_gamma: float
    amp: bool = False
    sync_bn: bool = False
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # metrics of the epoch with the best test accuracy
    last: dict | None = None  # metrics of the latest evaluated epoch

    def __post_init__(self) -> None:
        if self.amp and self.env.device.type != "cuda":
            raise ValueError("--amp needs a CUDA device (mixed precision is not used on CPU)")
        self.module.to(self.env.device)
        if self.sync_bn and self.env.distributed:
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        self.is_distiller = isinstance(self.module, GradualSelfDistiller)
        self.optimizer = torch.optim.Adam(
            self.module.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=self.lr_gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start_epoch = 1
        self.runner: nn.Module = self.module
        if self.env.distributed:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            self.runner = DistributedDataParallel(self.module, device_ids=ids)

    # --- checkpoints -------------------------------------------------------------------------
    def state(self, epoch: int, run_info: dict) -> dict:
        return {
            "epoch": epoch,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "best": self.best,
            "run": run_info,
        }

    def resume(self, path: Path, run_info: dict) -> None:
        state = checkpoint.load(path)
        differ = {k: (state["run"].get(k), v) for k, v in run_info.items() if state["run"].get(k) != v}
        if differ:
            raise ValueError(f"{path} was written by a different run configuration: {differ} (saved, now)")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history, self.best = state["history"], state["best"]
        self.start_epoch = state["epoch"] + 1
        log.info("resumed from %s after epoch %d", path, state["epoch"])

    # --- one epoch ---------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp)

    def step_loss(self, images: torch.Tensor, targets: torch.Tensor):
        with self.autocast():
            if self.is_distiller:
                out = self.runner(images, targets)
                return out.logits, out.loss, out.losses
            logits = self.runner(images)
            loss = F.cross_entropy(logits.float(), targets)
            return logits, loss, {"ce": loss}

    def check_finite(self, loss: torch.Tensor, losses: dict, epoch: int, step: int) -> None:
        """Stop every process together (before backward, where DDP would wait) on NaN/inf."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        all_reduce(finite, self.env, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, step {step} (terms {bad or 'on another process'} "
                f"on rank {self.env.rank}); stopping. The last good checkpoint is kept: lower --lr "
                "or check the data, then --resume"
            )

    def train_epoch(self, loader: DataLoader, epoch: int) -> dict:
        self.runner.train()
        device = self.env.device
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device)
        seen = torch.zeros((), device=device)
        bar = tqdm(
            loader, desc=f"epoch {epoch} train", leave=False, disable=None if self.env.is_main else True
        )
        for step, (images, targets) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits, loss, losses = self.step_loss(images, targets)
            self.check_finite(loss, losses, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            n = images.shape[0]
            for key, value in {"loss": loss, **losses}.items():
                sums[key] = sums.get(key, torch.zeros((), device=device)) + value.detach().float() * n
            correct += (logits.argmax(1) == targets).sum()
            seen += n
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        keys = sorted(sums)
        packed = all_reduce(torch.stack([sums[k] for k in keys] + [correct.float(), seen.float()]), self.env)
        count = packed[-1].clamp(min=1)
        terms = {k: float(v / count) for k, v in zip(keys, packed[:-2])}
        return {"lr": lr, "train_accuracy": float(packed[-2] / count), "losses": terms}

    @torch.no_grad()
    def evaluate(self, loader: DataLoader, num_classes: int) -> dict[str, torch.Tensor]:
        """Confusion matrix of every head over the whole test set (summed over processes)."""
        broadcast_buffers(self.module, self.env)
        self.module.eval()
        names = head_names(self.module)
        cms = torch.zeros(len(names), num_classes, num_classes, dtype=torch.long, device=self.env.device)
        bar = tqdm(loader, desc="test", leave=False, disable=None if self.env.is_main else True)
        for images, targets in bar:
            images = images.to(self.env.device, non_blocking=True)
            targets = targets.to(self.env.device, non_blocking=True)
            with self.autocast():
                if self.is_distiller:
                    all_logits = self.module(images, run_heads=True).head_logits
                else:
                    all_logits = (self.module(images),)
            for i, logits in enumerate(all_logits):
                cms[i] += confusion_matrix(logits.argmax(1), targets, num_classes)
        all_reduce(cms, self.env)
        return {name: cm.cpu() for name, cm in zip(names, cms)}

    def fit(
        self,
        train: DataLoader,
        test: DataLoader,
        epochs: int,
        classes: list[str],
        seed: int,
        output_dir: Path,
        run_info: dict,
        on_best,
        on_epoch,
    ) -> None:
        """Train to ``epochs``; after each epoch evaluate, keep the best, checkpoint, log."""
        for epoch in range(self.start_epoch, epochs + 1):
            started = time.time()
            seed_everything(seed, epoch, self.env.rank)
            train.sampler.set_epoch(epoch)
            record = {"epoch": epoch, **self.train_epoch(train, epoch)}
            result = summarize(self.evaluate(test, len(classes)), classes, epoch)
            record.update(
                test_accuracy=result["accuracy"],
                per_head_accuracy=result["per_head_accuracy"],
                seconds=round(time.time() - started, 2),
            )
            self.history.append(record)
            if self.best is None or result["accuracy"] > self.best["accuracy"]:
                self.best = result
                if self.env.is_main:
                    on_best(self.module)
            self.last = result
            if self.env.is_main:
                checkpoint.save(self.state(epoch, run_info), output_dir / "checkpoint.pt")
                on_epoch(record)
        if self.start_epoch > epochs:  # resumed a finished run: evaluate the restored weights
            self.last = summarize(self.evaluate(test, len(classes)), classes, epochs)

    def plain_model(self) -> nn.Module:
        return plain_model(self.module)
