"""Stage discovery: layouts and prefix tokens from evidence, classifiers of every shape,
candidate listings, example inputs, and errors that name the argument that fixes them."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import timm
import torch
import torchvision
from torch import nn

from gradual_sd import (
    ACAM,
    GradualSelfDistiller,
    describe_stages,
    find_classifier_name,
    insert_after,
    list_stages,
)
from gradual_sd.layout import count_prefix_tokens, resolve_layout
from gradual_sd.stages import default_example_input
from gradual_sd.surgery import ChannelsLast

pytestmark = pytest.mark.usefixtures("one_thread")


# --- layout evidence -------------------------------------------------------------------------


@given(
    n=st.integers(1, 4),
    c=st.integers(1, 64),
    h=st.integers(1, 16),
    w=st.integers(1, 16),
    nhwc=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_two_input_sizes_decide_the_layout(n, c, h, w, nhwc):
    """Spatial axes double with the input, the channel axis does not: that alone decides."""
    if nhwc:
        shape, other, expected = (n, h, w, c), (n, 2 * h, 2 * w, c), "NHWC"
    else:
        shape, other, expected = (n, c, h, w), (n, c, 2 * h, 2 * w), "NCHW"
    assert resolve_layout("s", shape, other_shape=other) == expected


def test_layout_from_feature_info_channels_and_declared_format():
    assert resolve_layout("s", (1, 8, 8, 96), channels=96) == "NHWC"
    assert resolve_layout("s", (1, 96, 8, 8), channels=96) == "NCHW"
    assert resolve_layout("s", (1, 8, 8, 8), channels=8, declared="NHWC") == "NHWC"


def test_layout_without_evidence_asks_for_stage_layout():
    with pytest.raises(ValueError, match="stage_layout"):
        resolve_layout("s", (1, 8, 8, 8), channels=8)
    assert resolve_layout("s", (1, 8, 8, 8), requested="NHWC") == "NHWC"


def test_layout_evidence_that_disagrees_is_refused():
    with pytest.raises(ValueError, match="disagrees"):
        resolve_layout("s", (1, 96, 8, 8), other_shape=(1, 96, 16, 16), channels=8)
    with pytest.raises(ValueError, match="stage_layout='NHWC' does not fit"):
        resolve_layout("s", (1, 96, 8, 8), other_shape=(1, 96, 16, 16), requested="NHWC")
    with pytest.raises(ValueError, match="stage_layout must be one of"):
        resolve_layout("s", (1, 96, 8, 8), requested="NWHC")


@given(prefix=st.integers(0, 8), grid=st.integers(1, 64))
@settings(max_examples=60, deadline=None)
def test_prefix_tokens_are_measured(prefix, grid):
    tokens = prefix + grid
    assert count_prefix_tokens("s", tokens, other_tokens=prefix + 4 * grid, declared=99) == prefix
    assert count_prefix_tokens("s", tokens, grid_tokens=grid, declared=99) == prefix


def test_prefix_tokens_requested_against_a_measurement():
    with pytest.raises(ValueError, match="num_prefix_tokens=2 but stage 's' carries 1"):
        count_prefix_tokens("s", 17, grid_tokens=16, requested=2)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        count_prefix_tokens("s", 17)
    assert count_prefix_tokens("s", 17, declared=1) == 1


# --- real models whose layout used to be guessed ----------------------------------------------


def tv_swin():
    torch.manual_seed(0)
    return torchvision.models.swin_t(num_classes=5)


def test_torchvision_swin_stages_are_nhwc():
    """No feature_info, no output_fmt: the two-size probe finds the channels (issue 7's
    silently wrong case built heads on the W axis)."""
    model = tv_swin()
    distiller = GradualSelfDistiller(
        model, ["features.1", "features.3", "features.5"], example_input=torch.zeros(1, 3, 64, 64)
    )
    assert distiller.layouts == ("NHWC", "NHWC", "NHWC")
    assert [s.channels for s in distiller.stages] == [96, 192, 384]
    assert [head.conv.in_channels for head in distiller.heads] == [96, 192, 384]
    assert [s.reduction for s in distiller.stages] == [4, 8, 16]


def test_volo_without_output_fmt_gets_channels_from_feature_info():
    model = timm.create_model("volo_d1_224", num_classes=5, img_size=64)
    with pytest.raises(ValueError, match="example_input"):  # VOLO keeps no record of img_size
        GradualSelfDistiller(model)
    distiller = GradualSelfDistiller(model, example_input=torch.zeros(1, 3, 64, 64))
    info = {e["module"]: e["num_chs"] for e in model.feature_info}
    assert set(distiller.layouts) == {"NHWC"}
    assert [s.channels for s in distiller.stages] == [info[n] for n in distiller.stage_names]


@pytest.mark.parametrize(
    "name,target,channels",
    [("mambaout_femto", "stages.3", 288), ("swin_tiny_patch4_window7_224", "layers.3", 768)],
)
def test_insert_after_nhwc_stage_wraps_attention(name, target, channels):
    kwargs = {"img_size": 64} if name.startswith("swin") else {}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    images = torch.randn(2, 3, 64, 64)
    inserted = insert_after(model, target, example_input=images[:1])
    attention = inserted[target]
    assert isinstance(attention, ACAM) and attention.channels == channels
    wrapper = model.get_submodule(target)[-1]
    assert isinstance(wrapper, ChannelsLast) and wrapper.module is attention
    assert model(images).shape == (2, 5)


def test_insert_after_refuses_token_sequences():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, depth=2)
    with pytest.raises(ValueError, match="token sequences"):
        insert_after(model, "blocks.0")


def test_channels_last_matches_the_module_on_a_permuted_map():
    attention = ACAM(16).double()
    x = torch.randn(2, 5, 6, 16, dtype=torch.float64)
    expected = attention(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(ChannelsLast(attention)(x), expected)


# --- prefix tokens where the model's attribute is missing or wrong ---------------------------


def tiny_torchvision_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )


def test_torchvision_vit_class_token_counted_from_shapes():
    model = tiny_torchvision_vit()
    assert default_example_input(model).shape == (1, 3, 32, 32)
    names = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    distiller = GradualSelfDistiller(model, names)
    assert distiller.num_prefix_tokens == (1, 1)
    assert distiller.classifier_name == "heads.head"
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 4])
    distiller.train()(images, targets).loss.backward()


def test_xcit_blocks_carry_no_class_token():
    """XCiT reports one prefix token, but adds it only after its blocks."""
    model = timm.create_model("xcit_nano_12_p16_224", num_classes=5, img_size=64)
    assert model.num_prefix_tokens == 1
    distiller = GradualSelfDistiller(model, ["blocks.2", "blocks.5"])
    assert distiller.num_prefix_tokens == (0, 0)


# --- classifiers of every shape ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 2}, "head_dist"),
        ("repvit_m0_9", {}, "head.head_dist.l"),
        ("dla46_c", {}, "fc"),
        ("resnet18", {}, "fc"),
        ("sequencer2d_s", {}, "head.fc"),
    ],
)
def test_classifier_of_any_shape(name, kwargs, expected):
    """Tuples and wrappers: the last linear layer to run with num_classes outputs."""
    model = timm.create_model(name, num_classes=5, **kwargs)
    example = torch.zeros(1, 3, 64, 64) if not kwargs else None
    assert find_classifier_name(model, example_input=example) == expected


def test_one_by_one_conv_classifier_trains():
    """DLA's classifier is a 1x1 conv on an (N, D, 1, 1) map: the pre-logits are that map."""
    torch.manual_seed(0)
    model = timm.create_model("dla46_c", num_classes=5)
    distiller = GradualSelfDistiller(model, example_input=torch.zeros(1, 3, 64, 64))
    assert distiller.hidden_size == model.num_features
    out = distiller.train()(torch.randn(2, 3, 64, 64), torch.tensor([1, 2]))
    assert out.head_features[-1].shape == (2, 128)
    out.loss.backward()


