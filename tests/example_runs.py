"""Runs of ``examples/train_gsdnet.py`` for the example tests, trained in-process on one thread.

An end-to-end run takes seconds (its exit model's ONNX export most of them), so a run that
several tests read is trained once per session by a fixture in ``conftest.py`` (``rafdb_run``)
or once per module, and each test reads the :class:`ExampleRun` it returns. The run's folders
are shared: a test that changes them (a resume, an edited label file) works on
:meth:`ExampleRun.copy`.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import examples_path  # noqa: F401
import train_gsdnet


@dataclass(frozen=True)
class ExampleRun:
    """A finished command: its data folder, output folder, what ``main`` returned and what it
    printed."""

    data: Path | None
    out: Path
    argv: tuple[str, ...]
    metrics: dict
    printed: str

    def copy(self, root: Path) -> ExampleRun:
        """The same run with its data and output folders copied under ``root``, the arguments
        pointing there: for tests that change them."""
        moved = {}
        for folder in (self.data, self.out):
            if folder is not None:
                moved[str(folder)] = str(root / folder.name)
                shutil.copytree(folder, root / folder.name)
        data = None if self.data is None else root / self.data.name
        argv = tuple(moved.get(a, a) for a in self.argv)
        return ExampleRun(data, root / self.out.name, argv, self.metrics, self.printed)


def train(argv: list[str], out: Path) -> ExampleRun:
    """``train_gsdnet.main(argv + ["--output-dir", out])`` on one thread, its stdout kept."""
    data = Path(argv[argv.index("--data-dir") + 1]) if "--data-dir" in argv else None
    argv = [*argv, "--output-dir", str(out)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            metrics = train_gsdnet.main(argv)
    finally:
        torch.set_num_threads(threads)
    return ExampleRun(data, out, tuple(argv), metrics, printed.getvalue())
