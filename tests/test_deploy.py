"""Exits that deploy: the graph cut at the stages, the exit folder, and the ONNX Runtime exit model.

The models here are small hand-written ones, so that an export takes seconds; every timm family
and Hugging Face class goes through the same checks in ``test_zoo.py`` and ``test_hf_zoo.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from gradual_sd import EarlyExitModel, GradualSelfDistiller, PooledHead
from gradual_sd.early_exit._deployment import _float_batch
from gradual_sd.early_exit._split import SplitError, run_segments, split_model

from exit_zoo import check_exits, check_runtime, thresholds_for_every_exit

pytest.importorskip("onnxruntime", reason="the deploy extra: pip install -e '.[deploy]'")
pytest.importorskip("onnxscript", reason="the deploy extra: pip install -e '.[deploy]'")

from gradual_sd.runtime import ManifestError, OnnxExitModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4


class Net(nn.Module):
    """Three conv stages and a classifier; ``link`` makes stage3 also read the stem's output."""

    def __init__(self, link: bool = False) -> None:
        super().__init__()
        self.link = link
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(x)
        x = self.stage2(self.stage1(x0))
        if self.link:
            x = x + nn.functional.avg_pool2d(x0, 2).repeat(1, 2, 1, 1)
        return self.fc(self.stage3(x).mean((2, 3)))


