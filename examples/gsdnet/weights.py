"""Initial weights: the face-recognition ``resnet50_ft`` pickle and ordinary checkpoints.

``vgg_msceleb_resnet50_ft_weight.pkl`` (MS-Celeb-1M pre-training, VGGFace2 fine-tuning) is a
Python 2 pickle of ``{torchvision name: numpy array}`` from a Caffe model. Two details of that
network differ from torchvision/timm ResNets, so :func:`patch_caffe_resnet` changes the model
before loading: downsampling bottlenecks stride in their 1x1 ``conv1`` (not the 3x3 ``conv2``),
and the stem max-pool is ``MaxPool2d(3, 2, padding=0, ceil_mode=True)``.

Loading matches tensors by name and shape and reports what was and was not loaded. It raises
when less than half of the backbone was matched, which is what a wrong key prefix looks like
(``load_state_dict(strict=False)`` would silently load nothing).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .datasets.common import log

MIN_BACKBONE_FRACTION = 0.5
WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """Keys of a weights file against a model's ``state_dict``."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # same name, different shape

    def summary(self) -> str:
        def head(keys: list[str]) -> str:
            return f" {keys[:6]}{' ...' if len(keys) > 6 else ''}" if keys else ""

        return (
            f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}{head(self.missing)}; "
            f"unexpected {len(self.unexpected)}{head(self.unexpected)}; shape-mismatched "
            f"{len(self.mismatched)}{head(self.mismatched)}"
        )


def patch_caffe_resnet(model: nn.Module) -> nn.Module:
    """Make a torchvision/timm bottleneck ResNet match the Caffe-ported ``resnet50_ft``, in place."""
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if not isinstance(getattr(model, "maxpool", None), nn.MaxPool2d) or any(s is None for s in stages):
        raise ValueError(
            f"{type(model).__name__} is not a ResNet with maxpool and layer1..layer4; the Caffe "
            "patch applies to bottleneck ResNets (resnet50, resnet101, ...)"
        )
    model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    for stage in stages:
        for block in stage:
            if not all(hasattr(block, n) for n in ("conv1", "conv2", "conv3")):
                raise ValueError(f"{type(block).__name__} is not a bottleneck block (no conv3)")
            if not isinstance(getattr(block, "aa", nn.Identity()), nn.Identity):
                raise ValueError("anti-aliased ResNets cannot take Caffe ResNet weights")
            stride = block.conv2.stride
            if stride != (1, 1):
                block.conv1.stride, block.conv2.stride = stride, (1, 1)
    return model


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefixes that DataParallel/DDP and torch.compile add to every key."""
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pkl`` (resnet50_ft format), ``.safetensors`` or ``.pth``/``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        with open(path, "rb") as handle:
            raw = pickle.load(handle, encoding="latin1")
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in raw.items()}
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in WRAPPER_KEYS:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat name -> tensor mapping")
    return strip_prefixes(state)


def load_weights(model: nn.Module, path: Path, classifier_prefix: str = "fc.") -> LoadReport:
    """Copy every tensor of ``path`` whose name and shape match ``model``; report the rest.

    Raises ``ValueError`` when less than half of the model's tensors outside the classifier were
    matched.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    report = LoadReport()
    to_load = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(key)
        else:
            to_load[key] = value.to(own[key].dtype)
    report.loaded = sorted(to_load)
    report.unexpected.sort()
    report.mismatched.sort()
    report.missing = sorted(k for k in own if k not in state)
    backbone = [k for k in own if not k.startswith(classifier_prefix) and "num_batches_tracked" not in k]
    matched = sum(k in to_load for k in backbone)
    if matched < MIN_BACKBONE_FRACTION * len(backbone):
        raise ValueError(
            f"{path} matched only {matched} of the model's {len(backbone)} backbone tensors. File "
            f"keys look like {list(state)[:4]}; model keys look like {backbone[:4]}. A different "
            "prefix or architecture? Nothing was loaded"
        )
    model.load_state_dict(to_load, strict=False)
    log.info("weights %s: %s", path, report.summary())
    return report
