"""What a command prints: one logger for the console and ``train.log``, each epoch's line, and
the whole command's elapsed time and ETA.

``train.log`` is held in memory until :func:`keep_log` (called once a run passed its checks and
is about to train), so that a command refused before that (a missing data directory, weights
file or checkpoint) leaves no file behind.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from .distributed import DistEnv

log = logging.getLogger("gsdnet")


class PendingFileHandler(logging.Handler):
    """Appends to ``path`` once :meth:`keep` is called; the lines before it wait in memory."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path, self.lines, self.file = path, [], None

    def keep(self) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")  # closed in close()
            self.file.write("".join(self.lines))
            self.file.flush()
            self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record) + "\n"
        if self.file is None:
            self.lines.append(line)
        else:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def setup_logging(output_dir: Path, env: DistEnv) -> list[logging.Handler]:
    log.setLevel(logging.INFO if env.is_main else logging.WARNING)
    log.propagate = False
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if env.is_main:
        handlers.append(PendingFileHandler(output_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return handlers


def close_logging(handlers: list[logging.Handler]) -> None:
    for handler in handlers:
        log.removeHandler(handler)
        handler.close()


def keep_log() -> None:
    """Start writing ``train.log`` (with every line so far): the command passed its checks."""
    for handler in log.handlers:
        if isinstance(handler, PendingFileHandler):
            handler.keep()


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
