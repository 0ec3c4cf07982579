"""What the Lightning and accelerate examples share: a distiller around any timm model, the
shipped digits data, per-head accuracy and the command-line options.

The data is scikit-learn's handwritten digits (the stand-in of ``train_gsdnet.py``), so both
examples run with no download; swap :func:`digits_loaders` for your own loaders.
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch.utils.data import DataLoader, Subset

from gradual_sd import GradualSelfDistiller
from gsdnet.datasets import build_datasets
from gsdnet.transforms import eval_transform, train_transform

NUM_CLASSES = 10  # the digits


def build_distiller(model_name: str, num_classes: int, img_size: int) -> GradualSelfDistiller:
    """A freshly initialised timm model wrapped for gradual self distillation at ``img_size``."""
    model = timm.create_model(model_name, num_classes=num_classes)
    return GradualSelfDistiller(model, example_input=torch.zeros(1, 3, img_size, img_size))


def digits_loaders(
    img_size: int, batch_size: int, train_limit: int | None = None, workers: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over the digits, upscaled to ``img_size``.

    Plain loaders: Lightning and accelerate shard them over processes themselves. The training
    loader drops its last partial batch, because a batch of one fails in training-mode
    BatchNorm once a stage's maps are 1x1.
    """
    splits = build_datasets("digits")
    splits.train.transform = train_transform(img_size, hflip=splits.hflip)
    splits.test.transform = eval_transform(img_size)
    train = splits.train
    if train_limit is not None:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:train_limit]
        train = Subset(train, keep.tolist())
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers),
        DataLoader(splits.test, batch_size=batch_size, num_workers=workers),
    )


def head_correct(head_logits: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
    """Correct predictions per sample and head, ``(N, heads)``: rows can be gathered across
    processes, and a column mean is a head's accuracy."""
    return torch.stack([logits.argmax(1) == targets for logits in head_logits], dim=1)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options both examples take, with the digits stand-in's defaults."""
    parser.add_argument("--model", default="resnet18", help="any timm model name")
    parser.add_argument(
        "--img-size", type=int, default=32, help="ViT and Swin models need their configured size (224)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--train-limit", type=int, help="train on a fixed random subset of N images")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
