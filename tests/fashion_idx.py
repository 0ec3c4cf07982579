"""Write Fashion-MNIST's IDX files for tests: a tiny folder in the upstream layout."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    """``array`` as an IDX file at ``path``, gzipped when ``path`` ends in ``.gz``."""
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fashion_mnist(root: Path, train: int = 60, test: int = 20, gz: bool = True, seed: int = 0) -> Path:
    """A folder of the four IDX files: ``train`` and ``test`` images with balanced labels, each
    class's images a brightness level of their own plus noise (so a model can learn them)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        base = (labels * 25).astype(np.int64)[:, None, None]
        images = np.clip(base + rng.integers(0, 30, (count, 28, 28)), 0, 255)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, IMAGES_MAGIC)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, LABELS_MAGIC)
    return root
