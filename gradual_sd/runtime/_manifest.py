"""The exit folder's manifest: what a deployment needs to run the exits without the training
code, and the sha256 of every file it names.

Written by :meth:`gradual_sd.EarlyExitModel.export_onnx`, read by
:class:`~gradual_sd.runtime.OnnxExitModel`. Plain Python: no torch, no numpy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
SAVED_CONFIG = "early_exit.json"  # in the folders EarlyExitModel.save writes, for PyTorch
FORMAT = "gradual-sd-exits"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """The folder is not a usable exit folder: a file is missing, damaged or of another format."""


def sha256(path: Path) -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of ``directory``, after checking its format and every file's digest."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise ManifestError(
            f"{directory} does not exist (not an exit folder: write one with "
            "EarlyExitModel.export_onnx(directory))"
        )
    if not path.is_file():
        saved = (directory / SAVED_CONFIG).is_file()
        kind = " (it holds exits saved for PyTorch by EarlyExitModel.save)" if saved else ""
        raise ManifestError(
            f"{path} does not exist: {directory} is not an exit folder for ONNX Runtime{kind}; "
            "write one with EarlyExitModel.export_onnx(directory)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a {FORMAT!r} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {version!r}; this gradual_sd reads version {FORMAT_VERSION} "
            "(export the folder again with this version)"
        )
    for name, expected in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise ManifestError(f"{file} is listed in {MANIFEST_FILE} but missing")
        actual = sha256(file)
        if actual != expected:
            raise ManifestError(
                f"{file} does not match {MANIFEST_FILE}: its sha256 is {actual}, the manifest says "
                f"{expected}. The file was changed or damaged after export; export the folder again"
            )
    return manifest
