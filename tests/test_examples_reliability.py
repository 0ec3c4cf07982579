"""A run survives any kill and never reports what it did not train: checkpoints that check
themselves, run identity on --resume, multi-run resume after SIGKILL, the divergence stop, the
CLI's errors, high-bit-depth images and strict metrics.json (issue 16)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import examples_path  # noqa: F401
import train_gsdnet
from gsdnet import checkpoint
from gsdnet.datasets import LabelFileError, build_datasets
from gsdnet.datasets.common import ImageList
from gsdnet.divergence import DivergedError, check_loss
from gsdnet.engine import RunMismatchError, Trainer
from test_examples_datasets import write_ferplus
from test_examples_training import TINY, image_folder, rafdb_basic

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).resolve().parent
DRIVER = TESTS / "fault_driver.py"
NO_WEIGHTS = TINY[: TINY.index("--weights")]  # TINY without its "--weights none"


# --- checkpoint integrity, orphans, strict JSON ------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checked({"epoch": 3, "module": {"w": torch.full((4096,), 1.5)}}, path)
    return path


def test_an_intact_checkpoint_loads(saved):
    state = checkpoint.load(saved)
    assert state["epoch"] == 3 and torch.equal(state["module"]["w"], torch.full((4096,), 1.5))


def flip_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    where = data.find(torch.tensor([1.5]).numpy().tobytes() * 8) + 1000
    data[where] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        flip_tensor_byte,
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated
        lambda p: p.write_bytes(b""),  # empty
        lambda p: p.write_text("not a zip file at all"),
    ],
    ids=["flipped-byte", "truncated", "empty", "not-zip"],
)
def test_a_damaged_checkpoint_is_refused_with_the_path_and_what_to_do(saved, damage):
    damage(saved)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load(saved)
    message = str(caught.value)
    assert str(saved) in message and "Delete it" in message
    assert "weights_only" not in message


def test_orphan_temporary_files_are_removed(tmp_path):
    orphan = tmp_path / ".checkpoint.pt.abc123.tmp"
    orphan.write_bytes(b"partial")
    keep = tmp_path / "checkpoint.pt"
    keep.write_bytes(b"kept")
    assert checkpoint.remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and keep.exists()


def test_metrics_json_is_strict_with_a_note_for_non_finite_values(tmp_path):
    checkpoint.save_json({"final": {"loss": float("nan"), "top": [1.0, float("inf")]}}, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    saved = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard token {token}"))
    assert saved["final"] == {"loss": None, "top": [1.0, None]}
    assert (
        "final.loss (nan)" in saved["non_finite_values"]
        and "final.top[1] (inf)" in saved["non_finite_values"]
    )


# --- run identity on --resume ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-epoch imagefolder run from a weights file, checkpoint kept; the plain baseline,
    since what the run's identity holds does not depend on the method (and it saves no exits)."""
    root = tmp_path_factory.mktemp("identity")
    data = image_folder(root / "data")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=2).state_dict(), root / "w0.pth")
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet", num_classes=2).state_dict(), root / "w1.pth")
    run = [*data, *NO_WEIGHTS, "--weights", str(root / "w0.pth"), "--epochs", "2", "--keep-checkpoint"]
    run += ["--method", "baseline"]
    train_gsdnet.main([*run, "--output-dir", str(root / "run")])
    return root, run


def checkpoint_only(root: Path, tmp_path: Path) -> Path:
    """A copy of the trained run's folder as a kill before metrics.json leaves it."""
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    (out / "metrics.json").unlink()
    return out


