"""The network configurations of the paper's Table 2, built from ``gradual_sd``.

* ``baseline``: the plain timm model (ResNet50 in the paper).
* ``gsd``: gradual self distillation, heads after every stage but the last, no ACAM anywhere.
* ``gsd-acam``: GSDNet: as ``gsd``, with ACAM in every head and before the final pooling.

Loss settings default to the reference code's (``PAPER_LOSS``): T = 3, KL 0.3, feature 0.01,
reference formulation, no cross-entropy on the auxiliary heads. ``as_shipped=True`` trains
``gsd-acam`` the way the authors' code does (see ``shipped.py``).

Every configuration is called the same way: ``module(images, targets=None, *, run_heads=None)``
returns a :class:`gradual_sd.DistillerOutput`, ``module.model`` is the plain classifier, and
``module.finite_check`` checks every training step for NaN/inf (the library's deferred check:
call its ``flush()`` at the end of an epoch).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from gradual_sd import (
    ACAM,
    BottleneckHead,
    DistillerOutput,
    GradualDistillationLoss,
    GradualSelfDistiller,
    PooledHead,
    default_stage_names,
    find_classifier_name,
    insert_after,
)
from gradual_sd import FiniteCheck

from . import small_models  # noqa: F401 (registers the small-image ResNets with timm)
from .shipped import ShippedGSDNet, ShippedHead, reference_init
from .weights import (
    file_sha256,
    is_reference_state_dict,
    load_reference_state_dict,
    load_weights,
    patch_caffe_resnet,
    read_state_dict,
)

log = logging.getLogger(__name__)

METHODS = ("baseline", "gsd", "gsd-acam")
HEADS = {"bottleneck": BottleneckHead, "pooled": PooledHead}
FEATURE_DIM = 128
# The loss settings and their defaults come from the library's loss, so they are stated once.
PAPER_LOSS = {
    name: inspect.signature(GradualDistillationLoss).parameters[name].default
    for name in ("temperature", "kl_weight", "feature_weight", "formulation", "aux_ce_weight")
}


class BuiltModel(NamedTuple):
    """What :func:`build_gsdnet` returns: the module to train and how it was built."""

    module: nn.Module
    config: dict  # how to rebuild the plain model, and what weights were loaded


class PlainClassifier(nn.Module):
    """The baseline behind the distiller's call interface: plain cross-entropy, one head, and the
    same finiteness check of every training step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.classifier_name = find_classifier_name(model)
        self.head_names = (self.classifier_name,)
        self.finite_check = FiniteCheck()

    def forward(
        self, images: torch.Tensor, targets: torch.Tensor | None = None, *, run_heads: bool | None = None
    ) -> DistillerOutput:
        logits = self.model(images)
        if targets is None:
            return DistillerOutput(logits, None, {}, (logits,), ())
        loss = F.cross_entropy(logits.float(), targets)
        self.finite_check.submit([loss, logits], lambda: ["loss", f"logits of {self.classifier_name}"])
        return DistillerOutput(logits, loss, {"ce": loss}, (logits,), ())


def create_backbone(
    model_name: str, num_classes: int, pretrained: bool = False, in_chans: int = 3
) -> nn.Module:
    """A timm model with ``num_classes`` outputs taking ``in_chans`` channels (timm's pretrained
    weights need the hub or its local cache)."""
    try:
        return timm.create_model(
            model_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans
        )
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"{error}; see timm.list_models()") from None
        raise


