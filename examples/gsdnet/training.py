"""Train: one run's epochs (continued from its checkpoint with ``--resume``), its per-epoch log
and the exported models that ``--save`` asks for."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import checkpoint
from .build import Built
from .cli import MODEL_FILES
from .console import Progress, epoch_line, keep_log
from .distributed import DistEnv
from .engine import Trainer, eval_loader, train_loader
from .models import export_payload
from .prepare import RunData
from .transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trained:
    """What training leaves: the model after the last epoch and the test results it kept."""

    module: nn.Module  # the distiller (heads and hooks included) at the final epoch
    final: dict  # test results of the final epoch
    best: dict  # ... of the epoch with the best test accuracy (optimistic)
    selected: dict | None  # {"epoch", "val", "test"} of the epoch picked on validation
    selected_state: dict | None  # the distiller's weights at that epoch


def train(
    args: argparse.Namespace,
    built: Built,
    data: RunData,
    classes: list[str],
    seed: int,
    env: DistEnv,
    out: Path,
    progress: Progress,
) -> Trained:
    trainer = Trainer(
        built.module,
        env,
        args.lr,
        args.weight_decay,
        args.lr_gamma,
        args.amp,
        args.sync_bn,
        later_ties=args.as_shipped,
    )
    if args.resume and (out / "checkpoint.pt").is_file():
        trainer.resume(out / "checkpoint.pt", built.run_info, args.epochs)
    elif args.resume:
        log.info("%s: no checkpoint yet; this run of the command starts from epoch 1", out)
    keep_log()  # every check passed: from here on the command leaves train.log

    def save_model(kind: str, module: nn.Module) -> None:
        if kind in args.save:
            payload = export_payload(module, built.config, classes, IMAGENET_MEAN, IMAGENET_STD)
            checkpoint.save(payload, out / MODEL_FILES[kind])

    def on_epoch(record: dict) -> None:
        lines = "".join(json.dumps(checkpoint.strict(r), allow_nan=False) + "\n" for r in trainer.history)
        checkpoint.atomic_write(out / "log.jsonl", lambda f: f.write(lines.encode()))
        log.info("%s  [%s]", epoch_line(record, args.epochs), progress.step(record["seconds"]))

    trainer.fit(
        train_loader(
            data.train, data.weights, args.batch_size, args.workers, env, seed, drop_last=args.as_shipped
        ),
        {
            name: eval_loader(split, args.batch_size, args.workers, env)
            for name, split in data.evals().items()
        },
        args.epochs,
        classes,
        seed,
        out,
        built.run_info,
        on_improved=save_model,
        on_epoch=on_epoch,
    )
    if env.is_main:
        save_model("final", trainer.module)
    return Trained(trainer.module, trainer.last, trainer.best, trainer.selected, trainer.selected_state)
