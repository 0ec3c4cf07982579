"""Files written atomically (temporary file, fsync, rename), checkpoints that check themselves,
and strict JSON.

A kill mid-write leaves the previous file intact and an orphan ``.<name>.*.tmp`` beside it,
which :func:`remove_orphans` deletes on the next start. torch does not check a zip's CRCs on
load, so a checkpoint carries a sha256 of its own contents (every tensor's bytes and every other
value), recomputed on :func:`load`; a damaged file is refused, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

DIGEST_KEY = "content_sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; the message names the file and what to do."""


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


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_write` left in ``folder``."""
    orphans = sorted(Path(folder).glob(".*.*.tmp")) if Path(folder).is_dir() else []
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def content_digest(obj: Any) -> str:
    """sha256 of a nested structure of dicts, lists, tensors and plain values, in a fixed order."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                feed(key)
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"V{value!r};".encode())

    feed(obj)
    return digest.hexdigest()


def save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda file: torch.save(obj, file))


def save_checked(state: dict, path: Path) -> None:
    """``state`` with its :func:`content_digest`, for :func:`load` to verify."""
    save({**state, DIGEST_KEY: content_digest(state)}, path)


def load(path: Path) -> dict:
    """A checkpoint written by :func:`save_checked`, verified; :class:`CheckpointError` if not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from")
    advice = (
        "it cannot be resumed from. Delete it (or restore an intact copy) and run again: "
        "without a checkpoint the run starts over from epoch 1"
    )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty; {advice}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is not a complete zip archive (truncated?); {advice}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's messages vary, and some advise weights_only=False: never
        raise CheckpointError(f"checkpoint {path} is damaged ({type(error).__name__}); {advice}") from None
    if not isinstance(state, dict) or DIGEST_KEY not in state:
        raise CheckpointError(
            f"checkpoint {path} carries no content digest (written before checkpoints had one, or "
            f"not by this script), so it cannot be verified; {advice}"
        )
    saved = state.pop(DIGEST_KEY)
    if content_digest(state) != saved:
        raise CheckpointError(f"checkpoint {path} fails its content check (sha256 differs); {advice}")
    return state


def strict(obj: Any, where: str = "", found: list[str] | None = None) -> Any:
    """``obj`` with NaN and infinite floats replaced by ``None``; their paths go to ``found``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if found is not None:
            found.append(f"{where} ({obj})")
        return None
    if isinstance(obj, dict):
        return {k: strict(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def json_text(obj: Any) -> str:
    """Strict JSON (no NaN or Infinity tokens): a non-finite value becomes ``null``, and a dict
    gets a ``non_finite_values`` note naming where each one was."""
    found: list[str] = []
    clean = strict(obj, found=found)
    if found and isinstance(clean, dict):
        clean["non_finite_values"] = "null stands for a non-finite number at: " + ", ".join(found)
    return json.dumps(clean, indent=2, allow_nan=False) + "\n"


def save_json(obj: Any, path: Path) -> None:
    text = json_text(obj)
    atomic_write(path, lambda file: file.write(text.encode()))
