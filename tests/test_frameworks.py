"""The Lightning and accelerate examples: a few CPU steps on the shipped digits log every loss
term and head accuracy, and the saved model is the plain timm model, equal to the trained one.

CI installs the ``frameworks`` extra (and imports both packages before the tests), so the
import skips below only ever apply to a checkout installed without it.
"""

import csv
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import examples_path  # noqa: F401

pytest.importorskip("lightning", reason="the frameworks extra: pip install -e '.[frameworks]'")
pytest.importorskip("accelerate", reason="the frameworks extra: pip install -e '.[frameworks]'")

import accelerate_gsd  # noqa: E402
import lightning_gsd  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from frameworks_common import build_distiller, digits_loaders  # noqa: E402

MODEL = "test_resnet"
TINY = ["--model", MODEL, "--img-size", "32", "--train-limit", "32", "--batch-size", "16"]
STAGES = ["layer1", "layer2", "layer3"]  # test_resnet's stages before the last; fc classifies
TERMS = ["loss", "ce", *(f"kl/{s}" for s in STAGES), *(f"feature/{s}" for s in STAGES)]
METRICS = [*TERMS, *(f"acc/{head}" for head in [*STAGES, "fc"])]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(example, precision)``: the example's result, run once per module: two training
    steps (32 digits, batch 16) and one validation on one CPU process, seed 0."""
    results = {}

    def run_once(example: str, precision: str) -> dict:
        if (example, precision) not in results:
            out = ["--output-dir", str(tmp_path_factory.mktemp(f"{example}-{precision}"))]
            if example == "lightning":
                trainer = ["--accelerator", "cpu", "--devices", "1", "--precision", precision]
                steps = ["--max-steps", "2", "--log-every-n-steps", "1"]
                results[example, precision] = lightning_gsd.main([*TINY, *trainer, *steps, *out])
            else:
                try:
                    results[example, precision] = accelerate_gsd.main(
                        [*TINY, "--epochs", "1", "--cpu", "--mixed-precision", precision, *out]
                    )
                finally:  # accelerate keeps one process-wide state; the next run starts afresh
                    AcceleratorState._reset_state(reset_partial_state=True)
        return results[example, precision]

    return run_once


def digits_batch() -> torch.Tensor:
    _, val = digits_loaders(img_size=32, batch_size=8)
    return next(iter(val))[0]


def initial_state() -> dict[str, torch.Tensor]:
    """The plain model's weights before training, as both examples seed them (seed 0)."""
    torch.manual_seed(0)
    return build_distiller(MODEL, 10, 32).model.state_dict()


def plain_accuracy(model: torch.nn.Module) -> float:
    """The model's accuracy on the whole digits validation split, evaluated here in float32."""
    _, val = digits_loaders(img_size=32, batch_size=64)
    with torch.no_grad():
        correct = sum(int((model.eval()(x).argmax(1) == y).sum()) for x, y in val)
    return correct / len(val.dataset)


def assert_no_hooks(model: torch.nn.Module) -> None:
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, hooked


def load_saved_model(path: Path) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """The saved state dict, checked to be the timm model's own (no heads, no prefix) and
    trained (not the initial weights), and a fresh timm model loaded from it, in eval mode."""
    saved = torch.load(path, weights_only=True)
    fresh = timm.create_model(MODEL, num_classes=10, checkpoint_path=str(path)).eval()
    assert list(saved) == list(fresh.state_dict())
    initial = initial_state()
    assert any(not torch.equal(saved[k], initial[k]) for k in saved if saved[k].is_floating_point())
    return saved, fresh