def test_resume_refuses_renamed_class_folders(trained, tmp_path):
    root, run = trained
    out = checkpoint_only(root, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    for split in ("train", "test"):
        (data / split / "b").rename(data / split / "c")
    renamed = [a if a != str(root / "data") else str(data) for a in run]
    with pytest.raises(RunMismatchError, match=r"classes: saved \['a', 'b'\], now \['a', 'c'\]"):
        train_gsdnet.main([*renamed, "--output-dir", str(out), "--resume"])


def test_resume_refuses_an_edited_label_list(tmp_path):
    data = rafdb_basic(tmp_path / "data")
    run = [*data, *TINY, "--epochs", "1", "--keep-checkpoint", "--output-dir", str(tmp_path / "run")]
    run += ["--save"]  # no models: not needed here
    train_gsdnet.main(run)
    labels = tmp_path / "data" / "EmoLabel" / "list_patition_label.txt"
    labels.write_text(labels.read_text().replace("train_00001.jpg 2", "train_00001.jpg 3"))
    with pytest.raises(RunMismatchError, match="dataset_sha256: saved"):
        train_gsdnet.main([*run, "--resume"])


def test_resume_refuses_other_weights(trained, tmp_path):
    root, run = trained
    out = checkpoint_only(root, tmp_path)
    other = [str(root / "w1.pth") if a == str(root / "w0.pth") else a for a in run]
    with pytest.raises(RunMismatchError, match="weights_sha256: saved '[0-9a-f]{64}', now '[0-9a-f]{64}'"):
        train_gsdnet.main([*other, "--output-dir", str(out), "--resume"])


def test_resume_refuses_fewer_epochs_than_the_checkpoint(trained, tmp_path):
    root, run = trained
    out = checkpoint_only(root, tmp_path)
    with pytest.raises(RunMismatchError, match="holds epoch 2, beyond --epochs 1; pass --epochs 2"):
        train_gsdnet.main([*run, "--epochs", "1", "--output-dir", str(out), "--resume"])
    with pytest.raises(RunMismatchError, match="finished run of 2 epochs, beyond --epochs 1"):
        train_gsdnet.main([*run, "--epochs", "1", "--output-dir", str(root / "run"), "--resume"])


def test_resume_refuses_a_metrics_file_that_records_no_settings(trained, tmp_path):
    root, run = trained
    out = tmp_path / "run"
    shutil.copytree(root / "run", out)
    (out / "checkpoint.pt").unlink()
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "run"}))
    with pytest.raises(RunMismatchError, match="written by an older version of this script"):
        train_gsdnet.main([*run, "--output-dir", str(out), "--resume"])


def test_resume_of_a_finished_run_skips_it(trained, caplog):
    root, run = trained
    before = (root / "run" / "metrics.json").read_text()
    metrics = train_gsdnet.main([*run, "--output-dir", str(root / "run"), "--resume"])
    assert "finished and verified, skipped" in caplog.text
    assert (root / "run" / "metrics.json").read_text() == before
    assert metrics["final"]["epoch"] == 2 and set(metrics["outputs"]) >= {"log.jsonl", "model_final.pt"}


# --- divergence ---------------------------------------------------------------------------------
def test_an_update_that_breaks_the_weights_never_replaces_the_good_checkpoint(tmp_path, monkeypatch):
    data = rafdb_basic(tmp_path / "data")
    out = tmp_path / "run"
    original = Trainer.train_epoch

    def blown_up_in_epoch_two(self, loader, epoch):
        record = original(self, loader, epoch)
        if epoch == 2:  # a finite loss, then an update that overflows the weights
            with torch.no_grad():
                next(self.module.parameters()).fill_(float("inf"))
        return record

    monkeypatch.setattr(Trainer, "train_epoch", blown_up_in_epoch_two)
    with pytest.raises(DivergedError, match="weights are not finite after epoch 2.*epoch 1 is kept"):
        train_gsdnet.main([*data, *TINY, "--epochs", "3", "--output-dir", str(out)])
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["epoch"] == 1 and len(saved["history"]) == 1
    assert all(torch.isfinite(v.float()).all() for v in saved["module"].values())
    assert not (out / "metrics.json").exists()


def test_a_runaway_loss_stops_the_run_instead_of_reporting_chance_accuracy(tmp_path):
    out = tmp_path / "run"
    run = ["--dataset", "digits", "--train-limit", "48", "--seeds", "0", *TINY, "--epochs", "2"]
    with pytest.raises(DivergedError, match=r"training diverged: epoch 1's mean loss .* 10 x the first step"):
        train_gsdnet.main([*run, "--lr", "10", "--output-dir", str(out)])
    assert not (out / "metrics.json").exists() and not (out / "checkpoint.pt").exists()


