"""The command line of ``examples/train_gsdnet.py``: its flags, the two presets, and the checks
that need no file (a wrong value is an argparse error, exit code 2); :func:`parse_args` turns
them into a :class:`~gsdnet.config.RunConfig`."""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

from gradual_sd import GradualDistillationLoss

from .argtypes import non_negative_float, non_negative_int, positive_float, positive_int, timm_model
from .config import RunConfig
from .datasets import DATASETS, fashion_mnist
from .distributed import DEFAULT_TIMEOUT_S
from .engine import OPTIMIZERS, SCHEDULES
from .models import HEADS, METHODS, PAPER_LOSS
from .transforms import AUGMENTATIONS

DESCRIPTION = "Train GSDNet (or the Table 2 ablation variants) on a facial-expression dataset."

# The reference recipe; the preset of the shipped stand-in: small and trained from scratch (so a
# larger learning rate), sized to compare all three methods over two seeds in minutes on a small
# CPU, one thread (docs/reproducing.md says why), its models not worth keeping, so none are saved
# unless --save asks; and Fashion-MNIST's: a small ResNet from scratch with the usual recipe of
# small-image benchmarks (SGD with Nesterov momentum, one-cycle schedule, crops and flips), heads
# after every stage but the last, as the paper's (docs/benchmarks.md measures it).
PAPER = dict(
    model="resnet50",
    img_size=224,
    epochs=40,
    batch_size=64,
    lr=1e-4,
    weight_decay=1e-4,
    optimizer="adam",
    schedule="exponential",
    augment="fer",
    workers=min(4, os.cpu_count() or 1),
    seeds=[0],
    save=["final", "selected", "best"],
)
STAND_IN = dict(
    PAPER,
    model="resnet10t",
    img_size=32,
    epochs=5,
    batch_size=64,
    lr=1e-3,
    workers=0,
    threads=1,
    seeds=[0, 1],
    val_fraction=0.2,
    save=[],
)
FASHION_MNIST = dict(
    PAPER,
    model="small_resnet18",
    stages=["layer1", "layer2", "layer3"],
    img_size=28,
    epochs=12,
    batch_size=128,
    lr=0.1,
    weight_decay=5e-4,
    optimizer="sgd",
    schedule="onecycle",
    augment="crop-flip",
    workers=0,
    seeds=[0],
    val_fraction=0.1,
    save=["final", "selected"],
)
PRESETS = {"digits": STAND_IN, "fashion-mnist": FASHION_MNIST}  # any other dataset: PAPER
FACE_WEIGHTS = "vgg_msceleb_resnet50_ft_weight.pkl"
MODEL_FILES = {"final": "model_final.pt", "selected": "model_selected.pt", "best": "model_best.pt"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, except where the help text states them (the preset options); lines
    wrap between words only, so ``fashion-mnist`` stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def preset_help(key: str, what: str) -> str:
    """``what``, with the default of every preset."""
    others = "; ".join(f"{name}: {preset.get(key)}" for name, preset in PRESETS.items())
    return f"{what} (default: {PAPER.get(key)}; {others})"


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """The run configuration from ``argv`` (default ``sys.argv[1:]``); exits with status 2 and
    one line on a bad value."""
    p = argparse.ArgumentParser(
        usage="%(prog)s --dataset NAME [options] (--help lists them)",  # an error stays short
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
        epilog=f"presets: FER datasets {PAPER}; "
        + "; ".join(f"{name} {preset}" for name, preset in PRESETS.items()),
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        required=True,
        help="digits is the shipped stand-in (no --data-dir needed); fashion-mnist reads the four "
        "IDX files (apt-get install dataset-fashion-mnist)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="dataset root, in the layout users download (fashion-mnist: default "
        f"{fashion_mnist.DEFAULT_DIR})",
    )
    p.add_argument(
        "--method",
        choices=(*METHODS, "all"),
        default="gsd-acam",
        help="Table 2 row; 'all' trains the three in turn and writes comparison.md",
    )
    p.add_argument("--model", type=timm_model, help=preset_help("model", "any timm model name"))
    p.add_argument(
        "--weights",
        help=f"initial weights (required for the FER datasets): {FACE_WEIGHTS} (face-pretrained "
        "resnet50_ft, the paper's start), a .pth/.safetensors backbone, a checkpoint saved by the "
        "authors' code (whole GSDNet), 'timm' for timm's pretrained weights (needs the hub or its "
        "cache), or 'none' to train from scratch on purpose",
    )
    p.add_argument(
        "--caffe-resnet",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="patch the ResNet for Caffe-ported weights (default: on for .pkl weights and the "
        "authors' checkpoints)",
    )
    p.add_argument(
        "--as-shipped",
        action="store_true",
        help="train gsd-acam as the authors' code does: the heads' in-place sum, a trainable last "
        "projection, conv bias and init, drop the last partial batch, ties to the later epoch",
    )
    p.add_argument("--epochs", type=positive_int, help=preset_help("epochs", "training epochs"))
    p.add_argument(
        "--batch-size",
        type=positive_int,
        help=preset_help("batch_size", "global batch, split over torchrun processes"),
    )
    p.add_argument("--img-size", type=positive_int, help=preset_help("img_size", "input size in pixels"))
    p.add_argument(
        "--stages",
        nargs="+",
        metavar="NAME",
        help=preset_help(
            "stages", "the stages the heads follow, shallow to deep (None: the library's default_stage_names)"
        ),
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help=preset_help("optimizer", "adam, or sgd with Nesterov momentum 0.9"),
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help=preset_help(
            "schedule",
            "exponential: the rate times --lr-gamma after every epoch; onecycle: warm up to --lr "
            "over the first 30 %% of the steps, then anneal to zero, momentum cycled 0.95-0.85",
        ),
    )
    p.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        help=preset_help("augment", "fer: the reference recipe's; crop-flip: padded crops and flips"),
    )
    p.add_argument("--lr", type=positive_float, help=preset_help("lr", "peak learning rate"))
    p.add_argument(
        "--weight-decay", type=non_negative_float, help=preset_help("weight_decay", "weight decay")
    )
    p.add_argument(
        "--lr-gamma",
        type=positive_float,
        default=0.9,
        help="learning-rate factor per epoch (--schedule exponential)",
    )
    p.add_argument(
        "--teacher",
        choices=GradualDistillationLoss.TEACHERS,
        default="neighbour",
        help="neighbour: GSDNet's gradual pairs; deepest: BYOT-style, the last classifier teaches all",
    )
    p.add_argument(
        "--head",
        choices=sorted(HEADS),
        default="bottleneck",
        help="bottleneck: the paper's head; pooled: a cheaper head that pools first",
    )
    p.add_argument(
        "--head-pool-size",
        type=positive_int,
        metavar="N",
        help="with --head bottleneck: average-pool each stage output to at most N x N before the "
        "head's projection, BN and ReLU, so early exits stay cheap at large batches "
        "(default: the paper's full-resolution head; docs/early-exit.md)",
    )
    loss = p.add_argument_group("loss (gsd and gsd-acam; defaults: the paper's)")
    loss.add_argument(
        "--temperature",
        type=positive_float,
        default=PAPER_LOSS["temperature"],
        help="softening temperature T",
    )
    loss.add_argument(
        "--kl-weight",
        type=non_negative_float,
        default=PAPER_LOSS["kl_weight"],
        help="weight of each pair's KL term",
    )
    loss.add_argument(
        "--feature-weight",
        type=non_negative_float,
        default=PAPER_LOSS["feature_weight"],
        help="weight of each pair's feature term",
    )
    loss.add_argument(
        "--formulation",
        choices=GradualDistillationLoss.FORMULATIONS,
        default=PAPER_LOSS["formulation"],
        help="reference: the paper's code (KL without T^2, torch.dist features); "
        "normalized: T^2-scaled KL, per-sample squared feature distance",
    )
    loss.add_argument(
        "--aux-ce-weight",
        type=non_negative_float,
        default=PAPER_LOSS["aux_ce_weight"],
        help="cross-entropy weight on every auxiliary head (paper: 0)",
    )
    protocol = p.add_argument_group("protocol")
    protocol.add_argument(
        "--val-fraction",
        type=float,
        help="hold out this stratified, seeded fraction of the training set; the epoch is picked "
        "on it and the test set is scored at that epoch (default: off; digits: 0.2; 0: off)",
    )
    protocol.add_argument(
        "--seeds",
        "--seed",
        type=non_negative_int,
        nargs="+",
        help=preset_help("seeds", "seeds to run; mean +- std over them in comparison.md"),
    )
    protocol.add_argument(
        "--train-limit", type=positive_int, help="train on a fixed random subset of N images"
    )
    protocol.add_argument(
        "--eval-split",
        choices=("test", "val"),
        default="test",
        help="val exists for FERPlus (PublicTest) only",
    )
    p.add_argument(
        "--affectnet-classes", type=int, choices=(7, 8), default=7, help="AffectNet's 7- or 8-class protocol"
    )
    p.add_argument("--balanced", action="store_true", help="class-balanced sampling (AffectNet)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes")
    p.add_argument(
        "--workers",
        type=non_negative_int,
        help=f"DataLoader worker processes per training process (default: {PAPER['workers']}, "
        "at most the machine's cores; digits: 0, its images are in memory)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads for PyTorch (default: PyTorch's choice; 1 for digits); "
        "1 avoids oversubscription on a CPU shared with other jobs",
    )
    out = p.add_argument_group("outputs")
    out.add_argument("--output-dir", type=Path, help="default: runs/<dataset>-<method>")
    out.add_argument(
        "--save",
        nargs="*",
        choices=sorted(MODEL_FILES),
        help="exported models to write: final epoch, the epoch selected on validation, the best "
        "epoch on test (default: all that apply; digits: none)",
    )
    out.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep checkpoint.pt (model, optimiser and history) after a finished run; it is "
        "always written during training so that --resume can continue after a kill",
    )
    out.add_argument(
        "--check-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode every image file before training and report all unreadable ones at once",
    )
    out.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="train and test without the unreadable images (counted in metrics.json)",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue the command: skip its finished runs, continue each unfinished one from its "
        "checkpoint.pt (same settings, data and weights; --epochs may grow)",
    )
    out.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    p.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="with torchrun: how long a process waits for the others in a collective before the "
        "run ends with an error (a stalled or dead process otherwise blocks the rest forever)",
    )
    args = p.parse_args(argv)
    preset = PRESETS.get(args.dataset, PAPER)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dataset not in PRESETS:
        if args.data_dir is None:
            p.error(f"--data-dir is required for --dataset {args.dataset}")
        if args.weights is None:
            p.error(
                f"--weights is required for --dataset {args.dataset}: the paper starts from the "
                f"face-pretrained {FACE_WEIGHTS} (resnet50_ft; docs/reproducing.md says where to "
                "get it). To train from scratch on purpose, pass --weights none"
            )
    if args.weights is not None and args.weights.lower() == "none":
        args.weights = None
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"{args.dataset}-{args.method}"
    if args.val_fraction == 0:  # turns off the digits preset's split
        args.val_fraction = None
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be 0 (off) or lie strictly between 0 and 1, got {args.val_fraction}")
    if args.as_shipped and args.method != "gsd-acam":
        p.error(f"--as-shipped reproduces the authors' GSDNet (gsd-acam), not --method {args.method}")
    if args.head_pool_size is not None and (args.head != "bottleneck" or args.as_shipped):
        shipped = " --as-shipped" if args.as_shipped else ""
        p.error(
            "--head-pool-size applies to --head bottleneck without --as-shipped, "
            f"not --head {args.head}{shipped}"
        )
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds lists a seed twice: {args.seeds}")
    stages = None if args.stages is None else tuple(args.stages)
    return RunConfig(**dict(vars(args), seeds=tuple(args.seeds), save=tuple(args.save), stages=stages))