class Sequence1d(nn.Module):
    """Conv1d stages over ``(N, C, L)`` sequences (NCL stage outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 5, padding=2)
        self.stage1 = nn.Sequential(nn.Conv1d(8, 12, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv1d(12, 12, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.stage1(self.stem(x))).mean(-1))


def make_exits(
    model: nn.Module, stages: list[str], example: torch.Tensor, check: bool = True
) -> EarlyExitModel:
    torch.manual_seed(0)
    distiller = GradualSelfDistiller(model, stages, example_input=example[:1], head_factory=PooledHead)
    with torch.no_grad():  # spread the random heads' confidences over (0, 1)
        for head in distiller.heads:
            head.fc.weight.mul_(20.0)
    distiller.eval()
    return EarlyExitModel.from_distiller(distiller, example_input=example, check=check)


def images(count: int, shape: tuple[int, ...] = (3, 16, 16), seed: int = 1) -> torch.Tensor:
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[EarlyExitModel, OnnxExitModel, torch.Tensor, object]:
    """A three-exit model, its folder (thresholds set so that samples leave at every exit, and
    class names), and the batch the thresholds were set on."""
    torch.manual_seed(0)
    exits = make_exits(Net(), ["stage1", "stage2", "stage3"], images(4))
    batch = images(16)
    thresholds = check_exits(exits, batch)
    assert thresholds is not None
    directory = tmp_path_factory.mktemp("exits")
    exits.export_onnx(directory, example_input=batch, class_names=["a", "b", "c", "d"])
    return exits, OnnxExitModel(directory, threads=1), batch, directory


def test_runtime_exits_equal_pytorch(exported):
    exits, runtime, batch, _ = exported
    for x in (batch, batch[:1], batch[5:6]):
        with torch.inference_mode():
            expected = exits(x)
        got = runtime(x.numpy())
        assert got.exit_index.tolist() == expected.exit_index.tolist()
        np.testing.assert_allclose(got.logits, expected.logits.numpy(), rtol=1e-4, atol=1e-5)
    assert set(runtime(batch.numpy()).exit_index.tolist()) == {0, 1, 2, 3}


def test_manifest_describes_the_folder(exported):
    exits, runtime, batch, directory = exported
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["thresholds"] == list(exits.thresholds)
    assert manifest["class_names"] == ["a", "b", "c", "d"] == runtime.class_names
    assert manifest["input"] == {"name": "images", "shape": [None, 3, 16, 16], "dtype": "float32"}
    assert [s["layout"] for s in manifest["stages"]] == ["NCHW"] * 3
    assert [s["name"] for s in manifest["stages"]] == ["stage1", "stage2", "stage3"]
    import gradual_sd

    assert manifest["gradual_sd_version"] == gradual_sd.__version__
    files = sorted(p.name for p in directory.iterdir() if p.name != "manifest.json")
    assert (
        sorted(manifest["files"])
        == files
        == sorted([f"segment_{k}.onnx" for k in range(4)] + [f"head_{k}.onnx" for k in range(3)])
    )
    costs = exits.exit_costs(batch[:1])
    assert manifest["flops"] == {"stages": list(costs.stages), "heads": list(costs.heads), "full": costs.full}


def test_every_file_has_a_dynamic_batch(exported):
    import onnx

    _, _, _, directory = exported
    for path in directory.glob("*.onnx"):
        for value in onnx.load(str(path)).graph.input:
            batch = value.type.tensor_type.shape.dim[0]
            assert batch.dim_param and not batch.dim_value, f"{path.name}: fixed batch {batch}"


def test_samples_that_leave_are_dropped_and_disabled_heads_never_run(exported):
    _, runtime, batch, _ = exported
    seen: dict[str, list[int]] = {}

    def recording(name, graph):
        def run(*arrays):
            seen.setdefault(name, []).append(arrays[0].shape[0])
            return graph(*arrays)

        return run

    saved = runtime._segments, runtime._heads, runtime._final
    runtime._segments = [recording(f"segment {k}", g) for k, g in enumerate(saved[0])]
    runtime._heads = [recording(f"head {k}", g) for k, g in enumerate(saved[1])]
    runtime._final = recording("final", saved[2])
    try:
        out = runtime(batch.numpy())
        left = [int((out.exit_index == k).sum()) for k in range(4)]
        assert seen["segment 0"] == [16]
        assert seen["segment 1"] == [16 - left[0]]
        assert seen["segment 2"] == [16 - left[0] - left[1]]
        assert seen["final"] == [left[3]]
        thresholds = runtime.thresholds
        seen.clear()
        runtime.set_thresholds([math.inf, thresholds[1], math.inf])
        runtime(batch.numpy())
        assert set(seen) == {"segment 0", "segment 1", "segment 2", "head 1", "final"}
        seen.clear()
        runtime.set_thresholds(math.inf)
        out = runtime(batch.numpy())
        assert set(seen) == {"segment 0", "segment 1", "segment 2", "final"}
        assert out.exit_index.tolist() == [3] * 16
    finally:
        runtime._segments, runtime._heads, runtime._final = saved
        runtime.set_thresholds(thresholds)


def test_thresholds_change_at_run_time(exported):
    exits, runtime, batch, _ = exported
    try:
        runtime.set_thresholds(0.0)
        assert runtime(batch.numpy()).exit_index.tolist() == [0] * 16
        runtime.set_thresholds(math.inf)
        with torch.inference_mode():
            plain = exits.model(batch)
        got = runtime(batch.numpy())
        assert got.exit_index.tolist() == [3] * 16
        np.testing.assert_allclose(got.logits, plain.numpy(), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="need 3 thresholds"):
            runtime.set_thresholds([0.5, 0.5])
        with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*got \[-1, nan\]"):
            runtime.set_thresholds([0.5, -1, float("nan")])
        with pytest.raises(ValueError, match=r"math.inf .*got \[95, 95, 95\]"):
            runtime.set_thresholds([95, 95, 95])
    finally:
        runtime.set_thresholds(exits.thresholds)


def test_every_graph_gets_the_threads_and_idle_threads_do_not_spin(exported):
    # A chain of sessions, each with its own pool: threads spinning after one graph would hold
    # the cores the next one needs (2.75x the whole model at batch 1 on 2 cores, benchmarks.md).
    *_, directory = exported
    runtime = OnnxExitModel(directory, threads=2)
    graphs = [*runtime._segments, runtime._final, *runtime._heads]
    assert len(graphs) == 7
    for graph in graphs:
        options = graph.session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(ValueError, match="threads must be a positive int"):
        OnnxExitModel(directory, threads=0)


def test_bad_batches_get_clear_errors(exported):
    _, runtime, batch, _ = exported
    with pytest.raises(ValueError, match=r"no batch axis; add one \(images\[None\]\)"):
        runtime(batch[0].numpy())
    with pytest.raises(TypeError, match="astype"):
        runtime(batch.numpy().astype(np.float64))
    with pytest.raises(ValueError, match=r"takes \(N, 3, 16, 16\)"):
        runtime(np.zeros((2, 3, 8, 8), np.float32))
    fix = r"resize them to 16x16, or export the folder at their size.*example_input=images.*8x8"
    with pytest.raises(ValueError, match=fix):
        runtime(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"takes \(N, 3, 16, 16\) batches \(it was exported at that size\)$"):
        runtime(np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        runtime(np.zeros((0, 3, 16, 16), np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        runtime(batch)


def distilled_on_16px() -> EarlyExitModel:
    """Exits of a model that records no size (its default example would be 224 px), distilled
    on 16 px images, with no example_input past the distiller's, as docs/early-exit.md shows."""
    torch.manual_seed(0)
    distiller = GradualSelfDistiller(Net(), ["stage1"], example_input=images(1), head_factory=PooledHead)
    return EarlyExitModel.from_distiller(distiller.eval())


def test_export_defaults_to_the_size_the_exits_were_built_and_calibrated_on(tmp_path):
    exits = distilled_on_16px()
    assert exits.input_shape == (3, 16, 16)
    assert _float_batch(exits, None).shape == (4, 3, 16, 16)  # the export's example
    # Calibrated on another size (the model is convolutional): the thresholds hold at that one,
    # and it comes back with the saved exits.
    exits.calibrate((images(8, (3, 24, 24)), torch.zeros(8, dtype=torch.long)))
    assert exits.input_shape == (3, 24, 24)
    assert _float_batch(exits, None).shape == (4, 3, 24, 24)
    assert _float_batch(exits, images(3, (3, 8, 8))).shape == (3, 3, 8, 8)  # a given one wins
    exits.save(tmp_path)
    assert json.loads((tmp_path / "early_exit.json").read_text())["input_shape"] == [3, 24, 24]
    assert EarlyExitModel.load(tmp_path, Net()).input_shape == (3, 24, 24)


