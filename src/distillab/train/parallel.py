"""How a run's model is spread over processes, behind one small interface.

The parallelisms themselves are described in `distillab.parallelism` (a name and a mesh of
replicate x shard processes); `distillab.train.world` starts the processes and picks the
implementation:

    SingleProcess    one process, one device: every method is the plain thing (this class is
                     the interface, each method's contract in its docstring)
    DataParallel     the `replicate` family: N processes, DistributedDataParallel
    FullySharded     the `fully_shard` family (`distillab.train.fsdp`): FSDP2 over a 1-D mesh
                     (fsdp) or a 2-D replicate x shard mesh (hsdp)

The trainer never branches on which one it has. It asks the parallelism to build (or wrap)
the student and to wrap the teacher, to open each micro-batch (gradients synchronise on the
last one only), for the factor that turns each process's mean-loss gradient into the sum over
processes, to clip and measure the gradient norm, and to reduce, gather or share values
across processes. Checkpoints need nothing more: `distillab.train.checkpointer` reads and
writes every layout through torch's distributed state-dict API.

Data parallelism reads disjoint slices of each global batch: process r takes global
micro-batch i * N + r, so N processes see exactly the sequences one process would.
"""

from __future__ import annotations

import contextlib

import torch

from distillab.errors import ConfigError
from distillab.models import ModelSpec, build_model
from distillab.parallelism import Mesh


class SingleProcess:
    """The interface every parallelism implements; on one process each method is the plain thing.

    Attributes: `device`, `rank` (0..world-1), `world` (processes), `mesh_shape` (the
    `distillab.parallelism.Mesh` the processes form), `name` (the parallelism's family).
    """

    name = "single"

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1, mesh_shape: Mesh | None = None,
                 precision: str = "float32"):
        self.device, self.rank, self.world = device, rank, world
        self.mesh_shape = mesh_shape or Mesh(replicate=world)
        self.owns_group = True  # False: the process group was started by the caller (a rehearsal) and stays up

    @property
    def is_main(self) -> bool:
        """The process that logs and writes the files every process shares (rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------ models

    def build_model(self, spec: ModelSpec, vocab_size: int, max_seq_len: int, seed: int, eos_token_id: int | None,
                    activation_checkpointing: bool = False, compile_blocks: bool = False,
                    parametrisation: str = "hf") -> torch.nn.Module:
        """A freshly initialised student, ready to step: its weights (and attention scale) are
        `models.build_model`'s for `seed` and `parametrisation`, bit for bit, however they are laid
        out over the processes."""
        model = build_model(spec, vocab_size, max_seq_len, seed, eos_token_id, self.device, parametrisation)
        return self.prepare_model(model, activation_checkpointing, compile_blocks)

    def prepare_model(self, model: torch.nn.Module, activation_checkpointing: bool = False,
                      compile_blocks: bool = False) -> torch.nn.Module:
        """The module the step calls, for a model already in memory (the model itself here)."""
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compile_blocks:
            for block in transformer_blocks(model):
                block.compile()
        return model

    def prepare_teacher(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen teacher laid out for inference."""
        return model

    def unwrap(self, stepper: torch.nn.Module) -> torch.nn.Module:
        """The HF model inside whatever `prepare_model` returned."""
        return getattr(stepper, "module", stepper)

    @property
    def collective_forward(self) -> bool:
        """True when a forward pass needs every process (sharded weights): evaluation then runs on all."""
        return False

    @property
    def uses_process_group(self) -> bool:
        """True when the processes communicate through torch.distributed's default group (checkpoints
        are then written and read together); a single process never does, even beside a group."""
        return False

    def autocast_precision(self, precision: str) -> str:
        """The precision to autocast the step to (`train.precision` unless the parallelism casts)."""
        return precision

    # ------------------------------------------------------------------ one step

    def micro_batch(self, stepper: torch.nn.Module, last: bool):
        """A context for one micro-batch's backward; gradients synchronise when `last`."""
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

    # ------------------------------------------------------------------ across processes

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Each value summed over processes (every process gets the sums)."""
        return values

    def all_gather_object(self, value) -> list:
        """Every process's `value` (a picklable object), in rank order, on every process."""
        return [value]

    def broadcast_object(self, value):
        """The main process's `value`, on every process."""
        return value

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class DataParallel(SingleProcess):
    name = "ddp"

    @property
    def uses_process_group(self) -> bool:
        return True

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

    def all_gather_object(self, value) -> list:
        import torch.distributed as dist

        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value):
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and self.owns_group:
            dist.destroy_process_group()


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of an HF causal LM (`model.<base>.layers`)."""
    backbone = getattr(model, model.base_model_prefix, None)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ConfigError("train.parallel", f"{type(model).__name__} has no .{model.base_model_prefix}.layers to "
                                            "shard or compile per block")
    return list(layers)
