"""The reference recipe's image transforms (RAF-DB training at 224 x 224).

Train: resize -> horizontal flip -> with p = 0.2 (rotate up to 20 degrees, then a random crop
with padding) -> tensor -> ImageNet normalisation -> random erasing of 2-25 % of the image.
Eval: resize -> tensor -> normalisation. The crop padding is 32 px at 224 and scales with size.
"""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(img_size: int, hflip: bool = True) -> T.Compose:
    padding = max(1, round(img_size * 32 / 224))
    steps = [T.Resize((img_size, img_size))]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [
        T.RandomApply([T.RandomRotation(20), T.RandomCrop(img_size, padding=padding)], p=0.2),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        T.RandomErasing(scale=(0.02, 0.25)),
    ]
    return T.Compose(steps)


def eval_transform(img_size: int) -> T.Compose:
    return T.Compose([T.Resize((img_size, img_size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
