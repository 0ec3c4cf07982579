"""How often a freshly initialised ACAM's shared MLP is dead, by hidden-width rounding.

    python benchmarks/acam_width.py

For each channel count and ``rd_divisor``, builds ``inits`` ACAMs (seeds 0, 1, ...) with
PyTorch's default initialisation, runs one batch of post-ReLU features (``relu(randn)``, what a
stage after an activation gives) through it, backpropagates a random output gradient, and
counts the inits where both weights of the shared MLP ``f`` get an all-zero gradient: every
hidden unit is negative on every sample's average and max descriptor, so ReLU passes nothing
and ``f`` cannot start learning.
"""

from __future__ import annotations

import argparse
import sys

import torch

from _harness import command_line, markdown_table
from gradual_sd import ACAM


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 24, 32, 64, 256])
    parser.add_argument("--divisors", type=int, nargs="+", default=[1, 8], help="rd_divisor values")
    parser.add_argument("--inits", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=8, help="height and width of the feature map")
    return parser.parse_args(argv)


def shared_mlp_is_dead(module: ACAM, x: torch.Tensor) -> bool:
    """Whether one backward leaves both weights of the shared MLP with an all-zero gradient."""
    module(x).backward(torch.randn_like(x))
    return all(not param.grad.any() for param in (module.fc1.weight, module.fc2.weight))


def dead_share(channels: int, rd_divisor: int, args: argparse.Namespace) -> tuple[int, float]:
    """Hidden width and the share of ``args.inits`` seeds whose shared MLP is dead."""
    dead = 0
    for seed in range(args.inits):
        torch.manual_seed(seed)
        module = ACAM(channels, rd_divisor=rd_divisor)
        x = torch.randn(args.batch, channels, args.size, args.size).relu()
        dead += shared_mlp_is_dead(module, x)
    return module.rd_channels, dead / args.inits


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    print(f"`{command_line()}`\n")
    rows = []
    for channels in args.channels:
        row: list[object] = [channels]
        for divisor in args.divisors:
            width, share = dead_share(channels, divisor, args)
            row += [width, f"{share:.1%}"]
        rows.append(row)
    header = ["C"] + [f"{col} (rd_divisor={d})" for d in args.divisors for col in ("hidden", "dead")]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main(sys.argv[1:])
