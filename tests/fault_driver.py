"""Run ``train_gsdnet.main(argv)`` with a fault at a named point, for the kill and stall tests.

``GSDNET_FAULT=point:n:SIGNAL[:rank]`` sends ``SIGNAL`` (KILL or STOP) to this process the
``n``-th time it reaches ``point`` (only on that torchrun rank, if given); ``train-step:n:NAN``
makes that step's images NaN instead:

* ``checkpoint-write``: while writing checkpoint.pt (a few bytes are in the temporary file);
* ``train-step``: before an optimiser step;
* ``run-start``: as a run of the command starts training (after the previous runs finished);
* ``before-reports``: after a run's last epoch, before its confusion matrix, metrics.json;
* ``before-checkpoint-removal``: after metrics.json is written, before it is verified.
"""

import os
import signal
import sys

import examples_path  # noqa: F401
import train_gsdnet
from gsdnet import checkpoint, engine, report, runs


def nan_images(n: int) -> None:
    """The ``n``-th training step of this process sees NaN images."""
    original, count = engine.Trainer.train_step, 0

    def train_step(self, images, targets):
        nonlocal count
        count += 1
        return original(self, images * float("nan") if count == n else images, targets)

    engine.Trainer.train_step = train_step


def inject(point: str, n: int, sig: signal.Signals) -> None:
    count = 0

    def hit() -> bool:
        nonlocal count
        count += 1
        return count == n

    def fire() -> None:
        os.kill(os.getpid(), sig)

    def wrap(owner, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if hit():
                fire()
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    if point == "checkpoint-write":
        original = checkpoint.atomic_write

        def atomic_write(path, write):
            if path.name != "checkpoint.pt" or not hit():
                return original(path, write)

            def partial(file):
                file.write(b"PK\x03\x04 a partial checkpoint")
                file.flush()
                fire()

            return original(path, partial)

        checkpoint.atomic_write = atomic_write
    else:
        owner, name = {
            "train-step": (engine.Trainer, "train_step"),
            "run-start": (engine.Trainer, "fit"),
            "before-reports": (report, "plot_confusion_matrix"),
            "before-checkpoint-removal": (runs, "unverified"),
        }[point]
        wrap(owner, name)


if __name__ == "__main__":
    fault = os.environ.get("GSDNET_FAULT")
    if fault:
        point, n, sig, *rank = fault.split(":")
        here = not rank or rank[0] == os.environ.get("RANK", "0")
        if here and (point, sig) == ("train-step", "NAN"):
            nan_images(int(n))
        elif here:
            inject(point, int(n), getattr(signal, f"SIG{sig}"))
    train_gsdnet.main(sys.argv[1:])
