"""Train a Hugging Face image classifier with gradual self distillation under ``transformers.Trainer``.

``GSDTrainer`` overrides ``compute_loss`` to run the :class:`GradualSelfDistiller` around the
model, logs every loss term (``ce``, ``kl/<stage>``, ``feature/<stage>``...) with the Trainer's
own ``loss``, and evaluates every head's accuracy. When training ends the plain Hugging Face
model (no heads, no hooks) is exported and saved with ``save_pretrained``, so
``AutoModelForImageClassification.from_pretrained("runs/hf_trainer/model")`` loads it.

    python examples/hf_trainer_gsd.py --epochs 5                      # a small ViT from scratch
    python examples/hf_trainer_gsd.py --model-type convnext --epochs 5
    python examples/hf_trainer_gsd.py --pretrained google/vit-base-patch16-224 --img-size 224

The data is scikit-learn's handwritten digits (the stand-in of ``train_gsdnet.py``), so the
example runs with no download; any dataset whose items are ``(image tensor, label)`` works. The
Trainer's ``dataloader_drop_last`` would drop evaluation images too, so it is left off: choose a
batch size that leaves no last training batch of one, which training-mode BatchNorm rejects once
a stage's maps are 1x1.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    EvalPrediction,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from gradual_sd import GradualSelfDistiller
from gsdnet.datasets import build_datasets
from gsdnet.transforms import eval_transform, train_transform

NUM_CLASSES = 10  # the digits

# Small configurations to train from scratch, by model type; any other field keeps its default.
SMALL_CONFIGS = {
    "vit": dict(
        patch_size=4, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128
    ),
    "convnext": dict(patch_size=2, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1]),
    "resnet": dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
}


def build_model(args: argparse.Namespace) -> PreTrainedModel:
    """A pretrained checkpoint (a local folder or a hub name) with a new ``NUM_CLASSES`` head,
    or a small model of ``--model-type`` initialised at random for ``--img-size`` images."""
    if args.pretrained:
        return AutoModelForImageClassification.from_pretrained(
            args.pretrained, num_labels=NUM_CLASSES, ignore_mismatched_sizes=True
        )
    config = AutoConfig.for_model(
        args.model_type, num_labels=NUM_CLASSES, image_size=args.img_size, **SMALL_CONFIGS[args.model_type]
    )
    return AutoModelForImageClassification.from_config(config)


def collate(batch: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """``(image, label)`` items as the Trainer's batch: ``pixel_values`` and ``labels``."""
    images, labels = zip(*batch)
    return {"pixel_values": torch.stack(images), "labels": torch.as_tensor(labels)}


class GSDTrainer(Trainer):
    """A ``Trainer`` whose model is a :class:`GradualSelfDistiller`.

    Training steps return the distiller's combined loss; its terms are averaged between two
    logging steps and logged beside the Trainer's ``loss``. Evaluation runs every head, so the
    predictions are all heads' logits, ``(N, heads, classes)``, for :func:`head_accuracy`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.terms: defaultdict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = model(inputs["pixel_values"], inputs["labels"], run_heads=True)
        if model.training:
            for name, value in out.losses.items():
                self.terms[name].append(value.detach().item())
        return (out.loss, {"logits": torch.stack(out.head_logits, 1)}) if return_outputs else out.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the terms seen since the last one
            logs.update({name: float(np.mean(values)) for name, values in self.terms.items()})
            self.terms.clear()
        super().log(logs, *args, **kwargs)


def head_accuracy(heads: list[str]):
    """``compute_metrics`` for :class:`GSDTrainer`: ``acc/<head>`` for every head."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
        correct = logits.argmax(-1) == labels[:, None]
        return {f"acc/{head}": float(correct[:, i].mean()) for i, head in enumerate(heads)}

    return compute


class Digits(Dataset):
    """The digits split as ``(image, label)`` items, upscaled to the model's size."""

    def __init__(self, train: bool, img_size: int, limit: int | None = None) -> None:
        splits = build_datasets("digits")
        data = splits.train if train else splits.test
        data.transform = train_transform(img_size, hflip=splits.hflip) if train else eval_transform(img_size)
        if limit is not None:
            keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit]
            data = Subset(data, keep.tolist())
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit", choices=sorted(SMALL_CONFIGS))
    parser.add_argument("--pretrained", help="a local folder or hub name to fine-tune instead")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after N steps (-1: epochs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--train-limit", type=int, help="train on a fixed random subset of N images")
    parser.add_argument("--eval-limit", type=int, help="evaluate on a fixed random subset of N images")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/hf_trainer"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate, save ``<output-dir>/model``; returns the log history, the last
    evaluation, the exported model and its folder."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(args)
    distiller = GradualSelfDistiller(model)
    heads = list(distiller.head_names)
    training = TrainingArguments(
        output_dir=str(args.output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=args.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # the batches are built by collate, not from dataset columns
        label_names=["labels"],
        use_cpu=args.cpu,
        seed=args.seed,
    )
    trainer = GSDTrainer(
        model=distiller,
        args=training,
        data_collator=collate,
        train_dataset=Digits(True, args.img_size, args.train_limit),
        eval_dataset=Digits(False, args.img_size, args.eval_limit),
        compute_metrics=head_accuracy(heads),
    )
    trainer.train()
    evaluation = trainer.evaluate()
    plain = distiller.export()
    folder = args.output_dir / "model"
    plain.save_pretrained(folder)
    accuracy = ", ".join(f"{h} {100 * evaluation[f'eval_acc/{h}']:.1f}%" for h in heads)
    print(f"evaluation accuracy per head: {accuracy}\nplain model saved to {folder}")
    return {"history": trainer.state.log_history, "evaluation": evaluation, "model": plain, "path": folder}


if __name__ == "__main__":
    main()
