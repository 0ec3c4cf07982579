"""Any dataset stored as ``<data-dir>/{train,test}/<class>/<image>`` (torchvision ImageFolder)."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from .common import DatasetSplits, ImageList

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
TEST_DIR_NAMES = ("test", "val", "validation")


def build(data_dir: Path) -> DatasetSplits:
    """Classes are the train folder's subfolders in sorted order (torchvision's rule)."""
    train_root = data_dir / "train"
    test_root = next((data_dir / n for n in TEST_DIR_NAMES if (data_dir / n).is_dir()), None)
    if not train_root.is_dir() or test_root is None:
        raise FileNotFoundError(
            f"{data_dir} needs a train/ folder and one of {list(TEST_DIR_NAMES)}, each with one "
            "folder per class"
        )
    train = ImageFolder(train_root)
    test = ImageFolder(test_root)
    if test.classes != train.classes:
        raise ValueError(
            f"class folders differ: {train_root} has {train.classes}, {test_root} has {test.classes}"
        )
    lists = [ImageList([Path(p) for p, _ in d.samples], d.targets) for d in (train, test)]
    return DatasetSplits(
        train=lists[0],
        test=lists[1],
        classes=list(train.classes),
        description=(
            f"ImageFolder {data_dir}: {len(lists[0])} train, {len(lists[1])} test "
            f"({test_root.name}/) images, {len(train.classes)} classes"
        ),
    )
