"""Runs laid out over processes and nodes: meta-device initialisation, sharded (DCP) checkpoints, the
streamed HF export, resume across layouts, and two simulated nodes (gloo on this machine's CPU)."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run
from distillab.config import config_from_dict
from distillab.models import LADDER, build_model

WORKER = str(Path(__file__).with_name("sharded_worker.py"))
RUNG = dataclasses.asdict(LADDER["cpu-0.1m"])  # llama, untied
TIED = dataclasses.asdict(dataclasses.replace(LADDER["qwen3-0.15b"], layers=2, d_model=64, heads=4, kv_heads=2,
                                              head_dim=16, ffn=96, vocab_rows=None))  # qwen3, tied embeddings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(cache_dir: Path | None = None) -> dict:
    values = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return {**values, "DISTILLAB_CACHE": str(cache_dir)} if cache_dir else values


def launch(command: list[str], processes: int, nodes: int = 1, cache_dir: Path | None = None,
           timeout: int = 600) -> str:
    """`command` (a module or script and its arguments) on `nodes` simulated nodes of processes/nodes
    gloo processes each: one torchrun per node, --nnodes with a c10d rendezvous on localhost."""
    if nodes == 1:
        launchers = [["--standalone", "--nproc_per_node", str(processes)]]
    else:
        endpoint = f"127.0.0.1:{free_port()}"
        launchers = [["--nnodes", str(nodes), "--node_rank", str(rank), "--nproc_per_node", str(processes // nodes),
                      "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "test"]
                     for rank in range(nodes)]
    running = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, *command], env=env(cache_dir),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for launcher in launchers]
    outputs = [p.communicate(timeout=timeout)[0] for p in running]
    for process, output in zip(running, outputs):
        assert process.returncode == 0, output[-3000:]
    return "\n".join(outputs)


# --------------------------------------------------------------------------- meta-device initialisation


@pytest.mark.parametrize("spec", [RUNG, TIED], ids=["llama", "qwen3-tied"])
def test_meta_device_init_equals_the_single_process_build_bit_for_bit(spec):
    """FSDP on a world of one: built on meta, sharded, materialised = build_model, every tensor equal."""
    from sharded_worker import compare_initial_weights

    result = compare_initial_weights("fsdp", 1, {"spec": spec})["spec"]
    assert result["mismatches"] == [] and result["tensors"] >= 10
    assert result["tied"] == spec["tie_embeddings"]


@pytest.mark.slow
@pytest.mark.parametrize("processes,parallel,nodes", [(2, "fsdp", 1), (4, "fsdp", 1), (4, "hsdp", 2)],
                         ids=["fsdp-2", "fsdp-4", "hsdp-2x2"])
def test_meta_device_init_on_several_processes_equals_the_single_process_build(tmp_path, processes, parallel, nodes):
    launch([WORKER, "init", parallel, str(nodes), json.dumps({"llama": RUNG, "qwen3": TIED}), f"{tmp_path / 'init'}"],
           processes, nodes)
    results = json.loads((tmp_path / "init.0").read_text())
    assert list(results) == ["llama", "qwen3"]
    for name, result in results.items():
        assert result["mismatches"] == [] and result["tensors"] >= 10, (name, result)


@pytest.mark.parametrize("spec", [RUNG, TIED], ids=["llama", "qwen3-tied"])
def test_meta_device_init_under_maxtext_equals_the_single_process_build_bit_for_bit(spec):
    """model.parametrisation maxtext under FSDP on a world of one: transformers' draws replayed, then
    MaxText's from the same generator, equal build_model(..., "maxtext"), with its attention scale."""
    from sharded_worker import compare_initial_weights

    result = compare_initial_weights("fsdp", 1, {"spec": spec}, "maxtext")["spec"]
    assert result["mismatches"] == [] and result["tensors"] >= 10 and result["scaling"]
    assert result["tied"] == spec["tie_embeddings"]


