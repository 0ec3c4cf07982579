"""The checks every zoo model's exits go through, in PyTorch and, exported, in ONNX Runtime.

- Every head disabled: the plain model's logits, bit for bit.
- Every sample forced out at head ``k``: that head's logits, bit for bit.
- A batch whose samples leave at every exit: each sample answered by the exit the rule picks
  (its first head whose confidence reaches the threshold), with that exit's logits.
- Exported (``export_onnx``), the runtime gives the same exits as the PyTorch model and logits
  within float32 rounding (1e-4 relative), at batch 1 and on that batch.
"""

from __future__ import annotations

import numpy as np
import torch

from gradual_sd import EarlyExitModel
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


def spread_confidences(exits: EarlyExitModel, images: torch.Tensor, largest_logit: float = 8.0) -> None:
    """Make each head's classifier answer ``images`` with logits ``f * (z - mean z)``, the mean
    over the batch, largest about ``largest_logit``. Untrained heads on random images give every
    sample nearly the same logits (confidences within 1e-3 on a fresh ResNet), too close to set
    thresholds between; this keeps what differs between samples and spreads them over (0, 1)."""
    with torch.inference_mode():
        logits = exits.exit_logits(images)[:-1]
    for head, z in zip(exits.heads, logits):
        classes = z.shape[-1]
        linear = [m for m in head.modules() if isinstance(m, torch.nn.Linear) and m.out_features == classes]
        assert linear, f"no Linear layer with {classes} outputs in {type(head).__name__}"
        classifier = linear[-1]
        assert classifier.bias is not None, f"{type(head).__name__}'s classifier has no bias"
        mean = z.mean(0)
        factor = largest_logit / max(float((z - mean).abs().max()), 1e-12)
        with torch.no_grad():  # W h + b  ->  f * (W h + b - mean)
            classifier.bias.sub_(mean).mul_(factor)
            classifier.weight.mul_(factor)


def expected_routing(logits: list[torch.Tensor], thresholds: list[float]) -> tuple[list[int], torch.Tensor]:
    """The rule applied sample by sample: each one's exit and that exit's logits."""
    confidence = [z.float().softmax(-1).amax(-1) for z in logits[:-1]]
    index = []
    for i in range(logits[0].shape[0]):
        passed = [k for k, t in enumerate(thresholds) if confidence[k][i] >= t]
        index.append(passed[0] if passed else len(thresholds))
    return index, torch.stack([logits[k][i] for i, k in enumerate(index)])


def check_exits(exits: EarlyExitModel, images: torch.Tensor) -> list[float] | None:
    """The PyTorch checks; returns the thresholds of the mixed batch (``None`` if its
    confidences could not be split), left set on ``exits``."""
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
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4 * scale)
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
