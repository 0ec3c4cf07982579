"""What gradual self distillation buys: every head's test accuracy, mean and standard deviation
over seeds, for the plain baseline, gradual SD, gradual SD + ACAM, the BYOT-style teacher and
a few loss/head settings, on full data and on a reduced training set.

    python benchmarks/accuracy.py --seeds 0 1 2 --jobs 2

Each run is one call of ``examples/train_gsdnet.py`` (its ``main``) in a fresh process with one
torch thread, on the dataset that ships with the install (scikit-learn's digits; not facial
expressions). Every configuration of a regime gets the same data, epochs and schedule.
Accuracies are those of the final epoch; the best epoch (picked on the test set, as the
reference code does) is reported for the last classifier only, as an optimistic aside.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _harness import command_line, machine_line, markdown_table

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# name -> train_gsdnet flags; the loss settings not named keep the paper's values.
CONFIGS: dict[str, list[str]] = {
    "baseline": ["--method", "baseline"],
    "gsd": ["--method", "gsd"],
    "gsd-acam": ["--method", "gsd-acam"],
    "byot": ["--method", "gsd", "--teacher", "deepest"],
    "gsd-acam pooled-head": ["--method", "gsd-acam", "--head", "pooled"],
    "gsd-acam normalized": ["--method", "gsd-acam", "--formulation", "normalized"],
    "gsd-acam aux-CE": ["--method", "gsd-acam", "--aux-ce-weight", "1"],
}


def child(argv: list[str]) -> None:
    """Run one training in this process and print its metrics as one JSON line."""
    import torch

    torch.set_num_threads(1)  # shared cores: OpenMP threads that wait on each other stall
    sys.path.insert(0, str(EXAMPLES))
    import train_gsdnet

    metrics = train_gsdnet.main(argv)
    final, best = metrics["final"], metrics["best"]
    print(
        json.dumps(
            {
                "final": final["per_head_accuracy"],
                "best_last": best["accuracy"],
                "train_samples": metrics["num_train_samples"],
                "batch_size": int(metrics["args"]["batch_size"]),
                "test_samples": metrics["num_test_samples"],
                "seconds": metrics["wall_time_s"],
            }
        )
    )


def run(config: str, regime: dict, seed: int, args: argparse.Namespace) -> dict:
    out = args.output_dir / regime["name"] / config.replace(" ", "_") / f"seed{seed}"
    argv = [
        *CONFIGS[config],
        "--dataset",
        args.dataset,
        "--seed",
        str(seed),
        "--device",
        "cpu",
        "--img-size",
        str(args.img_size),
        "--epochs",
        str(regime["epochs"]),
        "--output-dir",
        str(out),
        *regime["flags"],
    ]
    result = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{config} seed {seed} failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"{regime['name']:8s} {config:22s} seed {seed}: {record['final']}  {record['seconds']}s",
        file=sys.stderr,
        flush=True,
    )
    return record


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def table(records: dict[str, list[dict]]) -> str:
    heads: list[str] = []
    for runs in records.values():
        for name in runs[0]["final"]:
            if name not in heads:
                heads.append(name)
    # The last classifier is named after the model's classifier; keep it last.
    last = list(next(iter(records.values()))[0]["final"])[-1]
    heads = [h for h in heads if h != last] + [last]
    rows = []
    for config, runs in records.items():
        row = [config]
        for head in heads:
            values = [r["final"][head] for r in runs if head in r["final"]]
            row.append(mean_std(values) if values else "-")
        row.append(mean_std([r["best_last"] for r in runs]))
        row.append(f"{statistics.mean(r['seconds'] for r in runs):.0f}")
        rows.append(row)
    header = ["config", *[f"{h} (final)" for h in heads], f"{last} best epoch", "s/run"]
    return markdown_table(header, rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--full-epochs", type=int, default=8)
    parser.add_argument("--reduced-limit", type=int, default=300)
    parser.add_argument("--reduced-epochs", type=int, default=20)
    parser.add_argument("--reduced-batch-size", type=int, help="default: the example's (64)")
    parser.add_argument("--regimes", nargs="+", default=["full", "reduced"], choices=["full", "reduced"])
    parser.add_argument("--jobs", type=int, default=2, help="training processes at once")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/benchmark-accuracy"))
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        child(argv[1:])
        return
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # only so that the machine line names the children's setting
    started = time.time()
    regimes = {
        "full": {"name": "full", "epochs": args.full_epochs, "flags": []},
        "reduced": {
            "name": "reduced",
            "epochs": args.reduced_epochs,
            "flags": ["--train-limit", str(args.reduced_limit)],
        },
    }
    if args.reduced_batch_size:
        regimes["reduced"]["flags"] += ["--batch-size", str(args.reduced_batch_size)]
    jobs = [
        (regime, config, seed) for regime in args.regimes for config in args.configs for seed in args.seeds
    ]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(run, job[1], regimes[job[0]], job[2], args) for job in jobs}
    print(
        f"`{command_line()}`\n\n{machine_line(torch.device('cpu'))}; "
        f"{args.jobs} runs at once, 1 thread each; {time.time() - started:.0f} s in all\n"
    )
    for name in args.regimes:
        regime = regimes[name]
        records = {c: [futures[(name, c, s)].result() for s in args.seeds] for c in args.configs}
        sample = next(iter(records.values()))[0]
        print(
            f"{name} data: batch {sample['batch_size']}, {sample['train_samples']} train / "
            f"{sample['test_samples']} test images, {regime['epochs']} epochs, {args.img_size} px, "
            f"seeds {args.seeds}; test accuracy %, mean ± std over seeds\n"
        )
        print(table(records) + "\n")
    with open(args.output_dir / "results.json", "w") as f:
        json.dump({f"{r}/{c}/{s}": fut.result() for (r, c, s), fut in futures.items()}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
