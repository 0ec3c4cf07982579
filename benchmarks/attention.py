"""ACAM alone against SE and CBAM's channel gate: forward + backward time over channel counts and
spatial sizes, as paired ratios to SE (see ``_harness``).

    python benchmarks/attention.py --threads 1
    python benchmarks/attention.py --device cuda --amp bf16 --compile

All modules use the same reduction (1/16). The input requires grad, as inside a network, so
the backward includes the gradient of the input through the gating multiply.

"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch
from timm.layers import SEModule
from timm.layers.cbam import ChannelAttn

from _harness import (
    CLOCKS,
    default_clock,
    command_line,
    format_ratio,
    interleaved_times,
    machine_line,
    markdown_table,
    paired_ratios,
)
from gradual_sd import ACAM


MODULES = {"se": SEModule, "cbam-channel": ChannelAttn, "acam": ACAM}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 256, 512, 1024, 2048])
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 14, 28, 56])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--max-elements",
        type=int,
        default=2048 * 28 * 28,
        help="skip shapes with more than this many elements per sample",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument(
        "--compile", action="store_true", help="time each module under torch.compile (inductor)"
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-ms", type=float, default=50.0, help="target duration of one sample")
    parser.add_argument("--clock", choices=CLOCKS, help="default: cpu for 1-thread CPU runs, else wall")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
    )
    clock = args.clock or default_clock(device)
    print(f"`{command_line()}`\n\n{machine_line(device, clock)}\n", flush=True)
    rows = []
    for channels in args.channels:
        eager = {name: cls(channels).to(device) for name, cls in MODULES.items()}
        params = {name: sum(p.numel() for p in m.parameters()) for name, m in eager.items()}
        for size in args.sizes:
            if channels * size * size > args.max_elements:
                continue
            modules = eager
            if args.compile:
                # Dynamo's cache is per forward function, shared by every instance of a class:
                # past its recompile limit (8 shapes) it would run the rest eagerly.
                torch._dynamo.reset()
                modules = {name: torch.compile(m, dynamic=False) for name, m in eager.items()}
            torch.manual_seed(0)
            x = torch.randn(args.batch, channels, size, size, device=device, requires_grad=True)
            grad = torch.randn_like(x)

            def fwd_bwd(module: torch.nn.Module, calls: int, x: torch.Tensor = x, grad: torch.Tensor = grad):
                def call() -> None:
                    for _ in range(calls):
                        with amp:
                            out = module(x)
                        out.backward(grad.to(out.dtype))
                        module.zero_grad(set_to_none=True)
                        x.grad = None

                return call

            # Small shapes take well under a millisecond; time enough calls per sample that
            # one sample lasts about --min-ms, so timer and scheduler noise stay small.
            single = interleaved_times({"se": fwd_bwd(modules["se"], 1)}, device, 3, args.warmup, clock)
            calls = max(1, math.ceil(args.min_ms / 1e3 / min(single["se"])))
            fns = {name: fwd_bwd(m, calls) for name, m in modules.items()}
            times = interleaved_times(fns, device, args.repeats, 1, clock)
            times = {name: [t / calls for t in values] for name, values in times.items()}
            ratios = paired_ratios(times, "se")
            cbam_base = paired_ratios(times, "cbam-channel")
            rows.append(
                [
                    channels,
                    f"{size}x{size}",
                    f"{ratios['se']['median_s'] * 1e3:.2f}",
                    format_ratio(ratios["cbam-channel"]),
                    format_ratio(ratios["acam"]),
                    format_ratio(cbam_base["acam"]),
                ]
            )
            print("| " + " | ".join(map(str, rows[-1])) + " |", file=sys.stderr, flush=True)
        rows.append([channels, "params", params["se"], params["cbam-channel"], params["acam"], ""])
    header = [
        "C",
        "H x W",
        "SE ms (median)",
        "CBAM-channel / SE",
        "ACAM / SE",
        "ACAM / CBAM-channel",
    ]
    print(
        f"Forward + backward, batch {args.batch}, {args.device}, amp={args.amp}, "
        f"{'compiled (inductor)' if args.compile else 'eager'}; "
        f"{args.repeats} paired repetitions of >= {args.min_ms:.0f} ms each, after warm-up; "
        "time per call: median [IQR] of paired ratios, then ratio of fastest times\n"
    )
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main(sys.argv[1:])