def build_gsdnet(
    method: str = "gsd-acam",
    model_name: str = "resnet50",
    num_classes: int = 7,
    *,
    weights: str | Path | None = None,
    caffe_resnet: bool | None = None,
    img_size: int = 224,
    in_chans: int = 3,
    stage_names: Sequence[str] | None = None,
    teacher: str = "neighbour",
    head: str = "bottleneck",
    head_pool_size: int | None = None,
    as_shipped: bool = False,
    **loss_options: object,
) -> BuiltModel:
    """The plain model (``baseline``) or a distiller (``gsd``, ``gsd-acam``), and its config.

    ``weights``: ``None`` (random), ``"timm"`` (timm's pretrained weights) or a ``.pkl`` /
    ``.pth`` / ``.safetensors`` file: a backbone checkpoint (for example ``resnet50_ft``), loaded
    before ACAM is inserted, or a checkpoint saved by the authors' code, loaded into the whole
    ``gsd-acam`` network by :func:`load_reference_state_dict`. ``caffe_resnet`` patches the
    ResNet for Caffe-ported weights; by default it is on for ``.pkl`` files and the authors'
    checkpoints. ``as_shipped`` trains ``gsd-acam`` as the authors' code does (``shipped.py``).
    ``head_pool_size`` runs the bottleneck heads' projection on a pooled grid
    (``BottleneckHead(pool_size=...)``, cheaper early exits). ``loss_options`` override
    ``PAPER_LOSS``; the baseline trains with plain cross-entropy. ``config["weights"]`` records
    the file, its sha256 and what was loaded. ``stage_names`` are the stages the heads follow
    (``None``: the library's default); ``in_chans`` the input's channels (1: greyscale).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {sorted(HEADS)}")
    unknown = sorted(set(loss_options) - set(PAPER_LOSS))
    if unknown:
        raise ValueError(f"unknown loss options {unknown}; choose from {sorted(PAPER_LOSS)}")
    if head_pool_size is not None and head != "bottleneck":
        raise ValueError(f"head_pool_size applies to the 'bottleneck' head, not {head!r}")
    if as_shipped and (method, head, head_pool_size) != ("gsd-acam", "bottleneck", None):
        raise ValueError(
            f"as_shipped reproduces the authors' GSDNet: method 'gsd-acam' with the 'bottleneck' "
            f"head at full resolution, not method {method!r} with head {head!r} "
            f"(head_pool_size={head_pool_size})"
        )
    path = None if weights in (None, "timm") else Path(weights)
    state = read_state_dict(path) if path is not None else None
    reference = state is not None and is_reference_state_dict(state)
    if reference and method != "gsd-acam":
        raise ValueError(
            f"{path} was saved by the authors' code (a whole GSDNet); load it with method "
            f"'gsd-acam', not {method!r}"
        )
    if caffe_resnet is None:
        caffe_resnet = reference or (path is not None and path.suffix.lower() == ".pkl")
    model = create_backbone(model_name, num_classes, pretrained=weights == "timm", in_chans=in_chans)
    if as_shipped:
        reference_init(model)
    if caffe_resnet:
        patch_caffe_resnet(model)
    report = None
    if state is not None and not reference:
        report = load_weights(model, state, f"{find_classifier_name(model)}.", source=str(path))
    example = torch.zeros(1, in_chans, img_size, img_size)
    acam_after = None
    if method == "gsd-acam":
        acam_after = default_stage_names(model, example, include_last=True)[-1]
        insert_after(model, acam_after, example_input=example)
    module: nn.Module
    if method == "baseline":
        module = PlainClassifier(model)
    else:
        attn_layer = ACAM if method == "gsd-acam" else None
        head_factory = ShippedHead if as_shipped else HEADS[head]
        head_options = {} if head_pool_size is None else {"pool_size": head_pool_size}
        module = GradualSelfDistiller(
            model,
            None if stage_names is None else list(stage_names),
            loss=GradualDistillationLoss(teacher=teacher, **{**PAPER_LOSS, **loss_options}),
            head_factory=partial(head_factory, attn_layer=attn_layer, **head_options),
            feature_dim=FEATURE_DIM,
            example_input=example,
        )
        if as_shipped:
            reference_init(module.heads)
            module = ShippedGSDNet(module, FEATURE_DIM)
    if reference:
        report = load_reference_state_dict(module, state)
    if report is not None:
        report.file, report.sha256 = str(path), file_sha256(path)
        log.info("weights %s (%s, sha256 %s): %s", path, report.kind, report.sha256, report.summary())
    config = dict(
        model_name=model_name,
        num_classes=num_classes,
        caffe_resnet=bool(caffe_resnet),
        acam_after=acam_after,
        img_size=img_size,
        in_chans=in_chans,
        as_shipped=as_shipped,
        weights=report.record() if report is not None else {"file": weights},
    )
    return BuiltModel(module, config)


def export_payload(module: nn.Module, config: dict, classes: list[str], mean, std) -> dict:
    """What ``model_*.pt`` holds: the plain model's weights (``module.model``, every
    configuration's classifier) and how to rebuild it."""
    keep = ("model_name", "num_classes", "caffe_resnet", "acam_after", "img_size", "in_chans")
    rebuild = {k: config[k] for k in keep}
    rebuild.update(classes=list(classes), mean=list(mean), std=list(std))
    state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    return {"config": rebuild, "state_dict": state}


def load_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild an exported model for inference: returns ``(model in eval mode, config)``.

    ``config`` holds ``classes``, ``img_size``, ``mean`` and ``std`` for preprocessing.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = payload["config"]
    in_chans = config.setdefault("in_chans", 3)  # files written before greyscale inputs: RGB
    model = create_backbone(config["model_name"], config["num_classes"], in_chans=in_chans)
    if config["caffe_resnet"]:
        patch_caffe_resnet(model)
    if config["acam_after"]:
        size = config["img_size"]
        insert_after(model, config["acam_after"], example_input=torch.zeros(1, in_chans, size, size))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), config
