"""Initial weights: the face-recognition ``resnet50_ft`` pickle and ordinary checkpoints.

``vgg_msceleb_resnet50_ft_weight.pkl`` (MS-Celeb-1M pre-training, VGGFace2 fine-tuning) is a
Python 2 pickle of ``{torchvision name: numpy array}`` from a Caffe model. Two details of that
network differ from torchvision/timm ResNets, so :func:`patch_caffe_resnet` changes the model
before loading: downsampling bottlenecks stride in their 1x1 ``conv1`` (not the 3x3 ``conv2``),
and the stem max-pool is ``MaxPool2d(3, 2, padding=0, ceil_mode=True)``.

Loading matches tensors by name and shape and reports what was and was not loaded, with the
file's sha256. It raises when less than half of the backbone was matched, which is what a wrong
key prefix looks like (``load_state_dict(strict=False)`` would silently load nothing).

A ``.pkl`` is read with an unpickler that admits only numpy arrays, dtypes and plain
containers, so a tampered copy from a mirror cannot run code (what ``torch.load(...,
weights_only=True)`` does for ``.pth``). :func:`load_reference_state_dict` loads a checkpoint
saved by the authors' code (keys ``layer*``, ``cm1..cm4``, ``fc_1..fc_4``, ``fc_1_1..fc_4_4``).
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import importlib
import logging
import pickle
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradual_sd import ACAM

log = logging.getLogger(__name__)

MIN_BACKBONE_FRACTION = 0.5
WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """Keys of a weights file against a model's ``state_dict``, and which file it was."""

    file: str = ""
    sha256: str = ""
    kind: str = "backbone"  # or "authors' checkpoint"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # same name, different shape
    folded: list[str] = field(default_factory=list)  # merged into another tensor (exactly)

    def summary(self) -> str:
        def head(keys: list[str]) -> str:
            return f" {keys[:6]}{' ...' if len(keys) > 6 else ''}" if keys else ""

        return (
            f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}{head(self.missing)}; "
            f"unexpected {len(self.unexpected)}{head(self.unexpected)}; shape-mismatched "
            f"{len(self.mismatched)}{head(self.mismatched)}"
            + (f"; folded {len(self.folded)}{head(self.folded)}" if self.folded else "")
        )

    def record(self) -> dict:
        """What ``metrics.json`` keeps: the file, its sha256 and the counts."""
        counts = {k: len(v) for k, v in asdict(self).items() if isinstance(v, list)}
        return {"file": self.file, "sha256": self.sha256, "kind": self.kind, **counts}


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


def _numpy_multiarray():
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2, numpy 1
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("numpy has neither numpy._core.multiarray nor numpy.core.multiarray")


_MULTIARRAY = _numpy_multiarray()
_MULTIARRAY_NAMES = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1, numpy 2
# What a pickle of {name: numpy array} needs, under every module name numpy and Python 2/3 used.
SAFE_GLOBALS: dict[tuple[str, str], object] = {
    **{(m, "_reconstruct"): _MULTIARRAY._reconstruct for m in _MULTIARRAY_NAMES},
    **{(m, "scalar"): _MULTIARRAY.scalar for m in _MULTIARRAY_NAMES},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 pickles bytes at protocol 2
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that asks for something other than numpy arrays and plain containers."""


class ArrayUnpickler(pickle.Unpickler):
    """Admits numpy arrays, dtypes and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: a weights pickle holds only numpy arrays, "
                "dtypes and plain containers, and this object could run code on unpickling. "
                "The file is not the resnet50_ft pickle, or it was tampered with; get it again "
                "from a trusted source and compare its sha256"
            ) from None


def read_array_pickle(path: Path) -> dict:
    """``{name: numpy array}`` from a (Python 2 or 3) pickle, without running any code."""
    with open(path, "rb") as handle:
        return ArrayUnpickler(handle, encoding="latin1").load()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pkl`` (resnet50_ft format), ``.safetensors`` or ``.pth``/``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        raw = read_array_pickle(path)
        if not isinstance(raw, dict) or not all(isinstance(v, np.ndarray) for v in raw.values()):
            raise ValueError(f"{path} does not hold a flat name -> numpy array mapping")
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


