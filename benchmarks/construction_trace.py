"""What building a distiller calls: a profile of ``GradualSelfDistiller(model)``'s library calls.

    python benchmarks/construction_trace.py                      # torchvision resnet18
    python benchmarks/construction_trace.py --model timm:resnet18 --size 64

Counts, for one construction: the model's forward passes; the distinct calls from a function of
one ``gradual_sd`` module into a function of another (caller and callee by module and qualified
name, each pair once); and how often the functions of stage discovery ran (the dry runs, the
records made of them, the choice of each module's tapped tensor, the descriptions). Figures are
counts, not times, so the machine and its load do not change them. At 3bafafc (before the
discovery pipeline) torchvision's resnet18 made 44 distinct cross-module calls, 2 forwards,
72 observations and 199 selections for 67 modules; timm's resnet18 41 and 1 forward.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import torch

import gradual_sd

LIBRARY = str(Path(gradual_sd.__file__).resolve().parent)


def _module(code) -> str | None:
    path = str(Path(code.co_filename).resolve())
    if not path.startswith(LIBRARY):
        return None
    relative = Path(path).relative_to(LIBRARY).with_suffix("")
    return ".".join(("gradual_sd", *relative.parts)).removesuffix(".__init__")


def build(spec: str) -> torch.nn.Module:
    source, _, name = spec.partition(":")
    if source == "timm":
        import timm

        return timm.create_model(name, num_classes=5)
    import torchvision

    return getattr(torchvision.models, name)(num_classes=5)


def trace(model: torch.nn.Module, example: torch.Tensor | None) -> dict:
    """The counts for one ``GradualSelfDistiller(model, example_input=example)``."""
    edges: set[tuple[str, str]] = set()
    calls: collections.Counter[str] = collections.Counter()
    forwards = []

    def profiler(frame, event, arg):
        if event != "call":
            return
        callee = _module(frame.f_code)
        if callee is None:
            return
        name = f"{callee}.{frame.f_code.co_qualname}"
        calls[name] += 1
        caller = frame.f_back
        source = _module(caller.f_code) if caller is not None else None
        if source is not None and source != callee:
            edges.add((f"{source}.{caller.f_code.co_qualname}", name))

    distiller_class = gradual_sd.GradualSelfDistiller  # imported before the profile starts
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(tuple(args[0].shape)))
    sys.setprofile(profiler)
    try:
        distiller = distiller_class(model, example_input=example)
    finally:
        sys.setprofile(None)
        handle.remove()
    distiller.remove()
    return {"edges": sorted(edges), "calls": calls, "forwards": forwards}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", nargs="+", default=["torchvision:resnet18"], help="torchvision:NAME or timm:NAME"
    )
    parser.add_argument("--size", type=int, default=None, help="example side (default: the model's)")
    parser.add_argument("--edges", action="store_true", help="list every cross-module call")
    parser.add_argument("--calls", type=int, default=0, help="also list the N most called functions")
    parser.add_argument(
        "--count",
        default=r"probe|observe|select|_tensor_to_tap|seen_again|describe|checked_model|checked_example",
        help="a regular expression: the functions whose names match it, with their calls",
    )
    args = parser.parse_args(argv)
    for spec in args.model:
        torch.manual_seed(0)
        model = build(spec)
        example = None if args.size is None else torch.zeros(1, 3, args.size, args.size)
        found = trace(model, example)
        modules = len(dict(model.named_modules())) - 1
        print(f"{spec}: {modules} modules, example {args.size or 'default'}")
        print(f"  forwards: {len(found['forwards'])} {found['forwards']}")
        print(f"  distinct cross-module calls: {len(found['edges'])}")
        if args.edges:
            for caller, callee in found["edges"]:
                print(f"    {caller} -> {callee}")
        counted = {n: c for n, c in found["calls"].items() if re.search(args.count, n.rpartition(".")[2])}
        print(f"  calls of the functions matching {args.count!r}:")
        for name, count in sorted(counted.items(), key=lambda item: -item[1]):
            print(f"    {count:5d}  {name}")
        if args.calls:
            print(f"  most called library functions (top {args.calls}):")
            for name, count in found["calls"].most_common(args.calls):
                print(f"    {count:5d}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
