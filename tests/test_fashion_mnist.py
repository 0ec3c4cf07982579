"""Fashion-MNIST in the training example: the IDX reader's checks on files the tests write, the
command's one-line refusals, the real files where the Debian package is installed, and the
study script end to end on a tiny folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import examples_path  # noqa: F401
from fashion_idx import IMAGES_MAGIC, LABELS_MAGIC, write_fashion_mnist, write_idx
from gsdnet.datasets import build_datasets, fashion_mnist
from gsdnet.datasets.fashion_mnist import IdxFileError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("gz", [True, False])
def test_reads_the_four_files_gzipped_or_not(tmp_path, gz):
    write_fashion_mnist(tmp_path, train=30, test=10, gz=gz)
    splits = build_datasets("fashion-mnist", tmp_path)
    assert (len(splits.train), len(splits.test)) == (30, 10)
    assert splits.classes[0] == "T-shirt/top" and splits.classes[9] == "Ankle boot"
    assert splits.train.labels[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert splits.pixels.channels == 1 and splits.hflip
    image = splits.train.load(3)
    assert image.mode == "L" and image.size == (28, 28)
    # Label 3's images are 75 + noise in [0, 30): the pixels come through unchanged.
    assert 75 <= np.asarray(image).min() and np.asarray(image).max() < 105


def test_idx_payload_round_trips(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, IMAGES_MAGIC)
    np.testing.assert_array_equal(fashion_mnist.read_idx(path, IMAGES_MAGIC), array)


def test_missing_folder_names_the_file_and_the_package(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_datasets("fashion-mnist", tmp_path / "nowhere")
    message = str(error.value)
    assert "train-images-idx3-ubyte.gz" in message and "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message


def test_missing_labels_file_is_named(tmp_path):
    write_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        build_datasets("fashion-mnist", tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file_is_named(tmp_path, gz):
    write_fashion_mnist(tmp_path, gz=gz)
    path = tmp_path / f"train-images-idx3-ubyte{'.gz' if gz else ''}"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(IdxFileError, match="truncated") as error:
        build_datasets("fashion-mnist", tmp_path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_damaged_gzip_is_named(tmp_path):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[20:40] = b"\xff" * 20
    path.write_bytes(bytes(data))
    with pytest.raises(IdxFileError, match="damaged or truncated") as error:
        build_datasets("fashion-mnist", tmp_path)
    assert str(path) in str(error.value)


def test_wrong_magic_number(tmp_path):
    write_fashion_mnist(tmp_path)
    # Labels written where the images belong: one dimension, not three.
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(60, dtype=np.uint8), LABELS_MAGIC)
    with pytest.raises(IdxFileError, match="magic number 0x00000801, expected 0x00000803"):
        build_datasets("fashion-mnist", tmp_path)


def test_longer_than_the_header_says(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(LABELS_MAGIC.to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(4))
    with pytest.raises(IdxFileError, match="longer than its header says"):
        fashion_mnist.read_idx(path, LABELS_MAGIC)


def test_image_and_label_counts_must_agree(tmp_path):
    write_fashion_mnist(tmp_path, train=30)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(29) % 10, LABELS_MAGIC)
    with pytest.raises(IdxFileError, match="30 images but .* 29 labels"):
        build_datasets("fashion-mnist", tmp_path)


def test_images_must_be_28_pixels(tmp_path):
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((20, 32, 32)), IMAGES_MAGIC)
    with pytest.raises(IdxFileError, match="32x32 images; Fashion-MNIST's are 28x28"):
        build_datasets("fashion-mnist", tmp_path)


def test_labels_out_of_range(tmp_path):
    write_fashion_mnist(tmp_path)
    labels = np.arange(20) % 10
    labels[7] = 10
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, LABELS_MAGIC)
    with pytest.raises(IdxFileError, match="label 10 at index 7 is outside 0..9"):
        build_datasets("fashion-mnist", tmp_path)


def run_example(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_gsdnet.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_command_refuses_a_folder_without_files_in_one_line(tmp_path):
    result = run_example(
        "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path)
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "train-images-idx3-ubyte" in lines[0] and "apt-get install dataset-fashion-mnist" in lines[0]


def test_preset_is_the_studied_recipe():
    from gsdnet.cli import parse_args

    config = parse_args(["--dataset", "fashion-mnist"])
    assert config.data_dir is None and config.weights is None  # the Debian folder; from scratch
    assert (config.model, config.img_size, config.epochs, config.batch_size) == (
        "small_resnet18",
        28,
        12,
        128,
    )
    assert (config.optimizer, config.schedule, config.augment, config.lr) == (
        "sgd",
        "onecycle",
        "crop-flip",
        0.1,
    )
    assert config.stages == ("layer1", "layer2", "layer3") and config.val_fraction == 0.1
    assert config.identity()["epochs"] == 12  # a one-cycle schedule spans the run: --resume keeps it


def test_small_resnet_keeps_resolution_for_28_pixels():
    import timm
    import torch

    from gradual_sd import list_stages

    model = timm.create_model("small_resnet18", num_classes=10, in_chans=1)
    shapes = {
        s.name: s.shape for s in list_stages(model, torch.zeros(1, 1, 28, 28)) if s.name.startswith("layer")
    }
    assert [shapes[f"layer{i}"][-1] for i in (1, 2, 3, 4)] == [14, 7, 4, 2]
    assert [info["reduction"] for info in model.feature_info] == [2, 2, 4, 8, 16]


@pytest.mark.skipif(
    not (fashion_mnist.DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"the Debian package dataset-fashion-mnist is not installed ({fashion_mnist.DEFAULT_DIR})",
)
def test_the_installed_files():
    splits = build_datasets("fashion-mnist")
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    for split, per_class in ((splits.train, 6000), (splits.test, 1000)):
        assert np.bincount(split.labels).tolist() == [per_class] * 10
    pixels = np.stack(splits.train.sources[:1000]) / 255.0
    assert abs(pixels.mean() - fashion_mnist.PIXELS.mean[0]) < 0.02


@pytest.mark.slow
def test_study_end_to_end_on_a_tiny_folder(tmp_path):
    """The study's three steps on 100 training and 40 test images, one epoch: every run
    finishes, the exits are calibrated, exported and timed, and the results file holds them."""
    data = write_fashion_mnist(tmp_path / "data", train=100, test=40)
    runs, results, plot = tmp_path / "runs", tmp_path / "results.json", tmp_path / "plot.png"
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n<!-- fashion-mnist:begin -->\nold\n<!-- fashion-mnist:end -->\n\nafter\n")
    script = [sys.executable, str(ROOT / "benchmarks" / "fashion_mnist.py")]
    small = ["--example-args", "--epochs", "1", "--batch-size", "25", "--data-dir", str(data)]
    train = [*script, "train", "--runs", str(runs), "--only", "baseline", "gsd-ce", "small_resnet10"]
    train += ["--regimes", "full", "--seeds", "0", *small]
    for argv in (
        train,
        [*script, "exits", "--runs", str(runs), "--repeats", "2", *small],
        [*script, "report", "--runs", str(runs), "--results", str(results), "--plot", str(plot)]
        + ["--docs", str(page)],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = json.loads(results.read_text())
    assert {(r["method"], r["seed"], r["regime"]) for r in written["runs"]} == {
        ("baseline", 0, "full"),
        ("gsd-ce", 0, "full"),
        ("small_resnet10", 0, "full"),
    }
    for run in written["runs"]:
        assert 0 <= run["test_accuracy"] <= 1 and run["epochs"] == 1 and run["seconds"] > 0
    assert set(written["runs"][1]["head_accuracy"]) == {"layer1", "layer2", "layer3", "fc"}
    # A budget below the first exit's cost (about 0.3 of the FLOPs here) is refused and recorded.
    settings = {r["setting"] for r in written["exits"]} | {r["setting"] for r in written["refused_settings"]}
    assert {"drop 0.5 pt", "drop 1 pt", "cost 0.3", "cost 0.5", "cost 0.7"} <= settings
    assert all("below the cheapest answer" in r["reason"] for r in written["refused_settings"])
    for row in written["exits"]:
        assert abs(sum(row["exit_shares"]) - 1) < 1e-9 and row["latency_ratio"] > 0
        assert row["batch"] in (1, 32)
    disabled = [r for r in written["exits"] if r["setting"] == "exits, all disabled"]
    assert all(
        r["exit_shares"][-1] == 1 and r["test_accuracy"] == r["whole_model_accuracy"] for r in disabled
    )
    assert {r["model"] for r in written["static"]} == {"baseline/seed0", "small_resnet10/seed0"}
    assert plot.stat().st_size > 0
    text = page.read_text()
    assert "old" not in text and text.endswith("<!-- fashion-mnist:end -->\n\nafter\n")
    assert "| gsd-ce | 1 |" in text and "| static model | test accuracy % |" in text


def study_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fashion_study", ROOT / "benchmarks" / "fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_paired_difference_and_t_test_against_the_formula():
    """The paired comparison: mean and spread of the per-seed differences, and the two-sided
    p-value of t = mean / (sd / sqrt(n)) with n - 1 degrees of freedom; one seed gives the
    difference alone, without a spread or a test."""
    from scipy.stats import t as student

    paired = study_module().paired
    ours, theirs = [0.930, 0.925, 0.934, 0.921], [0.926, 0.924, 0.927, 0.922]

    def run(method, seed, accuracy):
        return {
            "method": method,
            "seed": seed,
            "regime": "full",
            "test_accuracy": accuracy,
            "seconds_per_epoch": 2.0 if method == "gsd" else 1.0,
        }

    runs = [run("gsd", s, a) for s, a in enumerate(ours)] + [
        run("baseline", s, a) for s, a in enumerate(theirs)
    ]
    runs.append(run("baseline", 9, 0.5))  # a seed the other arm lacks is not paired
    result = paired(runs, "full", "gsd")
    d = np.array(ours) - np.array(theirs)
    statistic = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    assert result["seeds"] == [0, 1, 2, 3]
    assert result["mean"] == pytest.approx(d.mean()) and result["sd"] == pytest.approx(d.std(ddof=1))
    assert result["p_value"] == pytest.approx(2 * student.sf(abs(statistic), len(d) - 1))
    assert result["epoch_time_ratio"] == 2.0
    one = paired(runs[:1] + runs[4:5], "full", "gsd")
    assert one["mean"] == pytest.approx(0.004) and one["sd"] is None and one["p_value"] is None
    assert paired(runs, "10pct", "gsd") is None
