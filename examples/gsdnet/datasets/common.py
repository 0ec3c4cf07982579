"""What every dataset builder returns, and image loading that names the file that failed."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

ImageSource = Path | np.ndarray


class LabelFileError(ValueError):
    """A label file line that cannot be parsed; the message names the file and line."""


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale (modes ``I;16*``, and ``I`` holding values up to 65535) is
    scaled by its bit depth to 0..255: Pillow's own conversion clips it, turning nearly every
    pixel of a 16-bit image white. 32-bit integer images are scaled by 2**32."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode != "I" or pixels.max(initial=0) <= 65535 else 2.0**32 - 1
        scaled = np.clip(np.round(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class PixelFormat:
    """How a dataset's images reach the model: Pillow mode (``"RGB"`` or ``"L"``, greyscale)
    and the per-channel mean and std of the normalisation."""

    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return len(self.mean)


# The face datasets' (and the stand-in's) format: RGB, normalised as ImageNet-pretrained models expect.
IMAGENET = PixelFormat("RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class ImageList(Dataset):
    """``(image, label)`` pairs from a list of files (or in-memory uint8 arrays) and labels.

    Images are decoded lazily and converted to 8-bit RGB (:func:`to_rgb`), or to 8-bit
    greyscale with ``mode="L"``; a corrupt file raises an error naming it.
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        labels: Sequence[int],
        transform: Callable | None = None,
        mode: str = "RGB",
    ) -> None:
        if len(sources) != len(labels):
            raise ValueError(f"{len(sources)} images but {len(labels)} labels")
        self.sources = list(sources)
        self.labels = [int(label) for label in labels]
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.sources)

    def load(self, index: int) -> Image.Image:
        source = self.sources[index]
        if isinstance(source, np.ndarray):
            return Image.fromarray(source).convert(self.mode)
        try:
            with Image.open(source) as image:
                rgb = to_rgb(image)
                return rgb if self.mode == "RGB" else rgb.convert(self.mode)
        except (OSError, SyntaxError, ValueError) as error:
            raise OSError(f"cannot read image {source}: {error}") from error

    def subset(self, indices: Sequence[int]) -> ImageList:
        """The images at ``indices``, in that order, with the same transform."""
        return ImageList(
            [self.sources[i] for i in indices], [self.labels[i] for i in indices], self.transform, self.mode
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


@dataclass
class DatasetSplits:
    """A dataset's train and test splits (and validation, where the protocol has one).

    Attributes:
        classes: Class names in label order (label ``i`` is ``classes[i]``).
        description: One line for the log (layout, counts, protocol).
        hflip: Whether horizontal flipping preserves the label (faces: yes; digits: no).
        pixels: The images' mode and normalisation (the lists' ``mode`` is ``pixels.mode``).
        notes: Counts of anything dropped while parsing, by reason, for the log and metrics.
    """

    train: ImageList
    test: ImageList
    classes: list[str]
    description: str
    val: ImageList | None = None
    hflip: bool = True
    pixels: PixelFormat = IMAGENET
    notes: dict[str, int] = field(default_factory=dict)


def require_files(paths: Sequence[Path], what: str) -> None:
    """Raise one error listing missing images (count and the first few paths)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:5])
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} {what} images are missing, e.g.:\n  {shown}")


def require_path(path: Path, hint: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {hint}")
    return path


class UnreadableImagesError(ValueError):
    """Images that cannot be decoded, found before training; the message lists every one."""


def check_image(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or ``None``. JPEGs decode at 1/8 scale (libjpeg's DCT
    scaling still reads the whole stream, so a truncated file is caught) to keep this fast."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def find_unreadable(images: ImageList, workers: int | None = None) -> dict[int, str]:
    """``{index: reason}`` for every file of ``images`` that cannot be decoded (in-memory images
    are skipped). Threads: Pillow decodes without the GIL."""
    files = [(i, s) for i, s in enumerate(images.sources) if not isinstance(s, np.ndarray)]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        reasons = pool.map(check_image, [path for _, path in files], chunksize=256)
        return {i: reason for (i, _), reason in zip(files, reasons) if reason is not None}


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(keep, held_out)``: within every class, a seeded random ``fraction`` (rounded,
    at least one image of any class with two or more) is held out. Both lists are sorted."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must lie strictly between 0 and 1, got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels_t = torch.as_tensor(labels)
    held_out: list[int] = []
    for label in torch.unique(labels_t).tolist():
        members = torch.nonzero(labels_t == label).flatten()
        count = round(fraction * len(members))
        count = min(max(count, 1), len(members) - 1) if len(members) > 1 else 0
        held_out += members[torch.randperm(len(members), generator=generator)[:count]].tolist()
    held = set(held_out)
    return [i for i in range(len(labels)) if i not in held], sorted(held_out)


def class_balanced_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-sample weights ``1 / count(label)`` so that every class is drawn equally often."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).double()
    return (1.0 / counts.clamp(min=1))[torch.as_tensor(labels)]
