"""ACAM's three paths (fused autograd functions for eager training, the traceable pool for
torch.compile, plain ops without gradients) against one plain-autograd formulation, in float64,
with first- and second-order gradients, ties in the max, channels-last maps and 1x1 maps."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradual_sd import ACAM, NormalizedACAM
from gradual_sd import _pooled_gate as pooled_gate_module
from gradual_sd._pooled_gate import CompiledPath, FusedPath, spatial_max


def plain_acam(module: ACAM, x: torch.Tensor) -> torch.Tensor:
    """ACAM as plain autograd, written from the method's description and the module's
    parameters: adaptive max pooling (gradient to the first maximal position), grouped 1x1
    convolutions for the branch weights. This is how the module computed before the fused path."""
    c, rd = module.channels, module.rd_channels
    pooled = torch.stack((x.mean((2, 3)), F.adaptive_max_pool2d(x, 1).flatten(1)), dim=1)
    shared = module.fc2(module.act(module.fc1(pooled)))
    grouped = pooled.reshape(-1, 2 * c, 1)
    hidden = F.conv1d(grouped, module.weight_fc1.weight, module.weight_fc1.bias, groups=2)
    weights = F.conv1d(module.weight_act(hidden), module.weight_fc2.weight, module.weight_fc2.bias, groups=2)
    if module.normalize_weights:
        weights = weights.softmax(dim=1)
    attn = module.gate((shared * weights).sum(dim=1))
    assert hidden.shape[1] == 2 * rd
    return x * attn[:, :, None, None]


def through(path, module: ACAM, x: torch.Tensor, gate_fn=None) -> torch.Tensor:
    """ACAM's forward along one ``path`` (``gate_fn`` defaults to the module's gate network)."""
    return path.multiply(x, (gate_fn or module.gate_from_pooled)(path.pool(x)))


def randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def make_input(shape, ties: str, channels_last: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if ties == "relu":  # whole channels of zeros: every position ties
        x = x.relu()
        x[:, : max(1, shape[1] // 3)] = 0
    elif ties == "rounded":  # a few values repeated across the map
        x = x.mul(1.5).round()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def gradients(module, x, forward, grad_out):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    module.zero_grad(set_to_none=True)
    out = forward(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {name: p.grad.clone() for name, p in module.named_parameters()}


@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 24),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    ties=st.sampled_from(["none", "relu", "rounded"]),
    channels_last=st.booleans(),
    normalize=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    cpu_kernels=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_fused_and_compile_paths_equal_plain_autograd(
    batch, channels, height, width, ties, channels_last, normalize, bias, seed, cpu_kernels
):
    # cpu_kernels=False runs the formulas chosen for CUDA (a max over a channels-last view, one
    # addcmul) on the CPU, so they are checked where no GPU is lent.
    with mock.patch.object(pooled_gate_module, "_cpu_kernels", lambda t: cpu_kernels):
        check_paths_equal_plain_autograd(
            batch, channels, height, width, ties, channels_last, normalize, bias, seed
        )


def check_paths_equal_plain_autograd(
    batch, channels, height, width, ties, channels_last, normalize, bias, seed
):
    module = ACAM(channels, rd_ratio=0.25, normalize_weights=normalize, mlp_bias=bias).double()
    randomize(module, seed)
    x = make_input((batch, channels, height, width), ties, channels_last, seed)
    grad_out = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    expected = gradients(module, x, lambda v: plain_acam(module, v), grad_out)
    fused = gradients(module, x, module, grad_out)
    traceable = gradients(module, x, lambda v: through(CompiledPath(), module, v), grad_out)
    for got in (fused, traceable):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-13)
        for name, grad in expected[2].items():
            torch.testing.assert_close(got[2][name], grad, rtol=1e-12, atol=1e-13, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected[0], rtol=1e-12, atol=1e-13)


def test_the_fused_function_runs_in_training():
    """Guard against the dispatch silently falling back to plain ops."""
    module = ACAM(8)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    assert type(module(x).grad_fn).__name__ == "_GateBackward"
    with torch.no_grad():
        assert module(x).grad_fn is None


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu-kernels", "cuda-kernels"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_max_index_is_the_first_maximum_in_row_major_order(channels_last, cpu_kernels, monkeypatch):
    monkeypatch.setattr(pooled_gate_module, "_cpu_kernels", lambda t: cpu_kernels)
    x = torch.zeros(2, 3, 4, 5)
    x[0, 1, 2, 0] = x[0, 1, 0, 4] = 1.0  # (0, 4) comes first in row-major order
    x[1, 2, 3, 1] = x[1, 2, 1, 3] = 2.0  # (1, 3) comes first
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    peak, index = spatial_max(x)
    assert peak.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    assert index.tolist() == [[0, 4, 0], [0, 0, 8]]


def test_gradcheck_fused_function_and_pool():
    module = ACAM(4, rd_channels=2).double()  # gradcheck is O(numel) of the input and parameters
    randomize(module, 0)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(module.parameters())

    def fused(x, *_params):  # gradcheck perturbs the parameters themselves in place
        return through(FusedPath(), module, x)

    assert torch.autograd.gradcheck(fused, (x, *params))
    assert torch.autograd.gradcheck(CompiledPath.pool, (x,))


def test_partial_gradients_and_a_detached_gate():
    """autograd.grad for the input alone or the parameters alone gives the plain formulation's
    values; a gate network that detaches leaves the input the gating multiply's gradient."""
    module = ACAM(16, rd_ratio=0.25).double()
    randomize(module, 7)
    x = make_input((2, 16, 5, 3), "relu", False, 8).requires_grad_()
    grad_out = torch.randn_like(x)
    params = list(module.parameters())
    expected = torch.autograd.grad(plain_acam(module, x), [x, *params], grad_out)
    (x_grad,) = torch.autograd.grad(module(x), [x], grad_out)
    torch.testing.assert_close(x_grad, expected[0], rtol=1e-12, atol=1e-13)
    for got, want in zip(torch.autograd.grad(module(x), params, grad_out), expected[1:]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)

    def detached(pooled):
        return module.gate_from_pooled(pooled).detach()

    (x_grad,) = torch.autograd.grad(through(FusedPath(), module, x, detached), [x], grad_out)
    gate = module.gate_from_pooled(torch.stack((x.mean((2, 3)), x.amax((2, 3))), dim=1))
    torch.testing.assert_close(x_grad, grad_out * gate[:, :, None, None].detach())


