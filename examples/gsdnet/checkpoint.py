"""Checkpoints written atomically (temporary file, fsync, rename): a kill mid-write leaves the
previous checkpoint intact."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give results the usual mode
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda file: torch.save(obj, file))


def save_json(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))


def load(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)