def load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], classifier_prefix: str = "fc.", source: str = ""
) -> LoadReport:
    """Copy every tensor of ``state`` whose name and shape match ``model``; report the rest.

    Raises ``ValueError`` when less than half of the model's tensors outside the classifier were
    matched.
    """
    own = model.state_dict()
    report = LoadReport(file=source)
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
            f"{source or 'the weights'} matched only {matched} of the model's {len(backbone)} "
            f"backbone tensors. File keys look like {list(state)[:4]}; model keys look like "
            f"{backbone[:4]}. A different prefix or architecture? Nothing was loaded"
        )
    model.load_state_dict(to_load, strict=False)
    return report


# --- the authors' checkpoints ----------------------------------------------------------------
# ACAM's parameters and the authors' ChannelGate tensors they are made of: ``mlp`` is the shared
# MLP; ``mean_weight`` / ``max_weight`` are the branch-weight MLPs that ACAM runs as one grouped
# conv (group 0 reads the average, group 1 the max), so their tensors are stacked on dim 0.
ACAM_PARTS = {
    "fc1.weight": ("mlp.1.weight",),
    "fc1.bias": ("mlp.1.bias",),
    "fc2.weight": ("mlp.3.weight",),
    "fc2.bias": ("mlp.3.bias",),
    "weight_fc1.weight": ("mean_weight.1.weight", "max_weight.1.weight"),
    "weight_fc1.bias": ("mean_weight.1.bias", "max_weight.1.bias"),
    "weight_fc2.weight": ("mean_weight.3.weight", "max_weight.3.weight"),
    "weight_fc2.bias": ("mean_weight.3.bias", "max_weight.3.bias"),
}
# A head's modules and the authors' names for head j (their cm{j} is Sequential(ACAM, conv, BN)).
HEAD_PARTS = {"conv": "cm{j}.1", "norm": "cm{j}.2", "fc": "fc_{j}_{j}", "feature": "fc_{j}"}
# The distiller's fixed projection of the classifier's input: the authors' fc_4.
TEACHER_PROJECTION = {"teacher_projection_weight": "fc_4.weight", "teacher_projection_bias": "fc_4.bias"}


@dataclass
class ReferenceEntry:
    """One tensor of ours, made from ``sources`` (the authors' keys) by ``combine``."""

    sources: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]
    shapes: tuple[torch.Size, ...]  # what each source must look like
    folded: tuple[str, ...] = ()  # sources with no tensor of their own here, folded into this one


def _copied(source: str, target: torch.Tensor) -> ReferenceEntry:
    return ReferenceEntry((source,), lambda parts: parts[0], (target.shape,))