def test_the_divergence_rule():
    check_loss(49.9, 5.0, 3, "kept")  # below 10 x the first step's loss
    with pytest.raises(DivergedError, match="epoch 3's mean loss 50 is more than 10 x the first step's 5"):
        check_loss(50.0, 5.0, 3, "kept")
    check_loss(9.9, 0.01, 2, "kept")  # a first loss below 1 counts as 1
    with pytest.raises(DivergedError):
        check_loss(10.0, 0.01, 2, "kept")
    with pytest.raises(DivergedError):
        check_loss(float("nan"), 5.0, 2, "kept")


# --- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--img-size", "-3"], "argument --img-size: must be >= 1, got -3"),
        (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
        (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
        (["--temperature", "0"], "argument --temperature: must be a finite number > 0, got 0"),
        (["--model", "resnet5O"], "argument --model: timm has no model 'resnet5O'; close matches: resnet50"),
    ],
)
def test_invalid_values_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as caught:
        train_gsdnet.parse_args(["--dataset", "digits", *flags])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err


def script(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environ = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    command = [
        sys.executable,
        str(DRIVER if env else Path(examples_path.EXAMPLES) / "train_gsdnet.py"),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environ)


@pytest.mark.slow  # two interpreter starts, about 8 s each on a busy 2-core machine
def test_a_user_error_found_later_is_one_line_and_the_traceback_needs_debug(tmp_path):
    run = ["--dataset", "digits", *TINY, "--output-dir", str(tmp_path / "none"), "--resume"]
    done = script(*run)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: --resume: no checkpoint.pt or finished run under")
    debug = script(*run, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_resume_with_nothing_to_resume_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt or finished run under"):
        train_gsdnet.main(["--dataset", "digits", *TINY, "--output-dir", str(tmp_path / "none"), "--resume"])
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "rafdb", "--data-dir", "missing", *TINY], "data directory .*missing does not exist"),
        (["--dataset", "digits", *NO_WEIGHTS, "--weights", "missing.pth"], "weights file missing.pth"),
    ],
)
def test_a_refused_run_leaves_no_files_and_no_banner(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=message):
        train_gsdnet.main([*flags, "--epochs", "1", "--output-dir", "run"])
    assert list(tmp_path.iterdir()) == []  # no train.log, no folder
    printed = capsys.readouterr().out
    assert "missing" not in printed and "training on" not in printed  # the run was never described


# --- images ---------------------------------------------------------------------------------------
def test_a_16_bit_png_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")
    pixels = np.asarray(ImageList([tmp_path / "ramp.png"], [0]).load(0))
    assert pixels.shape == (64, 64, 3) and pixels.min() == 0 and pixels.max() == 255
    assert (pixels == 255).mean() < 0.01 and abs(pixels.mean() - 127.5) < 1


def test_ferplus_pixel_values_outside_0_255_name_the_file_and_row(tmp_path):
    write_ferplus(tmp_path, [("Training", [10] + [0] * 9)] * 3)
    pixels = tmp_path / "fer2013.csv"
    lines = pixels.read_text().splitlines()
    emotion, values, usage = lines[2].split(",")
    lines[2] = ",".join([emotion, "300 " + values.split(" ", 1)[1], usage])
    pixels.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        LabelFileError, match=f"{pixels}:3: pixel values must lie in 0..255, got values from 0 to 300"
    ):
        build_datasets("ferplus", tmp_path)


# --- SIGKILL at chosen points of a two-seed command, then --resume ------------------------------
KILLS = [
    # (fault, what the run folders hold right after the kill)
    ("checkpoint-write:2:KILL", "seed 0 killed writing its epoch-2 checkpoint"),
    ("before-reports:1:KILL", "seed 0 trained both epochs, no report written yet"),
    ("before-checkpoint-removal:1:KILL", "seed 0's metrics.json written, checkpoint still there"),
    ("run-start:1:KILL", "seed 0 finished; seed 1 not started"),
    ("train-step:8:KILL", "seed 1 killed in its second epoch"),
]


def comparable(metrics: dict) -> dict:
    """What an interrupted and an uninterrupted run must agree on (not timings or paths)."""
    return {k: metrics[k] for k in ("final", "best", "selected", "classes", "run", "num_train_samples")}


