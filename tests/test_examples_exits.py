"""The example's early-exit report: written next to the confusion matrix for the distillation
methods, and the saved exit model rebuilt from the exported files alone."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import examples_path  # noqa: F401
import deploy_exits
import gsdnet.exits
import gsdnet.report
import train_gsdnet
from gradual_sd import EarlyExitModel
from gsdnet.datasets import build_datasets
from gsdnet.engine import Trainer
from gsdnet.models import load_exported
from gsdnet.transforms import eval_transform

from example_runs import train
from gradual_sd.runtime import OnnxExitModel

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "16", "--workers", "0"]
DIGITS = ["--dataset", "digits", "--train-limit", "48", "--epochs", "2", "--method", "gsd-acam"]
DIGITS += ["--seeds", "0", "--save", "final", "selected", "--keep-checkpoint", *TINY, "--device", "cpu"]


def first_epoch_only(self, accuracy, current) -> bool:
    """Trainer.improves where validation keeps epoch 1: no later epoch counts as better."""
    return current is None


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Two epochs of gsd-acam on the stand-in with the final and the selected models saved,
    where validation keeps epoch 1, so the epoch reported differs from the final one; and the
    confusion matrices plotted, with their titles. Trained once for the module's tests."""
    plotted = []
    original = gsdnet.report.plot_confusion_matrix
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "improves", first_epoch_only)
        patch.setattr(
            gsdnet.report,
            "plot_confusion_matrix",
            lambda cm, *a: plotted.append((cm, a[-1])) or original(cm, *a),
        )
        run = train(DIGITS, tmp_path_factory.mktemp("digits") / "run")
    return run, plotted


