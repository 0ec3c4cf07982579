"""Dataset builders by name. Each returns :class:`DatasetSplits` with transform-less splits."""

from __future__ import annotations

from pathlib import Path

from . import affectnet, digits, fashion_mnist, ferplus, folders, rafdb
from .common import DatasetSplits, ImageList, LabelFileError

__all__ = ["DATASETS", "build_datasets", "DatasetSplits", "ImageList", "LabelFileError"]

DATASETS = ("rafdb", "ferplus", "affectnet", "imagefolder", "digits", "fashion-mnist")


def build_datasets(
    name: str,
    data_dir: Path | None = None,
    affectnet_classes: int = 7,
    balanced: bool = False,
) -> DatasetSplits:
    """Parse dataset ``name`` under ``data_dir`` (not needed for the shipped ``digits``; for
    ``fashion-mnist`` it defaults to the Debian package's folder)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if balanced and name != "affectnet":
        raise ValueError("class-balanced sampling is offered for affectnet only")
    if name == "digits":
        return digits.build()
    if name == "fashion-mnist":
        return fashion_mnist.build(Path(data_dir or fashion_mnist.DEFAULT_DIR).expanduser())
    if data_dir is None:
        raise ValueError(f"--data-dir is required for dataset {name!r}")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    if name == "rafdb":
        return rafdb.build(data_dir)
    if name == "ferplus":
        return ferplus.build(data_dir)
    if name == "affectnet":
        return affectnet.build(data_dir, affectnet_classes, balanced)
    return folders.build(data_dir)
