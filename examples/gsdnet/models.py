"""The network configurations of the paper's Table 2, built from ``gradual_sd``.

* ``baseline``: the plain timm model (ResNet50 in the paper).
* ``gsd``: gradual self distillation, heads after every stage but the last, no ACAM anywhere.
* ``gsd-acam``: GSDNet: as ``gsd``, with ACAM in every head and before the final pooling.

Loss settings default to the reference code's (``PAPER_LOSS``): T = 3, KL 0.3, feature 0.01,
reference formulation, no cross-entropy on the auxiliary heads.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import timm
import torch
from torch import nn

from gradual_sd import ACAM, BottleneckHead, GradualDistillationLoss, GradualSelfDistiller, PooledHead
from gradual_sd import insert_after

from .weights import load_weights, patch_caffe_resnet

METHODS = ("baseline", "gsd", "gsd-acam")
HEADS = {"bottleneck": BottleneckHead, "pooled": PooledHead}
PAPER_LOSS = dict(
    temperature=3.0, kl_weight=0.3, feature_weight=0.01, formulation="reference", aux_ce_weight=0.0
)


def last_stage_name(model: nn.Module) -> str:
    """The deepest feature stage (``layer4`` for ResNets), where ACAM goes before pooling."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no timm feature_info to find its last stage")
    return info[-1]["module"]


def create_backbone(
    model_name: str,
    num_classes: int,
    weights: str | Path | None = None,
    caffe_resnet: bool | None = None,
) -> tuple[nn.Module, bool]:
    """A timm model with ``num_classes`` outputs and its initial weights.

    ``weights``: ``None`` (random), ``"timm"`` (timm's pretrained weights; needs the hub or a
    local cache) or a ``.pkl`` / ``.pth`` / ``.safetensors`` file. ``caffe_resnet`` patches the
    model for Caffe-ported weights; by default it is on exactly for ``.pkl`` files.
    Returns the model and whether it was patched.
    """
    pretrained = weights == "timm"
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"{error}; see timm.list_models()") from None
        raise
    if caffe_resnet is None:
        caffe_resnet = weights is not None and not pretrained and Path(weights).suffix.lower() == ".pkl"
    if caffe_resnet:
        patch_caffe_resnet(model)
    if weights is not None and not pretrained:
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        prefix = next((f"{n}." for n, m in model.named_modules() if m is classifier), "fc.")
        load_weights(model, Path(weights), classifier_prefix=prefix)
    return model, bool(caffe_resnet)


def build_gsdnet(
    method: str = "gsd-acam",
    model_name: str = "resnet50",
    num_classes: int = 7,
    *,
    weights: str | Path | None = None,
    caffe_resnet: bool | None = None,
    img_size: int = 224,
    teacher: str = "neighbour",
    head: str = "bottleneck",
    **loss_options: object,
) -> nn.Module:
    """The plain model (``baseline``) or a :class:`GradualSelfDistiller` (``gsd``, ``gsd-acam``).

    ``loss_options`` override ``PAPER_LOSS`` (keys ``temperature``, ``kl_weight``,
    ``feature_weight``, ``formulation``, ``aux_ce_weight``); the baseline trains with plain
    cross-entropy and ignores them. Weights are loaded before ACAM is inserted, so their keys are
    unaffected. The returned module carries ``gsdnet_config``, which :func:`export_payload`
    stores next to the exported weights.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {sorted(HEADS)}")
    unknown = sorted(set(loss_options) - set(PAPER_LOSS))
    if unknown:
        raise ValueError(f"unknown loss options {unknown}; choose from {sorted(PAPER_LOSS)}")
    model, patched = create_backbone(model_name, num_classes, weights, caffe_resnet)
    example = torch.zeros(1, 3, img_size, img_size)
    acam_after = None
    if method == "gsd-acam":
        acam_after = last_stage_name(model)
        insert_after(model, acam_after, example_input=example)
    model.gsdnet_config = dict(
        model_name=model_name,
        num_classes=num_classes,
        caffe_resnet=patched,
        acam_after=acam_after,
        img_size=img_size,
    )
    if method == "baseline":
        return model
    attn_layer = ACAM if method == "gsd-acam" else None
    distiller = GradualSelfDistiller(
        model,
        loss=GradualDistillationLoss(teacher=teacher, **{**PAPER_LOSS, **loss_options}),
        head_factory=partial(HEADS[head], attn_layer=attn_layer),
        example_input=example,
        check_finite=False,  # the engine checks, agreeing across processes before backward
    )
    return distiller


def plain_model(module: nn.Module) -> nn.Module:
    """The classifier itself: the wrapped model of a distiller, or ``module``."""
    return module.model if isinstance(module, GradualSelfDistiller) else module


def export_payload(module: nn.Module, classes: list[str], mean, std) -> dict:
    """What ``model_*.pt`` holds: the plain model's weights and how to rebuild it."""
    model = plain_model(module)
    config = dict(model.gsdnet_config, classes=list(classes), mean=list(mean), std=list(std))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"config": config, "state_dict": state}


def load_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild an exported model for inference: ``(model in eval mode, config)``."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = payload["config"]
    model = timm.create_model(config["model_name"], num_classes=config["num_classes"])
    if config["caffe_resnet"]:
        patch_caffe_resnet(model)
    if config["acam_after"]:
        size = config["img_size"]
        insert_after(model, config["acam_after"], example_input=torch.zeros(1, 3, size, size))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), config
