"""ACAM against an independent float64 reference, and inside timm models."""

from functools import partial

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import SEModule, create_attn

from gradual_sd import ACAM, NormalizedACAM


def reference_acam(module: ACAM, x: torch.Tensor) -> np.ndarray:
    """ACAM written out per sample from the module's raw weights, in float64 numpy."""
    p = {k: v.detach().double().numpy() for k, v in module.state_dict().items()}
    c, rd = module.channels, module.rd_channels
    w1a, w1m = p["weight_fc1.weight"][:rd, :, 0], p["weight_fc1.weight"][rd:, :, 0]
    b1a, b1m = p["weight_fc1.bias"][:rd], p["weight_fc1.bias"][rd:]
    w2a, w2m = p["weight_fc2.weight"][0, :, 0], p["weight_fc2.weight"][1, :, 0]
    b2a, b2m = p["weight_fc2.bias"]
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    shared = lambda v: p["fc2.weight"] @ relu(p["fc1.weight"] @ v + p["fc1.bias"]) + p["fc2.bias"]  # noqa: E731
    xs = x.detach().double().numpy()
    out = np.empty_like(xs)
    for n in range(xs.shape[0]):
        avg = xs[n].reshape(c, -1).mean(axis=1)
        mx = xs[n].reshape(c, -1).max(axis=1)
        weight_avg = w2a @ relu(w1a @ avg + b1a) + b2a
        weight_max = w2m @ relu(w1m @ mx + b1m) + b2m
        if module.normalize_weights:
            e = np.exp([weight_avg, weight_max])
            weight_avg, weight_max = e / e.sum()
        attn = 1.0 / (1.0 + np.exp(-(shared(avg) * weight_avg + shared(mx) * weight_max)))
        out[n] = xs[n] * attn[:, None, None]
    return out


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Default init leaves biases small; random weights make every path matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 40),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    rd_ratio=st.sampled_from([1 / 16, 0.25, 1.0]),
    normalize=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_acam_matches_reference(batch, channels, height, width, rd_ratio, normalize):
    module = ACAM(channels, rd_ratio=rd_ratio, normalize_weights=normalize).double()
    randomize(module)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64)
    np.testing.assert_allclose(module(x).detach().numpy(), reference_acam(module, x), rtol=1e-10, atol=1e-12)


@given(dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), channels=st.integers(1, 33))
@settings(max_examples=15, deadline=None)
def test_acam_keeps_shape_and_dtype(dtype, channels):
    module = ACAM(channels, dtype=dtype)
    x = torch.randn(2, channels, 3, 5, dtype=dtype)
    out = module(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


def test_acam_gradients_reach_every_parameter_and_input():
    module = ACAM(8, rd_ratio=0.25)
    randomize(module)
    x = torch.randn(2, 8, 2, 3, dtype=torch.float64, requires_grad=True)  # gradcheck is O(numel)
    module.double()
    assert torch.autograd.gradcheck(module, (x,))
    module(x).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_branch_weights_are_per_sample_and_can_be_negative():
    module = ACAM(16)
    randomize(module, seed=3)
    pooled = torch.randn(64, 2, 16)
    weights = module.branch_weights(pooled)
    assert weights.shape == (64, 2, 1)
    assert (weights < 0).any() and (weights > 0).any()  # reference default: unnormalised
    normalized = NormalizedACAM(16)
    normalized.load_state_dict(module.state_dict())
    proportions = normalized.branch_weights(pooled)
    torch.testing.assert_close(proportions.sum(1), torch.ones(64, 1))
    torch.testing.assert_close(proportions, weights.softmax(1))


def test_acam_reduces_to_cbam_channel_gate_with_unit_weights():
    """With both branch weights fixed at 1, ACAM is CBAM's channel gate (shared MLP, summed)."""
    module = ACAM(8, rd_ratio=0.5)
    randomize(module)
    with torch.no_grad():
        module.weight_fc1.weight.zero_()
        module.weight_fc1.bias.zero_()
        module.weight_fc2.weight.zero_()
        module.weight_fc2.bias.fill_(1.0)
    cbam = timm.layers.cbam.ChannelAttn(8, rd_channels=module.rd_channels, mlp_bias=True)
    with torch.no_grad():
        cbam.fc1.weight.copy_(module.fc1.weight[:, :, None, None])
        cbam.fc1.bias.copy_(module.fc1.bias)
        cbam.fc2.weight.copy_(module.fc2.weight[:, :, None, None])
        cbam.fc2.bias.copy_(module.fc2.bias)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(module(x), cbam(x))


def test_channels_last_input_gives_same_result():
    module = ACAM(32)
    x = torch.randn(2, 32, 7, 7)
    torch.testing.assert_close(module(x.to(memory_format=torch.channels_last)), module(x))


def test_tiny_channels_and_one_by_one_maps():
    for channels in (1, 3):
        for rd_divisor, width in ((8, 8), (1, 1)):
            module = ACAM(channels, rd_divisor=rd_divisor)
            assert module.rd_channels == width
            out = module(torch.randn(2, channels, 1, 1))
            assert out.shape == (2, channels, 1, 1)


@given(channels=st.integers(1, 4096), rd_ratio=st.sampled_from([1 / 16, 1 / 8, 0.25, 1.0]))
@settings(max_examples=60, deadline=None)
def test_hidden_width_follows_timm_se(channels, rd_ratio):
    se = SEModule(channels, rd_ratio=rd_ratio, device="meta")
    assert ACAM(channels, rd_ratio=rd_ratio, device="meta").rd_channels == se.fc1.out_channels


@pytest.mark.parametrize("channels", [256, 512, 1024, 2048])
def test_resnet50_widths_keep_the_papers_reduction(channels):
    assert ACAM(channels, device="meta").rd_channels == channels // 16


@pytest.mark.usefixtures("one_thread")
def test_narrow_default_width_keeps_the_shared_mlp_alive():
    """At C = 8 the old C/16 rounding left one hidden unit, dead from init for some seeds
    (about 30 % in ``benchmarks/acam_width.py``); the default width must not be."""

    def dead(rd_divisor: int, seed: int) -> bool:
        torch.manual_seed(seed)
        module = ACAM(8, rd_divisor=rd_divisor)
        x = torch.randn(4, 8, 4, 4).relu()
        module(x).backward(torch.randn_like(x))
        return not (module.fc1.weight.grad.any() or module.fc2.weight.grad.any())

    assert any(dead(1, seed) for seed in range(20))
    assert not any(dead(8, seed) for seed in range(20))


def test_device_dtype_and_rd_channels_arguments():
    module = ACAM(64, rd_channels=7, device="cpu", dtype=torch.float64)
    assert module.rd_channels == 7
    assert all(p.dtype == torch.float64 for p in module.parameters())
    assert ACAM(64, rd_ratio=0.25, rd_divisor=8).rd_channels == 16


@pytest.mark.parametrize("channels, kwargs", [(0, {}), (-3, {}), (8, {"rd_ratio": 0.0})])
def test_bad_arguments_raise(channels, kwargs):
    with pytest.raises(ValueError, match="ACAM"):
        ACAM(channels, **kwargs)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "training"])
