"""The image transforms, by recipe.

``fer`` is the reference recipe's (RAF-DB training at 224 x 224): resize -> horizontal flip ->
with p = 0.2 (rotate up to 20 degrees, then a random crop with padding) -> tensor ->
normalisation -> random erasing of 2-25 % of the image. The crop padding is 32 px at 224 and
scales with size.

``crop-flip`` is the standard augmentation of small-image benchmarks (CIFAR, Fashion-MNIST):
resize -> a random crop of the image padded by 1/14 of its size (2 px at 28) -> horizontal flip
-> tensor -> normalisation.

Eval, either recipe: resize -> tensor -> normalisation.
"""

from __future__ import annotations

from torchvision import transforms as T

from .datasets.common import IMAGENET, PixelFormat

AUGMENTATIONS = ("fer", "crop-flip")


def train_transform(
    img_size: int, hflip: bool = True, pixels: PixelFormat = IMAGENET, augment: str = "fer"
) -> T.Compose:
    """The training transform of recipe ``augment``; ``hflip=False`` where a mirror image
    changes the label."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose from {AUGMENTATIONS}")
    steps: list = [T.Resize((img_size, img_size))]
    if augment == "crop-flip":
        steps.append(T.RandomCrop(img_size, padding=max(1, round(img_size / 14))))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        return T.Compose([*steps, T.ToTensor(), T.Normalize(pixels.mean, pixels.std)])
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    padding = max(1, round(img_size * 32 / 224))
    steps += [
        T.RandomApply([T.RandomRotation(20), T.RandomCrop(img_size, padding=padding)], p=0.2),
        T.ToTensor(),
        T.Normalize(pixels.mean, pixels.std),
        T.RandomErasing(scale=(0.02, 0.25)),
    ]
    return T.Compose(steps)


def eval_transform(img_size: int, pixels: PixelFormat = IMAGENET) -> T.Compose:
    return T.Compose([T.Resize((img_size, img_size)), T.ToTensor(), T.Normalize(pixels.mean, pixels.std)])
