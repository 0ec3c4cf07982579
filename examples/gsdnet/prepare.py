"""Prepare data: the dataset once per command (splits, the checked image lists), then each run's
own split of it (the seeded validation carve, balance weights, transforms)."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import torch

from .datasets import build_datasets
from .datasets.common import (
    DatasetSplits,
    ImageList,
    UnreadableImagesError,
    class_balanced_weights,
    find_unreadable,
    stratified_split,
)
from .transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


def limit_train(train: ImageList, limit: int | None) -> ImageList:
    """A fixed subset (generator seed 0, independent of --seeds, so every method sees the same)."""
    if limit is None or limit >= len(train):
        return train
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return train.subset(keep.tolist())


def check_images(
    args: argparse.Namespace, lists: dict[str, ImageList], notes: dict[str, int]
) -> dict[str, ImageList]:
    """Decode every image file once, before training; raise listing every unreadable file, or
    with --skip-bad-images drop them and count them in ``notes`` (the dataset notes)."""
    if not args.check_images:
        return lists
    started = time.time()
    bad = {name: find_unreadable(images) for name, images in lists.items()}
    total = sum(len(images) for images in lists.values())
    log.info(
        "checked %d images in %.1fs: %d unreadable", total, time.time() - started, sum(map(len, bad.values()))
    )
    listing = [
        f"  {lists[name].sources[i]}: {reason}" for name, found in bad.items() for i, reason in found.items()
    ]
    if listing and not args.skip_bad_images:
        raise UnreadableImagesError(
            f"{len(listing)} unreadable images (nothing was trained):\n"
            + "\n".join(listing)
            + "\nReplace them, or pass --skip-bad-images to train and test without them"
        )
    if listing:
        log.warning("skipping %d unreadable images:\n%s", len(listing), "\n".join(listing))
    notes.update({f"{name}: unreadable images skipped": len(found) for name, found in bad.items() if found})
    return {
        name: images.subset([i for i in range(len(images)) if i not in bad[name]]) if bad[name] else images
        for name, images in lists.items()
    }


def prepare_data(args: argparse.Namespace) -> tuple[DatasetSplits, dict[str, ImageList]]:
    """The dataset, once per command: its splits and the checked lists to train and test on."""
    splits = build_datasets(args.dataset, args.data_dir, args.affectnet_classes, args.balanced)
    if args.eval_split == "val" and splits.val is None:
        raise ValueError(f"dataset {args.dataset!r} has no validation split; use --eval-split test")
    lists = {"train": limit_train(splits.train, args.train_limit)}
    lists["test"] = splits.val if args.eval_split == "val" else splits.test
    if args.val_fraction is None and splits.val is not None and args.eval_split == "test":
        lists["val"] = splits.val
    return splits, check_images(args, lists, splits.notes)


@dataclass(frozen=True)
class RunData:
    """One run's images, transforms set: train on ``train``, pick the epoch on ``val``."""

    train: ImageList
    test: ImageList
    val: ImageList | None
    val_source: str | None  # where ``val`` came from, for the log and metrics.json
    weights: torch.Tensor | None  # class-balanced sampling weights (--balanced)

    def evals(self) -> dict[str, ImageList]:
        return {"test": self.test} if self.val is None else {"test": self.test, "val": self.val}


def run_data(
    args: argparse.Namespace, splits: DatasetSplits, lists: dict[str, ImageList], seed: int
) -> RunData:
    """The run's split: with --val-fraction, a stratified validation carve seeded by ``seed``."""
    train, test, val = lists["train"], lists["test"], lists.get("val")
    val_source = "the dataset's validation split" if val is not None else None
    if args.val_fraction is not None:
        keep, held_out = stratified_split(train.labels, args.val_fraction, seed)
        train, val = train.subset(keep), train.subset(held_out)
        val_source = f"{args.val_fraction:g} of the training set, stratified, seeded by the run's seed"
    weights = class_balanced_weights(train.labels, len(splits.classes)) if args.balanced else None
    train.transform = train_transform(args.img_size, hflip=splits.hflip)
    data = RunData(train, test, val, val_source, weights)
    for split in data.evals().values():
        split.transform = eval_transform(args.img_size)
    return data
