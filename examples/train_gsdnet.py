"""Train GSDNet (or the Table 2 ablation variants) on a facial-expression dataset.

Defaults follow the reference recipe for RAF-DB: timm ResNet50, Adam lr 1e-4 and weight decay
1e-4, learning rate x0.9 per epoch, 40 epochs, batch 64, 224 x 224 input, T = 3, KL 0.3,
feature 0.01 in the reference formulation, no cross-entropy on the auxiliary heads (the loss
flags change these). ``--as-shipped`` trains what the authors' code trains, quirks included.
``--val-fraction`` and ``--seeds`` give the honest protocol: the epoch is picked on a validation
split carved from the training set, and mean +- std over seeds is reported next to the paper's
protocol (best epoch on the test set, optimistic). ``--dataset digits`` is a small stand-in that
ships with scikit-learn (no download); it uses its own small preset and is not a
facial-expression result.

    python examples/train_gsdnet.py --dataset digits --method all
    python examples/train_gsdnet.py --dataset rafdb --data-dir RAF-DB/basic \\
        --weights vgg_msceleb_resnet50_ft_weight.pkl --val-fraction 0.1 --seeds 0 1 2
    torchrun --nproc_per_node 4 examples/train_gsdnet.py --dataset ferplus --data-dir FERPlus ...

From Python, ``main(argv)`` returns the run's metrics dict; with several methods or seeds,
``{"runs": {method: [metrics per seed]}, "comparison": path of comparison.md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

import gradual_sd
from gradual_sd.losses import FORMULATIONS, TEACHERS
from gsdnet import checkpoint
from gsdnet.argtypes import non_negative_float, non_negative_int, positive_float, positive_int, timm_model
from gsdnet.datasets import DATASETS, build_datasets
from gsdnet.datasets.common import (
    DatasetSplits,
    ImageList,
    UnreadableImagesError,
    class_balanced_weights,
    find_unreadable,
    stratified_split,
)
from gsdnet.distributed import DEFAULT_TIMEOUT_S, DistEnv, init_distributed, shutdown, stall_error
from gsdnet.engine import Trainer, eval_loader, train_loader
from gsdnet.exits import EXIT_OUTPUTS, report_exits
from gsdnet.identity import run_identity
from gsdnet.metrics import comparison_table, plot_confusion_matrix
from gsdnet.models import HEADS, METHODS, PAPER_LOSS, build_gsdnet, export_payload
from gsdnet.runs import finish, finished_metrics, has_state
from gsdnet.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

log = logging.getLogger("gsdnet")
EXAMPLES = Path(__file__).resolve().parent

# The reference recipe, and the preset of the shipped stand-in: small and trained from scratch
# (so a larger learning rate), sized to compare all three methods over two seeds in a few
# minutes on 2 cores. One thread: its convolutions are too small to gain from more, and a second
# thread on a busy CPU made epochs several times slower in our measurements. Its models are not
# worth keeping, so none are saved unless --save asks.
PAPER = dict(
    model="resnet50",
    img_size=224,
    epochs=40,
    batch_size=64,
    lr=1e-4,
    workers=min(4, os.cpu_count() or 1),
    seeds=[0],
    save=["final", "selected", "best"],
)
STAND_IN = dict(
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
STAND_IN_NOTE = (
    "SMALL STAND-IN, NOT RAF-DB: scikit-learn's 8x8 handwritten digits, a {model} at {img_size}px "
    "from {init}; it checks the pipeline, it is not a facial-expression result"
)
FACE_WEIGHTS = "vgg_msceleb_resnet50_ft_weight.pkl"
# model_*.pt hold the plain model (no heads, no hooks); gsdnet lives in examples/, not installed.
LOAD_HINT = (
    "load an exported model from any directory (returns the model in eval mode and its config: "
    "classes, img_size, mean, std):\n"
    "  import sys; sys.path.insert(0, {examples!r})\n"
    "  from gsdnet.models import load_exported\n"
    "  model, config = load_exported({path!r})"
)
MODEL_FILES = {"final": "model_final.pt", "selected": "model_selected.pt", "best": "model_best.pt"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, except where the help text states them (the preset options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def preset_help(key: str, what: str) -> str:
    return f"{what} (default: {PAPER.get(key)}; digits: {STAND_IN.get(key, PAPER.get(key))})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        usage="%(prog)s --dataset NAME [options] (--help lists them)",  # an error stays short
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
        epilog=f"presets: FER datasets {PAPER}; digits {STAND_IN}",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        required=True,
        help="digits is the shipped stand-in (no --data-dir needed)",
    )
    p.add_argument("--data-dir", type=Path, help="dataset root, in the layout users download")
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
    p.add_argument("--lr", type=positive_float, help=preset_help("lr", "Adam learning rate"))
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="Adam weight decay")
    p.add_argument("--lr-gamma", type=positive_float, default=0.9, help="learning-rate factor per epoch")
    p.add_argument(
        "--teacher",
        choices=TEACHERS,
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
        choices=FORMULATIONS,
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
    preset = STAND_IN if args.dataset == "digits" else PAPER
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dataset != "digits":
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
    return args


RUN_KEYS = (  # the settings a resumed run must share with its checkpoint (--epochs may grow)
    "dataset",
    "model",
    "img_size",
    "batch_size",
    "lr",
    "weight_decay",
    "lr_gamma",
    "teacher",
    "head",
    "head_pool_size",
    "train_limit",
    "val_fraction",
    "eval_split",
    "affectnet_classes",
    "balanced",
    "as_shipped",
    *PAPER_LOSS,
)


def setup_logging(output_dir: Path, env: DistEnv) -> list[logging.Handler]:
    log.setLevel(logging.INFO if env.is_main else logging.WARNING)
    log.propagate = False
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return handlers


def limit_train(train: ImageList, limit: int | None) -> ImageList:
    """A fixed subset (generator seed 0, independent of --seeds, so every method sees the same)."""
    if limit is None or limit >= len(train):
        return train
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return train.subset(keep.tolist())


def environment() -> dict:
    """Versions and the git commit, so a metrics file says what produced it."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=EXAMPLES, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=EXAMPLES, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "gradual_sd": gradual_sd.__version__,
        "git_commit": commit,
        "git_dirty": dirty if commit else None,
    }


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return (
        f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"
    )


