"""The honest protocol (validation split, seeds, balanced accuracy), the command line as a new
user meets it, what metrics.json records, and the image check before training."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

import examples_path  # noqa: F401
import train_gsdnet
from gradual_sd import DistillerOutput
from gsdnet.datasets.common import UnreadableImagesError, stratified_split
from gsdnet.distributed import DistEnv
from gsdnet.engine import Trainer
from gsdnet.metrics import balanced_accuracy, comparison_table, confusion_matrix
from test_examples_training import TINY, rafdb_basic

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(examples_path.EXAMPLES) / "train_gsdnet.py"


@pytest.mark.parametrize("seed", [0, 3])
def test_stratified_split_holds_out_the_fraction_of_every_class(seed):
    labels = [0] * 50 + [1] * 30 + [2] * 7 + [3] * 1
    keep, held = stratified_split(labels, 0.2, seed)
    assert sorted(keep + held) == list(range(len(labels))) and not set(keep) & set(held)
    counts = np.bincount([labels[i] for i in held], minlength=4).tolist()
    assert counts == [10, 6, 1, 0]  # round(0.2 n), at least one where a class has two or more
    assert stratified_split(labels, 0.2, seed) == (keep, held)
    assert stratified_split(labels, 0.2, seed + 1)[1] != held
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        stratified_split(labels, 1.0, seed)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    targets = rng.choice(5, size=300, p=[0.6, 0.2, 0.1, 0.1, 0.0])  # imbalanced, class 4 absent
    predictions = np.where(rng.random(300) < 0.7, targets, rng.integers(0, 5, 300))
    cm = confusion_matrix(torch.tensor(predictions), torch.tensor(targets), 5)
    expected = balanced_accuracy_score(targets, predictions)
    assert balanced_accuracy(cm) == pytest.approx(expected, rel=1e-12)
    assert balanced_accuracy(cm) != pytest.approx(float(cm.diag().sum() / cm.sum()), abs=1e-3)


def test_comparison_table_gives_mean_and_std_over_seeds():
    def run(acc, bal, heads):
        return {"final": {"epoch": 2, "accuracy": acc, "balanced_accuracy": bal, "per_head_accuracy": heads}}

    runs = {
        "gsd": [run(0.80, 0.70, {"layer1": 0.5, "fc": 0.80}), run(0.84, 0.76, {"layer1": 0.7, "fc": 0.84})],
        "baseline": [run(0.78, 0.71, {"fc": 0.78}), run(0.79, 0.72, {"fc": 0.79})],
    }
    table = comparison_table(runs, "final")
    std = statistics.stdev([80.0, 84.0])
    assert (
        f"| gsd | 2, 2 | 82.00 ± {std:.2f} | 73.00 ± {statistics.stdev([70.0, 76.0]):.2f} | 60.00 ±" in table
    )
    assert "| baseline | 2, 2 | 78.50 ± 0.71 | 71.50 ± 0.71 | - | 78.50 ± 0.71 |" in table


def test_ties_go_to_the_earlier_epoch_unless_as_shipped():
    env = DistEnv(0, 1, torch.device("cpu"))
    clean = Trainer(torch.nn.Linear(2, 2), env, 1e-3, 0.0, 0.9)
    shipped = Trainer(torch.nn.Linear(2, 2), env, 1e-3, 0.0, 0.9, later_ties=True)
    current = {"accuracy": 0.5}
    assert not clean.improves(0.5, current) and shipped.improves(0.5, current)
    assert clean.improves(0.6, current) and not shipped.improves(0.4, current)


class Quadratic(torch.nn.Module):
    """A module with the trainer's call interface: the loss of ``images @ w`` against zero."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, images, targets):
        loss = ((images @ self.w) ** 2).mean()
        return DistillerOutput(images @ self.w, loss, {"ce": loss}, (), ())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_one_cycle_schedule_steps_per_batch_and_resumes(optimizer):
    """onecycle: warm up from lr/25 to lr over the first 30 % of the run's steps, anneal to ~0
    at its last step; stepped per batch (exponential: per epoch). A trainer restored from another's state
    continues the same schedule."""
    env = DistEnv(0, 1, torch.device("cpu"))

    def trainer():
        return Trainer(Quadratic(), env, 0.1, 0.0, 0.9, optimizer, "onecycle", epochs=2, steps_per_epoch=5)

    first = trainer()
    assert first.scheduler.get_last_lr()[0] == pytest.approx(0.1 / 25)
    rates = []
    for _ in range(3):
        first.train_step(torch.randn(4, 2), torch.zeros(4))
        rates.append(first.scheduler.get_last_lr()[0])
    # Torch's one-cycle peaks at step 0.3 * 10 - 1 = 2, then anneals.
    assert rates[0] < rates[1] == pytest.approx(0.1) and rates[2] < 0.1
    second = trainer()
    second.optimizer.load_state_dict(first.optimizer.state_dict())
    second.scheduler.load_state_dict(first.scheduler.state_dict())
    for t in (first, second):
        for _ in range(7):
            t.train_step(torch.randn(4, 2), torch.zeros(4))
    assert first.lr_used == second.lr_used
    assert first.lr_used < 1e-5  # the run's last step
    group = first.optimizer.param_groups[0]
    # Torch's one-cycle also cycles the momentum (Adam: beta1) inversely, 0.95 -> 0.85 -> 0.95.
    momentum = group["momentum"] if optimizer == "sgd" else group["betas"][0]
    assert momentum > 0.94 and (optimizer == "adam" or group["nesterov"])


