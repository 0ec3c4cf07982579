"""Checks of an image batch for a wrapped model's ``forward``, so that a wrong batch gets an
error naming the input and the fix instead of a kernel's message from deep inside the backbone.

Only shapes, dtypes and module flags are read before the model runs: no tensor value, so no
device sync. BatchNorm's refusal of a single value per channel (a batch of one whose maps are
1x1 at some layer, in training mode) depends on shapes inside the model, so that error is
translated where it is raised instead of guessed beforehand.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .probing import is_token_ids, takes_token_ids

__all__ = ["check_images", "checked_forward"]

BATCHNORM_MESSAGE = "Expected more than 1 value per channel when training"


def check_images(images: torch.Tensor, model: nn.Module) -> None:
    """Raise ``TypeError``/``ValueError`` for a batch ``model`` cannot take: an integer dtype,
    float64 for a model of another precision, or an empty batch; for a model whose main input
    is token ids, anything but an ``(N, L)`` integer batch. Inputs that are not tensors are
    left to the model."""
    if not isinstance(images, torch.Tensor) or torch.compiler.is_compiling():
        return
    if takes_token_ids(model):
        if not is_token_ids(images):
            raise TypeError(
                f"the model takes (N, L) integer token ids, got a {images.dtype} batch of shape "
                f"{tuple(images.shape)}: pass the ids its processor makes (ImageGPT: "
                "ImageGPTImageProcessor turns images into ids of colour clusters)"
            )
    elif not images.is_floating_point():
        raise TypeError(
            f"images are {images.dtype}, but the model takes floating-point images: convert them "
            "with images.float() (divide uint8 pixels by 255 and normalise as the model expects)"
        )
    elif images.dtype == torch.float64:  # the parameter walk only for the rare float64 batch
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        if weight is not None and weight.dtype != torch.float64:
            raise TypeError(
                f"images are {images.dtype} but the model's weights are {weight.dtype}: pass images.to("
                f"{weight.dtype}) (or convert the model with model.double())"
            )
    if images.dim() == 0 or images.shape[0] == 0:
        raise ValueError(
            f"empty batch (images of shape {tuple(images.shape)}): pass at least one image; "
            "skip empty batches before calling the model"
        )


def checked_forward(forward):
    """Decorate a wrapper's ``forward(self, images, ...)``: :func:`check_images` first, and
    BatchNorm's single-value error explained."""

    @functools.wraps(forward)
    def checked(self, images, *args, **kwargs):
        check_images(images, self)
        try:
            return forward(self, images, *args, **kwargs)
        except ValueError as error:
            if BATCHNORM_MESSAGE not in str(error):
                raise
            raise ValueError(
                f"a batch of {images.shape[0]} image(s) in training mode left a BatchNorm layer one "
                "value per channel (its maps are 1x1 there). Train on batches of two or more "
                "(DataLoader(..., drop_last=True) drops a last single-image batch), or call "
                "model.eval() to predict"
            ) from error

    return checked
