"""AffectNet (manually annotated part): ``training.csv`` for training, ``validation.csv`` as test.

Expression codes: 0 Neutral, 1 Happiness, 2 Sadness, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger,
7 Contempt, 8 None, 9 Uncertain, 10 No-Face. The 7-class protocol keeps 0..6, the 8-class one
0..7. The images are already face crops, so the face box columns are not used.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

from .common import (
    DatasetSplits,
    ImageList,
    LabelFileError,
    require_files,
    require_path,
)

log = logging.getLogger(__name__)

CLASSES = ["Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger", "Contempt"]
LISTS = Path("Manually_Annotated_file_lists")
IMAGES = Path("Manually_Annotated_Images")


def parse_list(path: Path, num_classes: int) -> tuple[list[str], list[int], Counter]:
    """Relative image paths and labels of ``path``; rows with codes >= num_classes are counted."""
    files, labels, dropped = [], [], Counter()
    with open(path, newline="") as handle:
        rows = csv.DictReader(handle)
        for row in rows:
            where = f"{path}:{rows.line_num}"
            try:
                code = int(row["expression"])
                name = row["subDirectory_filePath"].strip()
            except (KeyError, TypeError, ValueError, AttributeError):
                raise LabelFileError(
                    f"{where}: needs columns subDirectory_filePath and an integer expression, got {row}"
                ) from None
            if not 0 <= code <= 10 or not name:
                raise LabelFileError(f"{where}: expression {code} outside 0..10 or empty file path")
            if code >= num_classes:
                dropped[code] += 1
                continue
            files.append(name)
            labels.append(code)
    return files, labels, dropped


def build(data_dir: Path, num_classes: int = 7, balanced: bool = False) -> DatasetSplits:
    if num_classes not in (7, 8):
        raise ValueError(f"AffectNet protocols have 7 or 8 classes, got {num_classes}")
    lists, notes = {}, {}
    for split, file in (("train", "training.csv"), ("test", "validation.csv")):
        csv_path = require_path(data_dir / LISTS / file, f"AffectNet's {LISTS}/ folder is expected here")
        names, labels, dropped = parse_list(csv_path, num_classes)
        paths = [data_dir / IMAGES / name for name in names]
        require_files(paths, f"AffectNet {split}")
        lists[split] = ImageList(paths, labels)
        notes[f"{split}: dropped codes >= {num_classes}"] = sum(dropped.values())
        log.info("AffectNet %s: dropped %d rows with codes %s", split, sum(dropped.values()), dict(dropped))
    return DatasetSplits(
        train=lists["train"],
        test=lists["test"],
        classes=CLASSES[:num_classes],
        description=(
            f"AffectNet {num_classes}-class: {len(lists['train'])} train, {len(lists['test'])} "
            f"test (validation.csv) images{', class-balanced sampling' if balanced else ''}"
        ),
        notes=notes,
    )
