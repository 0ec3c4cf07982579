"""Process-group setup for ``torchrun`` (gloo on CPU, NCCL on CUDA) and the samplers it needs.

The group has a timeout: a collective that waits longer for a stalled or dead process raises
on the processes still running, so the run ends with an error instead of hanging forever.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


DEFAULT_TIMEOUT_S = 1800.0  # longer than any one epoch's evaluation or checkpoint write


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # whether init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was requested but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment, if any; a
    collective that waits more than ``timeout_s`` seconds raises."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size == 1:
        return DistEnv(0, 1, device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistEnv(dist.get_rank(), dist.get_world_size(), device, owns_group)


def shutdown(env: DistEnv, failed: bool = False) -> None:
    """Leave the process group; after a failure without the final barrier, which the other
    processes may never reach."""
    if env.owns_group and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


class ProcessTimeoutError(TimeoutError):
    """Another torchrun process did not take part in a collective within the timeout."""


class PeerExitedError(ConnectionError):
    """Another torchrun process ended (its own error says why) while this one waited for it."""


def peer_error(error: BaseException, env: DistEnv, timeout_s: float) -> OSError | None:
    """A message for a collective that failed because of another process (gloo's and NCCL's
    errors name only the transport): it timed out, or the other process ended."""
    if not (env.distributed and isinstance(error, RuntimeError)):
        return None
    text, first_line = str(error).lower(), str(error).splitlines()[0][:200]
    if "timed out" in text:
        return ProcessTimeoutError(
            f"another torchrun process did not answer within --dist-timeout {timeout_s:g} s "
            "(stalled, stopped or dead), so this one stops too; the last checkpoint is kept for "
            f"--resume ({first_line})"
        )
    if "closed by peer" in text:
        return PeerExitedError(
            "another torchrun process ended (its error above says why), so this one stops too; "
            f"the last checkpoint is kept for --resume ({first_line})"
        )
    return None


def all_reduce(tensor: torch.Tensor, env: DistEnv, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=op)
    return tensor


def broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Give every process rank 0's BatchNorm statistics, so all evaluate the checkpointed model."""
    if env.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class WeightedShardSampler(Sampler[int]):
    """Draw ``len(weights)`` indices with replacement in proportion to ``weights`` (the same
    draw on every process, seeded by ``seed + epoch``) and keep this process's share."""

    def __init__(self, weights: torch.Tensor, rank: int, world_size: int, seed: int) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_samples = math.ceil(len(self.weights) / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.world_size
        draw = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        return iter(draw[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


def shard_indices(length: int, env: DistEnv | None) -> list[int]:
    """This process's share of an evaluation set, without the padding DistributedSampler adds."""
    if env is None or not env.distributed:
        return list(range(length))
    return list(range(env.rank, length, env.world_size))