def test_unknown_optimizer_and_schedule_are_named():
    env = DistEnv(0, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'; choose from \\('adam', 'sgd'\\)"):
        Trainer(Quadratic(), env, 0.1, 0.0, 0.9, "lamb")
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        Trainer(Quadratic(), env, 0.1, 0.0, 0.9, "sgd", "cosine")


def test_val_fraction_and_seeds_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    result = train_gsdnet.main(
        [*rafdb_basic(tmp_path / "data"), *TINY, "--epochs", "3", "--val-fraction", "0.25"]
        + ["--seeds", "0", "1", "--save", "--output-dir", str(out)]  # no models: not checked here
    )
    runs = result["runs"]["gsd-acam"]
    assert [r["seed"] for r in runs] == [0, 1]
    for seed, metrics in zip((0, 1), runs):
        saved = json.loads((out / f"seed{seed}" / "metrics.json").read_text())
        history = [json.loads(line) for line in (out / f"seed{seed}" / "log.jsonl").read_text().splitlines()]
        val = [h["val_accuracy"] for h in history]
        picked = saved["selected"]
        assert picked["epoch"] == 1 + val.index(max(val))  # first of the best: ties go earlier
        assert picked["test"]["accuracy"] == history[picked["epoch"] - 1]["test_accuracy"]
        assert saved["headline"] == "selected" and saved["num_val_samples"] == 7  # 1 of each class
        assert saved["num_train_samples"] == 16 - 7
        assert "balanced_accuracy" in saved["final"] and "per_head_balanced_accuracy" in saved["best"]
        # Typed arguments, versions and the commit.
        assert saved["args"]["epochs"] == 3 and saved["args"]["amp"] is False
        assert saved["args"]["seeds"] == [0, 1] and saved["args"]["val_fraction"] == 0.25
        env = saved["environment"]
        assert {"python", "torch", "timm", "gradual_sd", "git_commit"} <= set(env)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SCRIPT.parent, capture_output=True, text=True)
        assert env["git_commit"] == (head.stdout.strip() or None)
        assert metrics["selected"]["epoch"] == picked["epoch"]
    text = (out / "comparison.md").read_text()
    assert "**Clean protocol**" in text and "optimistic" in text
    accuracies = [100 * r["selected"]["test"]["accuracy"] for r in runs]
    expected = f"{statistics.mean(accuracies):.2f} ± {statistics.stdev(accuracies):.2f}"
    row = next(line for line in text.splitlines() if line.startswith("| gsd-acam |"))
    assert row.split(" | ")[2] == expected
    printed = capsys.readouterr().out
    assert "elapsed 0:" in printed and "ETA " in printed and "(6/6 epochs)" in printed
    assert expected in printed  # the summary is printed, not only written


