"""The shipped stand-in: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes).

Not facial expressions: it exists so the whole pipeline can be run with no download. The split
is fixed: within each class, every fifth image (in the bundled order) is a test image.
"""

from __future__ import annotations

import numpy as np

from .common import DatasetSplits, ImageList

CLASSES = [str(d) for d in range(10)]
TEST_EVERY = 5


def build() -> DatasetSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits stand-in ships with scikit-learn: pip install -e '.[examples]'"
        ) from error
    bunch = load_digits()
    # Grey levels 0..16 -> 0..255 uint8 images.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(int)
    rank_in_class = np.zeros(len(labels), dtype=int)
    for digit in range(len(CLASSES)):
        members = np.flatnonzero(labels == digit)
        rank_in_class[members] = np.arange(len(members))
    is_test = rank_in_class % TEST_EVERY == 0
    train = ImageList(list(images[~is_test]), labels[~is_test].tolist())
    test = ImageList(list(images[is_test]), labels[is_test].tolist())
    return DatasetSplits(
        train=train,
        test=test,
        classes=list(CLASSES),
        description=(
            f"SMALL STAND-IN, NOT RAF-DB: scikit-learn handwritten digits, {len(train)} train / "
            f"{len(test)} test images, 10 classes (8x8 grey, upscaled)"
        ),
        hflip=False,  # a mirrored digit is not the same digit
    )
