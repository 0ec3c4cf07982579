"""Train: one run's epochs (continued from its checkpoint with ``--resume``), its per-epoch log
and the exported models that ``--save`` asks for."""

from __future__ import annotations

import json
import logging

from torch import nn

from . import checkpoint
from .build import BuiltRun
from .cli import MODEL_FILES
from .config import RunSpec
from .console import Progress, epoch_line, keep_log
from .engine import Trained, Trainer, eval_loader, train_loader
from .models import export_payload
from .prepare import RunData

log = logging.getLogger(__name__)


def train(run: RunSpec, built: BuiltRun, data: RunData, progress: Progress) -> Trained:
    """Train ``built.module`` on ``data`` for the configured epochs; write ``log.jsonl``,
    ``checkpoint.pt`` and the ``--save`` models into ``run.out``."""
    config, env, out = run.config, run.env, run.out
    loader = train_loader(
        data.train,
        data.weights,
        config.batch_size,
        config.workers,
        env,
        run.seed,
        drop_last=config.as_shipped,
    )
    trainer = Trainer(
        built.module,
        env,
        config.lr,
        config.weight_decay,
        config.lr_gamma,
        config.optimizer,
        config.schedule,
        config.epochs,
        len(loader),
        config.amp,
        config.sync_bn,
        later_ties=config.as_shipped,
    )
    if config.resume and (out / "checkpoint.pt").is_file():
        trainer.resume(out / "checkpoint.pt", built.identity, config.epochs)
    elif config.resume:
        log.info("%s: no checkpoint yet; this run of the command starts from epoch 1", out)
    keep_log()  # every check passed: from here on the command leaves train.log

    def save_model(kind: str, module: nn.Module) -> None:
        if kind in config.save:
            payload = export_payload(
                module, built.build_info, data.classes, data.pixels.mean, data.pixels.std
            )
            checkpoint.save(payload, out / MODEL_FILES[kind])

    def on_epoch(record: dict) -> None:
        lines = "".join(json.dumps(checkpoint.strict(r), allow_nan=False) + "\n" for r in trainer.history)
        checkpoint.atomic_write(out / "log.jsonl", lambda f: f.write(lines.encode()))
        log.info("%s  [%s]", epoch_line(record, config.epochs), progress.step(record["seconds"]))

    trained = trainer.fit(
        loader,
        {
            name: eval_loader(split, config.batch_size, config.workers, env)
            for name, split in data.evals().items()
        },
        config.epochs,
        data.classes,
        run.seed,
        out,
        built.identity,
        on_improved=save_model,
        on_epoch=on_epoch,
    )
    if env.is_main:
        save_model("final", trained.module)
    return trained
