"""BottleneckHead's ``pool_size`` against a float64 reference written out cell by cell."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradual_sd import ACAM, BottleneckHead

pytestmark = pytest.mark.usefixtures("one_thread")


def head(channels: int, pool_size: int | None, attn_layer=None, seed: int = 0) -> BottleneckHead:
    """A float64 head in eval mode with random weights and random BN running statistics."""
    torch.manual_seed(seed)
    module = BottleneckHead(channels, 6, 3, feature_dim=4, attn_layer=attn_layer, pool_size=pool_size)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.5)
        module.norm.running_mean.normal_(0.0, 0.5)
        module.norm.running_var.uniform_(0.5, 2.0)
    return module.double().eval()


def reference(module: BottleneckHead, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Average each adaptive-pooling window (PyTorch's bounds: floor(i*H/n) to ceil((i+1)*H/n)),
    then projection, BN with running statistics, ReLU per cell, the mean over cells and the
    two linear layers, in numpy. Attention is the module's own (ACAM has its own reference)."""
    p = {k: v.detach().double().numpy() for k, v in module.state_dict().items()}
    a = module.attn(x).detach().double().numpy()
    height, width = a.shape[-2:]
    rows = height if module.pool_size is None else min(module.pool_size, height)
    cols = width if module.pool_size is None else min(module.pool_size, width)
    cells = []
    for i in range(rows):
        top, bottom = i * height // rows, -(-(i + 1) * height // rows)
        for j in range(cols):
            left, right = j * width // cols, -(-(j + 1) * width // cols)
            mean = a[:, :, top:bottom, left:right].mean(axis=(2, 3))
            z = mean @ p["conv.weight"][:, :, 0, 0].T
            z = (z - p["norm.running_mean"]) / np.sqrt(p["norm.running_var"] + module.norm.eps)
            cells.append(np.maximum(z * p["norm.weight"] + p["norm.bias"], 0.0))
    pooled = np.mean(cells, axis=0)
    logits = pooled @ p["fc.weight"].T + p["fc.bias"]
    return logits, pooled @ p["feature.weight"].T + p["feature.bias"]


@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 9),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    pool_size=st.sampled_from([None, 1, 2, 3, 4, 7]),
    attention=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_head_matches_reference(batch, channels, height, width, pool_size, attention):
    module = head(channels, pool_size, ACAM if attention else None)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64)
    logits, feature = module(x)
    want_logits, want_feature = reference(module, x)
    torch.testing.assert_close(logits, torch.from_numpy(want_logits))
    torch.testing.assert_close(feature, torch.from_numpy(want_feature))


@given(height=st.integers(1, 12), width=st.integers(1, 12), pool_size=st.integers(1, 6))
@settings(max_examples=30, deadline=None)
def test_projection_runs_on_the_pooled_grid_never_larger(height, width, pool_size):
    module = BottleneckHead(5, 8, 3, feature_dim=4, pool_size=pool_size).eval()
    seen = []
    module.conv.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    logits, feature = module(torch.randn(2, 5, height, width))
    assert seen == [(2, 5, min(pool_size, height), min(pool_size, width))]
    assert logits.shape == (2, 3) and feature.shape == (2, 4)


def test_pool_size_at_least_the_map_is_the_paper_head():
    paper, pooled = head(4, None, ACAM), head(4, 6, ACAM)
    pooled.load_state_dict(paper.state_dict())
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    for got, want in zip(pooled(x), paper(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_state_dict_loads_either_way():
    paper, pooled = BottleneckHead(8, 16, 3), BottleneckHead(8, 16, 3, pool_size=2)
    assert list(paper.state_dict()) == list(pooled.state_dict())
    pooled.load_state_dict(paper.state_dict())
    paper.load_state_dict(pooled.state_dict())
    assert "pool_size=2" in repr(pooled)


def test_every_parameter_gets_a_gradient_in_training():
    module = BottleneckHead(6, 8, 3, feature_dim=4, pool_size=2).train()
    x = torch.randn(4, 6, 7, 7, requires_grad=True)
    logits, feature = module(x)
    (logits.square().sum() + feature.square().sum()).backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert module.norm.num_batches_tracked == 1


def test_gradcheck_through_the_pooled_projection():
    module = head(3, 2, ACAM)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: module(t)[0], (x,))


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "2"])
def test_bad_pool_size_is_refused(bad):
    with pytest.raises(ValueError, match=f"pool_size must be a positive int.*got {bad!r}"):
        BottleneckHead(8, 16, 3, pool_size=bad)


def test_compiles_in_one_graph():
    module = head(4, 2, ACAM)
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    for got, want in zip(compiled(x), module(x)):
        torch.testing.assert_close(got, want)
