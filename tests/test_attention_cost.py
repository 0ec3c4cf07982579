"""What ACAM costs against timm's SE, counted rather than timed: the operations that read or
write a full-size map in forward + backward, the full-size tensors kept for the backward, the
matrix products' FLOPs and the kernels inductor generates. Counts do not depend on the machine's load."""

import re

import pytest
import torch
from timm.layers import SEModule
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gradual_sd import ACAM, NormalizedACAM

# Operations that move no data, or only allocate it.
NO_TRAFFIC = {"detach", "alias", "empty", "empty_like", "empty_strided", "lift_fresh"}
SHAPE = (4, 64, 6, 10)  # H != W, so a transposed layout would show


class FullSizeOps(TorchDispatchMode):
    """Records every aten operation that reads or writes a tensor as large as the map."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_TRAFFIC:
            if any(
                isinstance(t, torch.Tensor) and t.numel() == self.numel
                for t in tree_leaves((args, kwargs, out))
            ):
                self.ops.append(name)
        return out


def full_size_ops(module: torch.nn.Module, channels_last: bool) -> list[str]:
    x = torch.randn(SHAPE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_out = torch.randn_like(x)
    module(x).backward(grad_out)  # warm-up, outside the count
    x.grad = None  # or the count would include accumulating into it
    with FullSizeOps(x.numel()) as mode:
        module(x).backward(grad_out)
    return mode.ops


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("cls", [ACAM, NormalizedACAM])
def test_acam_touches_the_map_at_most_twice_more_than_se(cls, channels_last):
    se = full_size_ops(SEModule(SHAPE[1]), channels_last)
    acam = full_size_ops(cls(SHAPE[1]), channels_last)
    # The two extra: the max's read and the scatter of N x C values into the gradient.
    assert len(acam) <= len(se) + 2, (acam, se)
    assert acam.count("scatter_add_") == 1
    # On CUDA adaptive max pooling to 1x1 runs one thread per output over the whole map; on the
    # CPU, for channels-last maps, plain max pooling is the faster vectorised kernel.
    assert not [op for op in acam if "adaptive" in op], acam
    assert "zero_" not in acam and "zeros_like" not in acam, acam


class Copies(TorchDispatchMode):
    """Records the shapes of every tensor copied (``copy_``, ``clone``, dtype or layout changes)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("copy_", "clone", "_to_copy"):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", [ACAM, NormalizedACAM])
def test_acam_backward_copies_no_weight(cls):
    # A weight gradient computed in a transposed layout is copied again when it is accumulated
    # into ``.grad``; at C = 2048 that copy of the branch-weight MLP cost as much as the map's
    # gating multiply on the CPU.
    module = cls(SHAPE[1])
    x = torch.randn(SHAPE, requires_grad=True)
    module(x).sum().backward()  # warm-up
    module.zero_grad(set_to_none=True)
    loss = module(x).sum()
    with Copies() as mode:
        loss.backward()
    weight = module.channels * module.rd_channels  # each C x C/r matrix; the rest are smaller
    assert all(torch.Size(s).numel() < weight for s in mode.shapes), mode.shapes


def matmul_flops(module: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of the matrix products (linear layers, 1x1 convolutions, batched products) of one
    forward + backward; the map-sized work is elementwise and not counted here."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(shape, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        module(x).backward(torch.randn(shape))
    return counter.get_total_flops()


@pytest.mark.parametrize("cls", [ACAM, NormalizedACAM])
def test_acam_gate_network_does_two_and_a_half_times_ses_products(cls):
    # SE: C -> C/r -> C. ACAM: the shared C -> C/r on both descriptors (2x), the two weight MLPs'
    # C -> C/r (2x) and, since the branches are mixed before the second layer, one C/r -> C (1x),
    # plus O(N * C/r) for the per-sample scalars: 2.5 + 2/C times SE's (2.508 here). Mixing
    # after the second layer, as written in the paper, is 3x (3.07 here).
    shape = (4, 256, 3, 3)
    se, acam = matmul_flops(SEModule(shape[1]), shape), matmul_flops(cls(shape[1]), shape)
    assert se > 0 and acam <= 2.55 * se, (acam, se, acam / se)


def saved_full_size(module: torch.nn.Module) -> int:
    """Full-size tensors that autograd keeps between forward and backward (distinct storages)."""
    x = torch.randn(SHAPE, requires_grad=True)
    storages = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == x.numel():
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x * 1.0)  # a non-leaf input, as inside a network
    out.sum().backward()
    return len(storages)


def test_acam_keeps_no_more_full_size_tensors_than_se():
    assert saved_full_size(ACAM(SHAPE[1])) <= saved_full_size(SEModule(SHAPE[1]))


def map_kernels(module: torch.nn.Module) -> list[str]:
    """Inductor's kernels (forward and backward) that take a full-size buffer as an argument."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    numel = torch.Size(SHAPE).numel()
    x = torch.randn(SHAPE, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True)
    _, codes = run_and_get_code(lambda: compiled(x).backward(torch.randn(SHAPE)))
    kernels = []
    for code in codes:
        full = set()
        for name, shape in re.findall(r"(\w+) = empty_strided_\w+\(\(([\d, ]+)\)", code):
            full.update([name] if _numel(shape) == numel else [])
        for name, shape in re.findall(r"assert_size_stride\((\w+), \(([\d, ]+)\)", code):
            full.update([name] if _numel(shape) == numel else [])
        for names, shapes in re.findall(
            r"assert_size_stride_grouped\(\(([\w, ]+)\), \(((?:\([\d, ]+\),? ?)+)\)", code
        ):
            for name, shape in zip(names.split(", "), re.findall(r"\(([\d, ]+)\)", shapes)):
                full.update([name] if _numel(shape) == numel else [])
        for kernel, args in re.findall(r"^\s+(\w+)\((\w+(?:, \w+)*)\)$", code, flags=re.M):
            if kernel.startswith(("cpp_fused", "triton_")) and full & set(args.split(", ")):
                kernels.append(kernel)
    return kernels


def _numel(shape: str) -> int:
    return torch.Size(int(d) for d in shape.replace(" ", "").split(",") if d).numel()


@pytest.mark.slow
def test_compiled_acam_makes_as_many_map_passes_as_se():
    se, acam = map_kernels(SEModule(SHAPE[1])), map_kernels(ACAM(SHAPE[1]))
    assert se, "no kernel found: the generated code's format changed"
    # Forward: one kernel pools (mean and max in one read), one gates; backward: one reduction
    # for the gate's gradient, one pointwise kernel that also scatters the max's gradient.
    assert len(acam) <= len(se), (acam, se)