@pytest.mark.slow
def test_meta_device_init_under_maxtext_on_two_processes_equals_the_single_process_build(tmp_path):
    launch([WORKER, "init", "fsdp", "1", json.dumps({"llama": RUNG, "qwen3": TIED}), f"{tmp_path / 'init'}", "maxtext"], 2)
    results = json.loads((tmp_path / "init.0").read_text())
    assert list(results) == ["llama", "qwen3"]
    for name, result in results.items():
        assert result["mismatches"] == [] and result["tensors"] >= 10 and result["scaling"], (name, result)


# --------------------------------------------------------------------------- the streamed HF export


@pytest.mark.parametrize("spec", [RUNG, TIED], ids=["llama", "qwen3-tied"])
def test_streamed_export_loads_with_from_pretrained_and_the_same_logits(tmp_path, cache_dir, spec):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from distillab.data.shards import prepare_data
    from distillab.export import export_model
    from distillab.models import ModelSpec

    data = prepare_data(config_from_dict(tiny_run(tmp_path, cache_dir)).data, log=lambda *a: None)
    model = build_model(ModelSpec(**spec), data.vocab_size, 32, 11, data.tokenizer.eos_token_id)
    export_model(tmp_path / "hf", model, data.tokenizer, {"note": "test"}, lambda t: t.detach().cpu(), write=True)
    model.save_pretrained(str(tmp_path / "reference"))  # what save_pretrained would have written
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as a, \
            safe_open(str(tmp_path / "reference" / "model.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ids = torch.randint(0, data.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert (tmp_path / "hf" / "manifest.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    # as a user generating from it expects: the KV cache on, the tokenizer's limit the model's 32 positions
    from transformers import AutoTokenizer

    assert loaded.config.use_cache is True
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).model_max_length == 32
    with torch.no_grad():
        cached = loaded.generate(ids[:, :8], max_new_tokens=12, do_sample=False, pad_token_id=0)
        uncached = loaded.generate(ids[:, :8], max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (2, 20)


# --------------------------------------------------------------------------- checkpoints of the older format


def test_a_checkpoint_of_the_older_format_resumes_bit_identically(tmp_path, cache_dir, tiny_teacher):
    """A step checkpoint written as before the sharded format (save_pretrained weights, the optimizer's
    own state dict in trainer_state.pt) resumes to the uninterrupted run's weights (the session's tiny
    teacher: the same config, trained straight through)."""
    from safetensors.torch import load_file

    from distillab.checkpoint import load_trainer_state, read_meta, save_checkpoint, step_dir
    from distillab.train import Trainer, train
    from distillab.train.parallel import SingleProcess

    quiet = lambda *a: None  # noqa: E731
    values = tiny_run(tmp_path, cache_dir, "legacy")
    train(config_from_dict(values), stop_after_steps=3, log=quiet)
    source = step_dir(tmp_path / "legacy" / "checkpoints", 3)
    trainer = Trainer.build(config_from_dict(values), SingleProcess(torch.device("cpu")), quiet)
    state, meta = load_trainer_state(source), read_meta(source)
    trainer.checkpointer.load(source, trainer.stepper, trainer.optimizer, state)
    shutil.rmtree(source)
    old_state = {key: state[key] for key in ("step", "tokens", "sequences", "log_window", "skipped_steps")}
    save_checkpoint(source, trainer.model, trainer.data.tokenizer, meta,
                    {**old_state, "optimizer": trainer.optimizer.state_dict(), "torch_rng": torch.get_rng_state()})
    assert (source / "model.safetensors").is_file() and not (source / "sharded").exists()
    messages = []
    assert train(config_from_dict(values), log=messages.append).completed
    assert any("from step 3" in m for m in messages)
    a = load_file(str(tiny_teacher / "model.safetensors"))
    b = load_file(str(tmp_path / "legacy" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_maxtext_checkpoint_of_the_older_format_resumes_bit_identically(tmp_path, cache_dir):
    """The older format saved MaxText Qwen3 weights folded (a plain HF model) and kept the unfolded query
    norms in its trainer state: such a checkpoint resumes to the uninterrupted run's final model."""
    from safetensors.torch import load_file

    from distillab.checkpoint import load_trainer_state, read_meta, save_checkpoint, step_dir
    from distillab.train import Trainer, train
    from distillab.train.parallel import SingleProcess

    quiet = lambda *a: None  # noqa: E731

    def values(name):
        return tiny_run(tmp_path, cache_dir, name, model={"name": "cpu-0.1m", "family": "qwen3",
                                                          "parametrisation": "maxtext"}, train={"threads": 1})
    whole = train(config_from_dict(values("whole")), log=quiet)
    train(config_from_dict(values("legacy")), stop_after_steps=3, log=quiet)
    source = step_dir(tmp_path / "legacy" / "checkpoints", 3)
    trainer = Trainer.build(config_from_dict(values("legacy")), SingleProcess(torch.device("cpu")), quiet)
    state, meta = load_trainer_state(source), read_meta(source)
    trainer.checkpointer.load(source, trainer.stepper, trainer.optimizer, state)
    factors = trainer.export_factors()
    trained = trainer.model.state_dict()
    folded = {name: tensor * factors[name] if name in factors else tensor for name, tensor in trained.items()}
    shutil.rmtree(source)
    old_state = {key: state[key] for key in ("step", "tokens", "sequences", "log_window", "skipped_steps")}
    save_checkpoint(source, trainer.model, trainer.data.tokenizer, meta,
                    {**old_state, "optimizer": trainer.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                     "unfolded_weights": {name: trained[name].clone() for name in factors}}, state_dict=folded)
    saved = load_file(str(source / "model.safetensors"))
    assert factors and not any(torch.equal(saved[name], trained[name]) for name in factors)
    assert train(config_from_dict(values("legacy")), log=quiet).completed
    a = load_file(str(whole.final_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "legacy" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- rank 0's memory during a save


@pytest.mark.slow
def test_rank_zero_holds_its_shard_and_one_tensor_while_saving(tmp_path, cache_dir):
    """2 FSDP processes, a 28M-parameter student (318 MiB of weights and AdamW state): rank 0's peak
    resident memory during the save rises above what it held before (its shards) by at most the
    largest tensor + 8 MiB (DCP's plans and metadata, pickling buffers), far below the other half of
    the state that a save gathering to rank 0 would add (measured: +2.2 MiB)."""
    values = tiny_run(tmp_path, cache_dir, "big", model={"name": "cpu-10m", "d_model": 512, "heads": 8, "kv_heads": 8, "layers": 8,
                                                          "ffn": 1536},
                      train={"processes": 2, "parallel": "fsdp", "batch_size": 2, "threads": 1,
                             "checkpoint_every": 1, "eval_every": 1000, "token_budget": 4 * 2 * 2 * 32})
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(values))
    launch([WORKER, "save-memory", str(path), str(tmp_path / "memory")], 2, cache_dir=cache_dir)
    measured = json.loads((tmp_path / "memory.0").read_text())
    rise = (measured["peak_kib"] - measured["before_kib"]) * 1024
    bound = measured["largest_tensor_bytes"] + 8 * 2**20
    print(f"rank 0 during the save: +{rise / 2**20:.1f} MiB (bound {bound / 2**20:.1f} MiB; its shards "
          f"{measured['shard_state_bytes'] / 2**20:.0f} MiB, the full state {measured['full_state_bytes'] / 2**20:.0f} MiB)")
    assert measured["full_state_bytes"] - measured["shard_state_bytes"] > 4 * bound  # the test can tell them apart
    assert rise <= bound


# --------------------------------------------------------------------------- resume across layouts, two nodes


BUDGET = 6 * 8 * 32


def run_config(tmp_path, cache_dir, name, processes, parallel="fsdp", nodes=1, **train_keys):
    keys = {"batch_size": 8 // processes, "processes": processes, "nodes": nodes, "parallel": parallel,
            "token_budget": BUDGET, "threads": 1, "checkpoint_every": 2, "keep_steps": [3], **train_keys}
    return tiny_run(tmp_path, cache_dir, name, train=keys)


def train_on(tmp_path, cache_dir, config: dict, processes: int, nodes: int = 1, *args: str) -> str:
    path = tmp_path / f"{config['name']}-{processes}x{nodes}.yaml"
    path.write_text(yaml.safe_dump(config))
    return launch(["-m", "distillab.cli", "train", str(path), *args], processes, nodes, cache_dir)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_continues(reference: Path, run: Path) -> None:
    from safetensors.torch import load_file

    a, b = metrics(reference), metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), (x, y)
    wa, wb = load_file(str(reference / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() < 1e-4 for k in wa)


def logits_of_checkpoint(source: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of a step checkpoint's weights, read with DCP itself into a model built from its config."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source)), dtype=torch.float32)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(source / "sharded"), no_dist=True)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.slow
def test_two_nodes_of_two_processes_match_one_process_and_resume_on_another_layout(tmp_path, cache_dir):
    """HSDP on 2 simulated nodes x 2 processes (torchrun --nnodes 2, c10d rendezvous), stopped after 3
    steps, resumed with FSDP on 2 processes of one node: the single process's losses (1e-4) at
    every logged step and its final weights; the 2 x 2 checkpoint exports to an HF model that
    from_pretrained loads with the checkpoint's own logits."""
    from transformers import AutoModelForCausalLM

    from distillab.export import export_checkpoint
    from distillab.train import train

    reference = train(config_from_dict(run_config(tmp_path, cache_dir, "one", 1, parallel="ddp")), log=lambda *a: None)
    output = train_on(tmp_path, cache_dir, run_config(tmp_path, cache_dir, "moved", 4, "hsdp", 2), 4, 2,
                      "--stop-after", "3")
    run = tmp_path / "moved"
    assert not (run / "final").exists() and (run / "checkpoints" / "step_00000003" / "sharded").is_dir(), output[-2000:]
    output = train_on(tmp_path, cache_dir, run_config(tmp_path, cache_dir, "moved", 2), 2)
    assert "resuming" in output and "from step 3" in output, output[-2000:]
    assert_continues(reference.run_dir, run)
    exported = export_checkpoint(run, step=3, log=lambda *a: None)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    loaded = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits_of_checkpoint(exported.parent.parent / "checkpoints" /
                                                                            "step_00000003", ids))


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_sharded_checkpoints_resume_on_another_number_of_processes(tmp_path, cache_dir, first, then):
    """Stopped after 3 steps on `first` FSDP processes (DCP checkpoint), resumed on `then`: the run
    continues the uninterrupted single process's trajectory; with async checkpoints on the way."""
    from distillab.train import train

    reference = train(config_from_dict(run_config(tmp_path, cache_dir, "one", 1, parallel="ddp")), log=lambda *a: None)
    train_on(tmp_path, cache_dir, run_config(tmp_path, cache_dir, "moved", first, async_checkpoint=True), first,
             1, "--stop-after", "3")
    assert not (tmp_path / "moved" / "final").exists()
    output = train_on(tmp_path, cache_dir, run_config(tmp_path, cache_dir, "moved", then), then)
    assert "from step 3" in output, output[-2000:]
    assert_continues(reference.run_dir, tmp_path / "moved")


def test_a_step_checkpoint_used_as_a_model_points_to_export(tmp_path, cache_dir):
    from distillab.errors import ConfigError
    from distillab.models import load_causal_lm
    from distillab.train import train

    train(config_from_dict(tiny_run(tmp_path, cache_dir, "run")), stop_after_steps=3, log=lambda *a: None)
    with pytest.raises(ConfigError, match=r"sharded training checkpoint; .*distillab export .*/run --step 3"):
        load_causal_lm(tmp_path / "run" / "checkpoints" / "step_00000003", "cpu")
    from distillab.cli import main

    assert main(["export", str(tmp_path / "run")]) == 0
    assert load_causal_lm(tmp_path / "run" / "export" / "step_00000003", "cpu") is not None
