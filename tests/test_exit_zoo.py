"""Every model the distiller zoo tests train, as early exits: timm's families and Hugging Face's
image classifiers, built as in ``test_zoo.py`` and ``test_hf_zoo.py``.

Each either exits correctly (``exit_zoo.check_exits``) or is refused at construction with a
``ValueError`` naming the stage (the models in ``REFUSED``). Exported to ONNX, the runtime must
give the same exits (``exit_zoo.check_runtime``): CI runs that for the models in ``ONNX_CI``,
one per kind of stage output (NCHW, NHWC, tokens with a class token, tuple stages, Hugging Face
outputs), as the export takes tens of seconds per model; ``GRADUAL_SD_ONNX_ZOO=all`` runs it for
every model that exits.
"""

from __future__ import annotations

import os

import pytest
import torch

from gradual_sd import EarlyExitModel, GradualSelfDistiller
from gradual_sd._stages import default_example_input

from exit_zoo import check_exits, check_runtime, spread_confidences
from test_zoo import REFUSED as TIMM_TRAIN_REFUSED
from test_zoo import wrap_as_a_user_would
from zoo import cached_families

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ALL_ONNX = os.environ.get("GRADUAL_SD_ONNX_ZOO") == "all"

# Models whose exits are refused, and what the refusal says.
REFUSED: dict[str, str] = {
    # Serial and parallel blocks that exchange maps at several scales.
    "coat": "samples cannot leave at stage 'serial_blocks1.1'",
    # Two encoders (SAM and CLIP) whose features are combined.
    "deepseek_vit": "samples cannot leave at stage 'encoder.blocks.7'",
    # The classifier reads every stage's output (a multi-stage head).
    "efficientvim": "samples cannot leave at stage 'stages.1'",
    # Fuse layers mix every resolution branch.
    "hrnet": "samples cannot leave at stage 'incre_modules.1'",
    # Each cell reads the outputs of the two cells before it.
    "nasnet": "samples cannot leave at stage 'cell_stem_1.conv_1x1.act'",
    "pnasnet": "samples cannot leave at stage 'cell_stem_1.conv_1x1.act'",
    # Reshapes to the batch size it read from the input.
    "qwen3_vit": "samples cannot leave at stage 'encoder.blocks.2'",
    "twins": "samples cannot leave at stage 'blocks.0.1'",
    # Its pixel embeddings fold the batch and the patches into one axis.
    "tnt": "samples cannot leave at stage 'blocks.2'",
    # The default stage lies inside a block whose shortcut reads the block's input.
    "xception": "samples cannot leave at stage 'block2.rep.0'",
    "xception_aligned": "samples cannot leave at stage 'blocks.1.stack.act3'",
}
PERCEIVER = "samples cannot leave at stage 'perceiver.encoder.self_attends.0'"
# The same for Hugging Face classes.
HF_REFUSED: dict[str, str] = {
    # Reshapes its last hidden state to the batch size of the input ids.
    "ImageGPTForImageClassification": "samples cannot leave at stage 'transformer.h.0'",
    # Expand their latents to the input's batch size before the encoder.
    **{
        f"PerceiverForImageClassification{kind}": PERCEIVER
        for kind in ("ConvProcessing", "Fourier", "Learned")
    },
    # Reshape each stage's output to the batch size read from the input.
    "PvtForImageClassification": "samples cannot leave at stage 'pvt.encoder.block.0.0'",
    "PvtV2ForImageClassification": "samples cannot leave at stage 'pvt_v2.encoder.layers.0.blocks.0'",
}
# Models the exporter refuses (with a ValueError saying why), among those that exit in PyTorch.
ONNX_REFUSED: dict[str, str] = {}
# Exported in CI: one of each kind of stage output.
ONNX_CI = {
    "resnet",  # NCHW
    "vision_transformer",  # tokens with a class token
    "swin_transformer",  # NHWC
    "pit",  # stages that return (tokens, class tokens)
    "ResNetForImageClassification",  # Hugging Face outputs, tuple stages
    "ViTForImageClassification",
    "ConvNextForImageClassification",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "family" in metafunc.fixturenames:
        families = {f: m for f, m in cached_families(metafunc.config).items() if f not in TIMM_TRAIN_REFUSED}
        metafunc.parametrize("family,model_name", sorted(families.items()), ids=sorted(families))
    if "class_name" in metafunc.fixturenames:
        hf_zoo = pytest.importorskip("hf_zoo")
        from test_hf_zoo import NEEDS
        from test_hf_zoo import REFUSED as HF_TRAIN_REFUSED

        cases = [
            (t, c) for t, c in hf_zoo.image_classifiers() if c not in HF_TRAIN_REFUSED and c not in NEEDS
        ]
        metafunc.parametrize("model_type,class_name", cases, ids=[c for _, c in cases])


def batch_like(example: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` random inputs shaped like ``example``: images, or token ids below 16 (every
    tiny config's vocabulary is larger)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (count, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, generator=generator)
    return torch.randint(0, 16, shape, generator=generator, dtype=example.dtype)


def check(distiller: GradualSelfDistiller, name: str, example: torch.Tensor, tmp_path) -> None:
    """Exit correctly or be refused as ``REFUSED`` says; export where asked."""
    distiller.eval()
    probe = batch_like(example, 4, seed=0)
    refused = REFUSED.get(name) or HF_REFUSED.get(name)
    if refused is not None:
        with pytest.raises(ValueError) as refusal:
            EarlyExitModel.from_distiller(distiller, example_input=probe)
        assert refused in str(refusal.value), refusal.value
        return
    exits = EarlyExitModel.from_distiller(distiller, example_input=probe)
    # Room for samples to leave at every exit; fewer for models that only run at a large size
    # (SAM2's Hiera at 1024 px), where every pass is seconds.
    per_exit = 3 if example[0].numel() <= 3 * 256 * 256 else 1
    images = batch_like(example, per_exit * (len(exits.heads) + 1) + 1, seed=1)
    spread_confidences(exits, images)
    thresholds = check_exits(exits, images)
    if not (ALL_ONNX or name in ONNX_CI) or not example.is_floating_point():
        return  # the runtime takes float32 images, not token ids (ImageGPT)
    assert thresholds is not None, f"{name}: no batch where samples leave at every exit"
    if name in ONNX_REFUSED:
        with pytest.raises(ValueError) as refusal:
            exits.export_onnx(tmp_path, example_input=images)
        assert ONNX_REFUSED[name] in str(refusal.value), refusal.value
        return
    check_runtime(exits, images, tmp_path)


def test_timm_family(family: str, model_name: str, tmp_path) -> None:
    distiller, size, _ = wrap_as_a_user_would(model_name)
    check(distiller, family, torch.zeros(1, 3, size, size), tmp_path)


def test_hf_class(model_type: str, class_name: str, tmp_path) -> None:
    from hf_zoo import build

    model = build(model_type, class_name)
    example = default_example_input(model)
    check(GradualSelfDistiller(model), class_name, example, tmp_path)
