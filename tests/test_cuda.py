"""The library on a CUDA device: float32 equal to the CPU, float16 and bfloat16 autocast (with a
gradient scaler for float16), the deferred finite check, no host synchronisation in a training
step, channels-last inputs, inductor, early exit, and ACAM's fused path against the CPU's (first and
second order).

CI has no GPU, so these are skipped there, and pytest says so. On a GPU machine:
``python -m pytest tests/test_cuda.py -v -rs`` (``benchmarks/gpu.sh`` runs it).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from gradual_sd import ACAM, EarlyExitModel, GradualSelfDistiller

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZE = 64
CLASSES = 7


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 matrix products and convolutions, so CUDA can be compared with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def distiller(seed: int = 0, **kwargs) -> GradualSelfDistiller:
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", num_classes=CLASSES, block_args={"attn_layer": ACAM})
    return GradualSelfDistiller(model, example_input=torch.zeros(1, 3, SIZE, SIZE), **kwargs)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def step(module: GradualSelfDistiller, images: torch.Tensor, targets: torch.Tensor):
    out = module(images, targets)
    out.loss.backward()
    return out


def test_float32_on_cuda_equals_the_cpu():
    cpu = distiller()
    gpu = copy.deepcopy(cpu).cuda()
    images, targets = batch()
    expected = step(cpu, images, targets)
    got = step(gpu, images.cuda(), targets.cuda())
    torch.testing.assert_close(got.loss.cpu(), expected.loss, rtol=1e-4, atol=1e-5)
    for name, value in expected.losses.items():
        torch.testing.assert_close(got.losses[name].cpu(), value, rtol=1e-4, atol=1e-5, msg=name)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_trains_with_a_float32_loss(dtype):
    module = distiller().cuda()
    images, targets = (t.cuda() for t in batch())
    with torch.no_grad():
        reference = module(images, targets).loss
    # float16 needs loss scaling; bfloat16 has float32's range and does not.
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    losses, ce = [], []
    for _ in range(25):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            out = module(images, targets)
        assert out.head_logits[0].dtype == dtype  # the heads ran in low precision...
        assert out.loss.dtype == torch.float32  # ...the loss terms in float32
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(out.loss.item())
        ce.append(out.losses["ce"].item())
    torch.testing.assert_close(torch.tensor(losses[0]), reference.cpu(), rtol=0.05, atol=0.05)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert ce[-1] < 0.5 * ce[0], ce  # it learns the batch
    module.finite_check.flush()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_acam_keeps_the_autocast_dtype(dtype):
    attention = ACAM(64).cuda()
    conv = torch.nn.Conv2d(64, 64, 1).cuda()
    with torch.autocast("cuda", dtype=dtype):
        x = conv(torch.randn(2, 64, 8, 8, device="cuda"))
        assert attention(x).dtype == dtype


def test_deferred_finite_check_names_the_bad_step_later():
    module = distiller().cuda()
    images, targets = (t.cuda() for t in batch())
    assert module.finite_check is not None
    for _ in range(2):
        step(module, images, targets)
    bad = images.clone()
    bad[3] = float("nan")
    step(module, bad, targets)  # step 2: queued, not read yet, so no error here
    with pytest.raises(FloatingPointError, match=r"training step 2: loss, ") as info:
        for _ in range(50):  # a later step reads step 2's flags once its copy has landed
            step(module, images, targets)
        module.finite_check.flush()
    assert "term ce" in str(info.value) and "logits of layer1" in str(info.value)


def test_a_training_step_does_not_wait_for_the_gpu():
    # With the default checks on: the finite and target-range flags reach the host deferred.
    module = distiller().cuda()
    images, targets = (t.cuda() for t in batch())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    step(module, images, targets)  # the first step initialises cuDNN and the allocator
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step(module, images, targets)
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    module.finite_check.flush()


def test_out_of_range_targets_are_reported_not_asserted():
    module = distiller().cuda()
    images, targets = (t.cuda() for t in batch())
    step(module, images, targets)
    bad = targets.clone()
    bad[0] = CLASSES  # one past the last class: unchecked, a device-side assert in the loss
    step(module, images, bad)  # step 1: trained on the clamped targets, reported later
    message = rf"training step 1: class-index targets outside \[0, {CLASSES - 1}\]"
    with pytest.raises(ValueError, match=message):
        for _ in range(50):
            step(module, images, targets)
        module.finite_check.flush()
    assert torch.isfinite(step(module, images, targets).loss)  # the CUDA context still works
    module.eval()
    bad[0] = -100  # cross_entropy's ignore_index: unchecked, that sample would silently not count
    with pytest.raises(ValueError, match=r"got values from -100"):
        module(images, bad)


def test_channels_last_inputs_give_the_same_loss():
    module = distiller().cuda()
    images, targets = (t.cuda() for t in batch())
    with torch.no_grad():
        expected = module(images, targets)
        module.to(memory_format=torch.channels_last)
        got = module(images.to(memory_format=torch.channels_last), targets)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(got.head_logits, expected.head_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_inductor_matches_eager():
    torch._dynamo.reset()
    eager = distiller().cuda()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    images, targets = (t.cuda() for t in batch())
    expected, got = step(eager, images, targets), step(compiled, images, targets)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-4)
    for key in expected.losses:
        torch.testing.assert_close(got.losses[key], expected.losses[key], rtol=1e-3, atol=1e-4, msg=key)
    for (name, p), q in zip(eager.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-2, atol=1e-4, msg=name)
    assert compiled_module.taps._store == {}


def early_exit_model() -> tuple[EarlyExitModel, torch.nn.Module]:
    module = distiller()
    with torch.no_grad():
        for head in module.heads:
            head.fc.weight.mul_(30.0)  # spread the heads' confidences over (0, 1)
    module.cuda().eval()
    plain = copy.deepcopy(module).export()
    exits = EarlyExitModel.from_distiller(module, example_input=torch.zeros(4, 3, SIZE, SIZE).cuda())
    return exits, plain


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_early_exit_extremes_on_cuda(dtype):
    exits, plain = early_exit_model()
    images = batch(16)[0].cuda()
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype is not None)
    with torch.inference_mode(), autocast:
        assert torch.equal(exits(images).logits, plain(images))
        exits.set_thresholds(0.0)
        out = exits(images)
        expected = exits.exit_logits(images)[0]
    assert out.exit_index.tolist() == [0] * len(images)
    assert torch.equal(out.logits, expected)


def test_early_exit_mixed_routing_on_cuda():
    exits, _ = early_exit_model()
    images = batch(32, seed=1)[0].cuda()
    with torch.inference_mode():
        logits = exits.exit_logits(images)
        confidence = [z.softmax(-1).amax(-1) for z in logits]
        exits.set_thresholds([c.quantile(0.7).item() for c in confidence[:-1]])
        out = exits(images)
    # The rule, sample by sample: the first head whose confidence reaches its threshold.
    index = []
    for i in range(len(images)):
        passed = [k for k, t in enumerate(exits.thresholds) if confidence[k][i] >= t]
        index.append(passed[0] if passed else len(exits.heads))
    assert len(set(index)) >= 3
    assert out.exit_index.tolist() == index
    expected = torch.stack([logits[k][i] for i, k in enumerate(index)])
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_fused_acam_on_cuda_equals_the_cpu_with_ties(channels_last):
    """The fused path on CUDA (max over dim, addcmul, scatter) against the CPU's, in float64,
    on post-ReLU maps with all-zero channels (every position ties)."""
    torch.manual_seed(0)
    cpu = ACAM(48).double()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 48, 7, 9, dtype=torch.float64).relu()
    x[:, :8] = 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(x)
    results = []
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        xd = x.detach().to(device).requires_grad_()  # a fresh leaf on each device
        out = module(xd)
        assert type(out.grad_fn).__name__ == "_GateBackward"
        out.backward(grad_out.to(device))
        results.append((out.cpu(), xd.grad.cpu(), [p.grad.cpu() for p in module.parameters()]))
    (out_c, gx_c, gp_c), (out_g, gx_g, gp_g) = results
    torch.testing.assert_close(out_g, out_c)
    torch.testing.assert_close(gx_g, gx_c)
    for got, expected in zip(gp_g, gp_c):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_second_order_through_fused_acam_on_cuda_equals_the_cpu(channels_last):
    """A gradient penalty (input gradient built with create_graph=True, then differentiated)
    on CUDA against the CPU's, in float64, with all-zero channels."""
    torch.manual_seed(1)
    cpu = ACAM(48).double()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 48, 7, 9, dtype=torch.float64).relu()
    x[:, :8] = 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v = torch.randn_like(x)
    results = []
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        xd = x.detach().to(device).requires_grad_()
        out = module(xd)
        assert type(out.grad_fn).__name__ == "_GateBackward"
        (input_grad,) = torch.autograd.grad((out * v.to(device)).square().sum(), xd, create_graph=True)
        grads = torch.autograd.grad(input_grad.square().sum(), [xd, *module.parameters()])
        results.append([g.cpu() for g in grads])
    for got, expected in zip(*results[::-1]):
        torch.testing.assert_close(got, expected)
