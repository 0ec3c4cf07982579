"""The training script end to end on tiny noise-image fixtures: one epoch per layout, resume,
the non-finite stop, the method comparison, the ablation table and a 2-process gloo run; the loss
flags and the training loader's last batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import examples_path  # noqa: F401
import ablation
import gsdnet.build
import train_gsdnet
from gsdnet.datasets import build_datasets
from gsdnet.distributed import DistEnv
from gsdnet.engine import NonFiniteLossError, Trainer, train_loader
from gsdnet.metrics import accuracy, confusion_matrix
from gsdnet.models import PAPER_LOSS, build_gsdnet, load_exported
from gsdnet.transforms import eval_transform
from example_runs import train
from test_examples_datasets import noise_image, write_affectnet, write_ferplus, write_rafdb

TINY = [
    "--model",
    "test_resnet",
    "--img-size",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--device",
    "cpu",
    "--weights",
    "none",
]
STAGES = ["layer1", "layer2", "layer3", "fc"]

pytestmark = pytest.mark.usefixtures("one_thread")


def rafdb_basic(root: Path) -> list[str]:
    labels = {f"train_{i:05d}.jpg": i % 7 + 1 for i in range(1, 17)}
    labels.update({f"test_{i:04d}.jpg": i % 7 + 1 for i in range(1, 7)})
    write_rafdb(root, labels)
    return ["--dataset", "rafdb", "--data-dir", str(root)]


def rafdb_folders(root: Path) -> list[str]:
    for i in range(14):
        noise_image(root / "train" / str(i % 7 + 1) / f"{i}.jpg", seed=i)
    for i in range(4):
        noise_image(root / "test" / str(i + 1) / f"{i}.jpg", seed=100 + i)
    return ["--dataset", "rafdb", "--data-dir", str(root)]


def ferplus_csvs(root: Path) -> list[str]:
    def votes(label):
        return [10 if j == label else 0 for j in range(10)]

    rows = [("Training", votes(i % 8)) for i in range(16)]
    rows += [("PublicTest", votes(i)) for i in range(3)] + [("PrivateTest", votes(i)) for i in range(5)]
    write_ferplus(root, rows)
    return ["--dataset", "ferplus", "--data-dir", str(root)]


def affectnet_csvs(root: Path) -> list[str]:
    write_affectnet(root, {"train": [i % 11 for i in range(22)], "test": [0, 1, 2, 3, 9]})
    return ["--dataset", "affectnet", "--data-dir", str(root), "--balanced"]


def image_folder(root: Path) -> list[str]:
    for split, count in (("train", 12), ("test", 4)):
        for i in range(count):
            noise_image(root / split / ("ab"[i % 2]) / f"{i}.png", seed=i)
    return ["--dataset", "imagefolder", "--data-dir", str(root)]


def digits(root: Path) -> list[str]:
    return ["--dataset", "digits", "--train-limit", "48", "--seeds", "0"]


LAYOUTS = {
    "rafdb-basic": (rafdb_basic, 6),
    "rafdb-folders": (rafdb_folders, 4),
    "ferplus": (ferplus_csvs, 5),
    "affectnet": (affectnet_csvs, 4),
    "imagefolder": (image_folder, 4),
    "digits": (digits, 364),
}


# The quick tier trains two layouts end to end: RAF-DB's (the session's shared run) and the
# stand-in's. The other layouts' parsing is checked in test_examples_datasets.py.
QUICK_LAYOUTS = ("rafdb-basic", "digits")


@pytest.mark.parametrize(
    "layout",
    [pytest.param(name, marks=() if name in QUICK_LAYOUTS else pytest.mark.slow) for name in sorted(LAYOUTS)],
)
def test_one_epoch_per_layout(tmp_path, layout, request):
    make, num_test = LAYOUTS[layout]
    if layout == "rafdb-basic":  # this very command, trained once per session
        run = request.getfixturevalue("rafdb_run")
    else:
        run = train([*make(tmp_path / "data"), *TINY, "--epochs", "1"], tmp_path / "run")
    out, metrics = run.out, run.metrics
    # The stand-in saves no models by default; FERPlus has a validation split to select on.
    models = {"digits": [], "ferplus": ["model_final.pt", "model_selected.pt", "model_best.pt"]}
    expected = models.get(layout, ["model_final.pt", "model_best.pt"])
    # Early exits on the trained heads of gsd-acam, the default method.
    assert metrics["early_exit"] is not None
    expected += ["early_exit.md", "early_exit.png"]
    if "model_final.pt" in expected:  # the exit model is saved with the final model, named by its epoch
        epoch = "selected" if metrics["selected"] else "final"
        expected += [f"early_exit_{epoch}", f"early_exit_{epoch}_onnx"]
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(["metrics.json", "log.jsonl", "confusion_matrix.png", "train.log", *expected])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_test_samples"] == num_test == metrics["num_test_samples"]
    assert saved["classes"] == metrics["classes"]
    for which in ("final", "best"):
        result = saved[which]
        assert result["epoch"] == 1
        assert list(result["per_head_accuracy"]) == STAGES
        assert result["per_head_accuracy"]["fc"] == result["accuracy"]
        assert list(result["per_class_accuracy"]) == saved["classes"]
        assert sum(map(sum, result["confusion_matrix"])) == num_test
    log_lines = (out / "log.jsonl").read_text().splitlines()
    assert len(log_lines) == 1 and "kl/layer1" in json.loads(log_lines[0])["losses"]
    printed = run.printed
    assert "epoch 1/1" in printed and str(out) in printed
    if layout == "digits":
        assert "NOT RAF-DB" in printed and "NOT RAF-DB" in saved["note"]


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    data = rafdb_basic(tmp_path / "data")
    # The kept checkpoints hold the weights compared (the model's and the heads'), so no model
    # is exported (--save with no value): the export and its ONNX files cost most of a run.
    run = [*data, *TINY, "--epochs", "2", "--keep-checkpoint", "--save"]
    whole = train_gsdnet.main([*run, "--output-dir", str(tmp_path / "whole")])

    steps_per_epoch, calls = 2, {"n": 0}  # 16 images, batch 8
    original = Trainer.train_step

    def killed_in_epoch_two(self, *args):
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 2:  # after one optimizer step of epoch 2
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_gsdnet.main([*run, "--output-dir", str(tmp_path / "killed")])
    monkeypatch.setattr(Trainer, "train_step", original)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = train_gsdnet.main([*run, "--output-dir", str(tmp_path / "killed"), "--resume"])

    expected, got = (
        torch.load(tmp_path / folder / "checkpoint.pt", weights_only=True)["module"]
        for folder in ("whole", "killed")
    )
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert resumed["final"] == whole["final"] and resumed["best"] == whole["best"]
    lines = (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]

    with pytest.raises(ValueError, match="different run configuration"):
        train_gsdnet.main([*run, "--output-dir", str(tmp_path / "killed"), "--resume", "--seed", "1"])


@pytest.mark.parametrize(
    ("flags", "deferred", "bad_step"),
    [
        (["--method", "gsd-acam"], False, 2),  # the distiller's check (at once on the CPU)
        (["--method", "gsd-acam"], True, 3),  # as on CUDA: read later, here at the epoch's end
        (["--method", "baseline"], False, 2),  # the plain model's check
        (["--method", "gsd-acam", "--as-shipped"], False, 2),  # the authors' loss, checked too
    ],
    ids=["gsd-acam", "gsd-acam-deferred", "baseline", "as-shipped"],
)
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path, monkeypatch, flags, deferred, bad_step
):
    data = rafdb_basic(tmp_path / "data")  # 16 images in batches of 8: steps 2 and 3 are epoch 2's
    out = tmp_path / "run"
    original, calls = Trainer.train_step, {"n": 0}

    def nan_images_at_bad_step(self, images, targets):
        self.module.finite_check.deferred = deferred
        calls["n"] += 1
        if calls["n"] == bad_step + 1:
            images = images * float("nan")
        return original(self, images, targets)

    monkeypatch.setattr(Trainer, "train_step", nan_images_at_bad_step)
    message = (
        rf"non-finite values at training step {bad_step}: loss, .*, in epoch 2; stopping. "
        "The checkpoint of epoch 1 is kept"
    )
    with pytest.raises(NonFiniteLossError, match=message):
        train_gsdnet.main([*data, *TINY, *flags, "--epochs", "3", "--output-dir", str(out)])
    assert calls["n"] == bad_step + 1  # stopped at that step, or at the epoch's end when deferred
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and len(saved["history"]) == 1
    for value in saved["module"].values():
        assert torch.isfinite(value.float()).all()


def test_method_all_compares_the_three_rows_per_head(tmp_path):
    out = tmp_path / "cmp"
    run = [*rafdb_basic(tmp_path / "data"), *TINY, "--epochs", "1", "--method", "all"]
    result = train_gsdnet.main([*run, "--save", "--output-dir", str(out)])  # no models: not checked here
    assert list(result["runs"]) == ["baseline", "gsd", "gsd-acam"]
    assert list(result["runs"]["baseline"][0]["final"]["per_head_accuracy"]) == ["fc"]
    text = (out / "comparison.md").read_text()
    assert "RAF-DB basic" in text
    rows = [line for line in text.splitlines() if line.startswith("| gsd-acam |")]
    gsd_acam = result["runs"]["gsd-acam"][0]["final"]
    assert rows[0].startswith(
        f"| gsd-acam | 1 | {100 * gsd_acam['accuracy']:.2f} | {100 * gsd_acam['balanced_accuracy']:.2f} |"
    )
    assert rows[0].count("|") == 4 + 4 + 1  # method, epoch, accuracy, balanced accuracy, four heads
    for method in ("baseline", "gsd", "gsd-acam"):
        assert (out / method / "metrics.json").is_file()


def test_ablation_table(tmp_path):
    data = rafdb_basic(tmp_path / "data")
    out = tmp_path / "table2"
    result = ablation.main(
        [
            "--seeds",
            "0",
            "1",
            "--methods",
            "baseline",
            "gsd-acam",
            "--output-dir",
            str(out),
            "--",
            *data,
            *TINY,
            "--epochs",
            "1",
            "--save",  # no models: not checked here
        ]
    )
    text = (out / "ablation.md").read_text()
    assert "| ResNet50 (plain) |" in text and "| + gradual SD + ACAM |" in text
    finals = [100 * r["final"]["accuracy"] for r in result["runs"]["gsd-acam"]]
    assert f"{sum(finals) / 2:.2f} ± " in text
    assert "| 90.91 |" in text  # the paper's RAF-DB number beside the measured one
    assert (out / "gsd-acam-seed1" / "metrics.json").is_file()


def evaluate_exported(path: Path, dataset) -> float:
    model, config = load_exported(path)
    dataset.transform = eval_transform(config["img_size"])
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        predictions = model(images).argmax(1)
    return accuracy(confusion_matrix(predictions, torch.tensor(dataset.labels), len(config["classes"])))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    data = rafdb_basic(tmp_path / "data")
    out = tmp_path / "ddp"
    script = Path(examples_path.EXAMPLES) / "train_gsdnet.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        *data,
        *TINY,
        "--epochs",
        "2",
        "--output-dir",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["num_test_samples"] == 6
    assert sum(map(sum, metrics["final"]["confusion_matrix"])) == 6  # no padded duplicates
    assert done.stdout.count("epoch 2/2") == 1  # rank 0 logs, rank 1 does not
    # Sharded evaluation, summed over both processes, equals a plain single-process evaluation.
    test = build_datasets("rafdb", Path(data[3])).test
    assert evaluate_exported(out / "model_final.pt", test) == pytest.approx(metrics["final"]["accuracy"])


def test_loss_flags_reach_the_distillers_loss(tmp_path, monkeypatch):
    built = []

    def keep(*args, **kwargs):
        built.append(build_gsdnet(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(gsdnet.build, "build_gsdnet", keep)
    flags = [
        "--temperature",
        "4",
        "--kl-weight",
        "0.5",
        "--feature-weight",
        "0.02",
        "--formulation",
        "normalized",
        "--aux-ce-weight",
        "1",
    ]
    out = tmp_path / "run"
    train_gsdnet.main([*digits(tmp_path), *TINY, "--epochs", "1", *flags, "--output-dir", str(out)])
    loss = built[0].module.loss
    assert (loss.temperature, loss.kl_weight, loss.feature_weight) == (4.0, 0.5, 0.02)
    assert (loss.formulation, loss.aux_ce_weight) == ("normalized", 1.0)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["loss"] == dict(
        temperature=4.0,
        kl_weight=0.5,
        feature_weight=0.02,
        formulation="normalized",
        aux_ce_weight=1.0,
        teacher="neighbour",
    )
    assert "ce/layer1" in json.loads((out / "log.jsonl").read_text())["losses"]


def test_loss_flags_default_to_the_papers_values():
    args = train_gsdnet.parse_args(["--dataset", "digits"])
    assert {k: getattr(args, k) for k in PAPER_LOSS} == dict(
        temperature=3.0, kl_weight=0.3, feature_weight=0.01, formulation="reference", aux_ce_weight=0.0
    )
    with pytest.raises(ValueError, match="unknown loss options \\['kl'\\]"):
        build_gsdnet("gsd", "test_resnet", 3, img_size=32, kl=0.3)


def test_val_fraction_zero_turns_off_the_digits_split():
    assert train_gsdnet.parse_args(["--dataset", "digits"]).val_fraction == 0.2
    assert train_gsdnet.parse_args(["--dataset", "digits", "--val-fraction", "0"]).val_fraction is None
    with pytest.raises(SystemExit):
        train_gsdnet.parse_args(["--dataset", "digits", "--val-fraction", "1"])


def test_head_pool_size_reaches_every_head_and_is_refused_where_it_does_not_apply():
    args = train_gsdnet.parse_args(["--dataset", "digits", "--head-pool-size", "2"])
    assert args.head_pool_size == 2 and args.head == "bottleneck"
    built = build_gsdnet("gsd-acam", "test_resnet", 3, img_size=32, head_pool_size=args.head_pool_size)
    assert [head.pool_size for head in built.module.heads] == [2] * len(built.module.heads)
    for bad in (["--head", "pooled", "--head-pool-size", "2"], ["--head-pool-size", "0"]):
        with pytest.raises(SystemExit):
            train_gsdnet.parse_args(["--dataset", "digits", *bad])
    with pytest.raises(ValueError, match="head_pool_size applies to the 'bottleneck' head, not 'pooled'"):
        build_gsdnet("gsd", "test_resnet", 3, img_size=32, head="pooled", head_pool_size=2)
    with pytest.raises(ValueError, match="as_shipped reproduces"):
        build_gsdnet("gsd-acam", "test_resnet", 3, img_size=32, head_pool_size=2, as_shipped=True)


@pytest.mark.parametrize(
    ("samples", "world_size", "batches"),
    [
        (100, 1, 2),  # a small --train-limit keeps its partial batch: 64 + 36
        (65, 1, 1),  # a last batch of one sample is dropped
        (64, 1, 1),
        (1, 1, 1),  # nothing else to train on: kept, BatchNorm reports it
        (130, 2, 2),  # 65 per process, batches of 32: 32 + 32, the single one dropped
    ],
)
def test_train_loader_drops_only_a_single_sample_batch(samples, world_size, batches):
    dataset = torch.utils.data.TensorDataset(torch.arange(samples))
    env = DistEnv(0, world_size, torch.device("cpu"))
    loader = train_loader(dataset, None, 64, 0, env, seed=0)
    assert len(loader) == batches == len(list(loader))
