"""Stage discovery's decisions as pure functions, on records written out by hand: what one
output is (``describe``) and which outputs are the default stages (``choose_stages``,
``default_stages``). No model runs here."""

import pytest

from gradual_sd._discovery import Ran, choose_stages, default_stages, share_after
from gradual_sd._layout import LayoutError
from gradual_sd._outputs import NotAStage, Observation, Output, Reason, StageInfo, describe


def seen(shape, other=None, *, scaled=True, positions=(32, 32), **evidence):
    """One tensor output at a one-image example, and at the second run's input."""
    second = Output("tensor", (other,)) if other is not None else None
    return Observation("s", Output("tensor", (shape,)), 1, positions, second, scaled, **evidence)


# --- one output --------------------------------------------------------------------------------


def test_tokens_at_two_sizes_give_layout_prefix_and_reduction():
    """A ViT block at 32 px with 8 px patches: 16 patches and a class token, 64 at 64 px."""
    stage = describe(seen((1, 17, 32), (2, 65, 32)))
    assert stage == StageInfo("s", (1, 17, 32), "NLC", 32, 8.0, 1, None)


def test_a_map_whose_sides_double_is_channels_last():
    stage = describe(seen((1, 8, 8, 96), (2, 16, 16, 96)))
    assert (stage.layout, stage.channels, stage.reduction) == ("NHWC", 96, 4.0)


def test_a_latent_array_has_no_reduction():
    """Perceiver's latents: the sequence does not grow with the input."""
    stage = describe(seen((1, 16, 32), (2, 16, 32), widths=(("its own layers", (32,)),)))
    assert (stage.layout, stage.reduction, stage.num_prefix_tokens) == ("NLC", None, 0)


@pytest.mark.parametrize("layout", [None, "NCHW", "NHWC"])
def test_a_pooled_map_is_no_stage_whatever_the_layout_says(layout):
    with pytest.raises(NotAStage, match="pooled to one position.*whatever stage_layout") as error:
        describe(seen((1, 512, 1, 1), (2, 512, 1, 1)), stage_layout=layout)
    assert error.value.reason is Reason.POOLED


def test_a_pooled_vector_is_no_stage():
    with pytest.raises(NotAStage, match=r"a pooled \(N, C\) vector") as error:
        describe(seen((1, 512), (2, 512)))
    assert error.value.reason is Reason.POOLED


def test_a_one_by_one_map_that_grows_with_the_input_is_a_stage():
    """A deep stage at a small example is 1x1, but 2x2 at twice the size: a map, not a pooler."""
    stage = describe(seen((1, 512, 1, 1), (2, 512, 2, 2), channels=512))
    assert (stage.layout, stage.reduction) == ("NCHW", 32.0)


def test_a_one_by_one_map_seen_at_one_size_is_refused():
    with pytest.raises(NotAStage) as error:
        describe(seen((1, 512, 1, 1), (2, 512, 1, 1), scaled=False, channels=512))
    assert error.value.reason is Reason.POOLED


@pytest.mark.parametrize("shape,layout", [((1, 1, 48), "NLC"), ((1, 48, 1, 1), "NCHW")])
def test_one_position_at_the_only_size_a_model_takes_is_the_users_to_name(shape, layout):
    """LeViT built for 64 px takes no other size, and its second stage has one token there:
    pooled or a 1x1 map cannot be told, so the refusal says so and how to tap it anyway; named
    with its layout, it is a stage (a larger example would have shown it growing)."""
    one_size = seen(shape, (2, *shape[1:]), scaled=False, positions=(64, 64))
    with pytest.raises(
        NotAStage, match=rf"one position at 64x64, the only input size .*stage_layout='{layout}'"
    ):
        describe(one_size)
    stage = describe(one_size, stage_layout=layout)
    assert (stage.layout, stage.channels, stage.reduction) == (layout, 48, 64.0)
    # Where a larger input ran and the output stayed one position, it is pooled: still refused.
    with pytest.raises(NotAStage, match="pooled to one position.*whatever stage_layout"):
        describe(seen(shape, (2, *shape[1:])), stage_layout=layout)


@pytest.mark.parametrize(
    "shape,other",
    [((4, 49, 96), None), ((1, 49, 96), (8, 196, 96))],  # windows folded into the batch axis
)
def test_an_output_whose_first_axis_is_not_the_batch_is_no_stage(shape, other):
    with pytest.raises(NotAStage, match="not the batch") as error:
        describe(seen(shape, other))
    assert error.value.reason is Reason.BATCH_FOLDED


def test_a_tuple_output_is_tapped_at_its_feature_tensor():
    """TNT's blocks return pixel and patch tokens: the element with feature_info's channels."""
    output = Output("tuple", ((1, 16, 24), None, (1, 17, 64)))
    other = Output("tuple", ((2, 64, 24), None, (2, 65, 64)))
    obs = Observation("blocks.0", output, 1, (32, 32), other, True, channels=64)
    stage = describe(obs)
    assert (stage.element, stage.shape, stage.layout, stage.num_prefix_tokens) == (2, (1, 17, 64), "NLC", 1)


