"""Ways to get each channel's spatial max *and its position* on the current device, timed as
paired ratios to ``mean`` over the same map (see ``_harness``).

    python benchmarks/spatial_max.py --threads 1
    python benchmarks/spatial_max.py --device cuda

ACAM's training path needs the argmax (its gradient goes there); which kernel finds it fastest
differs by device and by memory layout. ``gradual_sd._pooled_gate.spatial_max`` is what ACAM
uses; the other rows are the candidates it was chosen from. ``amax`` and ``mean`` find no
position and are there as the floor: a reduction that reads the map once. A channels-last copy
costs one extra pass over the map, which ACAM's pass budget allows only if the pool it enables
saves more than the copy costs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _harness import (
    CLOCKS,
    command_line,
    default_clock,
    format_ratio,
    interleaved_times,
    machine_line,
    markdown_table,
    paired_ratios,
)
from gradual_sd._pooled_gate import spatial_max

Candidate = Callable[[torch.Tensor], object]


def flat_max(x: torch.Tensor) -> object:
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w).max(2)


def channels_last_view_max(x: torch.Tensor) -> object:
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c).max(1)


def channels_last_copy_then_adaptive(x: torch.Tensor) -> object:
    return F.adaptive_max_pool2d(x.contiguous(memory_format=torch.channels_last), 1, return_indices=True)


CANDIDATES: dict[str, Candidate] = {
    "spatial_max (ACAM)": spatial_max,
    "max over flattened H*W": flat_max,
    "adaptive_max_pool2d": lambda x: F.adaptive_max_pool2d(x, 1, return_indices=True),
    "max_pool2d, kernel H x W": lambda x: F.max_pool2d(x, x.shape[-2:], return_indices=True),
    "channels-last view, max over H*W": channels_last_view_max,
    "channels-last copy + adaptive_max_pool2d": channels_last_copy_then_adaptive,
    "amax (no position)": lambda x: x.amax((2, 3)),
    "mean (no position)": lambda x: x.mean((2, 3)),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["8x256x28", "8x512x14", "8x1024x7", "8x2048x4", "64x512x14", "64x2048x7"],
        help="NxCxS: batch, channels and the side of a square map (ResNet50's stages at 112 px)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed sample")
    parser.add_argument("--clock", choices=CLOCKS, help="default: cpu for 1-thread CPU runs, else wall")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def timed(candidate: Candidate, x: torch.Tensor, calls: int) -> Callable[[], None]:
    def call() -> None:
        for _ in range(calls):
            candidate(x)

    return call


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = args.clock or default_clock(device)
    print(f"`{command_line()}`\n\n{machine_line(device, clock)}\n", flush=True)
    names = list(CANDIDATES)
    rows = []
    for shape in args.shapes:
        n, c, s = (int(v) for v in shape.split("x"))
        x = torch.randn(n, c, s, s, device=device, dtype=getattr(torch, args.dtype))
        for layout, tensor in (
            ("NCHW", x),
            ("channels-last", x.contiguous(memory_format=torch.channels_last)),
        ):
            fns = {name: timed(fn, tensor, args.calls) for name, fn in CANDIDATES.items()}
            times = interleaved_times(fns, device, args.repeats, 2, clock)
            ratios = paired_ratios(times, "mean (no position)")
            mean_ms = ratios["mean (no position)"]["median_s"] / args.calls * 1e3
            rows.append(
                [f"{n}x{c}x{s}x{s}", layout, f"{mean_ms:.3f}"]
                + [f"{ratios[k]['median']:.2f}" for k in names[:-1]]
            )
            detail = "; ".join(f"{k}: {format_ratio(ratios[k])}" for k in names[:-1])
            print(f"{shape} {layout}: {detail}", file=sys.stderr, flush=True)
    print(
        f"Time per call as a paired ratio to `mean` over the same map ({args.dtype}, {args.repeats} "
        f"repetitions of {args.calls} calls), median; the interquartile ranges go to stderr\n"
    )
    print(markdown_table(["map", "layout", "mean ms"] + names[:-1], rows))


if __name__ == "__main__":
    main(sys.argv[1:])
