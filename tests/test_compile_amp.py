"""The distiller under torch.compile and CPU bfloat16 autocast."""

import copy

import pytest
import timm
import torch

from gradual_sd import ACAM, GradualSelfDistiller


def small_distiller():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4, block_args={"attn_layer": ACAM})
    return GradualSelfDistiller(model, example_input=torch.zeros(1, 3, 32, 32))


def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 4, (4,), generator=gen)


@pytest.mark.parametrize("backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_compiled_training_step_matches_eager(backend):
    torch._dynamo.reset()
    eager = small_distiller()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend=backend, fullgraph=True)
    images, targets = data()
    for distiller in (eager, compiled):
        out = distiller(images, targets)
        out.loss.backward()
    expected, got = eager(images, targets), compiled(images, targets)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-5)
    for key in expected.losses:
        torch.testing.assert_close(got.losses[key], expected.losses[key], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    assert compiled_module.taps._store == {}


def test_cpu_bfloat16_autocast_trains_with_float32_loss():
    distiller = small_distiller()
    images, targets = data()
    reference = distiller(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distiller(images, targets)
    assert out.head_logits[0].dtype == torch.bfloat16  # the heads ran in bfloat16...
    assert out.loss.dtype == torch.float32  # ...the KL and CE in float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    torch.testing.assert_close(out.loss, reference.loss, rtol=0.05, atol=0.05)
    out.loss.backward()
    grads = [p.grad for p in distiller.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
