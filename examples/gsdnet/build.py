"""Build: one run's model from its seed, and the run's identity (the settings, data and weights
that ``--resume`` must find unchanged)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .datasets.common import ImageList
from .distributed import DistEnv
from .identity import run_identity
from .models import PAPER_LOSS, build_gsdnet

RUN_KEYS = (  # the settings a resumed run must share with its checkpoint (--epochs may grow)
    "dataset",
    "model",
    "img_size",
    "batch_size",
    "lr",
    "weight_decay",
    "lr_gamma",
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
class Built:
    module: nn.Module  # a configuration of models.build_gsdnet, initial weights loaded
    config: dict  # what build_gsdnet reports (weights file, sha256, ...), for the exports
    loss_options: dict  # the loss flags it was built with
    run_info: dict  # the run's identity, recorded in its checkpoint and metrics.json


def build_run(
    args: argparse.Namespace,
    method: str,
    seed: int,
    classes: list[str],
    lists: Mapping[str, ImageList],
    env: DistEnv,
) -> Built:
    """The model of ``method``, seeded by ``seed``; raises if its initial weights do not load."""
    torch.manual_seed(seed)
    loss_options = {k: getattr(args, k) for k in PAPER_LOSS}
    module, config = build_gsdnet(
        method,
        args.model,
        len(classes),
        weights=args.weights,
        caffe_resnet=args.caffe_resnet,
        img_size=args.img_size,
        teacher=args.teacher,
        head=args.head,
        head_pool_size=args.head_pool_size,
        as_shipped=args.as_shipped,
        **loss_options,
    )
    run_info = {k: getattr(args, k) for k in RUN_KEYS}
    run_info.update(method=method, seed=seed, world_size=env.world_size)
    run_info.update(run_identity(classes, lists, args.data_dir, config["weights"]))
    return Built(module, config, loss_options, run_info)
