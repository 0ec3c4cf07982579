"""Train GSDNet (or the Table 2 ablation variants) on a facial-expression dataset.

Defaults follow the reference recipe for RAF-DB: timm ResNet50, Adam lr 1e-4 and weight decay
1e-4, learning rate x0.9 per epoch, 40 epochs, batch 64, 224 x 224 input, T = 3, KL 0.3,
feature 0.01 in the reference formulation, no cross-entropy on the auxiliary heads (the loss
flags change these). ``--dataset digits`` is a small stand-in that ships with scikit-learn (no
download); it uses its own small preset and is not a facial-expression result.

    python examples/train_gsdnet.py --dataset digits --method all
    python examples/train_gsdnet.py --dataset rafdb --data-dir RAF-DB/basic \\
        --weights vgg_msceleb_resnet50_ft_weight.pkl --output-dir runs/rafdb-gsdnet
    torchrun --nproc_per_node 4 examples/train_gsdnet.py --dataset ferplus --data-dir FERPlus ...

From Python, ``main(argv)`` returns the run's metrics dict (with ``--method all``:
``{"runs": {method: metrics}, "comparison": path of comparison.md}``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from gsdnet import checkpoint
from gsdnet.datasets import DATASETS, LabelFileError, build_datasets
from gsdnet.datasets.common import ImageList, class_balanced_weights, log
from gsdnet.distributed import DistEnv, init_distributed, shutdown
from gsdnet.engine import NonFiniteLossError, Trainer, eval_loader, train_loader
from gsdnet.exits import report_exits
from gsdnet.metrics import comparison_table, plot_confusion_matrix
from gsdnet.models import HEADS, METHODS, PAPER_LOSS, build_gsdnet, export_payload
from gsdnet.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

# The reference recipe, and the preset of the shipped stand-in: small and trained from scratch
# (so a larger learning rate), sized to compare all three methods in about two and a half minutes
# on 2 cores. One thread: its convolutions are too small to gain from more, and a second thread
# on a busy CPU made epochs several times slower in our measurements.
PAPER = dict(model="resnet50", img_size=224, epochs=40, batch_size=64, lr=1e-4, workers=4)
STAND_IN = dict(model="resnet10t", img_size=32, epochs=8, batch_size=64, lr=1e-3, workers=0, threads=1)
STAND_IN_NOTE = (
    "SMALL STAND-IN, NOT RAF-DB: scikit-learn's 8x8 handwritten digits, a {model} at {img_size}px "
    "from {init}; it checks the pipeline, it is not a facial-expression result"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--model", help="any timm model name (default resnet50)")
    p.add_argument(
        "--weights",
        help="initial weights: a .pkl (resnet50_ft), .pth or .safetensors "
        "file, or 'timm' for timm's pretrained weights (needs the hub or its cache)",
    )
    p.add_argument(
        "--caffe-resnet",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="patch the ResNet for Caffe-ported weights (default: on for .pkl weights)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch, split over torchrun processes")
    p.add_argument("--img-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-gamma", type=float, default=0.9, help="learning-rate factor per epoch")
    p.add_argument(
        "--teacher",
        choices=("neighbour", "deepest"),
        default="neighbour",
        help="neighbour: GSDNet's gradual pairs; deepest: BYOT-style, the last classifier teaches all",
    )
    p.add_argument("--head", choices=sorted(HEADS), default="bottleneck")
    loss = p.add_argument_group("loss (gsd and gsd-acam; defaults: the paper's)")
    loss.add_argument("--temperature", type=float, default=PAPER_LOSS["temperature"])
    loss.add_argument("--kl-weight", type=float, default=PAPER_LOSS["kl_weight"])
    loss.add_argument("--feature-weight", type=float, default=PAPER_LOSS["feature_weight"])
    loss.add_argument(
        "--formulation",
        choices=("reference", "normalized"),
        default=PAPER_LOSS["formulation"],
        help="reference: the paper's code (KL without T^2, torch.dist features); "
        "normalized: T^2-scaled KL, per-sample squared feature distance",
    )
    loss.add_argument(
        "--aux-ce-weight",
        type=float,
        default=PAPER_LOSS["aux_ce_weight"],
        help="cross-entropy weight on every auxiliary head (paper: 0)",
    )
    p.add_argument("--train-limit", type=int, help="train on a fixed random subset of N images")
    p.add_argument(
        "--eval-split",
        choices=("test", "val"),
        default="test",
        help="val exists for FERPlus (PublicTest) only",
    )
    p.add_argument("--affectnet-classes", type=int, choices=(7, 8), default=7)
    p.add_argument("--balanced", action="store_true", help="class-balanced sampling (AffectNet)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun processes")
    p.add_argument("--workers", type=int)
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for PyTorch (default: PyTorch's choice; 1 for digits); "
        "1 avoids oversubscription on a CPU shared with other jobs",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <output-dir>/checkpoint.pt (same settings, --epochs may grow)",
    )
    args = p.parse_args(argv)
    preset = STAND_IN if args.dataset == "digits" else PAPER
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output_dir is None:
        args.output_dir = Path("runs") / f"{args.dataset}-{args.method}"
    if args.train_limit is not None and args.train_limit < 1:
        p.error("--train-limit must be >= 1")
    return args


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
    """A fixed subset (generator seed 0, independent of --seed, so every method sees the same)."""
    if limit is None or limit >= len(train):
        return train
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return ImageList([train.sources[i] for i in keep], [train.labels[i] for i in keep], train.transform)


def epoch_line(record: dict, epochs: int) -> str:
    groups: dict[str, float] = {}
    for key, value in record["losses"].items():
        if key != "loss":
            groups[key.split("/")[0]] = groups.get(key.split("/")[0], 0.0) + value
    terms = ", ".join(f"{k} {v:.3f}" for k, v in groups.items())
    heads = " | ".join(f"{k} {100 * v:.1f}" for k, v in record["per_head_accuracy"].items())
    return (
        f"epoch {record['epoch']}/{epochs}  loss {record['losses']['loss']:.3f} ({terms})  "
        f"train {100 * record['train_accuracy']:.1f}%  test {100 * record['test_accuracy']:.2f}%  "
        f"heads: {heads}  lr {record['lr']:.1e}  {record['seconds']:.1f}s"
    )


def run_one(args: argparse.Namespace, method: str, env: DistEnv, out: Path) -> dict:
    started = time.time()
    splits = build_datasets(args.dataset, args.data_dir, args.affectnet_classes, args.balanced)
    if args.eval_split == "val" and splits.val is None:
        raise ValueError(f"dataset {args.dataset!r} has no validation split; use --eval-split test")
    test = splits.val if args.eval_split == "val" else splits.test
    train = limit_train(splits.train, args.train_limit)
    weights = class_balanced_weights(train.labels, len(splits.classes)) if args.balanced else None
    train.transform = train_transform(args.img_size, hflip=splits.hflip)
    test.transform = eval_transform(args.img_size)
    init = args.weights or "random initialisation"
    note = (
        STAND_IN_NOTE.format(model=args.model, img_size=args.img_size, init=init)
        if args.dataset == "digits"
        else None
    )
    if note:
        log.info("NOTE: %s", note)
    log.info(
        "%s; training on %d images; method %s, model %s, classes %s",
        splits.description,
        len(train),
        method,
        args.model,
        splits.classes,
    )

    torch.manual_seed(args.seed)
    loss_options = {k: getattr(args, k) for k in PAPER_LOSS}
    module = build_gsdnet(
        method,
        args.model,
        len(splits.classes),
        weights=args.weights,
        caffe_resnet=args.caffe_resnet,
        img_size=args.img_size,
        teacher=args.teacher,
        head=args.head,
        **loss_options,
    )
    trainer = Trainer(module, env, args.lr, args.weight_decay, args.lr_gamma, args.amp, args.sync_bn)
    run_info = {
        k: str(getattr(args, k))
        for k in (
            "dataset",
            "model",
            "img_size",
            "batch_size",
            "lr",
            "weight_decay",
            "lr_gamma",
            "teacher",
            "head",
            "train_limit",
            "seed",
            "eval_split",
            "affectnet_classes",
            "balanced",
            *PAPER_LOSS,
        )
    }
    run_info.update(method=method, world_size=env.world_size)
    if args.resume:
        trainer.resume(out / "checkpoint.pt", run_info)

    def save_model(module, name: str) -> None:
        checkpoint.save(export_payload(module, splits.classes, IMAGENET_MEAN, IMAGENET_STD), out / name)

    def on_epoch(record: dict) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in trainer.history)
        checkpoint.atomic_write(out / "log.jsonl", lambda f: f.write(lines.encode()))
        log.info(epoch_line(record, args.epochs))

    trainer.fit(
        train_loader(train, weights, args.batch_size, args.workers, env, args.seed),
        eval_loader(test, args.batch_size, args.workers, env),
        args.epochs,
        splits.classes,
        args.seed,
        out,
        run_info,
        on_best=lambda m: save_model(m, "model_best.pt"),
        on_epoch=on_epoch,
    )
    final, best = trainer.last, trainer.best
    metrics = {
        "note": note,
        "dataset": args.dataset,
        "description": splits.description,
        "method": method,
        "model": args.model,
        "loss": None if method == "baseline" else dict(loss_options, teacher=args.teacher),
        "classes": splits.classes,
        "num_train_samples": len(train),
        "num_test_samples": len(test),
        "eval_split": args.eval_split,
        "accuracy_units": "fraction in [0, 1]",
        "headline": "final",
        "final": final,
        "best": dict(
            best,
            selected_on=f"{args.eval_split} accuracy of the last classifier "
            "(as the reference code does; optimistic)",
        ),
        "dataset_notes": splits.notes,
        "args": {k: str(v) for k, v in vars(args).items()},
        "world_size": env.world_size,
        "wall_time_s": round(time.time() - started, 1),
    }
    if env.is_main:
        save_model(trainer.module, "model_final.pt")
        if method != "baseline":  # early exits on the trained heads (gsdnet/exits.py)
            metrics["early_exit"] = report_exits(
                trainer.module, test, splits.val, args.batch_size, out, f"{method}, {args.dataset}"
            )
        checkpoint.save_json(metrics, out / "metrics.json")
        plot_confusion_matrix(
            final["confusion_matrix"],
            splits.classes,
            out / "confusion_matrix.png",
            f"{method}, {args.dataset}, epoch {final['epoch']} (final)",
        )
        log.info(
            "%s: final epoch %d accuracy %.2f%% (headline); best epoch %d %.2f%% (picked on the "
            "test set, optimistic)",
            method,
            final["epoch"],
            100 * final["accuracy"],
            best["epoch"],
            100 * best["accuracy"],
        )
        log.info(
            "wrote %s: metrics.json, log.jsonl, confusion_matrix.png, model_final.pt "
            "(plain model, load with gsdnet.models.load_exported), checkpoint.pt",
            out,
        )
    return metrics


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = init_distributed(args.device)
    handlers = setup_logging(args.output_dir, env)
    try:
        if args.method != "all":
            return run_one(args, args.method, env, args.output_dir)
        runs = {m: run_one(args, m, env, args.output_dir / m) for m in METHODS}
        table = comparison_table(runs, "final")
        path = args.output_dir / "comparison.md"
        if env.is_main:
            header = f"{runs['baseline']['note'] or runs['baseline']['description']}\n\n"
            text = (
                header
                + "Final epoch, test accuracy (%) of the last classifier and of every head:\n\n"
                + table
                + "\nBest epoch (picked on the test set, optimistic):\n\n"
                + comparison_table(runs, "best")
            )
            checkpoint.atomic_write(path, lambda f: f.write(text.encode()))
            log.info("\n%s\ncomparison: %s", table, path)
            log.info("per-method outputs: %s", ", ".join(str(args.output_dir / m) for m in METHODS))
        return {"runs": runs, "comparison": str(path)}
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        shutdown(env)
        torch.set_num_threads(threads)


if __name__ == "__main__":
    try:
        main()
    except (NonFiniteLossError, FileNotFoundError, LabelFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
