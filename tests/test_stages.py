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
    default_stage_names,
    describe_stages,
    find_classifier_name,
    insert_after,
    list_stages,
)
from gradual_sd._discovery import spread
from gradual_sd._layout import count_prefix_tokens, resolve_layout
from gradual_sd._stages import default_example_input
from gradual_sd._surgery import ChannelsLast
from gradual_sd._taps import tapped_by

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
    assert out.pre_logits.shape == (2, model.num_features)  # the map, pooled
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


# --- classifier choice follows the returned logits --------------------------------------------


class AuxHeadNet(nn.Module):
    """An auxiliary K-way head that runs after the main one and is not part of the logits."""

    def __init__(self, aux_first: bool = False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1))
        self.main = nn.Linear(16, 5)
        self.aux = nn.Linear(8, 5)
        self.aux_first = aux_first

    def forward(self, x):
        early = self.features[1](self.features[0](x))
        if self.aux_first:
            self.aux_logits = self.aux(early.mean((2, 3)))
        logits = self.main(self.features[2](early).mean((2, 3)))
        if not self.aux_first:
            self.aux_logits = self.aux(early.mean((2, 3)))
        return logits


@pytest.mark.parametrize("aux_first", [False, True])
def test_an_auxiliary_head_is_never_the_classifier(aux_first):
    model = AuxHeadNet(aux_first)
    example = torch.zeros(1, 3, 16, 16)
    assert find_classifier_name(model, example_input=example) == "main"
    distiller = GradualSelfDistiller(model, ["features.1"], example_input=example)
    assert distiller.hidden_size == 16  # the main head's input, not the auxiliary's 8


class AdapterOfDict(nn.Module):
    """A dict-returning model behind a small adapter, with an auxiliary head running last."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1))
        self.classifier = nn.Linear(16, 4)
        self.aux_classifier = nn.Linear(16, 4)

    def forward(self, x):
        pooled = self.body(x).mean((2, 3))
        out = {"logits": self.classifier(pooled), "aux": self.aux_classifier(pooled.detach())}
        return out["logits"] * 2.0  # the logits are computed from the classifier's output


def test_logits_computed_from_a_head_pick_that_head():
    model = AdapterOfDict()
    assert find_classifier_name(model, example_input=torch.zeros(1, 3, 16, 16)) == "classifier"


class TwoUnusedHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head_a = nn.Linear(4, 3)
        self.head_b = nn.Linear(4, 3)

    def forward(self, x):
        pooled = self.conv(x).mean((2, 3))
        self.head_a(pooled), self.head_b(pooled)
        return torch.zeros(x.shape[0], 3) + pooled.sum(1, keepdim=True)  # from neither head


def test_logits_from_no_head_list_the_candidates():
    with pytest.raises(ValueError, match=r"\['head_a', 'head_b'\].*pass classifier_name"):
        find_classifier_name(TwoUnusedHeads(), example_input=torch.zeros(1, 3, 8, 8))


def test_returned_feature_map_names_global_pool():
    model = timm.create_model("resnet18", num_classes=5, global_pool="")
    with pytest.raises(ValueError, match="global_pool=''"):
        GradualSelfDistiller(model, example_input=torch.zeros(1, 3, 32, 32))


def test_dict_output_says_wrap_it():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return {"scores": self.fc(self.conv(x).mean((2, 3)))}

    with pytest.raises(ValueError, match="a dict with no .*Wrap it so it takes images and returns logits"):
        GradualSelfDistiller(DictOut(), ["conv"], example_input=torch.zeros(1, 3, 8, 8))


def test_two_input_model_says_wrap_it():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, images, mask):
            return self.fc(self.conv(images * mask).mean((2, 3)))

    with pytest.raises(ValueError, match=r"needs \['images', 'mask'\]: wrap it"):
        GradualSelfDistiller(TwoInputs(), ["conv"], example_input=torch.zeros(1, 3, 8, 8))


def test_model_built_for_another_size_names_img_size():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, depth=2)
    with pytest.raises(ValueError, match=r"built for \(224, 224\).*img_size="):
        GradualSelfDistiller(model, example_input=torch.zeros(1, 3, 64, 64))


# --- wrapped models ------------------------------------------------------------------------------


def test_compiled_model_is_refused_with_the_order_to_wrap_in():
    model = torch.compile(timm.create_model("resnet18", num_classes=5), backend="eager")
    with pytest.raises(TypeError, match=r"model\._orig_mod.*compile after wrapping"):
        GradualSelfDistiller(model)
    assert tapped_by(model._orig_mod) == []


@pytest.mark.parametrize(
    "name,stages",
    [
        ("resnet18", ("layer1", "layer2", "layer3")),
        ("swin_tiny_patch4_window7_224", ("layers.0", "layers.1", "layers.2")),
    ],
)
def test_data_parallel_model_is_refused_and_its_module_wraps(name, stages):
    """The issue's DataParallel Swin got heads on a block's MLP branch; the wrapper is refused and
    its module gets the stage outputs."""
    kwargs = {"img_size": 64} if name.startswith("swin") else {}
    model = timm.create_model(name, num_classes=5, **kwargs)
    example = torch.zeros(1, 3, 64, 64)
    with pytest.raises(TypeError, match=r"model\.module.*DataParallel\(GradualSelfDistiller"):
        GradualSelfDistiller(nn.DataParallel(model), example_input=example)
    with pytest.raises(TypeError, match="DataParallel"):
        list_stages(nn.DataParallel(model), example)
    distiller = GradualSelfDistiller(nn.DataParallel(model).module, example_input=example)
    assert distiller.stage_names == stages


# --- (N, C, L) sequences -----------------------------------------------------------------------


class Conv1dNet(nn.Module):
    """A 1-D CNN over (N, C, L) sequences, as for audio or time series."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 16, 5, 2, 2)
        self.stage1 = nn.Sequential(nn.Conv1d(16, 24, 3, 2, 1), nn.BatchNorm1d(24), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv1d(24, 32, 3, 2, 1), nn.BatchNorm1d(32), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv1d(32, 40, 3, 2, 1), nn.BatchNorm1d(40), nn.ReLU())
        self.fc = nn.Linear(40, 3)

    def forward(self, x):
        return self.fc(self.stage3(self.stage2(self.stage1(self.stem(x)))).mean(2))


