"""FSDP2 (`torch.distributed.fsdp.fully_shard`): student and teacher sharded per transformer block.

    student   each decoder block is one FSDP unit, the rest (embeddings, final norm, output
              layer) the root unit; parameters, gradients and AdamW state live as 1/N shards
              (DTensors on a 1-D mesh over the N processes). Under `train.precision: bfloat16`
              a mixed-precision policy computes in bf16 and keeps fp32 master weights and fp32
              gradient reductions (no autocast on top).
    teacher   sharded the same way, without gradients or optimizer state; each unit gathers its
              weights for its forward and frees them right after (reshard after forward).

Initial weights: every process builds the full model from the run's init seed (the same
weights a single process builds) and keeps its shard, so "same seed, same initial weights"
holds for every world size. Checkpoints hold full tensors gathered to the main process, in the
single-process layout (safetensors weights, the optimizer's own state dict), so a run resumes
on any number of processes and under either parallelism: loading shards each full tensor like
the parameter it belongs to. (Gathering needs the full model in the main process's host
memory once per checkpoint; torch distributed checkpoint, which writes shards in place, is
not used yet.)

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
from distillab.runtime import is_sharded
from distillab.train.parallel import DataParallel, SingleProcess, transformer_blocks


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every process must call it), on the CPU."""
    return (tensor.full_tensor() if is_sharded(tensor) else tensor).detach().cpu()


def shard_like(source: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`source` (a full tensor, the same on every process) laid out like `like`."""
    if is_sharded(like):
        return distribute_tensor(source.to(dtype=like.dtype, device=like.to_local().device), like.device_mesh,
                                 like.placements)
    return source.to(dtype=like.dtype, device=like.device)


class FullySharded(DataParallel):
    name = "fsdp"

    def __init__(self, device: torch.device, rank: int, world: int, precision: str = "float32"):
        super().__init__(device, rank, world)
        self.mesh = init_device_mesh(device.type, (world,))
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

    def model_state(self, stepper):
        state = {name: full(tensor) for name, tensor in stepper.state_dict().items()}
        return state if self.is_main else None

    def optimizer_state(self, stepper, optimizer):
        state = optimizer.state_dict()
        gathered = {index: {key: full(value) if torch.is_tensor(value) else value for key, value in entry.items()}
                    for index, entry in state["state"].items()}
        return {"state": gathered, "param_groups": state["param_groups"]} if self.is_main else None

    def load_state(self, stepper, optimizer, weights: dict, optimizer_state: dict) -> None:
        """Full weights and optimizer state (single-process layout, read on every process), sharded."""
        tensors = {**dict(stepper.named_parameters(remove_duplicate=False)), **dict(stepper.named_buffers())}
        expected = set(stepper.state_dict())  # persistent entries only
        tied = {"lm_head.weight"} if stepper.config.tie_word_embeddings else set()
        if set(weights) - expected or expected - set(weights) - tied:
            raise ConfigError("model", "the checkpoint does not match the configured model")
        with torch.no_grad():
            for name in sorted(expected & set(weights)):
                tensors[name].copy_(shard_like(weights[name], tensors[name]))
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sharded = {"param_groups": optimizer_state["param_groups"], "state": {}}
        for index, entry in optimizer_state["state"].items():
            param = params[int(index)]
            sharded["state"][index] = {key: shard_like(value, param) if torch.is_tensor(value)
                                       and value.shape == param.shape else value for key, value in entry.items()}
        optimizer.load_state_dict(sharded)
