"""What a model takes: the example input construction probes it with, and checks of the batches
a wrapper's ``forward`` gets, so that a wrong batch gets an error naming the input and the fix
instead of a kernel's message from deep inside the backbone.

The checks read shapes, dtypes and module flags only, never a tensor's values, so they cost no
device sync. Errors that depend on shapes inside the model (BatchNorm's refusal of a single
value per channel, a convolution's refusal of another channel count) are translated where they
are raised instead of guessed beforehand.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

BATCHNORM_MESSAGE = "Expected more than 1 value per channel when training"


def _as_pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def configs(model: nn.Module) -> list[object]:
    """The model's Hugging Face config and, for a two-tower model, its vision config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    vision = getattr(config, "vision_config", None)
    return [config] + ([vision] if vision is not None else [])


def takes_token_ids(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a wrapper holds as ``.model``) is a Hugging Face model
    whose main input is token ids (ImageGPT reads an image as ids of colour clusters)."""
    inner = getattr(model, "model", None)
    return any(
        getattr(m, "main_input_name", None) == "input_ids" for m in (model, inner) if isinstance(m, nn.Module)
    )


def is_token_ids(example: torch.Tensor) -> bool:
    """An ``(N, L)`` batch of integer token ids (not an image or a float sequence)."""
    return example.dim() == 2 and not example.is_floating_point() and not example.is_complex()


def input_positions(example: torch.Tensor) -> tuple[int, ...]:
    """The input's sizes along the axes that grow with it: ``(H, W)`` of an image, ``L`` of a
    sequence or of a batch of token ids."""
    return tuple(example.shape[1:] if is_token_ids(example) else example.shape[2:])


def _token_length(model: nn.Module) -> int | None:
    for config in configs(model):
        for key in ("n_positions", "max_position_embeddings"):
            length = getattr(config, key, None)
            if isinstance(length, int) and length > 0:
                return length
    return None


def placement(module: nn.Module) -> dict[str, Any]:
    """Where a module's tensors live, as keyword arguments for tensor factories and ``.to``: the
    device of its first parameter and, where that parameter is floating point, its dtype; empty
    for a module without parameters."""
    param = next(module.parameters(), None)
    if param is None:
        return {}
    return {"device": param.device, **({"dtype": param.dtype} if param.is_floating_point() else {})}


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A one-image zero batch at the size the model was built for.

    A Hugging Face model whose main input is token ids (ImageGPT) gets one sequence of token 0
    as long as its config's ``n_positions`` (``max_position_embeddings``): a whole image.

    The size is a Hugging Face ``config.image_size`` (or its ``vision_config``'s), else a
    configured ``img_size``/``image_size`` of a submodule (timm ViT and Swin patch embeddings,
    torchvision ViT), else timm's ``pretrained_cfg['input_size']``, else 224x224; the channels
    are the config's ``num_channels``, else the first convolution's input channels, else 3. A
    model whose first convolution is 1-D has no default: pass an ``(N, C, L)`` example_input.
    """
    where = placement(model)
    length = _token_length(model) if takes_token_ids(model) else None
    if length is not None:
        return torch.zeros(1, length, dtype=torch.long, device=where.get("device"))
    first_conv = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if isinstance(first_conv, (nn.Conv1d, nn.Conv3d)):
        kind = type(first_conv).__name__
        raise ValueError(
            f"{type(model).__name__}'s first convolution is an {kind}, so it does not take (N, C, H, W) "
            "images of a size the model records; pass example_input, a batch the model accepts"
        )
    size = channels = None
    for config in configs(model):
        size = size or _as_pair(getattr(config, "image_size", None))
        channels = channels or getattr(config, "num_channels", None)
    for module in model.modules():
        if size is not None:
            break
        size = _as_pair(getattr(module, "img_size", None)) or _as_pair(getattr(module, "image_size", None))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if size is None and "input_size" in cfg:
        size = tuple(cfg["input_size"][1:])
    height, width = size or (224, 224)
    if not isinstance(channels, int) or channels < 1:
        channels = first_conv.in_channels if first_conv is not None else 3
    return torch.zeros(1, channels, height, width, **where)