def test_channels_first_sequences_get_heads_over_their_channels():
    model = Conv1dNet()
    example = torch.zeros(1, 2, 128)
    distiller = GradualSelfDistiller(model, example_input=example)
    assert distiller.stage_names == ("stage1", "stage2")
    assert distiller.layouts == ("NCL", "NCL")
    assert [h.conv.in_channels for h in distiller.heads] == [24, 32]  # channels, not the 32 and 16 steps
    assert [s.reduction for s in distiller.stages] == [4, 8]
    seen = []
    distiller.heads[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    out = distiller.train()(torch.randn(3, 2, 96), torch.tensor([0, 1, 2]))  # another length
    out.loss.backward()
    assert seen == [(3, 24, 24, 1)]
    assert all(p.grad is not None for p in distiller.heads.parameters())


def test_a_layout_against_the_evidence_is_refused():
    model, example = Conv1dNet(), torch.zeros(1, 2, 128)
    with pytest.raises(ValueError, match="stage_layout='NLC' does not fit stage 'stage1'"):
        GradualSelfDistiller(model, ["stage1"], stage_layout="NLC", example_input=example)
    with pytest.raises(ValueError, match="num_prefix_tokens=1 but stage 'stage1'.*channels-first"):
        GradualSelfDistiller(model, ["stage1"], num_prefix_tokens=1, example_input=example)
    assert resolve_layout("s", (1, 24, 32), other_shape=(1, 24, 64)) == "NCL"
    assert resolve_layout("s", (1, 32, 24), other_shape=(1, 64, 24)) == "NLC"


def test_sequence_models_need_an_example():
    with pytest.raises(ValueError, match="Conv1d.*pass example_input"):
        GradualSelfDistiller(Conv1dNet())


class FixedLengthCRNN(nn.Module):
    """Convolutions to (N, 128, 1, W), squeezed to (N, 128, W) frames; takes one size only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 128, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 16)))
        self.frames = nn.Conv1d(128, 128, 3, 1, 1)
        self.fc = nn.Linear(128 * 16, 4)

    def forward(self, x):
        if x.shape[-2:] != (32, 64):
            raise ValueError("this model takes 32x64 inputs")
        frames = self.frames(self.conv(x).squeeze(2))
        return self.fc(frames.flatten(1))


def test_fixed_size_sequence_reads_its_layout_from_its_layers():
    """One input size only: the channel axis is the one the module's own layers produce (the
    issue's CRNN got heads over its 16 frames)."""
    distiller = GradualSelfDistiller(FixedLengthCRNN(), ["frames"], example_input=torch.zeros(1, 1, 32, 64))
    assert distiller.layouts == ("NCL",) and distiller.stages[0].channels == 128


# --- default taps a user can afford --------------------------------------------------------------


@given(intermediate=st.integers(0, 40), max_heads=st.integers(1, 6))
@settings(max_examples=60, deadline=None)
def test_spread_picks_evenly_spaced_stages(intermediate, max_heads):
    names = [f"blocks.{i}" for i in range(intermediate)]
    picked = spread(names, max_heads)
    assert len(picked) == min(intermediate, max_heads)
    assert picked == sorted(picked, key=names.index) and len(set(picked)) == len(picked)
    assert spread(names, None) == names


def test_isotropic_models_get_three_evenly_spaced_blocks():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32)

    def stages(**kwargs):
        with GradualSelfDistiller(model, **kwargs) as distiller:
            return distiller.stage_names

    assert stages() == ("blocks.2", "blocks.5", "blocks.8")  # after 3, 6 and 9 of 12 blocks
    assert stages(max_heads=1) == ("blocks.5",)
    assert stages(max_heads=None) == tuple(f"blocks.{i}" for i in range(11))
    with pytest.raises(ValueError, match="max_heads must be a positive int"):
        GradualSelfDistiller(model, max_heads=0)


