"""What autograd holds between a training forward and its backward: the bytes of every tensor
saved for backward, for the plain ResNet50 and the distiller's head options. Deterministic: no
timing, no process-level memory, so it does not depend on the machine's load.

    python benchmarks/saved_activations.py
    python benchmarks/saved_activations.py --variants acam-blocks se-blocks cbam-blocks

Tensors are seen through ``torch.autograd.graph.saved_tensors_hooks`` and counted once per
storage (by ``untyped_storage().data_ptr()``), so views of one buffer and a tensor saved by two
operations count once. Parameters saved by convolutions and linear layers are counted too and
shown as their own column: they exist whether or not anything is saved. A tensor is attributed
to the head whose forward first saved it; the rest is the backbone's (and the loss's).

This is the memory held *between* forward and backward, which ``checkpoint_heads`` removes. The
peak *during* backward is another figure: a checkpointed head is recomputed while the backbone's
activations are still alive, so that peak still includes the largest head's working set.
"""

from __future__ import annotations

import argparse
import sys

import torch

from _harness import command_line, machine_line, markdown_table
from cost import VARIANTS as ALL_VARIANTS
from cost import Variant, batch, build

VARIANTS = ("plain", "gsd-paper-heads", "gsd-paper-heads-ckpt", "gsd-pooled-heads")
MIB = 2**20


def saved_bytes(variant: Variant, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """Bytes saved for backward by one forward + loss: ``total``, ``parameters`` and one entry per
    head (``heads.0`` ...), each storage counted once."""
    parameters = {p.untyped_storage().data_ptr() for p in variant.module.parameters()}
    owner_of: dict[int, str] = {}
    size_of: dict[int, int] = {}
    current: list[str] = []  # the head running now, if any

    heads = getattr(variant.module, "heads", None)
    handles = []
    for i, head in enumerate(heads or ()):
        handles.append(head.register_forward_pre_hook(lambda m, a, name=f"heads.{i}": current.append(name)))
        handles.append(head.register_forward_hook(lambda m, a, out: current.clear()))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in size_of:
            size_of[key] = storage.nbytes()
            owner_of[key] = "parameters" if key in parameters else (current[-1] if current else "backbone")
        return tensor

    variant.module.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = variant.forward_loss(x, y)
    finally:
        for handle in handles:
            handle.remove()
    del loss  # frees the graph and what it saved
    totals: dict[str, int] = {"total": sum(size_of.values())}
    for key, owner in owner_of.items():
        totals[owner] = totals.get(owner, 0) + size_of[key]
    return totals


def table(img_size: int, batch_size: int, variants: list[str]) -> str:
    torch.manual_seed(0)
    x, y = batch(batch_size, img_size, torch.device("cpu"))
    measured = {name: saved_bytes(build(name, x[:1]), x, y) for name in ["plain", *variants]}
    plain = measured["plain"]["total"]
    rows = []
    for name, sizes in measured.items():
        head_sizes = [v for k, v in sizes.items() if k.startswith("heads.")]
        rows.append(
            [
                name,
                f"{sizes['total'] / MIB:.1f}",
                f"{sizes['total'] / plain:.2f}",
                f"{sizes.get('parameters', 0) / MIB:.1f}",
                f"{sum(head_sizes) / MIB:.1f}",
                f"{max(head_sizes, default=0) / MIB:.1f}",
            ]
        )
    header = ["variant", "saved MiB", "ratio", "of which parameters", "of which heads", "largest head"]
    title = f"Saved for backward, resnet50, {img_size} px, batch {batch_size}, fp32"
    return f"{title}\n\n{markdown_table(header, rows)}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["112x8", "224x2"], help="IMG_SIZExBATCH")
    parser.add_argument(
        "--variants", nargs="+", default=[v for v in VARIANTS if v != "plain"], choices=ALL_VARIANTS[1:]
    )
    args = parser.parse_args(argv)
    print(f"`{command_line()}`\n\n{machine_line(torch.device('cpu'))}\n")
    for setting in args.settings:
        img_size, batch_size = map(int, setting.split("x"))
        print(table(img_size, batch_size, args.variants) + "\n", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
