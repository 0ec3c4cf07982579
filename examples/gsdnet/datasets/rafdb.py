"""RAF-DB (basic): the official label list, or a folder-per-class copy.

Official layout::

    <data-dir>/EmoLabel/list_patition_label.txt    lines "train_00001.jpg 5", labels 1..7
    <data-dir>/Image/aligned/train_00001_aligned.jpg

Folder-per-class copy: ``<data-dir>/{train,test}/<class>/*.jpg`` with class folders named
``1``..``7`` or by the class names below (any case).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .common import DatasetSplits, ImageList, LabelFileError, require_files
from .folders import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

# Label 1..7 of the official list, in order.
CLASSES = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"


def parse_label_file(path: Path) -> dict[str, list[tuple[str, int]]]:
    """``{"train": [(file name, label 0..6)], "test": [...]}`` from the official list."""
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.split()
            split = fields[0].split("_")[0] if fields else ""
            if len(fields) != 2 or not fields[1].isdigit() or split not in splits:
                raise LabelFileError(
                    f"{path}:{number}: expected '<train|test>_NNNN.jpg <label 1..7>', got {line.strip()!r}"
                )
            label = int(fields[1])
            if not 1 <= label <= len(CLASSES):
                raise LabelFileError(f"{path}:{number}: label {label} is outside 1..{len(CLASSES)}")
            splits[split].append((fields[0], label - 1))
    return splits


def aligned_path(data_dir: Path, name: str) -> Path:
    stem = Path(name).stem
    return data_dir / "Image" / "aligned" / f"{stem}_aligned.jpg"


def from_label_file(data_dir: Path) -> DatasetSplits:
    splits = parse_label_file(data_dir / LABEL_FILE)
    lists = {}
    for split, entries in splits.items():
        paths = [aligned_path(data_dir, name) for name, _ in entries]
        require_files(paths, f"RAF-DB {split}")
        lists[split] = ImageList(paths, [label for _, label in entries])
    return train_test_splits(lists, "official label list")


def train_test_splits(lists: dict[str, ImageList], layout: str) -> DatasetSplits:
    """RAF-DB's train and test lists with the class names and a one-line description."""
    return DatasetSplits(
        train=lists["train"],
        test=lists["test"],
        classes=list(CLASSES),
        description=(
            f"RAF-DB basic ({layout}): {len(lists['train'])} train, {len(lists['test'])} test images"
        ),
    )


def folder_label(folder: str) -> int:
    """Label 0..6 of a class folder named ``1``..``7`` or by its class name."""
    names = [c.lower() for c in CLASSES]
    if folder.isdigit() and 1 <= int(folder) <= len(CLASSES):
        return int(folder) - 1
    if folder.lower() in names:
        return names.index(folder.lower())
    raise ValueError(f"RAF-DB class folder {folder!r} is neither 1..7 nor one of {CLASSES}")


def from_folders(data_dir: Path) -> DatasetSplits:
    lists = {}
    for split in ("train", "test"):
        root = data_dir / split
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is missing; a folder-per-class copy needs train/ and test/")
        paths, labels, skipped = [], [], 0
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            label = folder_label(folder.name)
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(file)
                    labels.append(label)
                else:
                    skipped += 1
        if skipped:
            log.info("RAF-DB %s: ignored %d non-image files", split, skipped)
        lists[split] = ImageList(paths, labels)
    return train_test_splits(lists, "folder per class")


def build(data_dir: Path) -> DatasetSplits:
    """The official layout when its label list exists, else a folder-per-class copy."""
    if (data_dir / LABEL_FILE).is_file():
        return from_label_file(data_dir)
    if (data_dir / "train").is_dir():
        return from_folders(data_dir)
    raise FileNotFoundError(
        f"{data_dir} has neither {LABEL_FILE} (official RAF-DB basic layout) nor train/ and "
        "test/ folders (folder-per-class copy)"
    )
