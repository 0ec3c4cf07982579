"""Answer images with an exported exit folder and ONNX Runtime alone (no torch, no training code).

    python examples/deploy_exits.py runs/digits-gsd-acam/early_exit_selected_onnx photos/ a.png b.jpg

For each image (files, or every image in a folder): the class, the exit that answered (a stage's
head or the model's own classifier), the confidence (top softmax probability) and the time it
took, one image at a time as a stream would arrive. Images are read with Pillow, converted to
RGB, resized to the folder's input size and normalised with the mean and std the folder's
manifest records (``metadata``), as the training example's evaluation transform does.

A mistake a user can fix (a folder that is not an exit folder for ONNX Runtime, a file that is
no image, thresholds out of range) ends in one line, ``error: ...``, with exit status 2; every
image is checked before the first answer is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from gradual_sd.runtime import ManifestError, OnnxExitModel
from gradual_sd.runtime._manifest import MANIFEST_FILE

# What a user can fix: ManifestError and a bad threshold are ValueErrors, a file Pillow cannot
# read an OSError, a missing onnxruntime an ImportError.
USER_ERRORS = (ValueError, OSError, ImportError)

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and the images inside the folders named, in sorted order."""
    files = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(SUFFIXES))}) in {', '.join(map(str, paths))}")
    for file in files:  # the headers only: a file that is no image fails here, not mid-table
        readable(file)
    return files


def readable(path: Path) -> None:
    """Refuse a file Pillow cannot open as an image, naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        Image.open(path).close()
    except UnidentifiedImageError as error:
        raise ValueError(f"{path} is not an image Pillow can read ({error})") from error


def open_folder(folder: Path, threads: int) -> OnnxExitModel:
    """The exit folder; for a folder without a manifest, the error names an exit folder beside
    it (``train_gsdnet.py --save final`` writes ``early_exit_<epoch>/`` for PyTorch next to
    ``early_exit_<epoch>_onnx/``)."""
    try:
        return OnnxExitModel(folder, threads=threads)
    except ManifestError as error:
        beside = exit_folders_beside(folder)
        if folder.is_dir() and not (folder / MANIFEST_FILE).is_file() and beside:
            raise ManifestError(f"{error}. The exit folder beside it: pass {beside[0]}") from error
        raise


def exit_folders_beside(folder: Path) -> list[Path]:
    """Folders next to ``folder`` that hold a manifest, ``<folder>_onnx`` first."""
    folder = folder.resolve()
    found = [p for p in sorted(folder.parent.iterdir()) if p != folder and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: p.name != f"{folder.name}_onnx")  # a stable sort


def load(path: Path, shape: tuple[int, ...], metadata: dict) -> np.ndarray:
    """One image as a ``(1, C, H, W)`` float32 batch, preprocessed as the manifest says."""
    from PIL import Image

    channels, height, width = shape
    with Image.open(path) as image:
        image = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = pixels.reshape(height, width, channels).transpose(2, 0, 1)
    mean = np.asarray(metadata.get("mean", [0.0] * channels), dtype=np.float32)[:, None, None]
    std = np.asarray(metadata.get("std", [1.0] * channels), dtype=np.float32)[:, None, None]
    return ((pixels - mean) / std)[None].astype(np.float32)


def softmax_top(logits: np.ndarray) -> tuple[int, float]:
    shifted = np.exp(logits - logits.max())
    probabilities = shifted / shifted.sum()
    index = int(probabilities.argmax())
    return index, float(probabilities[index])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an exit folder written by EarlyExitModel.export_onnx")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders of images")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per graph (default 1)")
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        help="override the folder's thresholds (one per head, or one for all)",
    )
    args = parser.parse_args(argv)
    try:
        return answer(args)
    except USER_ERRORS as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2


def answer(args: argparse.Namespace) -> int:
    """Print the table for ``args``; a user's mistake raises one of :data:`USER_ERRORS`."""
    files = image_files(args.images)
    model = open_folder(args.folder, args.threads)
    if args.thresholds:
        model.set_thresholds(args.thresholds[0] if len(args.thresholds) == 1 else args.thresholds)
    if len(model.input_shape) != 3:
        raise ValueError(f"the folder takes inputs of shape {model.input_shape}, not (C, H, W) images")
    metadata = model.manifest.get("metadata") or {}
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    exits = [*model.stage_names, model.manifest["classifier_name"] + " (full model)"]
    trained = f"; {metadata['model']}" if "model" in metadata else ""  # the example's: names the epoch
    shape, thresholds = model.manifest["input"]["shape"], list(model.thresholds)
    print(f"{shape} inputs; exits: {exits}; thresholds {thresholds}{trained}")
    print("| image | class | exit | confidence | ms |")
    print("|---|---|---|---|---|")
    for path in files:
        batch = load(path, model.input_shape, metadata)
        start = time.perf_counter()
        out = model(batch)
        elapsed = 1000 * (time.perf_counter() - start)
        index, confidence = softmax_top(out.logits[0])
        answered_at = exits[int(out.exit_index[0])]
        print(f"| {path} | {names[index]} | {answered_at} | {confidence:.3f} | {elapsed:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
