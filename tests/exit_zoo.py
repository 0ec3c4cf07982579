"""The checks every zoo model's exits go through, in PyTorch and, exported, in ONNX Runtime;
``test_zoo.py`` and ``test_hf_zoo.py`` run them on the distiller each model trained with.

- Every head disabled: the plain model's logits, bit for bit.
- Every sample forced out at head ``k``: that head's logits, bit for bit.
- A batch whose samples leave at every exit: each sample answered by the exit the rule picks
  (its first head whose confidence reaches the threshold), with that exit's logits.
- Exported (``export_onnx``), the runtime gives the same exits as the PyTorch model and logits
  within float32 rounding (1e-4 relative), at batch 1 and on that batch.

Or the model is refused at construction with a ``ValueError`` naming the stage (the models in
``REFUSED`` and ``HF_REFUSED``). CI exports the models in ``ONNX_CI``, one per kind of stage
output (NCHW, NHWC, tokens with a class token, tuple stages, Hugging Face outputs), as the
export takes tens of seconds per model; ``GRADUAL_SD_ONNX_ZOO=all`` exports every model that
exits.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gradual_sd import EarlyExitModel, GradualSelfDistiller
from gradual_sd._probing import main_logits
from gradual_sd.early_exit._calibration import forced_exit

# Thresholds sit halfway between two neighbouring confidences at least this far apart, so that
# float32 rounding in another runtime cannot move a sample across one.
MIN_GAP = 1e-3


def thresholds_for_every_exit(confidence: list[torch.Tensor]) -> list[float] | None:
    """Thresholds under which about an equal share of the batch leaves at every head and the
    rest reaches the classifier; ``None`` where the confidences are too close to split."""
    heads = len(confidence)
    remaining = torch.arange(confidence[0].numel())
    thresholds = []
    for k in range(heads):
        values = confidence[k][remaining].sort(descending=True).values
        target = max(1, len(values) // (heads + 1 - k))
        gaps = [i for i in range(1, len(values)) if values[i - 1] - values[i] > MIN_GAP]
        if not gaps:
            return None
        cut = min(gaps, key=lambda i: abs(i - target))
        threshold = float(values[cut - 1] + values[cut]) / 2
        thresholds.append(threshold)
        remaining = remaining[confidence[k][remaining] < threshold]
        if remaining.numel() == 0:
            return None
    return thresholds


def spread_confidences(exits: EarlyExitModel, images: torch.Tensor, largest_logit: float = 8.0) -> float:
    """Make each head's classifier answer ``images`` with logits ``f * (z - mean z)``, the mean
    over the batch, largest about ``largest_logit``. Untrained heads on random images give every
    sample nearly the same logits (confidences within 1e-3 on a fresh ResNet), too close to set
    thresholds between; this keeps what differs between samples and spreads them over (0, 1).

    Returns the rounding the spread logits may carry: ``f`` times a float32 pass's rounding of
    ``z`` (1e-6 of its size; 5e-7 measured between batch sizes), since ``f`` magnifies it too.
    Where the samples' logits differ by little (NextViT after two steps), that exceeds the usual
    tolerance."""
    with torch.inference_mode():
        logits = exits.exit_logits(images)[:-1]
    rounding = 0.0
    for head, z in zip(exits.heads, logits):
        classes = z.shape[-1]
        linear = [m for m in head.modules() if isinstance(m, torch.nn.Linear) and m.out_features == classes]
        assert linear, f"no Linear layer with {classes} outputs in {type(head).__name__}"
        classifier = linear[-1]
        assert classifier.bias is not None, f"{type(head).__name__}'s classifier has no bias"
        mean = z.mean(0)
        factor = largest_logit / max(float((z - mean).abs().max()), 1e-12)
        rounding = max(rounding, factor * 1e-6 * float(z.abs().max()))
        with torch.no_grad():  # W h + b  ->  f * (W h + b - mean)
            classifier.bias.sub_(mean).mul_(factor)
            classifier.weight.mul_(factor)
    return rounding


def expected_routing(logits: list[torch.Tensor], thresholds: list[float]) -> tuple[list[int], torch.Tensor]:
    """The rule applied sample by sample: each one's exit and that exit's logits."""
    confidence = [z.float().softmax(-1).amax(-1) for z in logits[:-1]]
    index = []
    for i in range(logits[0].shape[0]):
        passed = [k for k, t in enumerate(thresholds) if confidence[k][i] >= t]
        index.append(passed[0] if passed else len(thresholds))
    return index, torch.stack([logits[k][i] for i, k in enumerate(index)])


def check_exits(exits: EarlyExitModel, images: torch.Tensor, rounding: float = 0.0) -> list[float] | None:
    """The PyTorch checks; returns the thresholds of the mixed batch (``None`` if its
    confidences could not be split), left set on ``exits``. ``rounding``: what the logits may
    differ by between batch sizes beyond the usual tolerance (``spread_confidences``)."""
    heads = len(exits.heads)
    with torch.inference_mode():
        exits.set_thresholds(float("inf"))
        plain = main_logits(exits.model(images))
        out = exits(images)
        assert torch.equal(out.logits, plain)
        assert out.exit_index.tolist() == [heads] * len(images)
        logits = exits.exit_logits(images)
        for k in range(heads):
            forced = forced_exit(exits, images, k)
            assert forced.exit_index.tolist() == [k] * len(images)
            assert torch.equal(forced.logits, logits[k]), f"forced exit {k}"
        thresholds = thresholds_for_every_exit([z.float().softmax(-1).amax(-1) for z in logits[:-1]])
        if thresholds is None:
            return None
        exits.set_thresholds(thresholds)
        out = exits(images)
    index, expected = expected_routing(logits, thresholds)
    assert set(index) == set(range(heads + 1)), index
    assert out.exit_index.tolist() == index
    # The routed samples run in smaller batches, whose kernels may round differently.
    scale = float(expected.abs().max())
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=max(1e-4 * scale, rounding))
    return thresholds


def check_runtime(exits: EarlyExitModel, images: torch.Tensor, directory) -> None:
    """Export, open with the runtime, and compare with the PyTorch exits at the current
    thresholds, on ``images`` and at batch 1."""
    from gradual_sd.runtime import OnnxExitModel

    exits.export_onnx(directory, example_input=images)
    runtime = OnnxExitModel(directory, threads=1)
    assert runtime.thresholds == exits.thresholds
    for batch in (images, images[:1]):
        with torch.inference_mode():
            expected = exits(batch)
        got = runtime(batch.numpy())
        assert got.exit_index.tolist() == expected.exit_index.tolist()
        scale = float(expected.logits.abs().max())
        np.testing.assert_allclose(got.logits, expected.logits.numpy(), rtol=1e-4, atol=1e-4 * scale)


ALL_ONNX = os.environ.get("GRADUAL_SD_ONNX_ZOO") == "all"

# Models whose exits are refused, and what the refusal says.
REFUSED: dict[str, str] = {
    # Serial and parallel blocks that exchange maps at several scales.
    "coat": "samples cannot leave at stage 'serial_blocks1.1'",
    # Two encoders (SAM and CLIP) whose features are combined.
    "deepseek_vit": "samples cannot leave at stage 'encoder.blocks.7'",
    # The classifier reads every stage's output (a multi-stage head).
    "efficientvim": "samples cannot leave at stage 'stages.1'",
    # Fuse layers mix every resolution branch.
    "hrnet": "samples cannot leave at stage 'incre_modules.1'",
    # Each cell reads the outputs of the two cells before it.
    "nasnet": "samples cannot leave at stage 'cell_stem_1.conv_1x1.act'",
    "pnasnet": "samples cannot leave at stage 'cell_stem_1.conv_1x1.act'",
    # Reshapes to the batch size it read from the input.
    "qwen3_vit": "samples cannot leave at stage 'encoder.blocks.2'",
    "twins": "samples cannot leave at stage 'blocks.0.1'",
    # Its pixel embeddings fold the batch and the patches into one axis.
    "tnt": "samples cannot leave at stage 'blocks.2'",
    # The default stage lies inside a block whose shortcut reads the block's input.
    "xception": "samples cannot leave at stage 'block2.rep.0'",
    "xception_aligned": "samples cannot leave at stage 'blocks.1.stack.act3'",
}
PERCEIVER = "samples cannot leave at stage 'perceiver.encoder.self_attends.0'"
# The same for Hugging Face classes.
HF_REFUSED: dict[str, str] = {
    # Reshapes its last hidden state to the batch size of the input ids.
    "ImageGPTForImageClassification": "samples cannot leave at stage 'transformer.h.0'",
    # Expand their latents to the input's batch size before the encoder.
    **{
        f"PerceiverForImageClassification{kind}": PERCEIVER
        for kind in ("ConvProcessing", "Fourier", "Learned")
    },
    # Reshape each stage's output to the batch size read from the input.
    "PvtForImageClassification": "samples cannot leave at stage 'pvt.encoder.block.0.0'",
    "PvtV2ForImageClassification": "samples cannot leave at stage 'pvt_v2.encoder.layers.0.blocks.0'",
}
# Models the exporter refuses (with a ValueError saying why), among those that exit in PyTorch.
ONNX_REFUSED: dict[str, str] = {}
# Exported in CI: one of each kind of stage output.
ONNX_CI = {
    "resnet",  # NCHW
    "vision_transformer",  # tokens with a class token
    "swin_transformer",  # NHWC
    "pit",  # stages that return (tokens, class tokens)
    "ResNetForImageClassification",  # Hugging Face outputs, tuple stages
    "ViTForImageClassification",
    "ConvNextForImageClassification",
}


def batch_like(example: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` random inputs shaped like ``example``: images, or token ids below 16 (every
    tiny config's vocabulary is larger)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (count, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, generator=generator)
    return torch.randint(0, 16, shape, generator=generator, dtype=example.dtype)


def check_as_exits(distiller: GradualSelfDistiller, name: str, example: torch.Tensor, directory) -> None:
    """The distiller's model and heads as early exits (``EarlyExitModel.from_distiller``, which
    removes the distiller's hooks): exit correctly or be refused as ``REFUSED`` or
    ``HF_REFUSED`` says; exported into ``directory`` where asked."""
    distiller.eval()
    probe = batch_like(example, 4, seed=0)
    refused = REFUSED.get(name) or HF_REFUSED.get(name)
    if refused is not None:
        with pytest.raises(ValueError) as refusal:
            EarlyExitModel.from_distiller(distiller, example_input=probe)
        assert refused in str(refusal.value), refusal.value
        return
    exits = EarlyExitModel.from_distiller(distiller, example_input=probe)
    # Room for samples to leave at every exit; fewer for models that only run at a large size
    # (SAM2's Hiera at 1024 px), where every pass is seconds.
    per_exit = 3 if example[0].numel() <= 3 * 256 * 256 else 1
    images = batch_like(example, per_exit * (len(exits.heads) + 1) + 1, seed=1)
    rounding = spread_confidences(exits, images)
    thresholds = check_exits(exits, images, rounding)
    if not (ALL_ONNX or name in ONNX_CI) or not example.is_floating_point():
        return  # the runtime takes float32 images, not token ids (ImageGPT)
    assert thresholds is not None, f"{name}: no batch where samples leave at every exit"
    if name in ONNX_REFUSED:
        with pytest.raises(ValueError) as refusal:
            exits.export_onnx(directory, example_input=images)
        assert ONNX_REFUSED[name] in str(refusal.value), refusal.value
        return
    check_runtime(exits, images, directory)
