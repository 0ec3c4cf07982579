"""Two CPU processes (gloo) train the distiller under DistributedDataParallel."""

import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from gradual_sd import GradualSelfDistiller


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # identical initial weights on both ranks
        model = timm.create_model("resnet10t", num_classes=3)
        distiller = GradualSelfDistiller(model, example_input=torch.zeros(1, 3, 32, 32))
        initial = torch.cat([p.detach().flatten() for p in distiller.parameters()])
        ddp = DistributedDataParallel(distiller)  # find_unused_parameters is left off
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(3):
            images, targets = (
                torch.randn(2, 3, 32, 32, generator=gen),
                torch.randint(0, 3, (2,), generator=gen),
            )
            optimizer.zero_grad()
            ddp(images, targets).loss.backward()
            no_grad = [n for n, p in distiller.named_parameters() if p.requires_grad and p.grad is None]
            assert not no_grad, no_grad
            optimizer.step()
        flat = torch.cat([p.detach().flatten() for p in distiller.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        spread = max((g - gathered[0]).abs().max().item() for g in gathered)
        results[rank] = (spread, (flat - initial).abs().max().item())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_step_keeps_every_parameter_in_sync():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(2, free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        spread, moved = results[rank]
        assert spread == 0.0  # identical parameters on both ranks after three steps
        assert moved > 0.0  # and they did train