def assert_same_state(saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    state = model.state_dict()
    assert list(saved) == list(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)


def assert_finite_metrics(metrics: dict[str, float], split: str) -> None:
    missing = [name for name in METRICS if f"{split}/{name}" not in metrics]
    assert not missing, (missing, sorted(metrics))
    assert all(math.isfinite(metrics[f"{split}/{name}"]) for name in METRICS)
    assert all(0.0 <= metrics[f"{split}/acc/{head}"] <= 1.0 for head in [*STAGES, "fc"])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_fit_logs_every_term_and_saves_the_plain_model(run, precision):
    result = run("lightning", precision)
    for split in ("train", "val"):
        assert_finite_metrics(result["metrics"], split)
    with open(result["path"].parent / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {f"{split}/{name}" for split in ("train", "val") for name in METRICS} <= logged
    assert sum(bool(row["train/loss"]) for row in rows) == 2  # one row per step

    distiller, plain = result["module"].distiller, result["model"]
    assert plain is not distiller.model and distiller.attached  # a copy was exported
    assert_no_hooks(plain)
    saved, fresh = load_saved_model(result["path"])
    assert_same_state(saved, distiller.model)
    assert_same_state(saved, plain)
    images = digits_batch()
    with torch.no_grad():
        expected = distiller.eval()(images).logits
        torch.testing.assert_close(plain.eval()(images), expected, rtol=0, atol=0)
        torch.testing.assert_close(fresh(images), expected, rtol=0, atol=0)
    if precision == "32-true":  # the logged accuracy is the exported model's, over all 364 images
        assert result["metrics"]["val/acc/fc"] == pytest.approx(plain_accuracy(fresh), abs=1e-6)
    # Exporting a copy left the module's hooks in place: it can go on training.
    out = distiller.train()(images, torch.arange(len(images)))
    assert len(out.head_logits) == len(STAGES) + 1 and torch.isfinite(out.loss)


def test_export_callback_rejects_a_module_without_a_distiller(tmp_path):
    class Plain(lightning_gsd.L.LightningModule):  # a plain classifier: no .distiller
        def __init__(self):
            super().__init__()
            self.model = timm.create_model(MODEL, num_classes=10)

        def training_step(self, batch, batch_idx):
            images, targets = batch
            return torch.nn.functional.cross_entropy(self.model(images), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = lightning_gsd.L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[lightning_gsd.ExportPlainModel(tmp_path / "model.pth")],
    )
    with pytest.raises(TypeError, match="Plain.distiller is NoneType"):
        trainer.fit(Plain(), [(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))])
    assert not (tmp_path / "model.pth").exists()


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_accelerate_loop_logs_every_term_and_saves_the_plain_model(run, precision):
    result = run("accelerate", precision)
    (record,) = result["history"]
    for split in ("train", "val"):
        assert_finite_metrics(record, split)

    plain = result["model"]
    assert_no_hooks(plain)
    assert "forward" not in vars(plain)  # accelerate's autocast wrapper stayed on the distiller
    saved, fresh = load_saved_model(result["path"])
    assert_same_state(saved, plain)
    images = digits_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), plain.eval()(images), rtol=0, atol=0)
    if precision == "no":
        assert record["val/acc/fc"] == pytest.approx(plain_accuracy(fresh), abs=1e-6)


def test_lightning_and_accelerate_train_the_same_model(run):
    """Same seed, data order, optimiser and schedule in float32: the two loops must agree."""
    lightning, accelerate = run("lightning", "32-true"), run("accelerate", "no")
    (record,) = accelerate["history"]
    for name in METRICS:
        assert lightning["metrics"][f"val/{name}"] == pytest.approx(record[f"val/{name}"], rel=1e-4, abs=1e-6)
    a, b = (torch.load(r["path"], weights_only=True) for r in (lightning, accelerate))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    script = [str(Path(examples_path.EXAMPLES) / "accelerate_gsd.py"), *TINY, "--epochs", "1", "--cpu"]
    command = [*launch, *script, "--mixed-precision", "bf16", "--output-dir", str(tmp_path)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es), DistributedType.MULTI_CPU, mixed precision bf16" in done.stdout
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("epoch 0:")]  # main only
    assert all(f"{split}/{name} " in line for split in ("train", "val") for name in METRICS), line
    load_saved_model(tmp_path / "model.pth")