def test_squeezenet_pools_its_classifier_input():
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=5)
    distiller = GradualSelfDistiller(
        model, ["features.4", "features.7"], example_input=torch.zeros(1, 3, 64, 64)
    )
    assert distiller.classifier_name == "classifier.1"
    assert distiller.hidden_size == 512
    distiller.train()(torch.randn(2, 3, 64, 64), torch.tensor([0, 1])).loss.backward()


def test_model_without_classifier_names_num_classes():
    model = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="num_classes > 0"):
        GradualSelfDistiller(model, example_input=torch.zeros(1, 3, 32, 32))


def test_classifier_name_without_linear_layer():
    model = timm.create_model("resnet18", num_classes=5)
    with pytest.raises(ValueError, match="classifier_name='global_pool'"):
        GradualSelfDistiller(model, classifier_name="global_pool", example_input=torch.zeros(1, 3, 32, 32))


# --- stage discovery ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("hrnet_w18_small", {}),
        ("twins_svt_small", {"img_size": 64}),
        ("pit_ti_224", {"img_size": 64}),
        ("selecsls42", {}),
        ("coat_tiny", {"img_size": 64}),
        ("crossvit_tiny_240", {"img_size": 240}),
    ],
)
def test_default_stages_where_feature_info_cannot_be_tapped(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs)
    example = None if kwargs else torch.zeros(1, 3, 64, 64)
    distiller = GradualSelfDistiller(model, example_input=example)
    assert len(distiller.stage_names) >= 1
    size = (example if example is not None else default_example_input(model)).shape[-1]
    out = distiller.train()(torch.randn(2, 3, size, size), torch.tensor([0, 4]))
    out.loss.backward()
    assert all(p.grad is not None for p in distiller.heads.parameters())


