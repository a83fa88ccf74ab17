"""The registry of parallelisms (`distillab.parallelism`): meshes, config checks, the memory plan reading
the same description, and how a sweep launches a run over several nodes."""

import os
import stat
import sys

import pytest

from conftest import tiny_run
from distillab.config import config_from_dict
from distillab.errors import ConfigError, DistillabError
from distillab.memory import Layout, memory_plan
from distillab.models import LADDER
from distillab.parallelism import PARALLELISMS, Mesh, mesh_of


@pytest.mark.parametrize("name", sorted(PARALLELISMS))
@pytest.mark.parametrize("processes,nodes", [(1, 1), (2, 1), (4, 2), (8, 2), (16, 4)])
def test_every_parallelism_lays_all_processes_on_its_mesh(name, processes, nodes):
    mesh = mesh_of(name, processes, nodes)
    assert mesh.world == processes and mesh.tensor == mesh.context == 1
    assert mesh.state_split == (1 if name == "ddp" else processes // nodes if name == "hsdp" else processes)


def test_hsdp_shards_within_a_node_and_replicates_across_nodes():
    assert mesh_of("hsdp", 8, 2) == Mesh(replicate=2, shard=4)
    assert Mesh(replicate=2, shard=4).dims() == (("replicate", "shard"), (2, 4))
    assert mesh_of("fsdp", 8, 2).dims() == (("shard",), (8,))


def test_config_names_the_key_of_an_unknown_parallelism_or_uneven_nodes(tmp_path, cache_dir):
    with pytest.raises(ConfigError) as info:
        config_from_dict(tiny_run(tmp_path, cache_dir, train={"parallel": "zero3"}))
    assert info.value.key == "train.parallel" and "ddp, fsdp, hsdp" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config_from_dict(tiny_run(tmp_path, cache_dir, train={"processes": 4, "nodes": 3}))
    assert info.value.key == "train.nodes"


def test_memory_plan_divides_the_state_by_the_shard_dimension():
    """hsdp over 2 nodes x 4 GPUs holds per GPU what fsdp over 4 holds (each node one whole copy);
    the components against 4P/S, 4P/S and 8P/S for S = 4 computed here."""
    spec, vocab = LADDER["llama-1.7b"], 128_256
    P = spec.total_parameters(vocab)
    hsdp = memory_plan(spec, vocab, Layout("hsdp", 8, 2, 4096, True, 2, nodes=2)).components
    fsdp4 = memory_plan(spec, vocab, Layout("fsdp", 4, 2, 4096, True, 2)).components
    fsdp8 = memory_plan(spec, vocab, Layout("fsdp", 8, 2, 4096, True, 2)).components
    for key in ("weights", "gradients", "optimizer"):
        assert hsdp[key] == pytest.approx(fsdp4[key]) and fsdp8[key] < hsdp[key]
    assert hsdp["gradients"] == pytest.approx(4 * P / 4) and hsdp["optimizer"] == pytest.approx(8 * P / 4)


def test_a_multi_node_launch_joins_one_rendezvous(tmp_path, monkeypatch):
    from distillab.sweep.execute import node_placement, torchrun_command

    command = torchrun_command(tmp_path / "launch.yaml", 8, 2, 1, "node-a:29400", "run1")
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    joined = " ".join(command)
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 4" in joined and "--rdzv_endpoint node-a:29400" in joined
    assert "--rdzv_backend c10d" in joined and "--standalone" not in joined
    assert "--standalone --nproc_per_node 4" in " ".join(torchrun_command(tmp_path / "l.yaml", 4))
    for key in ("DISTILLAB_NODE_RANK", "DISTILLAB_RDZV_ENDPOINT", "SLURM_NODEID", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DistillabError, match="--executor slurm"):
        node_placement(2)
    # under Slurm: this node's id, and the job's first host (scontrol expands the node list)
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[07-08]' ] && printf 'gpu07\\ngpu08\\n'\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    assert node_placement(2) == (1, "gpu07:29400")
    with pytest.raises(DistillabError, match="Slurm job has 2 nodes"):
        node_placement(4)