class Progress:
    """The whole command's elapsed time and an ETA from the mean epoch time so far."""

    def __init__(self, total_epochs: int) -> None:
        self.started = time.time()
        self.total, self.done, self.epoch_seconds = total_epochs, 0, 0.0

    def step(self, seconds: float) -> str:
        self.done += 1
        self.epoch_seconds += seconds
        left = (self.total - self.done) * self.epoch_seconds / self.done
        elapsed = clock(time.time() - self.started)
        return f"elapsed {elapsed}, ETA {clock(left)} ({self.done}/{self.total} epochs)"


def epoch_line(record: dict, epochs: int) -> str:
    groups: dict[str, float] = {}
    for key, value in record["losses"].items():
        if key != "loss":
            groups[key.split("/")[0]] = groups.get(key.split("/")[0], 0.0) + value
    terms = ", ".join(f"{k} {v:.3f}" for k, v in groups.items())
    heads = " | ".join(f"{k} {100 * v:.1f}" for k, v in record["per_head_accuracy"].items())
    val = f"val {100 * record['val_accuracy']:.2f}%  " if "val_accuracy" in record else ""
    return (
        f"epoch {record['epoch']}/{epochs}  loss {record['losses']['loss']:.3f} ({terms})  "
        f"train {100 * record['train_accuracy']:.1f}%  {val}test {100 * record['test_accuracy']:.2f}% "
        f"(balanced {100 * record['test_balanced_accuracy']:.2f}%)  heads: {heads}  "
        f"lr {record['lr']:.1e}  {record['seconds']:.1f}s"
    )


