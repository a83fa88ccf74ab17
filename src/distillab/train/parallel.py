"""How a run's model is spread over processes, behind one small interface.

    SingleProcess    one process, one device: every method is the plain thing
    DataParallel     torchrun, N processes, DistributedDataParallel (NCCL on GPUs, gloo on CPUs)
    FullySharded     torchrun, N processes, FSDP2 (`distillab.train.fsdp`)

The trainer never branches on which one it has. It asks the parallelism to wrap the student
and the teacher, to open each micro-batch (gradients synchronise on the last one only), for
the factor that turns each process's mean-loss gradient into the sum over processes, to clip
and measure the gradient norm, to reduce numbers across processes, and for the model and
optimizer state to save or load (full tensors, identical for every world size).

Data parallelism reads disjoint slices of each global batch: process r takes global
micro-batch i * N + r, so N processes see exactly the sequences one process would.
"""

from __future__ import annotations

import contextlib
import os

import torch

from distillab.config import TrainConfig
from distillab.errors import ConfigError
from distillab.runtime import resolve_device, setup_runtime


class SingleProcess:
    name = "single"

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1):
        self.device, self.rank, self.world = device, rank, world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_model(self, model: torch.nn.Module, activation_checkpointing: bool = False,
                      compile_blocks: bool = False) -> torch.nn.Module:
        """The module the step calls (the model itself here)."""
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compile_blocks:
            for block in transformer_blocks(model):
                block.compile()
        return model

    def prepare_teacher(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    @property
    def collective_forward(self) -> bool:
        """True when a forward pass needs every process (sharded weights): evaluation then runs on all."""
        return False

    def autocast_precision(self, precision: str) -> str:
        """The precision to autocast the step to (`train.precision` unless the parallelism casts)."""
        return precision

    def unwrap(self, stepper: torch.nn.Module) -> torch.nn.Module:
        """The HF model inside whatever `prepare_model` returned."""
        return getattr(stepper, "module", stepper)

    def micro_batch(self, stepper: torch.nn.Module, last: bool):
        return contextlib.nullcontext()

    @property
    def loss_scale(self) -> float:
        """Gradients of (mean loss x this) summed over processes are the global batch's gradient."""
        return 1.0

    def grad_norm(self, stepper: torch.nn.Module, max_norm: float) -> float:
        """The global gradient norm, after clipping to `max_norm` (0: no clipping)."""
        parameters = [p for p in stepper.parameters() if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def barrier(self) -> None:
        pass

    def model_state(self, stepper: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Full weights on the main process (None elsewhere), for safetensors."""
        return self.unwrap(stepper).state_dict() if self.is_main else None

    def optimizer_state(self, stepper: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        return optimizer.state_dict() if self.is_main else None

    def load_state(self, stepper: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict,
                   optimizer_state: dict) -> None:
        """Load full weights and optimizer state (read on every process)."""
        model = self.unwrap(stepper)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ConfigError("model", "the checkpoint does not match the configured model")
        if tied:
            model.tie_weights()
        optimizer.load_state_dict(optimizer_state)

    def close(self) -> None:
        pass


class DataParallel(SingleProcess):
    name = "ddp"

    def prepare_model(self, model, activation_checkpointing: bool = False, compile_blocks: bool = False):
        from torch.nn.parallel import DistributedDataParallel

        model = super().prepare_model(model, activation_checkpointing, compile_blocks)
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def micro_batch(self, stepper, last: bool):
        return contextlib.nullcontext() if last else stepper.no_sync()

    @property
    def loss_scale(self) -> float:
        return float(self.world)  # DDP averages gradients over processes; the sum is wanted

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and getattr(self, "owns_group", True):
            dist.destroy_process_group()


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of an HF causal LM (`model.<base>.layers`)."""
    backbone = getattr(model, model.base_model_prefix, None)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ConfigError("train.parallel", f"{type(model).__name__} has no .{model.base_model_prefix}.layers to "
                                            "shard or compile per block")
    return list(layers)


def setup_parallelism(train: TrainConfig) -> SingleProcess:
    """Start the process group (under torchrun), pick the device and threads, return the parallelism."""
    device = resolve_device(train.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != train.processes:
        raise ConfigError("train.processes", f"is {train.processes} but {world} processes were started; launch with "
                          f"torchrun --nproc_per_node {train.processes} (or set train.processes={world})")
    threads = train.threads or (max(1, (os.cpu_count() or 1) // world) if world > 1 else None)
    setup_runtime(threads)
    if world == 1 and train.parallel == "ddp":
        return SingleProcess(device)
    import torch.distributed as dist

    owns_group = not dist.is_initialized()  # a group started by the caller (a rehearsal) stays up
    if owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend)
        else:  # fsdp on one process without torchrun: a world of one
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if train.parallel == "fsdp":
        from distillab.train.fsdp import FullySharded

        parallel = FullySharded(device, rank, world, train.precision)
    else:
        parallel = DataParallel(device, rank, world)
    parallel.owns_group = owns_group
    return parallel