def checked_example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    """``example_input``, or the default one; an ``(N, C, L)`` or ``(N, C, H, W)`` batch, or
    ``(N, L)`` token ids for a model that takes them."""
    if example_input is None:
        return default_example_input(model)
    tokens = (
        isinstance(example_input, torch.Tensor) and is_token_ids(example_input) and takes_token_ids(model)
    )
    if not tokens and (not isinstance(example_input, torch.Tensor) or example_input.dim() not in (3, 4)):
        got = (
            tuple(example_input.shape)
            if isinstance(example_input, torch.Tensor)
            else type(example_input).__name__
        )
        raise ValueError(
            "example_input must be an (N, C, H, W) image batch or an (N, C, L) sequence batch (or "
            f"(N, L) token ids for a model whose main input they are), got {got}"
        )
    return example_input


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


def explain_shape(shape: tuple[int, ...], example: tuple[int, ...]) -> str | None:
    """Why a batch of ``shape`` does not fit a model that ran on an ``example`` batch of that
    shape (``(N, C, H, W)`` or ``(N, C, L)``), with the fix; ``None`` where it fits. Called once
    the model has failed on the batch, so images of another size than the example's are the
    reason.

    Args:
        shape: The batch's shape.
        example: The shape of the example the model was described with.
    """
    if len(example) not in (3, 4):  # token ids: any length is theirs
        return None
    channels, form = example[1], "(N, C, H, W)" if len(example) == 4 else "(N, C, L)"
    expects = f"the model takes {form} batches with C = {channels} (it was described on {example})"
    if len(shape) == len(example) - 1 and shape[0] == channels:
        return f"{expects}, got one item of shape {shape} without a batch axis: add one with images[None]"
    if len(shape) != len(example):
        return f"{expects}, got a batch of shape {shape}"
    if shape[1] == channels and len(shape) == 4 and shape[2:] != example[2:]:
        # A model that takes one size (ViT, most Hugging Face models), or a convolutional one
        # given images too small for its strides: resizing fits both, building for the images'
        # size only the first, and only for images no smaller than the example.
        size, theirs = "x".join(map(str, example[2:])), "x".join(map(str, shape[2:]))
        fix = f"resize them to {size}"
        if all(s >= e for s, e in zip(shape[2:], example[2:])):
            side = str(shape[2]) if shape[2] == shape[3] else str(tuple(shape[2:]))
            fix += (
                f", or build the model for {theirs} (timm: img_size={side}; Hugging Face: image_size={side})"
            )
        return f"{expects}, got {theirs} images, a size it was not built for: {fix}"
    if shape[1] == channels:
        return None
    if len(shape) == 4 and shape[3] == channels:
        return (
            f"{expects}, got {shape}, channels last (N, H, W, C): pass images.permute(0, 3, 1, 2) "
            "(or a channels-first batch from the data pipeline)"
        )
    build = (
        f"or build the model for {shape[1]} channels (timm: in_chans={shape[1]}; Hugging Face: num_channels=)"
    )
    if shape[1] == 1:
        repeat = ", ".join(["-1", str(channels)] + ["-1"] * (len(shape) - 2))
        return f"{expects}, got {shape[1]} channel: repeat it with images.expand({repeat}), {build}"
    return f"{expects}, got {shape[1]} channels in {shape}: convert the batch, {build}"


def checked_forward(forward):
    """Decorate a wrapper's ``forward(self, images, ...)``: :func:`check_images` first; a failure
    inside the model on a batch whose shape does not fit the example's (``self._example_shape``)
    explained by :func:`explain_shape`, and BatchNorm's single-value error explained."""

    @functools.wraps(forward)
    def checked(self, images, *args, **kwargs):
        check_images(images, self)
        try:
            return forward(self, images, *args, **kwargs)
        except Exception as error:
            example = getattr(self, "_example_shape", None)
            shaped = isinstance(images, torch.Tensor) and example is not None
            reason = explain_shape(tuple(images.shape), example) if shaped else None
            if reason is not None:
                raise ValueError(
                    f"{reason}. The model failed with {type(error).__name__}: {error}"
                ) from error
            if not (isinstance(error, ValueError) and BATCHNORM_MESSAGE in str(error)):
                raise
            raise ValueError(
                f"a batch of {images.shape[0]} image(s) in training mode left a BatchNorm layer one "
                "value per channel (its maps are 1x1 there). Train on batches of two or more "
                "(DataLoader(..., drop_last=True) drops a last single-image batch), or call "
                "model.eval() to predict"
            ) from error

    return checked
