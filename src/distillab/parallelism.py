"""The parallelisms a run can use (`train.parallel`), each described by the mesh it lays its processes on.

A mesh has four dimensions, outermost first; the world size is their product:

    replicate   groups that each hold a whole copy of the weights, gradients all-reduced between
                the groups (data parallel across them)
    shard       processes of one group that split its copy: parameters, gradients and optimizer
                state live as 1/shard slices (FSDP2), gathered per block for compute
    tensor      processes that split each matrix (tensor parallel) -- reserved, 1 today
    context     processes that split each sequence (context parallel) -- reserved, 1 today

Every process reads its own slice of each global batch, so a run's trajectory does not depend
on its mesh (up to floating-point summation order): a run may stop on one parallelism and
resume on another (checkpoints are written per shard and re-laid on load).

A parallelism is one entry of `PARALLELISMS`: its name, what it is, the module wrapper that
implements it (`family`: `replicate` = DDP, `fully_shard` = FSDP2 over the mesh) and its mesh
as a function of the run's processes and nodes. The memory plan (`distillab.memory`) and the
trainer (`distillab.train.world`) both read this table. Adding a parallelism that composes
these dimensions differently is one entry here and its test; one that needs a new kind of
wrapper (tensor parallel) adds its family in `distillab.train.world` as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from distillab.errors import ConfigError


@dataclass(frozen=True)
class Mesh:
    """Process counts along each dimension of the device mesh."""
    replicate: int = 1
    shard: int = 1
    tensor: int = 1
    context: int = 1

    @property
    def world(self) -> int:
        return self.replicate * self.shard * self.tensor * self.context

    @property
    def state_split(self) -> int:
        """Into how many slices one copy of the weights and optimizer state is split."""
        return self.shard * self.tensor

    def dims(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(names, sizes) of the dimensions a sharding mesh needs: `shard`, with `replicate` outside
        it when there is more than one group."""
        if self.tensor != 1 or self.context != 1:
            raise ConfigError("train.parallel", "tensor and context parallel dimensions are not implemented yet")
        if self.replicate > 1:
            return ("replicate", "shard"), (self.replicate, self.shard)
        return ("shard",), (self.shard,)


@dataclass(frozen=True)
class Parallelism:
    name: str
    summary: str
    family: str  # "replicate" (DistributedDataParallel) or "fully_shard" (FSDP2 on the mesh)
    mesh: Callable[[int, int], Mesh]  # (processes, nodes) -> mesh

    @property
    def sharded(self) -> bool:
        return self.family == "fully_shard"


PARALLELISMS: dict[str, Parallelism] = {p.name: p for p in [
    Parallelism("ddp", "a whole copy of the weights on every process; gradients all-reduced (DDP)", "replicate",
                lambda processes, nodes: Mesh(replicate=processes)),
    Parallelism("fsdp", "weights, gradients and optimizer state sharded over all processes (FSDP2)", "fully_shard",
                lambda processes, nodes: Mesh(shard=processes)),
    Parallelism("hsdp", "sharded within a node, replicated across nodes (FSDP2 on a 2-D mesh)", "fully_shard",
                lambda processes, nodes: Mesh(replicate=nodes, shard=processes // nodes)),
]}


def parallelism(name: str) -> Parallelism:
    if name not in PARALLELISMS:
        raise ConfigError("train.parallel", f"must be one of {', '.join(PARALLELISMS)}, got {name!r}")
    return PARALLELISMS[name]


def mesh_of(name: str, processes: int, nodes: int = 1) -> Mesh:
    """The mesh of `processes` processes on `nodes` nodes under parallelism `name`."""
    if nodes < 1 or processes % nodes:
        raise ConfigError("train.nodes", f"must divide train.processes ({processes}) into equal nodes, got {nodes}")
    mesh = parallelism(name).mesh(processes, nodes)
    assert mesh.world == processes, (name, processes, nodes, mesh)
    return mesh