def test_list_stages_shows_torchvision_candidates():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    stages = {s.name: s for s in list_stages(model, torch.zeros(1, 3, 64, 64))}
    assert stages["layer2"].shape == (1, 128, 8, 8)
    assert stages["layer2"].layout == "NCHW" and stages["layer2"].reduction == 8
    assert "fc" not in stages and "avgpool" in stages


def test_missing_stage_names_error_points_to_list_stages():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(5))
    model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="list_stages"):
        GradualSelfDistiller(model, example_input=torch.zeros(1, 3, 16, 16))


def test_string_stage_names_is_one_stage():
    model = timm.create_model("resnet18", num_classes=5)
    distiller = GradualSelfDistiller(model, "layer2", example_input=torch.zeros(1, 3, 32, 32))
    assert distiller.stage_names == ("layer2",)


def test_vit_built_at_another_size_is_probed_at_that_size():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=64, depth=3)
    assert default_example_input(model).shape == (1, 3, 64, 64)
    GradualSelfDistiller(model)


def test_one_channel_models_get_one_channel_examples():
    model = timm.create_model("resnet18", num_classes=5, in_chans=1)
    assert default_example_input(model).shape[1] == 1


def test_model_failing_on_the_example_names_example_input():
    model = timm.create_model("resnet18", num_classes=5)
    with pytest.raises(ValueError, match="example_input"):
        GradualSelfDistiller(model, example_input=torch.zeros(1, 4, 32, 32))


def test_wrapping_a_wrapped_model_is_refused():
    model = timm.create_model("resnet18", num_classes=5)
    example = torch.zeros(1, 3, 32, 32)
    first = GradualSelfDistiller(model, example_input=example)
    with pytest.raises(ValueError, match="another wrapper's hooks"):
        GradualSelfDistiller(model, example_input=example)
    first.remove()
    GradualSelfDistiller(model, example_input=example).remove()


@pytest.mark.parametrize("factory", [torchvision.models.googlenet, torchvision.models.inception_v3])
def test_torchvision_aux_outputs_train_on_their_main_logits(factory):
    torch.manual_seed(0)
    kwargs = {"init_weights": False, "aux_logits": True}
    model = factory(num_classes=5, **kwargs)
    size = 96 if factory is torchvision.models.googlenet else 299
    example = torch.zeros(1, 3, size, size)
    names = (
        ["inception3b", "inception4e"]
        if factory is torchvision.models.googlenet
        else ["Mixed_5d", "Mixed_6e"]
    )
    distiller = GradualSelfDistiller(model, names, example_input=example)
    images = torch.randn(2, 3, size, size)
    out = distiller.train()(images, torch.tensor([0, 3]))
    assert out.logits.shape == (2, 5)
    out.loss.backward()


def test_describe_stages_is_what_the_distiller_uses():
    model = timm.create_model("resnet18", num_classes=5)
    example = torch.zeros(1, 3, 64, 64)
    described = describe_stages(model, example_input=example)
    distiller = GradualSelfDistiller(model, example_input=example)
    assert described.stages == distiller.stages
    assert described.classifier_name == distiller.classifier_name == "fc"


class SharedBlock(nn.Module):
    """Runs one block twice: a hook on it would see only the second call."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.block = nn.Conv2d(8, 8, 3, 1, 1)
        self.down = nn.Conv2d(8, 16, 3, 2, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.block(self.block(self.stem(x)))
        return self.fc(self.down(x).mean((2, 3)))


def test_modules_that_run_twice_are_refused_and_not_listed():
    model = SharedBlock()
    example = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\{'block': 2\} run more than once"):
        GradualSelfDistiller(model, ["block"], example_input=example)
    assert "block" not in {s.name for s in list_stages(model, example)}