def test_frozen_parameters_or_frozen_input_get_the_right_gradients():
    module = NormalizedACAM(16, rd_ratio=0.25).double()
    randomize(module, 1)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    expected = gradients(module, x, lambda v: plain_acam(module, v), grad_out)
    module.requires_grad_(False)  # frozen attention: only the map's gradient
    xg = x.clone().requires_grad_()
    module(xg).backward(grad_out)
    torch.testing.assert_close(xg.grad, expected[1], rtol=1e-12, atol=1e-13)
    module.requires_grad_(True)  # fixed input: only the parameters' gradients
    module.zero_grad(set_to_none=True)
    module(x).backward(grad_out)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, expected[2][name], rtol=1e-12, atol=1e-13, msg=name)


def penalty_gradients(forward, x: torch.Tensor, params, v: torch.Tensor, loss: str):
    """Gradients of a gradient penalty: the input gradient of ``loss``, built with
    ``create_graph=True``, then its squared norm differentiated for the input and ``params``."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    out = forward(x)
    objective = (out * v).sum() if loss == "linear" else (out * v).square().sum()
    (input_grad,) = torch.autograd.grad(objective, x, create_graph=True)
    return torch.autograd.grad(input_grad.square().sum(), [x, *params])


@pytest.mark.parametrize("loss", ["linear", "square"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("path", ["fused", "compiled"])
@pytest.mark.parametrize("cls", [ACAM, NormalizedACAM])
def test_gradient_penalty_equals_the_plain_formulas(cls, path, channels_last, loss):
    """Second order, ties included. With a loss linear in the output, the penalty's backward runs
    the pooling's backward without the gating multiply's; with a square, both."""
    module = cls(12, rd_ratio=0.5).double()
    randomize(module, 9)
    x = make_input((2, 12, 4, 5), "relu", channels_last, 10)
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    params = list(module.parameters())
    forward = module if path == "fused" else (lambda t: through(CompiledPath(), module, t))
    expected = penalty_gradients(lambda t: plain_acam(module, t), x, params, v, loss)
    assert expected[0].abs().sum() > 0
    for cpu_kernels in (True, False):  # False: the formulas chosen for CUDA, run on the CPU
        with mock.patch.object(pooled_gate_module, "_cpu_kernels", lambda t, cpu=cpu_kernels: cpu):
            got = penalty_gradients(forward, x, params, v, loss)
        for name, a, b in zip(["x", *dict(module.named_parameters())], got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name}, {cpu_kernels=}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_gradgradcheck_through_the_module(channels_last):
    module = ACAM(4, rd_channels=2).double()
    randomize(module, 12)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64)  # no ties: a finite difference must not move a max
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def acam(x, *_params):  # gradgradcheck perturbs the parameters themselves in place
        return module(x)

    assert type(module(x).grad_fn).__name__ == "_GateBackward"
    assert torch.autograd.gradgradcheck(acam, (x, *module.parameters()))


def test_input_gradient_differentiates_in_the_parameters_with_ties():
    """Ties are safe when only the parameters are perturbed: the maps' argmaxes stay put."""
    module = NormalizedACAM(4, rd_channels=2).double()
    randomize(module, 13)
    x = make_input((2, 4, 2, 3), "relu", False, 14).requires_grad_()
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(15))

    def input_grad(*_params):
        (grad,) = torch.autograd.grad((module(x) * v).square().sum(), x, create_graph=True)
        return grad

    assert torch.autograd.gradcheck(input_grad, tuple(module.parameters()))


