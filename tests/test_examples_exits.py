"""The example's early-exit report: written next to the confusion matrix for the distillation
methods, and the saved exit model rebuilt from the exported files alone."""

import json

import pytest
import torch

import examples_path  # noqa: F401
import train_gsdnet
from gradual_sd import EarlyExitModel
from gsdnet.datasets import build_datasets
from gsdnet.models import load_exported
from gsdnet.transforms import eval_transform

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "16", "--workers", "0"]


def test_report_and_reload(tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "digits", "--train-limit", "48", "--epochs", "1", "--method", "gsd-acam"]
    argv += ["--seeds", "0", "--save", "final"]
    metrics = train_gsdnet.main([*argv, *TINY, "--device", "cpu", "--output-dir", str(out)])
    for name in ("early_exit.md", "early_exit.png", "confusion_matrix.png"):
        assert (out / name).is_file()
    report = metrics["early_exit"]
    # Thresholds chosen on the validation split carved from the training set, reported on all
    # 364 test images.
    assert report["how"] == "thresholds chosen on the validation split, reported on the test split"
    assert report["report"]["samples"] == 364
    assert len(report["tradeoff"]) == 21
    assert json.loads((out / "metrics.json").read_text())["early_exit"]["how"] == report["how"]

    # Rebuilt without the training code: the exported plain model and the saved exits.
    model, _ = load_exported(out / "model_final.pt")
    exits = EarlyExitModel.load(out / "early_exit", model)
    assert list(exits.thresholds) == [
        t if t is not None else float("inf") for t in report["calibration"]["thresholds"]
    ]
    test = build_datasets("digits", None, 7, False).test
    test.transform = eval_transform(32)
    images = torch.stack([test[i][0] for i in range(len(test))])
    targets = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        answered = exits(images)
    shares = [(answered.exit_index == k).double().mean().item() for k in range(len(exits.heads) + 1)]
    assert shares == pytest.approx([row["share"] for row in report["report"]["exits"]])
    accuracy = (answered.logits.argmax(-1) == targets).double().mean().item()
    assert accuracy == pytest.approx(report["report"]["accuracy"])
