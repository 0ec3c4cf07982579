"""Every Hugging Face ``*ForImageClassification`` class through the distiller with defaults.

The classes come from ``transformers``' auto-mapping (``hf_zoo.image_classifiers``), each built
from a tiny random config (no hub access). Each must either train (two steps, every head
parameter gets a gradient, eval logits equal the plain model's, ``export()`` returns the model,
``save_pretrained``/``from_pretrained`` round-trips it) with stages that are stage outputs, or,
for the classes in ``REFUSED``, refuse with an error that says what to do. The model that
trained then goes through the early-exit checks (``exit_zoo.check_as_exits``, exported to ONNX
for the classes in ``exit_zoo.ONNX_CI``): one build per class for both.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradual_sd import GradualSelfDistiller
from gradual_sd._stages import default_example_input, main_logits
from gradual_sd._taps import tapped_by

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

from exit_zoo import check_as_exits  # noqa: E402
from hf_zoo import NUM_LABELS, TINY_CONFIGS, assert_reloaded_equal, build, image_classifiers  # noqa: E402
from zoo import train_two_steps  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# Classes the distiller refuses with defaults, and what the error tells the user. A class here
# that starts training fails the test, so the list stays true.
REFUSED = {
    # A text-and-image model: its forward takes token ids and images.
    "ShieldGemma2ForImageClassification": "takes input_ids (token ids) and pixel_values (images): wrap it",
    # Takes patchified pixels with an attention mask and the patch grid's shape.
    "Siglip2ForImageClassification": "wrap it so it takes images and returns logits",
}
# Classes that need a package transformers does not install.
NEEDS = {"DinatForImageClassification": "natten", "NatForImageClassification": "natten"}

CASES = image_classifiers()


def test_every_architecture_has_a_tiny_config():
    missing = sorted({model_type for model_type, _ in CASES} - set(TINY_CONFIGS))
    assert not missing, f"add tiny configs to tests/hf_zoo.py for {missing}"


def test_most_classes_train_with_defaults():
    runnable = [c for _, c in CASES if c not in NEEDS]
    refused = [c for c in runnable if c in REFUSED]
    assert len(refused) <= 0.15 * len(runnable), f"{len(refused)} of {len(runnable)} refuse the defaults"


def hooks(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def check_stages(distiller: GradualSelfDistiller) -> None:
    """Stage outputs only: batch-first, more than one position, shallow to deep, never inside
    an attention module, at most three heads. A latent array (Perceiver) has no reduction."""
    model = distiller.model
    assert 1 <= len(distiller.stages) <= 3
    modules = dict(model.named_modules())
    reductions = []
    for stage, head in zip(distiller.stages, distiller.heads):
        assert stage.shape[0] == 1, stage  # the example's batch
        axes = {"NCHW": (2, 3), "NHWC": (1, 2), "NLC": (1,), "NCL": (2,)}[stage.layout]
        positions = 1
        for axis in axes:
            positions *= stage.shape[axis]
        assert positions - stage.num_prefix_tokens > 1, f"{stage.name} is pooled: {stage}"
        parts = stage.name.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        inside = [a for a in ancestors if "attention" in type(modules[a]).__name__.lower()]
        assert not inside, f"{stage.name} is inside attention module {inside}"
        assert head.conv.in_channels == stage.channels
        if stage.reduction is not None:
            reductions.append(stage.reduction)
    assert reductions == sorted(reductions), reductions


@pytest.mark.parametrize("model_type,class_name", CASES, ids=[c for _, c in CASES])
def test_class(model_type: str, class_name: str, tmp_path) -> None:
    if class_name in NEEDS:
        pytest.importorskip(NEEDS[class_name])
    model = build(model_type, class_name)
    # A config left at its defaults can be a full-size model (ShieldGemma2's took 14 GB of RAM).
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters <= 20_000_000, f"{class_name}: {parameters:,} parameters; shrink its tiny config"
    before = hooks(model)
    if class_name in REFUSED:
        with pytest.raises((ValueError, TypeError)) as refusal:
            GradualSelfDistiller(model)
        assert REFUSED[class_name] in str(refusal.value), refusal.value
        assert hooks(model) == before, "a refused wrap left hooks behind"
        return

    distiller = GradualSelfDistiller(model)
    check_stages(distiller)
    example = default_example_input(model)
    gen = torch.Generator().manual_seed(0)
    if example.is_floating_point():
        images = torch.randn(2, *example.shape[1:], generator=gen)
    else:  # token ids (ImageGPT's colour clusters)
        images = torch.randint(0, 16, (2, *example.shape[1:]), generator=gen)
    targets = torch.tensor([0, NUM_LABELS - 1])
    train_two_steps(distiller, images, targets)

    distiller.eval()
    with torch.no_grad():
        expected = main_logits(model(images))
        assert torch.equal(distiller(images).logits, expected)
    plain = distiller.export()
    assert plain is model and tapped_by(plain) == [] and hooks(plain) == before

    plain.save_pretrained(tmp_path / "saved")
    # num_labels again: transformers 4.x's PvtConfig saves its default of 1000 instead
    reloaded = type(plain).from_pretrained(tmp_path / "saved", num_labels=NUM_LABELS).eval()
    assert_reloaded_equal(plain, reloaded, images)

    check_as_exits(distiller, class_name, example, tmp_path / "onnx")
