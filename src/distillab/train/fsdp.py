"""FSDP2 (`torch.distributed.fsdp.fully_shard`): student and teacher sharded per transformer block.

    student   each decoder block is one FSDP unit, the rest (embeddings, final norm, output
              layer) the root unit; parameters, gradients and AdamW state live as shards
              (DTensors on the run's mesh). Under `train.precision: bfloat16` a mixed-precision
              policy computes in bf16 and keeps fp32 master weights and fp32 gradient reductions
              (no autocast on top).
    teacher   sharded the same way, without gradients or optimizer state; each unit gathers its
              weights for its forward and frees them right after (reshard after forward).
    mesh      `fsdp`: one dimension, the shards over all processes. `hsdp`: two, replicate x
              shard (shards within a node, whole copies across nodes; gradients are
              reduce-scattered within a node and all-reduced across nodes).

Initial weights: the student is built on the meta device, sharded, and materialised module by
module (`distillab.models.InitialWeights`): every process draws each full tensor from the init
seed's generator, as a single process does (then, under `model.parametrisation: maxtext`,
MaxText's draws from the same generator), and keeps its shard. The weights equal the single
process's bit for bit for every world size and mesh, and no process ever holds more than its
shards plus one module's (or one MaxText-initialised matrix's) tensors. Checkpoints are written per shard (`distillab.train.checkpointer`).

The root unit (embeddings, final norm, output layer) keeps its parameters gathered from its
forward pass until backward (FSDP's own choice for a root; the memory plan counts them
gathered), so the fused loss can take the output layer's full weight after the forward pass
(`distillab.train.step`, `distillab.teacher.OnlineTeacher.final_hidden`) and FSDP reduce-scatters
its gradient with the others'. Logits are then never materialised under FSDP either.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor

from distillab.errors import ConfigError
from distillab.models import InitialWeights, ModelSpec, apply_parametrisation, empty_model
from distillab.parallelism import Mesh
from distillab.runtime import is_sharded
from distillab.train.parallel import DataParallel, SingleProcess, transformer_blocks


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every process must call it), on the CPU."""
    return (tensor.full_tensor() if is_sharded(tensor) else tensor).detach().cpu()


def place(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy this process's part of the full tensor `value` into `target` (a shard or a whole tensor),
    without communication: every process holds the same `value`."""
    value = value.to(dtype=target.dtype, device=target.to_local().device if is_sharded(target) else target.device)
    if is_sharded(target):
        value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target = target.to_local()
    target.copy_(value)


class FullySharded(DataParallel):
    name = "fsdp"

    def __init__(self, device: torch.device, rank: int, world: int, mesh_shape: Mesh | None = None,
                 precision: str = "float32"):
        super().__init__(device, rank, world, mesh_shape or Mesh(shard=world))
        names, sizes = self.mesh_shape.dims()
        self.mesh = init_device_mesh(device.type, sizes, mesh_dim_names=names)
        if precision == "bfloat16":
            self.policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            self.policy = MixedPrecisionPolicy()

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        for block in transformer_blocks(model):
            fully_shard(block, mesh=self.mesh, mp_policy=self.policy, reshard_after_forward=True)
        # the root stays gathered after forward: the fused loss reads the output layer's weight then
        fully_shard(model, mesh=self.mesh, mp_policy=self.policy, reshard_after_forward=False)
        return model

    def build_model(self, spec: ModelSpec, vocab_size: int, max_seq_len: int, seed: int, eos_token_id: int | None,
                    activation_checkpointing: bool = False, compile_blocks: bool = False,
                    parametrisation: str = "hf") -> torch.nn.Module:
        """Built on the meta device, sharded, then materialised shard by shard (see the module docstring)."""
        model = empty_model(spec, vocab_size, max_seq_len, eos_token_id)
        apply_parametrisation(model, parametrisation)
        initial = InitialWeights(model, seed, parametrisation)
        stepper = self.prepare_model(model, activation_checkpointing, compile_blocks)
        stepper.to_empty(device=self.device)
        targets = {**dict(stepper.named_parameters()), **dict(stepper.named_buffers())}
        placed = initial.write(lambda name, value: place(targets[name], value) if name in targets else None)
        missing = sorted(set(targets) - placed)
        if missing:
            raise ConfigError("model", f"meta-device initialisation left {missing[0]} unset ({len(missing)} tensors); "
                                       "this model class is not supported by train.parallel=fsdp/hsdp")
        return stepper

    def prepare_model(self, model, activation_checkpointing: bool = False, compile_blocks: bool = False):
        return self.shard(SingleProcess.prepare_model(self, model, activation_checkpointing, compile_blocks))

    def prepare_teacher(self, model):
        model.requires_grad_(False)
        return self.shard(model)

    def unwrap(self, stepper):
        return stepper  # fully_shard changes the module in place

    @property
    def collective_forward(self) -> bool:
        return True

    def autocast_precision(self, precision: str) -> str:
        return "float32"  # the mixed-precision policy casts; no autocast on top

    def micro_batch(self, stepper, last: bool):
        stepper.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
