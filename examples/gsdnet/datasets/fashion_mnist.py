"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): 70,000 28x28 greyscale images of clothing,
10 classes, as the four original IDX files (gzipped or not).

Debian and Ubuntu ship them: ``apt-get install dataset-fashion-mnist`` puts them in
:data:`DEFAULT_DIR`, the default ``--data-dir``. The official split is kept: 60,000 training
images (the validation split is held out of them) and the 10,000 test images.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .common import DatasetSplits, ImageList, PixelFormat

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
SIZE = 28
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The IDX magic number: two zero bytes, the element type (0x08: unsigned byte), the dimension count.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
# Mean and std of the 60,000 training images' pixels in [0, 1].
PIXELS = PixelFormat("L", (0.2860,), (0.3530,))
INSTALL_HINT = (
    "install the Debian package (apt-get install dataset-fashion-mnist, which puts the files in "
    f"{DEFAULT_DIR}) or put the four upstream IDX files "
    f"({', '.join(name + '.gz' for pair in FILES.values() for name in pair)}) in --data-dir"
)


class IdxFileError(ValueError):
    """An IDX file that cannot be read: truncated, damaged, or not the expected array."""


def find_file(root: Path, stem: str) -> Path:
    """``root/stem.gz`` or ``root/stem``; raise naming both and how to get the files."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root / stem}.gz (or {stem}) not found: {INSTALL_HINT}")


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise IdxFileError(f"{path} is damaged or truncated: {error}") from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The unsigned-byte array of IDX file ``path``, its header checked against ``magic`` (which
    fixes the number of dimensions) and its payload against the header's shape."""
    data = read_bytes(path)
    dims = magic & 0xFF
    header = 4 + 4 * dims
    if len(data) < header:
        raise IdxFileError(f"{path} is truncated: {len(data)} bytes, shorter than its header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise IdxFileError(
            f"{path} is not an IDX file of unsigned bytes with {dims} dimension(s): magic number "
            f"0x{found:08x}, expected 0x{magic:08x}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise IdxFileError(f"{path} is {state}: {len(data)} bytes, its header {shape} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28), labels (N,))`` of ``split`` (``"train"`` or ``"test"``), checked."""
    images_path, labels_path = (find_file(root, stem) for stem in FILES[split])
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (SIZE, SIZE):
        raise IdxFileError(
            f"{images_path} holds {images.shape[1]}x{images.shape[2]} images; Fashion-MNIST's are "
            f"{SIZE}x{SIZE}"
        )
    if len(images) != len(labels):
        raise IdxFileError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if len(labels) and labels.max() >= len(CLASSES):
        bad = int(np.flatnonzero(labels >= len(CLASSES))[0])
        raise IdxFileError(
            f"{labels_path}: label {labels[bad]} at index {bad} is outside 0..{len(CLASSES) - 1}"
        )
    return images, labels


def build(data_dir: Path = DEFAULT_DIR) -> DatasetSplits:
    """The official training and test sets of ``data_dir``."""
    lists = {}
    for split in FILES:
        images, labels = read_split(data_dir, split)
        lists[split] = ImageList(list(images), labels.tolist(), mode=PIXELS.mode)
    return DatasetSplits(
        train=lists["train"],
        test=lists["test"],
        classes=list(CLASSES),
        description=(
            f"Fashion-MNIST {data_dir}: {len(lists['train'])} train / {len(lists['test'])} test "
            f"images, {len(CLASSES)} classes (28x28 grey)"
        ),
        hflip=True,  # a mirrored garment is the same garment
        pixels=PIXELS,
    )
