"""Prepare data: the dataset once per command (:class:`PreparedData`: the checked image lists),
then each run's own split of it (:class:`RunData`: the seeded validation carve, balance weights,
transforms)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .config import RunConfig
from .datasets import build_datasets
from .datasets.common import (
    ImageList,
    PixelFormat,
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


def check_images(lists: dict[str, ImageList], skip_bad: bool) -> tuple[dict[str, ImageList], dict[str, int]]:
    """Decode every image file once, before training; raise listing every unreadable file.

    Args:
        lists: The image lists to check, by split.
        skip_bad: Drop the unreadable images instead of raising (--skip-bad-images).

    Returns:
        The lists without the unreadable images, and their counts by split (the dataset notes).
    """
    started = time.time()
    bad = {name: find_unreadable(images) for name, images in lists.items()}
    total = sum(len(images) for images in lists.values())
    log.info(
        "checked %d images in %.1fs: %d unreadable", total, time.time() - started, sum(map(len, bad.values()))
    )
    listing = [
        f"  {lists[name].sources[i]}: {reason}" for name, found in bad.items() for i, reason in found.items()
    ]
    if listing and not skip_bad:
        raise UnreadableImagesError(
            f"{len(listing)} unreadable images (nothing was trained):\n"
            + "\n".join(listing)
            + "\nReplace them, or pass --skip-bad-images to train and test without them"
        )
    if listing:
        log.warning("skipping %d unreadable images:\n%s", len(listing), "\n".join(listing))
    notes = {f"{name}: unreadable images skipped": len(found) for name, found in bad.items() if found}
    kept = {
        name: images.subset([i for i in range(len(images)) if i not in bad[name]]) if bad[name] else images
        for name, images in lists.items()
    }
    return kept, notes


@dataclass(frozen=True)
class PreparedData:
    """The dataset once per command: its checked image lists and what describes them."""

    lists: dict[str, ImageList]  # "train" (--train-limit applied), "test" (evaluated), maybe "val"
    classes: list[str]
    description: str  # one line for the log and the reports
    hflip: bool  # whether horizontal flipping keeps the label
    pixels: PixelFormat  # the images' mode and normalisation
    notes: dict[str, int]  # counts of what was dropped (parsing, unreadable images)


def prepare_data(config: RunConfig) -> PreparedData:
    """The dataset's splits and the checked lists to train and test on."""
    splits = build_datasets(config.dataset, config.data_dir, config.affectnet_classes, config.balanced)
    if config.eval_split == "val" and splits.val is None:
        raise ValueError(f"dataset {config.dataset!r} has no validation split; use --eval-split test")
    lists = {"train": limit_train(splits.train, config.train_limit)}
    lists["test"] = splits.val if config.eval_split == "val" else splits.test
    if config.val_fraction is None and splits.val is not None and config.eval_split == "test":
        lists["val"] = splits.val
    notes = dict(splits.notes)
    if config.check_images:
        lists, skipped = check_images(lists, config.skip_bad_images)
        notes.update(skipped)
    return PreparedData(lists, splits.classes, splits.description, splits.hflip, splits.pixels, notes)


@dataclass(frozen=True)
class RunData:
    """One run's images, transforms set (train on ``train``, pick the epoch on ``val``), and
    the dataset's classes, description and notes."""

    train: ImageList
    test: ImageList
    val: ImageList | None
    val_source: str | None  # where ``val`` came from, for the log and metrics.json
    weights: torch.Tensor | None  # class-balanced sampling weights (--balanced)
    classes: list[str]
    description: str
    pixels: PixelFormat
    notes: dict[str, int]

    def evals(self) -> dict[str, ImageList]:
        return {"test": self.test} if self.val is None else {"test": self.test, "val": self.val}


def run_data(config: RunConfig, prepared: PreparedData, seed: int) -> RunData:
    """The run's split: with --val-fraction, a stratified validation carve seeded by ``seed``."""
    lists = prepared.lists
    train, test, val = lists["train"], lists["test"], lists.get("val")
    val_source = "the dataset's validation split" if val is not None else None
    if config.val_fraction is not None:
        keep, held_out = stratified_split(train.labels, config.val_fraction, seed)
        train, val = train.subset(keep), train.subset(held_out)
        val_source = f"{config.val_fraction:g} of the training set, stratified, seeded by the run's seed"
    weights = class_balanced_weights(train.labels, len(prepared.classes)) if config.balanced else None
    train.transform = train_transform(config.img_size, prepared.hflip, prepared.pixels, config.augment)
    data = RunData(
        train,
        test,
        val,
        val_source,
        weights,
        prepared.classes,
        prepared.description,
        prepared.pixels,
        prepared.notes,
    )
    for split in data.evals().values():
        split.transform = eval_transform(config.img_size, prepared.pixels)
    return data
