"""The Hugging Face Trainer example: a few CPU steps on the shipped digits log every loss term,
evaluate every head, and save the plain Hugging Face model, which loads back equal.

CI installs the ``hf`` extra, so the import skip below only applies to a checkout installed
without it.
"""

import math

import pytest
import torch

import examples_path  # noqa: F401

pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

import hf_trainer_gsd  # noqa: E402
from hf_zoo import assert_reloaded_equal  # noqa: E402
from transformers import AutoModelForImageClassification  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--cpu", "--train-limit", "32", "--eval-limit", "32", "--batch-size", "16", "--max-steps", "2"]


@pytest.mark.parametrize("model_type", ["vit", "resnet"])
def test_trainer_logs_every_term_and_saves_the_plain_model(model_type, tmp_path):
    result = hf_trainer_gsd.main(
        [*TINY, "--model-type", model_type, "--logging-steps", "1", "--output-dir", str(tmp_path)]
    )
    steps = [log for log in result["history"] if "loss" in log]
    assert len(steps) == 2
    kl = sorted(k for k in steps[0] if k.startswith("kl/"))
    assert len(kl) == 3 and {k.replace("kl/", "feature/") for k in kl} <= set(steps[0])
    for log in steps:
        assert all(math.isfinite(log[k]) for k in ["ce", *kl])

    evaluation = result["evaluation"]
    accuracies = [k for k in evaluation if k.startswith("eval_acc/")]
    assert len(accuracies) == 4  # three heads and the model's own classifier
    assert all(0 <= evaluation[k] <= 1 for k in accuracies)

    model = result["model"].eval()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    reloaded = AutoModelForImageClassification.from_pretrained(result["path"]).eval()
    assert_reloaded_equal(model, reloaded, torch.randn(2, 3, 32, 32))
