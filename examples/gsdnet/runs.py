"""Which runs of a command are finished, so that ``--resume`` skips them and continues the rest.

A run is finished when its ``metrics.json`` (written last) lists every other output with its
sha256 and every listed file still has that digest. Only then is its checkpoint removed, so a
kill at any point leaves either a verified finished run or a checkpoint to continue from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .checkpoint import save_json
from .engine import RunMismatchError, differences
from .weights import file_sha256

log = logging.getLogger(__name__)


def output_digests(out: Path, names: list[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of the named files of ``out`` (folders: every file inside)."""
    files: list[Path] = []
    for name in names:
        path = out / name
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {p.relative_to(out).as_posix(): file_sha256(p) for p in files}


def unverified(out: Path, outputs: dict[str, str]) -> list[str]:
    """The listed outputs that are missing or whose sha256 changed."""
    return [
        name for name, sha in outputs.items() if not (out / name).is_file() or file_sha256(out / name) != sha
    ]


def finished_metrics(out: Path, identity: dict, epochs: int) -> dict | None:
    """The metrics of the finished, verified run in ``out``, or ``None`` when it must (still)
    train. Raises :class:`RunMismatchError` for a finished run of other settings or epochs."""
    path = out / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet (a kill came first): continue from the checkpoint
    if not isinstance(metrics, dict) or "outputs" not in metrics or "run" not in metrics:
        raise RunMismatchError(
            f"--resume refused: {path} was written by an older version of this script, which "
            "recorded neither its settings nor its outputs; move the folder away to train this "
            "run again"
        )
    differ = differences(metrics["run"], identity)
    if differ:
        raise RunMismatchError(
            f"--resume refused: {path} was written by a different run configuration ({differ}). "
            "Resume with the original settings, or use another --output-dir"
        )
    done = metrics["final"]["epoch"]
    if done > epochs:
        raise RunMismatchError(
            f"--resume refused: {path} is a finished run of {done} epochs, beyond --epochs {epochs}; "
            f"pass --epochs {done}"
        )
    if done < epochs and not (out / "checkpoint.pt").is_file():
        raise RunMismatchError(
            f"--resume refused: {path} is a run finished at {done} epochs whose checkpoint was "
            "removed, so it cannot train further (--keep-checkpoint keeps it); "
            f"pass --epochs {done}, or use another --output-dir"
        )
    if done < epochs:
        return None
    damaged = unverified(out, metrics["outputs"])
    if damaged:
        log.warning("%s: outputs missing or changed since the run finished: %s; redoing them", out, damaged)
        return None
    return metrics


def finish(out: Path, metrics: dict, outputs: list[str], keep_checkpoint: bool) -> None:
    """Write ``metrics.json`` last, with the sha256 of each of ``outputs`` that exists; remove
    the checkpoint only once every one of them is verified on disk."""
    metrics["outputs"] = output_digests(out, [name for name in outputs if (out / name).exists()])
    save_json(metrics, out / "metrics.json")
    damaged = unverified(out, metrics["outputs"])
    if damaged:
        raise OSError(f"outputs of {out} did not verify after writing: {damaged}; checkpoint.pt kept")
    if not keep_checkpoint:
        (out / "checkpoint.pt").unlink(missing_ok=True)


def has_state(out: Path) -> bool:
    """Whether ``out`` holds anything ``--resume`` can use."""
    return (out / "checkpoint.pt").is_file() or (out / "metrics.json").is_file()
