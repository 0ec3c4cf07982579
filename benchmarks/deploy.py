"""Deployed exits in ONNX Runtime on the CPU: what the per-sample router costs, what each exit
saves, and when exits beat a smaller static model.

    python benchmarks/deploy.py --out runs/deploy
    python benchmarks/deploy.py --out runs/deploy --stand-in runs/digits-gsd-acam/seed0

For each model (random weights: time does not depend on them; heads are the paper's bottleneck
with ACAM on a 2x2 grid, ``pool_size=2``), the exit folder (``export_onnx``) and the whole model
exported to one ONNX file are timed side by side in ONNX Runtime, answering the same 32 images
one at a time (batch 1) or as one batch of 32, with one intra-op thread and with all cores:

- ``whole model``: the plain model as one ONNX file, the baseline (1.00), with ONNX Runtime's
  defaults; with all cores also ``whole model, spinning off``, the setting the runtime gives
  its graphs (idle intra-op threads do not spin);
- ``exits, all disabled``: the segment files in a chain with no head run: the router's overhead;
- ``exit k forced``: every sample leaves at head ``k`` (the other heads disabled), beside that
  exit's share of the model's FLOPs;
- ``first exit takes q``: head 0 alone enabled, at the threshold that lets a share ``q`` of the
  32 images leave there: per-sample routing at work inside a batch;
- with ``--smaller``, a smaller static model of the same family as one file (resnet18 for
  resnet50): where its row falls among the ``first exit takes q`` rows says at what share of
  early answers the exits win.

With ``--stand-in RUN`` (a seed folder of ``examples/train_gsdnet.py --dataset digits --save
final``), its calibrated exit folder is timed the same way on the digits test images, with the
runtime's accuracy beside the whole model's. Ratios are medians of paired per-repetition ratios
(``_harness``); one-thread runs use the process's CPU time, all-core runs wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from _harness import (
    command_line,
    format_ratio,
    interleaved_times,
    machine_line,
    markdown_table,
    paired_ratios,
)

from gradual_sd import ACAM, BottleneckHead, EarlyExitModel, GradualSelfDistiller
from gradual_sd.runtime import OnnxExitModel
from gradual_sd.runtime._exits import NO_SPINNING

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IMAGES = 32
SHARES = (0.25, 0.5, 0.75)


def export_whole(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The plain model as one ONNX file with a dynamic batch."""
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: batch},),
        external_data=False,
        verbose=False,
    )
    return path