def test_an_output_with_no_feature_tensor_is_no_stage():
    obs = Observation("s", Output("tuple", (None, (1, 5))), 1, (32, 32))
    with pytest.raises(NotAStage, match=r"outputs a tuple of \[a non-tensor, \(1, 5\)\]") as error:
        describe(obs)
    assert error.value.reason is Reason.NO_FEATURES


def test_one_source_of_widths_decides_a_sequence_at_one_size():
    """One input size only: the module's own layers say which axis is the channels."""
    frames = seen((1, 128, 32), (2, 128, 32), scaled=False, widths=(("its own layers", (128,)),))
    assert describe(frames).layout == "NCL"
    widths = (("its own layers", (32,)),)
    tokens = seen((1, 128, 32), (2, 128, 32), scaled=False, widths=widths, grid_tokens=128)
    assert describe(tokens).layout == "NLC"


def test_sources_of_widths_that_disagree_decide_nothing():
    widths = (("its own layers", (128,)), ("the map its tokens come from", (32,)))
    obs = seen((1, 128, 32), (2, 128, 32), scaled=False, widths=widths)
    with pytest.raises(LayoutError, match=r"disagree \(its own layers for NCL, the map .* for NLC\)"):
        describe(obs)
    assert describe(obs, stage_layout="NCL").channels == 128  # the user settles it


def test_sizes_outrank_widths():
    obs = seen((1, 128, 32), (2, 128, 64), widths=(("its own layers", (32,)),))
    assert describe(obs).layout == "NCL"


# --- default stages ----------------------------------------------------------------------------


def s(name, reduction, shape=(1, 8, 4, 4), layout="NCHW"):
    return StageInfo(name, shape, layout, shape[1], reduction)


RESNET = [
    s("conv1", 2),
    s("bn1", 2),
    s("maxpool", 4),
    s("layer1.0", 4),
    s("layer1.1", 4),
    s("layer1", 4),
    s("layer2.0.conv1", 4),  # the next stage's first convolution, still at layer1's resolution
    s("layer2.0", 8),
    s("layer2.1", 8),
    s("layer2", 8),
    s("layer3.0", 16),
    s("layer3", 16),
    s("layer4.0", 32),
    s("layer4", 32),
]


def test_a_hierarchical_model_gets_the_module_that_finishes_each_resolution():
    assert choose_stages(RESNET, 3) == ["layer1", "layer2", "layer3", "layer4"]
    assert choose_stages(RESNET, 1) == ["layer2", "layer4"]


def test_the_stem_gets_a_head_where_few_resolutions_follow():
    stem = [s("stem.conv", 2), s("stem", 2)]
    stages = [*stem, s("block1.0", 4), s("block1", 4), s("block2.0", 8), s("block2", 8)]
    assert choose_stages(stages, 3) == ["stem", "block1", "block2"]
    assert choose_stages([*stages, s("block3.0", 16), s("block3", 16)], 3) == ["block1", "block2", "block3"]


def test_an_output_a_finer_resolution_follows_is_off_the_main_path():
    """A strided key/value projection inside attention (reduction 16) is followed by the block
    at 8 that does not contain it."""
    stages = [s("stem", 4), s("s1", 4), s("s2.attn.kv", 16), s("s2.0", 8), s("s2", 8), s("s3", 16)]
    assert choose_stages(stages, 3) == ["s1", "s2", "s3"]


def test_an_isotropic_model_gets_evenly_spaced_blocks():
    tokens = (1, 16, 32)
    stages = [s("embed", 8)] + [s(f"blocks.{i}", 8, tokens, "NLC") for i in range(12)]
    assert choose_stages(stages, 3) == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert choose_stages(stages, None) == [f"blocks.{i}" for i in range(12)]


def test_one_resolution_without_a_run_of_blocks_finds_nothing():
    assert choose_stages([s("conv", 4), s("act", 4)], 3) == []


PERCEIVER = [s("embed.conv", 2), s("embed", 4)] + [
    s(f"latent.{i}", None, (1, 16, 32), "NLC") for i in range(4)
]


def ran(name, parameters, spread_out=True):
    return Ran(name, parameters, spread_out)


def test_most_work_after_the_last_resolution_makes_the_blocks_there_the_stages():
    work = [ran("embed.conv", 100), ran("embed", 0)] + [ran(f"latent.{i}", 1000) for i in range(4)]
    assert share_after(work, PERCEIVER, "embed", 4100) == pytest.approx(4000 / 4100)
    assert default_stages(PERCEIVER, work, 4100, 3, "Perceiver") == [f"latent.{i}" for i in range(4)]


def test_most_work_after_the_last_resolution_and_no_run_is_refused():
    listed = PERCEIVER[:2] + [s("latent", None, (1, 16, 32), "NLC")]
    work = [ran("embed.conv", 100), ran("embed", 0), ran("latent", 4000)]
    with pytest.raises(ValueError, match=r"98% of its parameters run after .*'embed'.*Pass stage_names"):
        default_stages(listed, work, 4100, 3, "Perceiver")


def test_fewer_than_two_stages_lists_the_outermost_candidates():
    listed = [s("conv", 4), s("conv.inner", 4), s("pool", 8, (1, 8, 1, 1), None)]
    with pytest.raises(ValueError, match=r"the outermost are: conv \(1, 8, 4, 4\), pool"):
        default_stages(listed, [ran("conv", 10), ran("pool", 0, False)], 10, 3, "Net")