def test_a_parameters_only_pass_leaves_nothing_for_a_later_pass():
    """A first-order pass for the parameters alone runs the multiply's backward but not the
    pooling's; what the multiply left for the pooling must not reach the pooling's backward in
    a later pass through the input gradient's graph, which runs it alone."""
    module = ACAM(12, rd_ratio=0.5).double()
    randomize(module, 16)
    x = make_input((2, 12, 4, 5), "relu", False, 17)
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    params = list(module.parameters())
    results = []
    for forward in (lambda t: plain_acam(module, t), module):
        xg = x.clone().requires_grad_()
        out = forward(xg)
        (input_grad,) = torch.autograd.grad((out * v).sum(), xg, create_graph=True)
        torch.autograd.grad(out, params, v.square(), retain_graph=True)
        results.append(torch.autograd.grad(input_grad.square().sum(), [xg, *params]))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_bfloat16_autocast_keeps_the_dtype_and_the_gradients(channels_last):
    torch.manual_seed(0)
    module = ACAM(32)
    x = torch.randn(4, 32, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(x)
    reference = gradients(module, x, module, grad_out)
    xb = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gradients(module, xb, module, grad_out.to(torch.bfloat16))
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].float(), reference[0], rtol=0.05, atol=0.05)
    torch.testing.assert_close(got[1].float(), reference[1], rtol=0.05, atol=0.05)
    for name, grad in reference[2].items():
        assert got[2][name].dtype == torch.float32, name
        cosine = F.cosine_similarity(got[2][name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)


@pytest.mark.parametrize("bias", [True, False])
def test_gate_network_has_first_and_second_order_gradients(bias):
    """The (N, C) gate network on its own (used by the compile path and by ``gate_from_pooled``)
    differentiates twice: only the map-sized fused function is first-order."""
    module = NormalizedACAM(6, rd_channels=3, mlp_bias=bias).double()
    randomize(module, 6)
    pooled = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    params = tuple(module.parameters())

    def gate(pooled, *_params):  # gradcheck perturbs the parameters themselves in place
        return module.gate_from_pooled(pooled)

    assert torch.autograd.gradcheck(gate, (pooled, *params))
    assert torch.autograd.gradgradcheck(gate, (pooled, *params))


def test_gate_network_under_autocast_differentiates_outside_it():
    """Backward runs after the autocast region has closed: its gradients come back in each
    input's dtype, close to float32's."""
    module = ACAM(32)
    pooled = torch.randn(4, 2, 32, requires_grad=True)
    module.gate_from_pooled(pooled).sum().backward()
    expected = {name: p.grad.clone() for name, p in module.named_parameters()}
    expected_pooled, pooled.grad = pooled.grad, None
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gate = module.gate_from_pooled(pooled)
    assert gate.dtype == torch.bfloat16
    gate.float().sum().backward()
    assert pooled.grad.dtype == torch.float32
    torch.testing.assert_close(pooled.grad, expected_pooled, rtol=0.05, atol=0.02)
    for name, param in module.named_parameters():
        assert param.grad.dtype == torch.float32, name
        cosine = F.cosine_similarity(param.grad.flatten(), expected[name].flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_acam_matches_eager_in_one_graph(backend):
    torch._dynamo.reset()
    module = NormalizedACAM(16).double()
    randomize(module, 2)
    x = make_input((2, 16, 5, 5), "relu", False, 3)
    grad_out = torch.randn_like(x)
    expected = gradients(module, x, module, grad_out)
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    got = gradients(module, x, compiled, grad_out)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_fused_acam_under_activation_checkpointing(use_reentrant):
    """Checkpointing recomputes the region in backward; the fused function must neither run
    twice per unpack nor give other gradients."""
    from torch.utils.checkpoint import checkpoint

    module = ACAM(16).double()
    randomize(module, 4)
    x = make_input((2, 16, 5, 5), "relu", False, 5)
    grad_out = torch.randn_like(x)
    expected = gradients(module, x, module, grad_out)
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    got = gradients(module, x, lambda v: checkpoint(module, v, use_reentrant=use_reentrant), grad_out)
    assert len(calls) == 2  # the forward and one recompute
    torch.testing.assert_close(got[1], expected[1])
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, msg=name)


def test_meta_tensors_go_through_forward_and_backward():
    """Shape-only runs (meta device) must not trip over the autocast state of an unknown device."""
    module = ACAM(16, device="meta")
    x = torch.empty(2, 16, 4, 4, device="meta", requires_grad=True)
    module(x).sum().backward()
    assert x.grad.shape == x.shape and module.fc1.weight.grad.shape == module.fc1.weight.shape
