"""What a run trained on, so that ``--resume`` can refuse to continue it on something else.

A checkpoint and a finished run's ``metrics.json`` record the run's settings, its class list, a
digest of its image lists and the sha256 of its initial weights; a resumed run must match all of
them (``--epochs`` alone may grow).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .datasets.common import ImageList


def dataset_digest(lists: Mapping[str, ImageList], root: Path | None) -> str:
    """sha256 of every split's file list (relative to ``root``) or in-memory pixels, and labels.

    The labels come from the label files or class folders, so an edited label file or a renamed
    class folder changes the digest; moving the whole dataset to another ``--data-dir`` does not.
    """
    digest = hashlib.sha256()
    root = None if root is None else Path(root).expanduser()  # as the dataset builders expand it
    for name in sorted(lists):
        images = lists[name]
        digest.update(f"split {name} {len(images)}\n".encode())
        for source, label in zip(images.sources, images.labels):
            if isinstance(source, np.ndarray):
                digest.update(hashlib.sha256(np.ascontiguousarray(source).tobytes()).digest())
            else:
                path = Path(source)
                if root is not None and path.is_relative_to(root):
                    path = path.relative_to(root)
                digest.update(path.as_posix().encode())
            digest.update(f" {label}\n".encode())
    return digest.hexdigest()


def run_identity(
    classes: list[str], lists: Mapping[str, ImageList], root: Path | None, weights: dict
) -> dict:
    """The entries a run adds to its settings: classes, dataset digest, initial weights' sha256."""
    return {
        "classes": list(classes),
        "dataset_sha256": dataset_digest(lists, root),
        "weights_sha256": weights.get("sha256") or None,
    }