def is_reference_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` was saved by the authors' code (it has their ``fc_4_4`` classifier)."""
    return any(key.startswith("fc_4_4.") for key in state)


def reference_layout(net: nn.Module) -> dict[str, ReferenceEntry]:
    """For every tensor of ``net``'s state_dict, the authors' tensors it is loaded from.

    ``net`` is a ``gsd-acam`` network from ``build_gsdnet`` (clean or as shipped). In the clean
    mode the heads' conv has no bias: the authors' ``cm{j}.1.bias`` is folded into the
    following BatchNorm's running mean, which is exact (BatchNorm subtracts it again).
    """
    shipped = hasattr(net, "distiller")
    distiller = net.distiller if shipped else net
    prefix = "distiller." if shipped else ""
    model = distiller.model
    acam = [n for n, m in model.named_modules() if isinstance(m, ACAM)]
    if not isinstance(distiller, nn.Module) or not hasattr(distiller, "heads") or len(acam) != 1:
        raise ValueError(
            "the authors' checkpoints load into a gsd-acam network from build_gsdnet (ACAM before "
            f"the pooling and one head per stage); got {type(net).__name__} with ACAM at {acam}"
        )
    classifier = distiller.classifier_name
    layout: dict[str, ReferenceEntry] = {}

    def acam_entry(target: torch.Tensor, part: str, where: str) -> ReferenceEntry:
        sources = tuple(f"{where}.{s}" for s in ACAM_PARTS[part])
        if len(sources) == 1:
            return _copied(sources[0], target)
        # Two Linear layers stacked into one grouped 1x1 Conv1d: (2r, C, 1) from two (r, C).
        shape = torch.Size((target.shape[0] // 2, *target.shape[1:2]))
        return ReferenceEntry(sources, lambda parts: torch.cat(parts).reshape(target.shape), (shape, shape))

    for key, target in model.state_dict().items():
        if key.startswith(acam[0] + "."):
            entry = acam_entry(target, key[len(acam[0]) + 1 :], "cm4.0.ChannelGate")
        elif key.startswith(classifier + "."):
            entry = _copied(f"fc_4_4.{key[len(classifier) + 1 :]}", target)
        else:
            entry = _copied(key, target)
        layout[f"{prefix}model.{key}"] = entry
    for i, head in enumerate(distiller.heads):
        j = i + 1
        own = head.state_dict()
        for key, target in own.items():
            module, rest = key.split(".", 1)
            if module == "attn":
                entry = acam_entry(target, rest, f"cm{j}.0.ChannelGate")
            elif module == "norm" and rest == "running_mean" and "conv.bias" not in own:
                bias = f"cm{j}.1.bias"
                entry = ReferenceEntry(
                    (f"cm{j}.2.running_mean", bias), lambda p: p[0] - p[1], (target.shape,) * 2, (bias,)
                )
            elif module in HEAD_PARTS:
                entry = _copied(f"{HEAD_PARTS[module].format(j=j)}.{rest}", target)
            else:
                raise ValueError(f"head {i} has a tensor {key!r} the authors' heads do not have")
            layout[f"{prefix}heads.{i}.{key}"] = entry
    for name, source in TEACHER_PROJECTION.items():
        layout[prefix + name] = _copied(source, getattr(distiller, name))
    if shipped:
        for name in ("weight", "bias"):
            layout[f"projection.{name}"] = _copied(f"fc_4.{name}", getattr(net.projection, name))
    return layout


@torch.no_grad()
def load_reference_state_dict(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Load a state_dict saved by the authors' code into a ``gsd-acam`` network of ``build_gsdnet``.

    Works in either mode; in the clean mode the heads' conv biases are folded into BatchNorm
    (exact) and the report lists them as ``folded``. Raises ``ValueError``
    naming every missing, unexpected or misshapen key; nothing is loaded then.
    """
    state = strip_prefixes(state_dict)
    layout = reference_layout(net)
    own = net.state_dict()
    unknown = sorted(set(own) - set(layout))
    if unknown:
        raise ValueError(f"cannot tell where {unknown[:6]} come from in the authors' layout")
    used = {source for entry in layout.values() for source in entry.sources}
    missing = sorted(used - set(state))
    unexpected = sorted(set(state) - used)
    misshapen = sorted(
        f"{source} {tuple(state[source].shape)} (expected {tuple(shape)})"
        for entry in layout.values()
        for source, shape in zip(entry.sources, entry.shapes)
        if source in state and state[source].shape != shape
    )
    if missing or unexpected or misshapen:
        raise ValueError(
            f"not a checkpoint of this network in the authors' layout: missing {len(missing)} "
            f"{missing[:6]}; unexpected {len(unexpected)} {unexpected[:6]}; misshapen "
            f"{len(misshapen)} {misshapen[:6]}. Nothing was loaded"
        )
    for key, entry in layout.items():
        own[key].copy_(entry.combine([state[s] for s in entry.sources]))
    folded = sorted(source for entry in layout.values() for source in entry.folded)
    if folded:
        log.info("clean mode: folded the heads' conv biases %s into their BatchNorm running means", folded)
    return LoadReport(kind="authors' checkpoint", loaded=sorted(used - set(folded)), folded=folded)