class Blocks(nn.Module):
    """An isotropic model without feature_info: a patch embedding, then numbered blocks."""

    def __init__(self, depth=8):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU()) for _ in range(depth)
        )
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((2, 3)))


def test_isotropic_blocks_from_the_shapes():
    distiller = GradualSelfDistiller(Blocks(8), example_input=torch.zeros(1, 3, 32, 32))
    assert distiller.stage_names == ("blocks.1", "blocks.3", "blocks.5")


class FourBlockCNN(nn.Module):
    """A hand-written CNN: four blocks, the first at the input's resolution."""

    def __init__(self):
        super().__init__()
        widths = [3, 8, 16, 24, 32]
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(a, b, 3, 1 if i == 0 else 2, 1), nn.BatchNorm2d(b), nn.ReLU())
                for i, (a, b) in enumerate(zip(widths, widths[1:]))
            )
        )
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3)))


def test_a_plain_cnn_with_several_resolutions_gets_several_heads():
    distiller = GradualSelfDistiller(FourBlockCNN(), example_input=torch.zeros(1, 3, 32, 32))
    assert distiller.stage_names == ("blocks.0", "blocks.1", "blocks.2")


def test_stem_and_next_stage_convolution_are_not_stages():
    """torchvision ResNet: layer1..3, not the stem at reduction 2 nor layer2's first
    convolution, which still runs at layer1's resolution."""
    model = torchvision.models.resnet50(num_classes=5)
    assert default_stage_names(model, torch.zeros(1, 3, 64, 64)) == ["layer1", "layer2", "layer3"]


def test_insert_after_refuses_sequences_before_asking_about_them():
    """insert_after takes no num_prefix_tokens: a sequence is refused for what it is."""
    with pytest.raises(ValueError, match=r"\{'stage1': \(1, 24, 32\)\} output token sequences") as error:
        insert_after(Conv1dNet(), "stage1", example_input=torch.zeros(1, 2, 128))
    assert "num_prefix_tokens" not in str(error.value) and "stage_layout" not in str(error.value)