def json_args(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def check_images(
    args: argparse.Namespace, lists: dict[str, ImageList], notes: dict[str, int]
) -> dict[str, ImageList]:
    """Decode every image file once, before training; raise listing every unreadable file, or
    with --skip-bad-images drop them and count them in ``notes`` (the dataset notes)."""
    if not args.check_images:
        return lists
    started = time.time()
    bad = {name: find_unreadable(images) for name, images in lists.items()}
    total = sum(len(images) for images in lists.values())
    log.info(
        "checked %d images in %.1fs: %d unreadable", total, time.time() - started, sum(map(len, bad.values()))
    )
    listing = [
        f"  {lists[name].sources[i]}: {reason}" for name, found in bad.items() for i, reason in found.items()
    ]
    if listing and not args.skip_bad_images:
        raise UnreadableImagesError(
            f"{len(listing)} unreadable images (nothing was trained):\n"
            + "\n".join(listing)
            + "\nReplace them, or pass --skip-bad-images to train and test without them"
        )
    if listing:
        log.warning("skipping %d unreadable images:\n%s", len(listing), "\n".join(listing))
    notes.update({f"{name}: unreadable images skipped": len(found) for name, found in bad.items() if found})
    return {
        name: images.subset([i for i in range(len(images)) if i not in bad[name]]) if bad[name] else images
        for name, images in lists.items()
    }


def prepare_data(args: argparse.Namespace) -> tuple[DatasetSplits, dict[str, ImageList]]:
    """The dataset, once per command: its splits and the checked lists to train and test on."""
    splits = build_datasets(args.dataset, args.data_dir, args.affectnet_classes, args.balanced)
    if args.eval_split == "val" and splits.val is None:
        raise ValueError(f"dataset {args.dataset!r} has no validation split; use --eval-split test")
    lists = {"train": limit_train(splits.train, args.train_limit)}
    lists["test"] = splits.val if args.eval_split == "val" else splits.test
    if args.val_fraction is None and splits.val is not None and args.eval_split == "test":
        lists["val"] = splits.val
    return splits, check_images(args, lists, splits.notes)


def run_one(
    args: argparse.Namespace,
    splits: DatasetSplits,
    lists: dict[str, ImageList],
    method: str,
    seed: int,
    env: DistEnv,
    out: Path,
    progress: Progress,
) -> dict:
    started = time.time()
    if env.is_main:
        orphans = checkpoint.remove_orphans(out)
        if orphans:
            log.info("removed %d temporary files left by a killed write in %s", len(orphans), out)
    train, test, val = lists["train"], lists["test"], lists.get("val")
    val_source = "the dataset's validation split" if val is not None else None
    if args.val_fraction is not None:
        keep, held_out = stratified_split(train.labels, args.val_fraction, seed)
        train, val = train.subset(keep), train.subset(held_out)
        val_source = f"{args.val_fraction:g} of the training set, stratified, seeded by the run's seed"
    weights = class_balanced_weights(train.labels, len(splits.classes)) if args.balanced else None
    train.transform = train_transform(args.img_size, hflip=splits.hflip)
    evals = {"test": test}
    if val is not None:
        evals["val"] = val
    for split in evals.values():
        split.transform = eval_transform(args.img_size)
    init = args.weights or "random initialisation"
    note = (
        STAND_IN_NOTE.format(model=args.model, img_size=args.img_size, init=init)
        if args.dataset == "digits"
        else None
    )
    if note:
        log.info("NOTE: %s", note)
    log.info(
        "%s; training on %d images%s; method %s%s, model %s, seed %d, classes %s",
        splits.description,
        len(train),
        f", validating on {len(val)} ({val_source})" if val is not None else "",
        method,
        " (as shipped)" if args.as_shipped else "",
        args.model,
        seed,
        splits.classes,
    )

    torch.manual_seed(seed)
    loss_options = {k: getattr(args, k) for k in PAPER_LOSS}
    module, config = build_gsdnet(
        method,
        args.model,
        len(splits.classes),
        weights=args.weights,
        caffe_resnet=args.caffe_resnet,
        img_size=args.img_size,
        teacher=args.teacher,
        head=args.head,
        head_pool_size=args.head_pool_size,
        as_shipped=args.as_shipped,
        **loss_options,
    )
    run_info = {k: getattr(args, k) for k in RUN_KEYS}
    run_info.update(method=method, seed=seed, world_size=env.world_size)
    run_info.update(run_identity(splits.classes, lists, args.data_dir, config["weights"]))
    if args.resume:
        done = finished_metrics(out, run_info, args.epochs)
        if done is not None:
            log.info("%s: finished and verified, skipped (--resume)", out)
            if env.is_main and not args.keep_checkpoint:  # a kill came before its removal
                (out / "checkpoint.pt").unlink(missing_ok=True)
            progress.total -= args.epochs
            return done
    trainer = Trainer(
        module,
        env,
        args.lr,
        args.weight_decay,
        args.lr_gamma,
        args.amp,
        args.sync_bn,
        later_ties=args.as_shipped,
    )
    if args.resume and (out / "checkpoint.pt").is_file():
        trainer.resume(out / "checkpoint.pt", run_info, args.epochs)
    elif args.resume:
        log.info("%s: no checkpoint yet; this run of the command starts from epoch 1", out)

    def save_model(kind: str, module) -> None:
        if kind in args.save:
            payload = export_payload(module, config, splits.classes, IMAGENET_MEAN, IMAGENET_STD)
            checkpoint.save(payload, out / MODEL_FILES[kind])

    def on_epoch(record: dict) -> None:
        lines = "".join(json.dumps(checkpoint.strict(r), allow_nan=False) + "\n" for r in trainer.history)
        checkpoint.atomic_write(out / "log.jsonl", lambda f: f.write(lines.encode()))
        log.info("%s  [%s]", epoch_line(record, args.epochs), progress.step(record["seconds"]))

    trainer.fit(
        train_loader(train, weights, args.batch_size, args.workers, env, seed, drop_last=args.as_shipped),
        {name: eval_loader(split, args.batch_size, args.workers, env) for name, split in evals.items()},
        args.epochs,
        splits.classes,
        seed,
        out,
        run_info,
        on_improved=save_model,
        on_epoch=on_epoch,
    )
    final, best, selected = trainer.last, trainer.best, trainer.selected
    tie_rule = "ties to the later epoch" if args.as_shipped else "ties to the earlier epoch"
    metrics = {
        "note": note,
        "dataset": args.dataset,
        "description": splits.description,
        "method": method,
        "as_shipped": args.as_shipped,
        "model": args.model,
        "seed": seed,
        "loss": None if method == "baseline" else dict(loss_options, teacher=args.teacher),
        "weights": config["weights"],
        "classes": splits.classes,
        "num_train_samples": len(train),
        "num_val_samples": len(val) if val is not None else None,
        "num_test_samples": len(test),
        "val_split": val_source,
        "eval_split": args.eval_split,
        "accuracy_units": "fraction in [0, 1]; balanced_accuracy is the mean per-class recall",
        "headline": "selected" if selected else "final",
        "final": final,
        "selected": None
        if selected is None
        else dict(selected, selected_on=f"validation accuracy of the last classifier ({tie_rule})"),
        "best": dict(
            best,
            selected_on=f"{args.eval_split} accuracy of the last classifier "
            f"(as the reference code does; optimistic; {tie_rule})",
        ),
        "dataset_notes": splits.notes,
        "args": json_args(args),
        "environment": environment(),
        "world_size": env.world_size,
        "wall_time_s": round(time.time() - started, 1),
        "run": run_info,
    }
    if env.is_main:
        save_model("final", trainer.module)
        if method != "baseline" and not args.as_shipped:  # early exits (gsdnet/exits.py)
            metrics["early_exit"] = report_exits(
                trainer.module,
                test,
                val,
                args.batch_size,
                out,
                f"{method}, {args.dataset}",
                save="final" in args.save,  # the exit model holds the whole model, as --save final does
            )
        plot_confusion_matrix(
            final["confusion_matrix"],
            splits.classes,
            out / "confusion_matrix.png",
            f"{method}, {args.dataset}, epoch {final['epoch']} (final)",
        )
        outputs = ["log.jsonl", "confusion_matrix.png", *MODEL_FILES.values(), *EXIT_OUTPUTS]
        finish(out, metrics, outputs, args.keep_checkpoint)
        if selected:
            log.info(
                "%s seed %d: test at the epoch picked on validation (%d): %.2f%% (balanced %.2f%%); "
                "final epoch %.2f%%; best epoch on test %d: %.2f%% (optimistic)",
                method,
                seed,
                selected["epoch"],
                100 * selected["test"]["accuracy"],
                100 * selected["test"]["balanced_accuracy"],
                100 * final["accuracy"],
                best["epoch"],
                100 * best["accuracy"],
            )
        else:
            log.info(
                "%s seed %d: final epoch %d accuracy %.2f%% (balanced %.2f%%, headline); best epoch "
                "%d %.2f%% (picked on the test set, optimistic)",
                method,
                seed,
                final["epoch"],
                100 * final["accuracy"],
                100 * final["balanced_accuracy"],
                best["epoch"],
                100 * best["accuracy"],
            )
        files = [
            "metrics.json",
            "log.jsonl",
            "train.log" if out == args.output_dir else None,
            "confusion_matrix.png",
        ]
        files += [
            MODEL_FILES[k]
            for k in ("final", "selected", "best")
            if k in args.save and (out / MODEL_FILES[k]).is_file()
        ]
        if args.keep_checkpoint:
            files.append("checkpoint.pt")
        log.info("wrote %s: %s", out, ", ".join(f for f in files if f))
        saved = [out / f for f in files if f and f.startswith("model_")]
        if saved:
            log.info(LOAD_HINT.format(examples=str(EXAMPLES), path=str(saved[0].resolve())))
    return metrics


def run_dir(args: argparse.Namespace, method: str, seed: int, methods: list[str]) -> Path:
    out = args.output_dir / method if len(methods) > 1 else args.output_dir
    return out / f"seed{seed}" if len(args.seeds) > 1 else out


def summary(runs: dict[str, list[dict]], seeds: list[int]) -> str:
    """comparison.md: every protocol's table, mean +- std over seeds."""
    first = next(iter(runs.values()))[0]
    header = (
        f"{first['note'] or first['description']}\n\nSeeds {seeds}; test accuracy (%) of the last "
        "classifier and of every head, mean ± std over seeds.\n"
    )
    parts = [header]
    if first["selected"]:
        parts.append(
            f"\n**Clean protocol**: test at the epoch picked on validation ({first['val_split']}):\n\n"
            + comparison_table(runs, "selected")
        )
    parts.append("\nFinal epoch:\n\n" + comparison_table(runs, "final"))
    parts.append(
        "\nBest epoch picked on the test set (the paper's protocol, optimistic):\n\n"
        + comparison_table(runs, "best")
    )
    return "".join(parts)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = init_distributed(args.device, args.dist_timeout)
    handlers = setup_logging(args.output_dir, env)
    methods = list(METHODS) if args.method == "all" else [args.method]
    progress = Progress(len(methods) * len(args.seeds) * args.epochs)
    failed = False
    try:
        dirs = [run_dir(args, m, s, methods) for m in methods for s in args.seeds]
        if args.resume and not any(has_state(d) for d in dirs):
            raise FileNotFoundError(
                f"--resume: no checkpoint.pt or finished run under {args.output_dir} to resume from"
            )
        if env.is_main:
            checkpoint.remove_orphans(args.output_dir)
        splits, lists = prepare_data(args)
        runs = {
            method: [
                run_one(
                    args, splits, lists, method, seed, env, run_dir(args, method, seed, methods), progress
                )
                for seed in args.seeds
            ]
            for method in methods
        }
        if len(methods) == 1 and len(args.seeds) == 1:
            return runs[methods[0]][0]
        path = args.output_dir / "comparison.md"
        if env.is_main:
            text = summary(runs, args.seeds)
            checkpoint.atomic_write(path, lambda f: f.write(text.encode()))
            log.info("\n%s\ncomparison: %s", text, path)
            log.info(
                "per-run outputs: %s",
                ", ".join(str(run_dir(args, m, s, methods)) for m in methods for s in args.seeds),
            )
        return {"runs": runs, "comparison": str(path)}
    except BaseException as error:
        failed = True
        stalled = stall_error(error, env, args.dist_timeout)
        if stalled is not None:
            raise stalled from error
        raise
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        shutdown(env, failed)
        torch.set_num_threads(threads)


# Errors a user can act on (data, checkpoint, settings, divergence, a stalled process): one message,
# the traceback only with --debug.
USER_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError, ImportError)

if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as error:
        if "--debug" in sys.argv:
            raise
        print(f"error: {error} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)