def test_report_and_reload(digits_run, tmp_path):
    run, _ = digits_run
    out, metrics = run.out, run.metrics
    for name in ("early_exit.md", "early_exit.png", "confusion_matrix.png"):
        assert (out / name).is_file()
    report = metrics["early_exit"]
    # Thresholds chosen on the validation split carved from the training set, reported on all
    # 364 test images.
    assert report["how"] == "thresholds chosen on the validation split, reported on the test split"
    assert report["report"]["samples"] == 364
    assert len(report["tradeoff"]) == 21
    assert json.loads((out / "metrics.json").read_text())["early_exit"]["how"] == report["how"]

    # Rebuilt without the training code: the exported plain model and the saved exits (whose
    # weights, the reported epoch's, EarlyExitModel.load puts into it).
    model, _ = load_exported(out / "model_final.pt")
    exits = EarlyExitModel.load(out / "early_exit_selected", model)
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

    # The same exits for ONNX Runtime: same answers, and deploy_exits.py on image files.
    onnx = out / "early_exit_selected_onnx"
    runtime = OnnxExitModel(onnx, threads=1)
    assert runtime.class_names == [str(d) for d in range(10)]
    assert runtime.thresholds == exits.thresholds
    deployed = runtime(images.numpy())
    assert deployed.exit_index.tolist() == answered.exit_index.tolist()
    np.testing.assert_allclose(deployed.logits, answered.logits.numpy(), rtol=1e-4, atol=1e-4)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        test.load(i).save(folder / f"digit{i}.png")
    printed = subprocess.run(
        [sys.executable, str(EXAMPLES / "deploy_exits.py"), str(onnx), str(folder)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line.split("|")[1:-1] for line in printed.splitlines() if line.startswith(f"| {folder}")]
    exit_names = [*exits.stage_names, "fc (full model)"]
    assert [(c.strip(), e.strip()) for _, c, e, _, _ in rows] == [
        (str(int(answered.logits[i].argmax())), exit_names[int(answered.exit_index[i])]) for i in range(3)
    ]
    # A user's mistake: one line and status 2, no traceback.
    assert deploy_exits.main([str(onnx), str(folder), "--thresholds", "95"]) == 2


def test_every_report_describes_the_epoch_the_headline_reports(digits_run):
    run, plotted = digits_run
    out, metrics = run.out, run.metrics
    selected, report = metrics["selected"], metrics["early_exit"]
    assert (selected["epoch"], metrics["final"]["epoch"], report["epoch"]) == (1, 2, 1)
    # The confusion matrix, early_exit.md and its plot name the epoch and show its results.
    assert plotted == [
        (selected["test"]["confusion_matrix"], "gsd-acam, digits, epoch 1 (picked on validation)")
    ]
    assert (
        "# Early exits: gsd-acam, digits, epoch 1 (picked on validation)"
        in (out / "early_exit.md").read_text()
    )
    assert report["report"]["full_accuracy"] == pytest.approx(selected["test"]["accuracy"])
    # The saved exit model holds the selected epoch's weights, not the final one's, and its
    # folders say so: a reader cannot take them for model_final.pt's exits. The log says which
    # epoch each file holds, and the command that answers images with the exits.
    assert holds_exported_weights(out, "selected") and not holds_exported_weights(out, "final")
    assert not (out / "early_exit").exists() and not (out / "early_exit_onnx").exists()
    onnx = out / "early_exit_selected_onnx"
    assert json.loads((onnx / "manifest.json").read_text())["metadata"]["model"] == plotted[0][1]
    log = " ".join((out / "train.log").read_text().split())
    assert "model_final.pt (epoch 2, the last)" in log
    assert "model_selected.pt (epoch 1, picked on validation)" in log
    assert "early_exit_selected/ and early_exit_selected_onnx/ (the exits of epoch 1, picked on" in log
    assert f"python {EXAMPLES}/deploy_exits.py {onnx.resolve()} IMAGES..." in log
    # The table's FLOPs count the head, as the plot's curve does (threshold 0: all leave there).
    assert report["report"]["exits"][0]["flops_ratio"] == pytest.approx(report["tradeoff"][0]["flops_ratio"])


@pytest.mark.slow  # a third epoch and every export again: 19 s, over the quick tier's 10 s budget
def test_a_resumed_run_reports_the_epoch_validation_picked(digits_run, tmp_path, monkeypatch):
    """A resumed run gets the selected epoch and its weights from its checkpoint."""
    run = digits_run[0].copy(tmp_path)
    monkeypatch.setattr(Trainer, "improves", first_epoch_only)
    resumed = train_gsdnet.main([*run.argv, "--epochs", "3", "--resume"])
    assert (resumed["final"]["epoch"], resumed["early_exit"]["epoch"]) == (3, 1)
    assert holds_exported_weights(run.out, "selected")


def holds_exported_weights(out, kind: str) -> bool:
    """Whether the saved exit model's weights are those of ``model_<kind>.pt``."""
    exit_weights = torch.load(out / "early_exit_selected" / "model.pt", weights_only=True)
    exported = torch.load(out / f"model_{kind}.pt", weights_only=True)["state_dict"]
    return all(torch.equal(exit_weights[k], v) for k, v in exported.items())


def test_the_tradeoff_plot_says_why_the_star_is_off_the_curve_and_past_one(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    drawn = {}
    original = Figure.savefig

    def keep_text(fig, *args, **kwargs):
        drawn["legend"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        drawn["caption"] = " ".join(t.get_text() for t in fig.texts)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_text)
    curve = [{"threshold": t / 2, "accuracy": 0.5 + t / 5, "flops_ratio": 0.6 + 0.5 * t} for t in range(3)]
    table = {"full_accuracy": 0.9, "accuracy": 0.88, "flops_ratio": 0.7}
    gsdnet.exits.plot_tradeoff(curve, table, tmp_path / "early_exit.png", "a title")
    assert (tmp_path / "early_exit.png").stat().st_size > 0
    assert drawn["legend"] == [
        "one threshold shared by every head (0 to 1)",
        "full model, no heads",
        "calibrated: one threshold per head",
    ]
    caption = " ".join(drawn["caption"].split())
    assert "right of 1.0x: the heads' own cost" in caption and "need not lie on the curve" in caption


def test_deploy_exits_answers_a_file_that_is_no_image_in_one_line(tmp_path, capsys):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    assert deploy_exits.main([str(tmp_path / "early_exit_onnx"), str(notes)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {notes} is not an image Pillow can read")


def test_deploy_exits_given_the_pytorch_folder_names_the_onnx_one_beside_it(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "early_exit").mkdir()
    (tmp_path / "early_exit" / "early_exit.json").write_text("{}")
    assert deploy_exits.main([str(tmp_path / "early_exit"), str(image)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and "EarlyExitModel.save" in err and "early_exit_onnx" not in err
    (tmp_path / "early_exit_onnx").mkdir()
    (tmp_path / "early_exit_onnx" / "manifest.json").write_text("{}")
    assert deploy_exits.main([str(tmp_path / "early_exit"), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith(f"pass {tmp_path / 'early_exit_onnx'}")
