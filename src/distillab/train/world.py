"""The processes of a run: the process group, the device, and the parallelism chosen from the registry.

A run of `train.processes` processes on `train.nodes` nodes is started by torchrun on every node
(`torchrun --nnodes N --nproc_per_node P/N` with a c10d rendezvous; sweeps launch it, under Slurm
through srun or submitit). Every process calls `setup_parallelism`, which checks the launch
against the config, starts the process group (NCCL on GPUs, gloo on CPUs) and builds the
implementation of `train.parallel`'s family (`distillab.parallelism.PARALLELISMS`) on its mesh.
"""

from __future__ import annotations

import os

import torch

from distillab.config import TrainConfig
from distillab.errors import ConfigError
from distillab.parallelism import mesh_of, parallelism
from distillab.runtime import resolve_device, setup_runtime
from distillab.train.fsdp import FullySharded
from distillab.train.parallel import DataParallel, SingleProcess

# a parallelism's family -> the class that implements it
FAMILIES = {"replicate": DataParallel, "fully_shard": FullySharded}


def check_launch(train: TrainConfig) -> int:
    """The world size torchrun started, checked against train.processes and train.nodes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != train.processes:
        raise ConfigError("train.processes", f"is {train.processes} but {world} processes were started; launch with "
                          f"torchrun --nproc_per_node {train.processes // train.nodes}"
                          f"{f' --nnodes {train.nodes}' if train.nodes > 1 else ''} (or set train.processes={world})")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world // per_node != train.nodes:
        raise ConfigError("train.nodes", f"is {train.nodes} but the {world} processes were started on "
                          f"{world // per_node} node(s) of {per_node}; set train.nodes={world // per_node}")
    return world


def start_process_group(device: torch.device) -> bool:
    """Start the process group unless the caller (a rehearsal) already has; whether this started it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:  # a sharded parallelism on one process without torchrun: a world of one
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def setup_parallelism(train: TrainConfig) -> SingleProcess:
    """Start the process group (under torchrun), pick the device and threads, return the parallelism."""
    device = resolve_device(train.device)
    world = check_launch(train)
    threads = train.threads or (max(1, (os.cpu_count() or 1) // world) if world > 1 else None)
    setup_runtime(threads)
    chosen = parallelism(train.parallel)
    mesh = mesh_of(train.parallel, train.processes, train.nodes)
    if world == 1 and not chosen.sharded:
        return SingleProcess(device)
    owns_group = start_process_group(device)
    import torch.distributed as dist

    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    parallel = FAMILIES[chosen.family](device, rank, world, mesh, train.precision)
    parallel.owns_group = owns_group  # a group the caller started stays up when the run closes
    return parallel
