"""Where the distiller's own per-step time goes: cProfile of training steps, gradual_sd frames only.

    python benchmarks/overhead_profile.py --model resnet10t --img-size 16 --steps 100

Timing ratios cannot resolve a cost of a fraction of a millisecond on a shared machine; a
profile can. The library's bookkeeping is what its frames spend beyond the heads' and the
loss terms' tensor work (hooks, captured-output and target checks, the finiteness check).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys

import torch

import cost
from _harness import command_line, machine_line


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--variant", default="gsd-paper-heads", choices=cost.VARIANTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cost.MODEL_NAME = args.model
    device = torch.device("cpu")
    x, y = cost.batch(args.batch, args.img_size, device)
    step = cost.make_step(cost.build(args.variant, x[:1]), x, y, "none")
    for _ in range(5):
        step()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        step()
    profile.disable()
    print(f"`{command_line()}`\n\n{machine_line(device)}; {args.steps} steps, times per run\n")
    pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative").print_stats("gradual_sd", 25)


if __name__ == "__main__":
    main(sys.argv[1:])