def session(path: Path, threads: int | None, spinning: bool = True):
    """One ONNX file in ONNX Runtime; ``spinning=False`` as ``OnnxExitModel`` sets its graphs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry(*NO_SPINNING)
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    graph = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = graph.get_inputs()[0].name
    return lambda x: graph.run(None, {name: x})[0]


def answering(fn, images: np.ndarray, batch: int):
    """A call that answers every image, ``batch`` at a time."""
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    return lambda: [fn(chunk) for chunk in chunks]


def first_exit_share(runtime: OnnxExitModel, images: np.ndarray, share: float) -> list[float]:
    """Thresholds with head 0 alone enabled, letting ``share`` of ``images`` leave there."""
    heads = len(runtime.stage_names)
    runtime.set_thresholds([0.0] + [math.inf] * (heads - 1))
    confidence = []
    for image in images:  # head 0's confidence per image: everyone leaves at threshold 0
        logits = runtime(image[None]).logits[0]
        shifted = np.exp(logits - logits.max())
        confidence.append(float(shifted.max() / shifted.sum()))
    ranked = sorted(confidence, reverse=True)
    leave = round(share * len(ranked))
    threshold = (ranked[leave - 1] + ranked[leave]) / 2 if 0 < leave < len(ranked) else ranked[0]
    return [threshold] + [math.inf] * (heads - 1)


def time_variants(
    runtime: OnnxExitModel,
    whole: Path,
    extra: dict[str, Path],
    images: np.ndarray,
    threads: int | None,
    batch: int,
    repeats: int,
    variants: dict[str, list[float]],
) -> dict[str, dict]:
    """Paired ratios to the whole model of each threshold setting and each extra model."""
    fns = {"whole model": answering(session(whole, threads), images, batch)}
    if threads != 1:  # the exit graphs' setting, on the whole model: what it costs there
        fns["whole model, spinning off"] = answering(session(whole, threads, spinning=False), images, batch)
    for name, path in extra.items():
        fns[name] = answering(session(path, threads), images, batch)

    def with_thresholds(values: list[float]):
        call = answering(runtime, images, batch)

        def run():
            runtime.set_thresholds(values)
            return call()

        return run

    for name, values in variants.items():
        fns[name] = with_thresholds(values)
    clock = "cpu" if threads == 1 else "wall"
    times = interleaved_times(fns, torch.device("cpu"), repeats, warmup=1, clock=clock)
    return paired_ratios(times, "whole model")


def threshold_variants(runtime: OnnxExitModel, images: np.ndarray) -> dict[str, list[float]]:
    heads = len(runtime.stage_names)
    variants = {"exits, all disabled": [math.inf] * heads}
    for k, name in enumerate(runtime.stage_names):
        variants[f"exit {k} ({name}) forced"] = [0.0 if j == k else math.inf for j in range(heads)]
    for share in SHARES:
        variants[f"first exit takes {share:.0%}"] = first_exit_share(runtime, images, share)
    return variants


def flops_shares(runtime: OnnxExitModel, variants: dict[str, list[float]]) -> dict[str, float]:
    flops = runtime.manifest["flops"]
    shares = {"whole model": 1.0, "exits, all disabled": 1.0}
    for k in range(len(runtime.stage_names)):
        name = next(n for n in variants if n.startswith(f"exit {k} "))
        shares[name] = (flops["stages"][k] + flops["heads"][k]) / flops["full"]
    return shares


def benchmark_model(spec: str, smaller: str | None, work: Path, args) -> str:
    name, size = spec.split(":")
    size = int(size)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    example = torch.zeros(1, 3, size, size)
    distiller = GradualSelfDistiller(
        model, example_input=example, head_factory=partial(BottleneckHead, attn_layer=ACAM, pool_size=2)
    )
    distiller.eval()
    exits = EarlyExitModel.from_distiller(distiller, example_input=example)
    images = torch.randn(IMAGES, 3, size, size, generator=torch.Generator().manual_seed(1))
    folder = exits.export_onnx(work / name, example_input=images[:4])
    whole = export_whole(exits.model, images[:2], work / f"{name}.onnx")
    extra = {}
    if smaller:
        torch.manual_seed(0)
        extra[f"{smaller} (whole, static)"] = export_whole(
            timm.create_model(smaller, num_classes=7).eval(), images[:2], work / f"{smaller}.onnx"
        )
    sections = []
    for threads in args.threads:
        runtime = OnnxExitModel(folder, threads=threads)
        variants = threshold_variants(runtime, images.numpy())
        shares = flops_shares(runtime, variants)
        label = "1 thread" if threads == 1 else f"all {os.cpu_count()} cores"
        columns = {}
        for batch in args.batch_sizes:
            columns[batch] = time_variants(
                runtime, whole, extra, images.numpy(), threads, batch, args.repeats, variants
            )
        rows = []
        for variant in columns[args.batch_sizes[0]]:
            share = shares.get(variant)
            rows.append(
                [
                    variant,
                    "" if share is None else f"{share:.2f}",
                    *(format_ratio(columns[b][variant]) for b in args.batch_sizes),
                ]
            )
        header = ["variant", "FLOPs share", *(f"time ratio, batch {b}" for b in args.batch_sizes)]
        ms = columns[args.batch_sizes[0]]["whole model"]["median_s"] * 1000 / IMAGES
        sections.append(
            f"### {name} at {size} px, ONNX Runtime, {label} "
            f"(whole model {ms:.2f} ms per image at batch {args.batch_sizes[0]})\n\n"
            + markdown_table(header, rows)
        )
    return "\n\n".join(sections)


def benchmark_stand_in(run: Path, work: Path, args) -> str:
    """The trained stand-in's calibrated exits on the digits test images."""
    sys.path.insert(0, str(EXAMPLES))
    from gsdnet.datasets import build_datasets
    from gsdnet.models import load_exported
    from gsdnet.transforms import eval_transform

    model, config = load_exported(run / "model_final.pt")
    # --save final writes the exits of the epoch the run reports: picked on validation, else the last
    saved = next(p for p in (run / "early_exit_selected", run / "early_exit_final") if p.is_dir())
    exits = EarlyExitModel.load(saved, model)
    test = build_datasets("digits").test
    test.transform = eval_transform(config["img_size"])
    pairs = [test[i] for i in range(len(test))]
    images = torch.stack([p[0] for p in pairs])
    targets = np.array([p[1] for p in pairs])
    folder = exits.export_onnx(work / "stand-in", example_input=images[:4])
    whole = export_whole(exits.model, images[:2], work / "stand-in.onnx")
    runtime = OnnxExitModel(folder, threads=1)
    out = runtime(images.numpy())
    whole_logits = session(whole, 1)(images.numpy())
    accuracy = float((out.logits.argmax(1) == targets).mean())
    full = float((whole_logits.argmax(1) == targets).mean())
    shares = [float((out.exit_index == k).mean()) for k in range(len(runtime.stage_names) + 1)]
    thresholds = list(runtime.thresholds)
    rows = []
    for threads in args.threads:
        runtime = OnnxExitModel(folder, threads=threads)
        label = "1 thread" if threads == 1 else f"all {os.cpu_count()} cores"
        for batch in args.batch_sizes:
            ratios = time_variants(
                runtime,
                whole,
                {},
                images.numpy(),
                threads,
                batch,
                args.repeats,
                {"calibrated exits": thresholds},
            )
            spinning_off = ratios.get("whole model, spinning off")
            rows.append(
                [
                    label,
                    batch,
                    format_ratio(ratios["calibrated exits"]),
                    format_ratio(spinning_off) if spinning_off else "-",
                ]
            )
    return (
        f"### Trained stand-in ({config['model_name']} at {config['img_size']} px, digits), "
        "calibrated thresholds\n\n"
        f"{len(targets)} test images; thresholds {['off' if t > 1 else round(t, 3) for t in thresholds]}; "
        f"runtime accuracy {100 * accuracy:.2f} % against the whole model's {100 * full:.2f} %; "
        f"share per exit {[round(s, 3) for s in shares]}\n\n"
        + markdown_table(
            ["ONNX Runtime", "batch", "calibrated exits x whole model", "whole model, spinning off"], rows
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/deploy"))
    parser.add_argument("--models", nargs="+", default=["resnet50:224", "vit_small_patch16_224:224"])
    parser.add_argument("--smaller", nargs="*", default=["resnet50=resnet18"], help="MODEL=SMALLER pairs")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 0], help="intra-op threads per graph; 0: all cores"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--stand-in", type=Path, help="a seed folder of the digits stand-in run with --save final"
    )
    args = parser.parse_args()
    args.threads = [t if t > 0 else None for t in args.threads]
    torch.set_num_threads(1)
    smaller = dict(pair.split("=") for pair in args.smaller)
    args.out.mkdir(parents=True, exist_ok=True)
    sections = [f"`{command_line()}`", machine_line(torch.device("cpu"), None)]
    import onnxruntime

    sections.append(f"onnxruntime {onnxruntime.__version__}")
    with tempfile.TemporaryDirectory() as work:
        for spec in args.models:
            sections.append(benchmark_model(spec, smaller.get(spec.split(":")[0]), Path(work), args))
            print(sections[-1], flush=True)
        if args.stand_in:
            sections.append(benchmark_stand_in(args.stand_in, Path(work), args))
            print(sections[-1], flush=True)
    text = "\n\n".join(sections) + "\n"
    (args.out / "deploy.md").write_text(text)
    (args.out / "deploy.json").write_text(json.dumps({"text": text}))
    print(f"wrote {args.out / 'deploy.md'}")


if __name__ == "__main__":
    main()