def test_per_token_logits_name_the_missing_head_not_global_pool():
    """An encoder returning (N, L, K): no pooled head; global_pool is named only where it is set."""

    class TokenLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, 4)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            return self.head(self.embed(x).flatten(2).transpose(1, 2))

    with pytest.raises(ValueError, match="no pooled classification head") as error:
        GradualSelfDistiller(TokenLogits(), ["embed"], example_input=torch.zeros(1, 3, 16, 16))
    assert "global_pool" not in str(error.value)


class SpectrogramNet(nn.Module):
    """An audio model as a user writes it: a 2-D convolution over an (N, 1, F, T) spectrogram,
    its map reshaped to (N, C*F, T) frames for 1-D convolutions. It takes one size only (the
    frames' width is fixed), and its first frames (N, 128, 32) have as many positions as the
    map (32 x 4) and as many frames as the map has channels."""

    def __init__(self):
        super().__init__()
        self.front = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(nn.Conv1d(128, 128, 3, s, 1), nn.BatchNorm1d(128), nn.ReLU())
                for s in (1, 2, 2, 2)
            )
        )
        self.fc = nn.Linear(128, 4)

    def forward(self, x):
        return self.fc(self.blocks(self.front(x).flatten(1, 2)).mean(2))


def test_frames_reshaped_from_a_map_are_channels_first():
    """The map the frames were reshaped from reads as their tokens (the held-out audio model got
    a head over its 32 frames); it reads as their channels-first reshape too, so it says nothing,
    and the frames' own layers (128 wide) and the classifier's input decide."""
    torch.manual_seed(0)
    example = torch.zeros(1, 1, 8, 64)
    distiller = GradualSelfDistiller(SpectrogramNet(), ["blocks.0", "blocks.2"], example_input=example)
    assert distiller.layouts == ("NCL", "NCL")
    assert [h.conv.in_channels for h in distiller.heads] == [128, 128]
    out = distiller.train()(torch.randn(2, 1, 8, 64), torch.tensor([0, 3]))
    out.loss.backward()
    assert all(p.grad is not None for p in distiller.heads.parameters())
    listed = {s.name: s for s in list_stages(SpectrogramNet(), example)}
    assert (listed["blocks.0"].layout, listed["blocks.0"].channels) == ("NCL", 128)


@pytest.mark.parametrize("layout", [None, "NCHW", "NHWC"])
def test_a_pooled_output_named_as_a_stage_is_refused_whatever_the_layout(layout):
    model = timm.create_model("test_convnext", num_classes=5)
    with pytest.raises(
        ValueError, match=r"'head.global_pool' outputs \(1, \d+, 1, 1\), pooled to one position"
    ):
        GradualSelfDistiller(model, ["head.global_pool"], stage_layout=layout)
    assert tapped_by(model) == []


def test_a_dict_with_logits_is_read_like_a_logits_field():
    class DictLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return {"logits": self.fc(self.conv(x).mean((2, 3))), "aux": x.mean()}

    torch.manual_seed(0)
    model = DictLogits()
    distiller = GradualSelfDistiller(model, ["conv"], example_input=torch.zeros(1, 3, 8, 8))
    images = torch.randn(2, 3, 8, 8)
    distiller.train()(images, torch.tensor([0, 1])).loss.backward()
    distiller.eval()
    assert torch.equal(distiller(images).logits, model(images)["logits"])


def forwards_at_construction(model, **kwargs):
    """How many times the model runs while a distiller is built around it."""
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    GradualSelfDistiller(model, **kwargs).remove()
    handle.remove()
    return calls


def test_construction_runs_each_dry_run_once():
    """timm's feature_info vouches for its stages: one run. torchvision's need the second run,
    at twice the size with one more image, for the batch axis and the layouts: two."""
    example = torch.zeros(1, 3, 64, 64)
    assert (
        len(forwards_at_construction(timm.create_model("resnet18", num_classes=5), example_input=example))
        == 1
    )
    runs = forwards_at_construction(torchvision.models.resnet18(num_classes=5), example_input=example)
    assert runs == [(1, 3, 64, 64), (2, 3, 128, 128)]
