"""Checks of an image batch before a wrapped model runs it, so that a wrong batch gets an error
naming the input and the fix instead of a kernel's message from deep inside the backbone.

Only shapes, dtypes and module flags are read: no tensor value, so no device sync.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["check_images"]


def check_images(images: torch.Tensor, model: nn.Module) -> None:
    """Raise ``TypeError``/``ValueError`` for a batch ``model`` cannot take: not a tensor, an
    integer dtype, float64 for a model of another precision, an empty batch, or a single image
    in training mode with BatchNorm (which needs more than one value per channel). Inputs that
    are not tensors are left to the model."""
    if not isinstance(images, torch.Tensor) or torch.compiler.is_compiling():
        return
    if not images.is_floating_point():
        raise TypeError(
            f"images are {images.dtype}, but the model takes floating-point images: convert them "
            "with images.float() (divide uint8 pixels by 255 and normalise as the model expects)"
        )
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if images.dtype == torch.float64 and weight is not None and weight.dtype != torch.float64:
        raise TypeError(
            f"images are {images.dtype} but the model's weights are {weight.dtype}: pass images.to("
            f"{weight.dtype}) (or convert the model with model.double())"
        )
    if images.dim() == 0 or images.shape[0] == 0:
        raise ValueError(
            f"empty batch (images of shape {tuple(images.shape)}): pass at least one image; "
            "skip empty batches before calling the model"
        )
    if (
        images.shape[0] == 1
        and model.training
        and any(isinstance(m, _BatchNorm) and m.training for m in model.modules())
    ):
        raise ValueError(
            "a batch of one image in training mode: BatchNorm needs more than one value per "
            "channel, which fails once a stage's maps are 1x1. Train on batches of two or more "
            "(DataLoader(..., drop_last=True) drops a last single-image batch), or call "
            "model.eval() to predict"
        )
