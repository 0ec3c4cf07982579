"""Training and evaluation: one process or many under ``torchrun``, CPU or CUDA (AMP).

Every model configuration is called the same way (``module(images, targets)`` returns a
``DistillerOutput``), so the trainer does not care which one it trains.

NaN/inf: every configuration checks its own training steps (``module.finite_check``, read at
once on the CPU, at a later step or at the epoch's end on CUDA, so no step waits for the GPU).
The trainer flushes it at the end of every epoch, before anything is evaluated or saved. Under
torchrun the process that saw the bad step stops; the others fail in their next collective
(or torchrun stops them), at the latest in the epoch's end checks, so the main process never
saves that epoch.

Model selection: ``best`` is the epoch with the best test accuracy (the reference code's
choice, optimistic); with a validation split, ``selected`` is the epoch with the best
validation accuracy, and the test set is scored at that epoch.

Reproducibility: every epoch reseeds all random generators from ``(seed, epoch, rank)`` and the
samplers shuffle with ``seed + epoch``, so a run resumed from the checkpoint of epoch ``k``
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from gradual_sd import DistillerOutput

from . import checkpoint
from .divergence import check_loss, check_weights
from .distributed import DistEnv, WeightedShardSampler, all_reduce, broadcast_buffers, shard_indices
from .metrics import confusion_matrix, summarize

log = logging.getLogger(__name__)


OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("exponential", "onecycle")


def make_optimizer(name: str, parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (the reference recipe's), or SGD with Nesterov momentum 0.9 (small-image benchmarks')."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def make_schedule(
    name: str, optimizer: torch.optim.Optimizer, gamma: float, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``exponential``: the rate times ``gamma`` after every epoch (the reference recipe's);
    ``onecycle``: stepped after every batch, from ``lr / 25`` up to ``lr`` over the first 30 % of
    the run's steps, then annealed (cosine) to nearly zero at its last, the momentum (Adam's
    beta1) cycled the other way between 0.95 and 0.85 (torch's ``OneCycleLR`` defaults)."""
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    if name == "onecycle":
        peak = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, peak, total_steps=epochs * steps_per_epoch)
    raise ValueError(f"unknown schedule {name!r}; choose from {SCHEDULES}")


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf loss; the last good checkpoint was kept."""


@dataclass(frozen=True)
class Trained:
    """What training leaves: the model after the last epoch and the test results it kept."""

    module: nn.Module  # the distiller (heads and hooks included) at the final epoch
    final: dict  # test results of the final epoch
    best: dict  # ... of the epoch with the best test accuracy (optimistic)
    selected: dict | None  # {"epoch", "val", "test"} of the epoch picked on validation
    selected_state: dict | None  # the distiller's weights at that epoch


class RunMismatchError(ValueError):
    """``--resume`` found a checkpoint of a different run; the message names every difference."""


def differences(saved: dict, now: dict) -> str:
    """``key: saved X, now Y`` for every key of ``now`` whose value differs in ``saved``."""
    return "; ".join(f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v)


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def train_loader(
    dataset,
    weights: torch.Tensor | None,
    batch_size: int,
    workers: int,
    env: DistEnv,
    seed: int,
    drop_last: bool = False,
) -> DataLoader:
    """Shuffled (or class-balanced) batches; ``drop_last`` drops every partial last batch, as
    the reference code does, instead of only a single-sample one."""
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
        drop_last=drop_last or single_sample_remainder(len(sampler), per_process),
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

    module: nn.Module  # any configuration of models.build_gsdnet
    env: DistEnv
    lr: float
    weight_decay: float
    lr_gamma: float
    optimizer_name: str = "adam"  # OPTIMIZERS
    schedule: str = "exponential"  # SCHEDULES
    epochs: int = 1  # the run's epochs and ...
    steps_per_epoch: int = 1  # ... batches per epoch, which a one-cycle schedule spans
    amp: bool = False
    sync_bn: bool = False
    later_ties: bool = False  # on equal accuracy keep the later epoch (the reference code's `<=`)
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # test metrics of the epoch with the best test accuracy
    selected: dict | None = None  # {"epoch", "val", "test"} at the best validation accuracy
    selected_state: dict | None = None  # the module's weights (on the CPU) at the selected epoch
    first_step_loss: float | None = None  # the untrained model's loss, for the divergence rule

    def __post_init__(self) -> None:
        if self.amp and self.env.device.type != "cuda":
            raise ValueError("--amp needs a CUDA device (mixed precision is not used on CPU)")
        self.module.to(self.env.device)
        if self.sync_bn and self.env.distributed:
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        self.optimizer = make_optimizer(
            self.optimizer_name, self.module.parameters(), self.lr, self.weight_decay
        )
        self.scheduler = make_schedule(
            self.schedule, self.optimizer, self.lr_gamma, self.epochs, self.steps_per_epoch
        )
        self.step_per_batch = self.schedule == "onecycle"
        self.lr_used = self.lr
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start_epoch = 1
        self.runner: nn.Module = self.module
        if self.env.distributed:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            self.runner = DistributedDataParallel(self.module, device_ids=ids)

    # --- checkpoints -------------------------------------------------------------------------
    def state(self, epoch: int, identity: dict) -> dict:
        return {
            "epoch": epoch,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "best": self.best,
            "selected": self.selected,
            "selected_module": self.selected_state,
            "first_step_loss": self.first_step_loss,
            "run": identity,
        }

    def resume(self, path: Path, identity: dict, epochs: int) -> None:
        state = checkpoint.load(path)
        differ = differences(state["run"], identity)
        if differ:
            raise RunMismatchError(
                f"--resume refused: {path} was written by a different run configuration ({differ}). "
                "Resume with the original settings, or use another --output-dir"
            )
        if state["epoch"] > epochs:
            raise RunMismatchError(
                f"--resume refused: {path} holds epoch {state['epoch']}, beyond --epochs {epochs}; "
                f"pass --epochs {state['epoch']} or more"
            )
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history, self.best, self.selected = state["history"], state["best"], state["selected"]
        self.selected_state = state.get("selected_module")  # None: written before it was kept
        self.first_step_loss = state.get("first_step_loss")
        self.start_epoch = state["epoch"] + 1
        log.info("resumed from %s after epoch %d", path, state["epoch"])

    # --- one epoch ---------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> DistillerOutput:
        """One optimiser step on a batch; returns the forward's output (logits, loss, terms)."""
        with self.autocast():
            out = self.runner(images, targets)
        if self.first_step_loss is None:  # once per run: the reference of the divergence rule
            loss = all_reduce(out.loss.detach().float().clone(), self.env)
            self.first_step_loss = float(loss) / self.env.world_size
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_used = self.optimizer.param_groups[0]["lr"]
        if self.step_per_batch:
            self.scheduler.step()
        return out

    def train_epoch(self, loader: DataLoader, epoch: int) -> dict:
        self.runner.train()
        device = self.env.device
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=device)
        seen = torch.zeros((), device=device)
        bar = tqdm(
            loader, desc=f"epoch {epoch} train", leave=False, disable=None if self.env.is_main else True
        )
        for images, targets in bar:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            out = self.train_step(images, targets)
            n = images.shape[0]
            for key, value in {"loss": out.loss, **out.losses}.items():
                sums[key] = sums.get(key, torch.zeros((), device=device)) + value.detach().float() * n
            correct += (out.logits.argmax(1) == targets).sum()
            seen += n
        self.module.finite_check.flush()  # the steps still in flight, before anything is saved
        lr = self.lr_used  # the rate of the epoch's last step (one-cycle: it changes every step)
        if not self.step_per_batch:
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
        names = list(self.module.head_names)
        cms = torch.zeros(len(names), num_classes, num_classes, dtype=torch.long, device=self.env.device)
        bar = tqdm(loader, desc="test", leave=False, disable=None if self.env.is_main else True)
        for images, targets in bar:
            images = images.to(self.env.device, non_blocking=True)
            targets = targets.to(self.env.device, non_blocking=True)
            with self.autocast():
                all_logits = self.module(images, run_heads=True).head_logits
            for i, logits in enumerate(all_logits):
                cms[i] += confusion_matrix(logits.argmax(1), targets, num_classes)
        all_reduce(cms, self.env)
        return {name: cm.cpu() for name, cm in zip(names, cms)}

    def improves(self, accuracy: float, current: dict | None) -> bool:
        if current is None:
            return True
        return accuracy >= current["accuracy"] if self.later_ties else accuracy > current["accuracy"]

    def evaluate_all(self, loaders: dict[str, DataLoader], classes: list[str], epoch: int) -> dict:
        return {
            split: summarize(self.evaluate(loader, len(classes)), classes, epoch)
            for split, loader in loaders.items()
        }

    def fit(
        self,
        train: DataLoader,
        evals: dict[str, DataLoader],
        epochs: int,
        classes: list[str],
        seed: int,
        output_dir: Path,
        identity: dict,
        on_improved,
        on_epoch,
    ) -> Trained:
        """Train to ``epochs``; after each epoch evaluate ``evals`` (``test`` and optionally
        ``val``), keep the best and the selected epoch (with the selected epoch's weights, which
        the run's reports describe), checkpoint, log. ``on_improved(kind, module)`` runs when
        ``best`` or ``selected`` moves to this epoch."""
        last = None
        for epoch in range(self.start_epoch, epochs + 1):
            started = time.time()
            seed_everything(seed, epoch, self.env.rank)
            train.sampler.set_epoch(epoch)
            kept = (
                f"The checkpoint of epoch {epoch - 1} is kept: lower --lr, then --resume"
                if epoch > 1
                else "No epoch was saved: lower --lr and start again"
            )
            try:
                record = {"epoch": epoch, **self.train_epoch(train, epoch)}
            except FloatingPointError as error:  # the module's finite check
                where = f" on process {self.env.rank}" if self.env.distributed else ""
                raise NonFiniteLossError(f"{error}, in epoch {epoch}{where}; stopping. {kept}") from error
            check_weights(self.module, self.env, epoch, kept)
            check_loss(record["losses"]["loss"], self.first_step_loss, epoch, kept)
            results = self.evaluate_all(evals, classes, epoch)
            test = results["test"]
            for split, result in results.items():
                record[f"{split}_accuracy"] = result["accuracy"]
                record[f"{split}_balanced_accuracy"] = result["balanced_accuracy"]
            record.update(
                per_head_accuracy=test["per_head_accuracy"], seconds=round(time.time() - started, 2)
            )
            self.history.append(record)
            if self.improves(test["accuracy"], self.best):
                self.best = test
                if self.env.is_main:
                    on_improved("best", self.module)
            if "val" in results and self.improves(
                results["val"]["accuracy"], (self.selected or {}).get("val")
            ):
                self.selected = {"epoch": epoch, "val": results["val"], "test": test}
                self.selected_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()
                }
                if self.env.is_main:
                    on_improved("selected", self.module)
            last = test
            if self.env.is_main:
                checkpoint.save_checked(self.state(epoch, identity), output_dir / "checkpoint.pt")
                on_epoch(record)
        if last is None:  # resumed a finished run: evaluate the restored weights
            last = self.evaluate_all(evals, classes, epochs)["test"]
        return Trained(self.module, last, self.best, self.selected, self.selected_state)