@pytest.mark.slow
def test_sigkill_anywhere_in_a_two_seed_command_then_resume_equals_an_uninterrupted_run(tmp_path):
    run = ["--dataset", "digits", "--train-limit", "48", "--seeds", "0", "1", *TINY, "--epochs", "2"]
    run += ["--save", "final"]
    whole = train_gsdnet.main([*run, "--output-dir", str(tmp_path / "whole")])
    out = tmp_path / "killed"
    seeds = [out / "seed0", out / "seed1"]
    for i, (fault, state) in enumerate(KILLS):
        done = script(
            *run, "--output-dir", str(out), *(["--resume"] if i else []), env={"GSDNET_FAULT": fault}
        )
        assert done.returncode == -signal.SIGKILL, (fault, done.stderr[-2000:])
        if fault.startswith("checkpoint-write"):
            assert list(seeds[0].glob(".checkpoint.pt.*.tmp")), "the kill left its temporary file"
            assert checkpoint.load(seeds[0] / "checkpoint.pt")["epoch"] == 1, state
        if fault.startswith("before-reports"):
            assert not list(seeds[0].glob(".*.tmp")), "the orphan was removed on the next start"
            assert checkpoint.load(seeds[0] / "checkpoint.pt")["epoch"] == 2, state
            assert not (seeds[0] / "metrics.json").exists(), state
        if fault.startswith("before-checkpoint-removal"):
            assert (seeds[0] / "metrics.json").exists() and (seeds[0] / "checkpoint.pt").exists(), state
        if fault.startswith("run-start"):
            assert not (seeds[0] / "checkpoint.pt").exists() and not seeds[1].exists(), state
        if fault.startswith("train-step"):
            assert checkpoint.load(seeds[1] / "checkpoint.pt")["epoch"] == 1, state
    resumed = script(*run, "--output-dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "seed0: finished and verified, skipped" in resumed.stdout
    for seed, folder in enumerate(seeds):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert comparable(metrics) == comparable(whole["runs"]["gsd-acam"][seed])
        expected = torch.load(tmp_path / "whole" / folder.name / "model_final.pt", weights_only=True)
        got = torch.load(folder / "model_final.pt", weights_only=True)
        for key, value in expected["state_dict"].items():
            torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=0, msg=key)
        assert not (folder / "checkpoint.pt").exists() and not list(folder.glob(".*.tmp"))
        lines = (folder / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (out / "comparison.md").read_text() == (tmp_path / "whole" / "comparison.md").read_text()


@pytest.mark.slow
def test_a_stalled_torchrun_process_ends_the_run_within_the_timeout(tmp_path):
    data = rafdb_basic(tmp_path / "data")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(DRIVER), *data, *TINY, "--epochs", "2", "--dist-timeout", "5"]
    command += ["--output-dir", str(tmp_path / "ddp")]
    env = dict(os.environ, OMP_NUM_THREADS="1", GSDNET_FAULT="train-step:2:STOP:1")  # rank 1 freezes
    started = time.time()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=180)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the frozen rank, if torchrun left it behind
        except ProcessLookupError:
            pass
    elapsed = time.time() - started
    assert process.returncode != 0 and elapsed < 120  # 5 s, then torchrun's 30 s grace for rank 1
    assert "did not answer within --dist-timeout 5 s" in stderr, stderr[-3000:]


@pytest.mark.slow
def test_a_non_finite_loss_on_one_torchrun_process_ends_the_run_and_keeps_the_good_checkpoint(tmp_path):
    data = rafdb_basic(tmp_path / "data")  # 16 images, 4 per process and step: 2 steps per epoch
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(DRIVER), *data, *TINY, "--epochs", "3", "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", GSDNET_FAULT="train-step:3:NAN:1")  # epoch 2, rank 1
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode != 0
    assert "non-finite values at training step 2: loss" in done.stderr, done.stderr[-3000:]
    assert "in epoch 2 on process 1; stopping. The checkpoint of epoch 1 is kept" in done.stderr
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == 1
    assert not (out / "metrics.json").exists()