@pytest.mark.parametrize("cls", [ACAM, NormalizedACAM])
def test_a_map_with_other_channels_names_both_counts_and_the_axis(cls, requires_grad):
    module = cls(16)
    x = torch.randn(2, 8, 5, 5, requires_grad=requires_grad)
    message = rf"{cls.__name__}\(16\) was built for 16 channels but got 8 on axis 1 \(C\) of an input"
    with pytest.raises(ValueError, match=message + r" of shape \(2, 8, 5, 5\).*channels=8"):
        module(x)


def test_a_channels_last_tensor_is_told_to_permute():
    with pytest.raises(ValueError, match=r"got 5 on axis 1 .*x\.permute\(0, 3, 1, 2\)"):
        ACAM(16)(torch.randn(2, 5, 7, 16))  # (N, H, W, C)


@pytest.mark.parametrize("shape", [(2, 16), (2, 16, 5), (2, 16, 5, 5, 1)])
def test_a_tensor_that_is_not_a_map_names_the_layout(shape):
    with pytest.raises(ValueError, match=r"takes an \(N, C, H, W\) input, got one of shape"):
        ACAM(16)(torch.randn(shape))


@pytest.mark.parametrize("method", ["gate_from_pooled", "branch_weights"])
@pytest.mark.parametrize(
    "shape, message",
    [((3, 2, 8), r"built for 16 channels but got 8 on axis 2"), ((3, 16), r"takes an \(N, 2, C\) input")],
)
def test_descriptors_of_the_wrong_shape_are_named(method, shape, message):
    with pytest.raises(ValueError, match=message):
        getattr(NormalizedACAM(16), method)(torch.randn(shape))


def test_the_channel_check_under_fullgraph_compile():
    """The check is on static shapes: no graph break for the right map, the same words for a
    wrong one (dynamo reports the raise as unsupported under ``fullgraph``)."""
    torch._dynamo.reset()
    compiled = torch.compile(ACAM(16), backend="eager", fullgraph=True)
    assert compiled(torch.randn(2, 16, 4, 4)).shape == (2, 16, 4, 4)
    with pytest.raises(RuntimeError, match=r"built for 16 channels but got 8 on axis 1"):
        compiled(torch.randn(2, 8, 4, 4))


def test_timm_probe_and_create_attn():
    probe = ACAM(8, rd_ratio=1.0)  # EfficientNet's builder probes the class like this
    assert probe.rd_channels == 8
    assert probe(torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)
    assert isinstance(create_attn(ACAM, 16), ACAM)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet18", {"block_args": {"attn_layer": ACAM}}),
        ("resnet50", {"block_args": {"attn_layer": partial(ACAM, rd_ratio=1 / 8)}}),
        ("efficientnet_b0", {"se_layer": ACAM}),
        ("resnet26t", {"block_args": {"attn_layer": NormalizedACAM}}),
    ],
)
def test_acam_inside_timm_models(name, kwargs):
    model = timm.create_model(name, num_classes=5, **kwargs)
    attention = [m for m in model.modules() if isinstance(m, ACAM)]
    assert attention, "timm did not build any ACAM"
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    assert all(p.grad is not None for m in attention for p in m.parameters())


def test_acam_in_byobnet():
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    cfg = ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=1, c=64, s=1, gs=0, br=0.25),
            ByoBlockCfg(type="bottle", d=1, c=128, s=2, gs=0, br=0.25),
        ),
        stem_chs=32,
        attn_layer=ACAM,
    )
    model = ByobNet(cfg, num_classes=4)
    assert any(isinstance(m, ACAM) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
