"""Where attention in every ResNet50 block spends its time beyond SE's: the torch profiler's
self CPU time per operator over a few training steps of each variant, as differences to
``se-blocks``.

    python benchmarks/attention_profile.py --img-size 112 --batch 8 --steps 3

A time ratio says how much more a variant costs; this says which operators the difference
sits in (the max with its index, the gate networks' matrix products, the autograd functions'
own Python time). Profiled times are inflated by the profiler and noisy on a shared machine:
read the large rows, not the last digit.
"""

from __future__ import annotations

import argparse
import sys

import torch

import cost
from _harness import command_line, machine_line


def self_times(variant: str, img_size: int, batch: int, steps: int) -> dict[str, tuple[float, float]]:
    """Operator -> (self CPU ms per step, calls per step)."""
    device = torch.device("cpu")
    x, y = cost.batch(batch, img_size, device)
    step = cost.make_step(cost.build(variant, x[:1]), x, y, "none")
    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(steps):
            step()
    return {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in profile.key_averages()}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", default="acam-blocks", choices=["acam-blocks", "cbam-blocks"])
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = self_times("se-blocks", args.img_size, args.batch, args.steps)
    other = self_times(args.variant, args.img_size, args.batch, args.steps)
    ops = sorted(set(base) | set(other), key=lambda k: other.get(k, (0, 0))[0] - base.get(k, (0, 0))[0])
    total = {name: sum(t for t, _ in times.values()) for name, times in (("se", base), ("other", other))}
    print(f"`{command_line()}`\n\n{machine_line(torch.device('cpu'))}; {args.steps} profiled steps each\n")
    print(
        f"Self CPU time per training step: se-blocks {total['se']:.1f} ms, {args.variant} "
        f"{total['other']:.1f} ms ({total['other'] - total['se']:+.1f} ms); the operators that "
        "differ most:\n"
    )
    print(f"| operator | {args.variant} ms (calls) | se-blocks ms (calls) | difference ms |")
    print("|---|---|---|---|")
    for op in ops[::-1][: args.rows]:
        (t, n), (tb, nb) = other.get(op, (0.0, 0)), base.get(op, (0.0, 0))
        print(f"| `{op}` | {t:.2f} ({n:.0f}) | {tb:.2f} ({nb:.0f}) | {t - tb:+.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
