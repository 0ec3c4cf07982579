"""The command's settings as typed data: :class:`RunConfig`, built once from the flags by
``cli.parse_args``, and :class:`RunSpec`, one run of the command (a method trained from a seed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .distributed import DistEnv
from .models import METHODS, PAPER_LOSS

# The settings a resumed run must share with its checkpoint (--epochs may grow).
IDENTITY_KEYS = (
    "dataset",
    "model",
    "img_size",
    "batch_size",
    "lr",
    "weight_decay",
    "lr_gamma",
    "stages",
    "optimizer",
    "schedule",
    "augment",
    "teacher",
    "head",
    "head_pool_size",
    "train_limit",
    "val_fraction",
    "eval_split",
    "affectnet_classes",
    "balanced",
    "as_shipped",
    *PAPER_LOSS,
)


@dataclass(frozen=True)
class RunConfig:
    """Every flag of ``train_gsdnet.py``, the dataset's preset filled in (``cli.py`` documents
    each); fields in the flags' order, which ``metrics.json``'s ``args`` keeps."""

    dataset: str
    data_dir: Path | None
    method: str  # a method of models.METHODS, or "all"
    model: str
    weights: str | None  # None: random initialisation
    caffe_resnet: bool | None  # None: decided by the weights file
    as_shipped: bool
    epochs: int
    batch_size: int
    img_size: int
    stages: tuple[str, ...] | None  # None: the library's default stages
    optimizer: str  # engine.OPTIMIZERS
    schedule: str  # engine.SCHEDULES
    augment: str  # transforms.AUGMENTATIONS
    lr: float
    weight_decay: float
    lr_gamma: float
    teacher: str
    head: str
    head_pool_size: int | None
    temperature: float
    kl_weight: float
    feature_weight: float
    formulation: str
    aux_ce_weight: float
    val_fraction: float | None
    seeds: tuple[int, ...]
    train_limit: int | None
    eval_split: str
    affectnet_classes: int
    balanced: bool
    device: str
    amp: bool
    sync_bn: bool
    workers: int
    threads: int | None
    output_dir: Path
    save: tuple[str, ...]  # keys of cli.MODEL_FILES
    keep_checkpoint: bool
    check_images: bool
    skip_bad_images: bool
    resume: bool
    debug: bool
    dist_timeout: float

    @property
    def methods(self) -> tuple[str, ...]:
        return METHODS if self.method == "all" else (self.method,)

    @property
    def loss_options(self) -> dict:
        """The loss flags, as ``models.build_gsdnet`` takes them."""
        return {name: getattr(self, name) for name in PAPER_LOSS}

    def identity(self) -> dict:
        """The settings recorded in a run's checkpoint and ``metrics.json`` for ``--resume``; a
        one-cycle schedule spans the run, so there ``--epochs`` may not change either."""
        identity = {name: getattr(self, name) for name in IDENTITY_KEYS}
        if self.schedule == "onecycle":
            identity["epochs"] = self.epochs
        return identity

    def as_json(self) -> dict:
        """Every flag's value, paths as text (``metrics.json``'s ``args``)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {name: str(v) if isinstance(v, Path) else v for name, v in values.items()}

    def run_dirs(self) -> list[Path]:
        """Every run's output folder, methods first, then seeds."""
        return [self.run_dir(method, seed) for method in self.methods for seed in self.seeds]

    def run_dir(self, method: str, seed: int) -> Path:
        """A run's output folder: ``<output-dir>[/<method>][/seed<k>]`` when the command has
        several methods or seeds."""
        out = self.output_dir / method if len(self.methods) > 1 else self.output_dir
        return out / f"seed{seed}" if len(self.seeds) > 1 else out


@dataclass(frozen=True)
class RunSpec:
    """One run of the command: ``method`` trained from ``seed`` in this process.

    Args:
        config: The command's settings.
        method: The run's method (one of ``config.methods``).
        seed: The run's seed (one of ``config.seeds``).
        env: This process's rank, world size and device.
        started: When the run began (``time.time()``), for ``metrics.json``'s wall time.
    """

    config: RunConfig
    method: str
    seed: int
    env: DistEnv
    started: float

    @property
    def out(self) -> Path:
        return self.config.run_dir(self.method, self.seed)
