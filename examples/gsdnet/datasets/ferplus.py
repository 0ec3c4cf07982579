"""FERPlus: Kaggle's ``fer2013.csv`` pixels paired row by row with ``fer2013new.csv`` votes.

Majority protocol: vote counts of 1 are zeroed (treated as annotator noise); an image is kept
when its top count is more than half of the remaining votes, and dropped when that top class
is ``unknown`` or ``NF`` (not a face). Usage ``Training`` / ``PublicTest`` / ``PrivateTest`` are
the train / validation / test splits.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from .common import DatasetSplits, ImageList, LabelFileError, require_path

log = logging.getLogger(__name__)

# Vote columns of fer2013new.csv, in order; the first eight are the classes.
VOTE_COLUMNS = [
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
]
CLASSES = ["Neutral", "Happiness", "Surprise", "Sadness", "Anger", "Disgust", "Fear", "Contempt"]
SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def majority_label(votes: Sequence[int]) -> tuple[int | None, str]:
    """``(label, "kept")`` or ``(None, reason)`` for one image's ten vote counts."""
    counts = np.asarray(votes, dtype=np.int64)
    counts[counts <= 1] = 0
    total = int(counts.sum())
    top = int(counts.argmax())
    if total == 0 or counts[top] * 2 <= total:
        return None, "no majority"
    if top >= len(CLASSES):
        return None, VOTE_COLUMNS[top]
    return top, "kept"


def parse(data_dir: Path) -> tuple[dict[str, tuple[list[np.ndarray], list[int]]], Counter]:
    """Images and majority labels per split, and a count of kept/dropped rows by reason."""
    pixels_csv = require_path(data_dir / "fer2013.csv", "download Kaggle's fer2013.csv")
    votes_csv = require_path(data_dir / "fer2013new.csv", "download fer2013new.csv from FERPlus")
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {s: ([], []) for s in SPLITS.values()}
    reasons: Counter = Counter()
    with open(pixels_csv, newline="") as a, open(votes_csv, newline="") as b:
        pixel_rows, vote_rows = csv.DictReader(a), csv.DictReader(b)
        for number, (pixel_row, vote_row) in enumerate(zip(pixel_rows, vote_rows), start=2):
            where = f"{votes_csv}:{number}"
            usage = vote_row.get("Usage", "")
            if usage not in SPLITS or pixel_row.get("Usage") != usage:
                raise LabelFileError(
                    f"{where}: Usage {usage!r} does not match fer2013.csv row {number} "
                    f"({pixel_row.get('Usage')!r}); the two files must be paired row by row"
                )
            try:
                votes = [int(vote_row[column]) for column in VOTE_COLUMNS]
                values = np.array(pixel_row["pixels"].split(), dtype=np.int64).reshape(48, 48)
            except (KeyError, TypeError, ValueError, OverflowError) as error:
                raise LabelFileError(f"{where}: cannot read votes or 48x48 pixels ({error})") from None
            if values.min() < 0 or values.max() > 255:
                raise LabelFileError(
                    f"{pixels_csv}:{number}: pixel values must lie in 0..255, got values from "
                    f"{values.min()} to {values.max()}"
                )
            pixels = values.astype(np.uint8)
            label, reason = majority_label(votes)
            reasons[f"{SPLITS[usage]}: {reason}"] += 1
            if label is not None:
                splits[SPLITS[usage]][0].append(pixels)
                splits[SPLITS[usage]][1].append(label)
        if next(pixel_rows, None) is not None or next(vote_rows, None) is not None:
            raise LabelFileError(f"{pixels_csv} and {votes_csv} have different numbers of rows")
    return splits, reasons


def build(data_dir: Path) -> DatasetSplits:
    splits, reasons = parse(data_dir)
    dropped = {k: v for k, v in sorted(reasons.items()) if not k.endswith("kept")}
    log.info("FERPlus majority protocol: dropped %s", dropped or "nothing")
    lists = {name: ImageList(images, labels) for name, (images, labels) in splits.items()}
    return DatasetSplits(
        train=lists["train"],
        val=lists["val"],
        test=lists["test"],
        classes=list(CLASSES),
        description=(
            f"FERPlus majority vote: {len(lists['train'])} train, {len(lists['val'])} validation "
            f"(PublicTest), {len(lists['test'])} test (PrivateTest) images"
        ),
        notes=dict(sorted(reasons.items())),
    )
