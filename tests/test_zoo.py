"""Every timm model family through the distiller with default arguments, as timm's own
test_models.py runs every family through the same checks.

Each family's smallest model (see ``zoo.py``) at a small input must either train (two steps,
every head parameter gets a gradient, eval logits equal the plain model's, heads as wide as
``feature_info`` says, nothing left behind by ``export``) or, for the families in
``REFUSED``, refuse with a ``ValueError``/``TypeError`` that names the argument that fixes it.
The model that trained then goes through the early-exit checks (``exit_zoo.check_as_exits``,
exported to ONNX for the families in ``exit_zoo.ONNX_CI``): one build per family for both.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from gradual_sd import GradualSelfDistiller, default_stage_names, list_stages
from gradual_sd._stages import default_example_input
from gradual_sd._taps import tapped_by

from exit_zoo import check_as_exits
from zoo import smallest_in, timm_families, train_two_steps

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # input size where the model accepts it; otherwise its minimum input size
NUM_CLASSES = 5

# Families whose smallest model the distiller refuses with defaults, and the argument its error
# names. Anything else must train; a family here that starts training fails the test too, so the
# list stays true.
REFUSED = {
    # A vision encoder with no classification head, whatever num_classes says.
    "gemma4_vit": "num_classes",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "family" not in metafunc.fixturenames:
        return
    metafunc.parametrize("family", timm_families())


def create_small(name: str) -> tuple[torch.nn.Module, int]:
    """The model at ``SIZE`` px where its constructor takes ``img_size``, else at its default
    configuration; returns it and the input size to try first."""
    torch.manual_seed(0)
    cfg = timm.get_pretrained_cfg(name)
    min_size = max((cfg.min_input_size or (3, SIZE, SIZE))[1:]) if cfg is not None else SIZE
    size = max(SIZE, min_size)
    try:
        return timm.create_model(name, num_classes=NUM_CLASSES, img_size=size), size
    except TypeError:
        return timm.create_model(name, num_classes=NUM_CLASSES), size


def wrap_as_a_user_would(name: str) -> tuple[GradualSelfDistiller, int, dict]:
    """Defaults first. Where the error asks for ``example_input`` (a model that does not keep
    the ``img_size`` it was built with, or one too small for the input tried), pass one at the
    size built; where the model fails at that size itself, build it at its default size."""
    model, size = create_small(name)
    hooks = hook_counts(model)
    try:
        return GradualSelfDistiller(model), default_example_input(model).shape[-1], hooks
    except ValueError as error:
        if "example_input" not in str(error):
            raise
    try:
        return GradualSelfDistiller(model, example_input=torch.zeros(1, 3, size, size)), size, hooks
    except ValueError as error:
        if "example_input" not in str(error):
            raise
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=NUM_CLASSES)
    hooks = hook_counts(model)
    return GradualSelfDistiller(model), default_example_input(model).shape[-1], hooks


def smallest_input(distiller: GradualSelfDistiller, size: int) -> int:
    """The input size to train and exit at: the model's smallest (timm's ``min_input_size``,
    else ``SIZE``), as timm's own test_models.py shrinks its inputs, where the model runs at it;
    else ``size``, the one it was wrapped at: where its pretrained config fixes the input size,
    or a forward at the smaller size fails (too small for its downsampling or its windows)."""
    cfg = getattr(distiller.model, "pretrained_cfg", None) or {}
    smallest = max(SIZE, *(cfg.get("min_input_size") or (3, SIZE, SIZE))[1:])
    if size <= smallest or cfg.get("fixed_input_size"):
        return size
    distiller.eval()
    try:
        with torch.no_grad():
            distiller(torch.zeros(2, 3, smallest, smallest))
    except Exception:  # whatever the model raises at a size it does not take
        return size
    return smallest


def head_input_width(head: torch.nn.Module) -> int:
    first = next(m for m in head.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    return first.in_channels if isinstance(first, torch.nn.Conv2d) else first.in_features


def hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


@pytest.mark.slow
def test_family(family: str, tmp_path) -> None:
    model_name = smallest_in(family)
    if family in REFUSED:
        model, _ = create_small(model_name)
        hooks_before = hook_counts(model)
        with pytest.raises((ValueError, TypeError)) as refusal:
            GradualSelfDistiller(model)
        assert REFUSED[family] in str(refusal.value), refusal.value
        assert hook_counts(model) == hooks_before, "a refused wrap left hooks behind"
        return

    distiller, size, hooks_before = wrap_as_a_user_would(model_name)
    size = smallest_input(distiller, size)
    model = distiller.model
    assert len(distiller.heads) >= 1
    channels = {e["module"]: e["num_chs"] for e in getattr(model, "feature_info", [])}
    for stage, head in zip(distiller.stages, distiller.heads):
        assert head_input_width(head) == stage.channels
        if stage.name in channels and [e["module"] for e in model.feature_info].count(stage.name) == 1:
            assert stage.channels == channels[stage.name], stage

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=gen)
    targets = torch.tensor([0, NUM_CLASSES - 1])
    train_two_steps(distiller, images, targets)

    distiller.eval()
    with torch.no_grad():
        assert torch.equal(distiller(images).logits, model(images))
    plain = distiller.export()
    assert plain is model
    assert tapped_by(plain) == []
    assert hook_counts(plain) == hooks_before

    check_as_exits(distiller, family, torch.zeros(1, 3, size, size), tmp_path)


def test_most_families_train_with_defaults() -> None:
    total = len(timm_families())
    assert len(REFUSED) <= 0.1 * total, f"{len(REFUSED)} of {total} families refuse the defaults"


TORCHVISION = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_y_400mf",
    "swin_t",
    "convnext_tiny",
]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_with_listed_stages(name: str) -> None:
    """torchvision has no feature_info: the stages come from list_stages' shapes, and the heads
    are as wide as the channel axis the listing found."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=NUM_CLASSES)
    example = torch.zeros(1, 3, SIZE, SIZE)
    listed = {s.name: s for s in list_stages(model, example)}
    names = default_stage_names(model, example)
    assert len(names) >= 2
    distiller = GradualSelfDistiller(model, names, example_input=example)
    for stage, head in zip(distiller.stages, distiller.heads):
        assert stage.layout == listed[stage.name].layout
        assert head_input_width(head) == stage.channels == listed[stage.name].channels
        axis = {"NCHW": 1, "NHWC": 3, "NLC": 2}[stage.layout]
        assert stage.shape[axis] == stage.channels
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    out = distiller.train()(images, torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is not None for p in distiller.heads.parameters())
    distiller.eval()
    with torch.no_grad():
        assert torch.equal(distiller(images).logits, model(images))
    assert tapped_by(distiller.export()) == []
