"""Build: one run's model from its seed, and the run's identity (the settings, data and weights
that ``--resume`` must find unchanged)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import RunSpec
from .identity import run_identity
from .models import build_gsdnet
from .prepare import PreparedData


@dataclass(frozen=True)
class BuiltRun:
    """A run's model, initial weights loaded, and the run's identity."""

    module: nn.Module  # a configuration of models.build_gsdnet
    build_info: dict  # what build_gsdnet reports (rebuild settings, weights file, sha256), for the exports
    identity: dict  # recorded in the run's checkpoint and metrics.json, checked by --resume


def build_run(run: RunSpec, prepared: PreparedData) -> BuiltRun:
    """The model of ``run.method``, seeded by ``run.seed``; raises if its initial weights do not load."""
    config = run.config
    torch.manual_seed(run.seed)
    module, build_info = build_gsdnet(
        run.method,
        config.model,
        len(prepared.classes),
        weights=config.weights,
        caffe_resnet=config.caffe_resnet,
        img_size=config.img_size,
        in_chans=prepared.pixels.channels,
        stage_names=config.stages,
        teacher=config.teacher,
        head=config.head,
        head_pool_size=config.head_pool_size,
        as_shipped=config.as_shipped,
        **config.loss_options,
    )
    identity = config.identity()
    identity.update(method=run.method, seed=run.seed, world_size=run.env.world_size)
    identity.update(run_identity(prepared.classes, prepared.lists, config.data_dir, build_info["weights"]))
    return BuiltRun(module, build_info, identity)
