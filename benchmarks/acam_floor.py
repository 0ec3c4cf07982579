"""How much of ACAM's cost beyond SE's is its argmax: ResNet50 training steps with ACAM in every
block, once as it is and once with the max found by ``amax`` and its position taken as 0 (a
wrong gradient, the same work otherwise), as paired ratios to SE blocks (see ``_harness``).

    python benchmarks/acam_floor.py --repeats 20

The second variant is a timing floor, not a model: it is what ACAM would cost if the device's
kernel for the max with its position were as fast as ``amax``.
"""

from __future__ import annotations

import argparse
import sys

import torch

import cost
import gradual_sd._pooled_gate as pooled_gate
from _harness import (
    command_line,
    format_ratio,
    interleaved_times,
    machine_line,
    markdown_table,
    paired_ratios,
)


def _max_without_position(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = x.shape[:2]
    return x.amax((2, 3)), torch.zeros(n, c, dtype=torch.long, device=x.device)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    x, y = cost.batch(args.batch, args.img_size, device)
    steps = {
        name: cost.make_step(cost.build(name, x[:1]), x, y, "none")
        for name in ("plain", "se-blocks", "acam-blocks")
    }
    floor_step = cost.make_step(cost.build("acam-blocks", x[:1]), x, y, "none")

    def floor() -> None:
        # Swapped for this step only, so the other steps run the library's own kernel; the
        # pooling looks spatial_max up at call time.
        spatial_max = pooled_gate.spatial_max
        pooled_gate.spatial_max = _max_without_position
        try:
            floor_step()
        finally:
            pooled_gate.spatial_max = spatial_max

    steps["acam-blocks, argmax at amax's cost"] = floor
    times = interleaved_times(steps, device, args.repeats, 1, "cpu")
    to_plain, to_se = paired_ratios(times, "plain"), paired_ratios(times, "se-blocks")
    print(f"`{command_line()}`\n\n{machine_line(device, 'cpu')}\n")
    print(
        f"Training step, resnet50, {args.img_size} px, batch {args.batch}; {args.repeats} paired "
        "repetitions: median [IQR], then ratio of fastest times\n"
    )
    rows = [[name, format_ratio(to_plain[name]), format_ratio(to_se[name])] for name in steps]
    print(markdown_table(["variant", "time / plain", "time / se-blocks"], rows))


if __name__ == "__main__":
    main(sys.argv[1:])