@pytest.mark.slow
def test_the_folder_takes_the_size_the_exits_were_built_on(tmp_path):
    exits = distilled_on_16px()
    runtime = OnnxExitModel(exits.export_onnx(tmp_path), threads=1)
    assert runtime.input_shape == (3, 16, 16)
    x = images(4)
    with torch.inference_mode():
        np.testing.assert_allclose(runtime(x.numpy()).logits, exits(x).logits.numpy(), rtol=1e-4, atol=1e-5)


def test_damaged_or_foreign_folders_are_refused_by_name(exported, tmp_path):
    _, _, _, directory = exported
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    head = tmp_path / "head_1.onnx"
    data = bytearray(head.read_bytes())
    data[len(data) // 2] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="head_1.onnx does not match manifest.json"):
        OnnxExitModel(tmp_path)
    head.unlink()
    with pytest.raises(ManifestError, match="head_1.onnx is listed in manifest.json but missing"):
        OnnxExitModel(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="format_version 99"):
        OnnxExitModel(tmp_path)
    with pytest.raises(ManifestError, match="not an exit folder"):
        OnnxExitModel(tmp_path / "nowhere")


def test_the_runtime_imports_and_runs_without_torch(exported):
    _, runtime, batch, directory = exported
    np.save(directory.parent / "batch.npy", batch.numpy())
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        import numpy as np

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is not installed here")

        sys.meta_path.insert(0, NoTorch())
        from gradual_sd.runtime import OnnxExitModel

        out = OnnxExitModel({str(directory)!r}, threads=1)(np.load({str(directory.parent / "batch.npy")!r}))
        assert "torch" not in sys.modules
        print(out.exit_index.tolist())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(runtime(batch.numpy()).exit_index.tolist())


# -- the cut ------------------------------------------------------------------------------------


def test_segments_reproduce_the_model_at_any_batch():
    exits = make_exits(Net(), ["stage1", "stage2", "stage3"], images(4))
    segments = split_model(exits.model, exits.stages, images(2))
    assert [s.inputs for s in segments] == [1, 1, 1, 1]
    for count in (1, 3, 7):
        x = images(count, seed=count)
        with torch.no_grad():
            head_inputs, logits = run_segments(segments, x)
            expected = exits.exit_logits(x)
            assert torch.equal(logits, expected[-1])
            for k, head in enumerate(exits.heads):
                assert torch.equal(head(head_inputs[k])[0], expected[k])


def test_a_cross_stage_link_is_refused_naming_the_stage_and_the_tensor(tmp_path):
    exits = make_exits(Net(link=True), ["stage1", "stage2"], images(4), check=False)
    expected = (
        "samples cannot leave at stage 'stage1': a tensor computed in 'stem.2' from before it is "
        "read after stage 'stage2'"
    )
    with pytest.raises(SplitError, match=expected) as refusal:
        exits.export_onnx(tmp_path, example_input=images(4))
    assert "cross-stage" in str(refusal.value)
    assert not (tmp_path / "manifest.json").exists()


class DataDependent(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        if x.sum() > 0:  # control flow on a value: torch.export cannot trace it
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_a_model_torch_export_cannot_trace_is_refused_with_the_reason(tmp_path):
    exits = make_exits(DataDependent(), ["stage1", "stage2"], images(4))
    with pytest.raises(SplitError, match="torch.export cannot trace DataDependent"):
        exits.export_onnx(tmp_path, example_input=images(4))


def test_ncl_sequences_export(tmp_path):
    x = images(4, shape=(2, 24))
    exits = make_exits(Sequence1d(), ["stage1", "stage2"], x)
    assert exits.layouts == ("NCL", "NCL")
    batch = images(12, shape=(2, 24), seed=3)
    assert check_exits(exits, batch) is not None
    check_runtime(exits, batch, tmp_path)


def test_non_float_inputs_are_refused(tmp_path):
    exits = make_exits(Net(), ["stage1"], images(4))
    with pytest.raises(TypeError, match="float32"):
        exits.export_onnx(tmp_path, example_input=images(4).double())


# -- calibration for a budget -------------------------------------------------------------------


def test_thresholds_for_every_exit_split_the_batch():
    confidence = [torch.tensor([0.9, 0.8, 0.3, 0.2, 0.1, 0.05]), torch.tensor([0.9, 0.9, 0.9, 0.7, 0.1, 0.1])]
    thresholds = thresholds_for_every_exit(confidence)
    assert thresholds is not None
    first = confidence[0] >= thresholds[0]
    second = ~first & (confidence[1] >= thresholds[1])
    assert 0 < int(first.sum()) and 0 < int(second.sum()) and int((~first & ~second).sum()) > 0