def test_as_shipped_run_drops_the_partial_batch(tmp_path, monkeypatch):
    batches = []
    original = Trainer.train_step
    monkeypatch.setattr(
        Trainer,
        "train_step",
        lambda self, images, *a: batches.append(len(images)) or original(self, images, *a),
    )
    out = tmp_path / "run"
    metrics = train_gsdnet.main(
        [*rafdb_basic(tmp_path / "data"), *TINY, "--batch-size", "6", "--epochs", "1"]
        + ["--as-shipped", "--output-dir", str(out)]
    )
    assert batches == [6, 6]  # 16 images in batches of 6: the last 4 are dropped
    assert metrics["as_shipped"] and "ties to the later epoch" in metrics["best"]["selected_on"]
    state = torch.load(out / "model_final.pt", weights_only=True)
    assert "fc.weight" in state["state_dict"]


def test_help_shows_defaults_and_presets(capsys):
    with pytest.raises(SystemExit):
        train_gsdnet.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 40; digits: 5; fashion-mnist: 12)" in text and "(default: 0.9)" in text
    assert "--workers WORKERS DataLoader worker processes" in text
    assert "digits" in text and "resnet10t" in text


def test_cli_errors_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_gsdnet.parse_args(["--dataset", "rafdb"])
    assert exit_info.value.code == 2 and "--data-dir is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_gsdnet.parse_args(["--dataset", "rafdb", "--data-dir", "x"])
    err = capsys.readouterr().err
    assert "vgg_msceleb_resnet50_ft_weight.pkl" in err and "--weights none" in err
    args = train_gsdnet.parse_args(["--dataset", "rafdb", "--data-dir", "x", "--weights", "none"])
    assert args.weights is None and args.workers <= (os.cpu_count() or 1)


def test_exported_model_loads_from_any_directory_as_printed(tmp_path, rafdb_run):
    snippet = rafdb_run.printed.split("load an exported model from any directory")[1].split("\n", 1)[1]
    snippet = "\n".join(line.strip() for line in snippet.splitlines()[:3])
    check = snippet + "\nassert not model.training and len(config['classes']) == 7; print('ok')"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_unreadable_images_are_all_reported_before_training(tmp_path):
    data = rafdb_basic(tmp_path / "data")
    aligned = Path(data[3]) / "Image" / "aligned"
    truncate(aligned / "train_00003_aligned.jpg")
    (aligned / "test_0002_aligned.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    command = [sys.executable, str(SCRIPT), *data, *TINY, "--epochs", "1", "--output-dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "2 unreadable images" in done.stderr
    assert "train_00003_aligned.jpg" in done.stderr and "test_0002_aligned.jpg" in done.stderr
    assert not (out / "log.jsonl").exists()  # nothing was trained
    with pytest.raises(UnreadableImagesError):
        train_gsdnet.main([*data, *TINY, "--epochs", "1", "--output-dir", str(out)])
    metrics = train_gsdnet.main(
        [*data, *TINY, "--epochs", "1", "--skip-bad-images", "--save", "--output-dir", str(out)]
    )  # no models: not checked here
    assert metrics["num_train_samples"] == 15 and metrics["num_test_samples"] == 5
    notes = metrics["dataset_notes"]
    assert notes == {"train: unreadable images skipped": 1, "test: unreadable images skipped": 1}


def test_confusion_matrix_colour_bar_reads_percent_like_the_cells(tmp_path, monkeypatch):
    import matplotlib.figure

    from gsdnet.metrics import plot_confusion_matrix

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    plot_confusion_matrix([[3, 1], [0, 4]], ["a", "b"], tmp_path / "cm.png", "title")
    main, bar = figures[0].axes
    assert bar.get_ylabel() == "% of the true class" and bar.get_ylim() == (0.0, 100.0)
    assert [t.get_text() for t in main.texts] == ["75", "25", "100"]  # an empty cell says nothing
    assert "rows normalised" in main.get_ylabel()
    assert {label.get_rotation() for label in main.get_xticklabels()} == {0.0}  # one character: upright


def test_confusion_matrix_marks_rare_confusions_and_slants_long_labels_only(tmp_path, monkeypatch):
    import matplotlib.figure

    from gsdnet.metrics import plot_confusion_matrix

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    plot_confusion_matrix([[299, 1], [0, 5]], ["happiness", "fear"], tmp_path / "cm.png", "title")
    main = figures[0].axes[0]
    assert [t.get_text() for t in main.texts] == ["100", "<1", "100"]  # 1 of 300 is not 0
    assert {label.get_rotation() for label in main.get_xticklabels()} == {45.0}
