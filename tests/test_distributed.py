"""Data-parallel training with torchrun (gloo on the CPU): two processes equal one with the same global batch."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest
import yaml

from conftest import assert_same_run, metrics, tiny_run
from distillab.config import config_from_dict
from distillab.errors import ConfigError
from distillab.train import train


def test_two_processes_match_one_process(tmp_path, cache_dir):
    budget = 6 * 8 * 32
    single = train(config_from_dict(tiny_run(tmp_path, cache_dir, "single",
                                             train={"batch_size": 8, "token_budget": budget, "threads": 1})),
                   log=lambda *a: None)
    config = tiny_run(tmp_path, cache_dir, "ddp", train={"batch_size": 4, "processes": 2, "token_budget": budget,
                                                         "threads": 1})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "DISTILLAB_CACHE": str(cache_dir)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "distillab.cli", "train", str(path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    one = [json.loads(l) for l in (single.run_dir / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["eval"]["validation"]["loss"] == pytest.approx(single.eval["validation"]["loss"], rel=1e-3)


def test_process_count_must_match_the_config(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError) as info:
        train(config_from_dict(tiny_run(tmp_path, cache_dir, "x", train={"processes": 2})), log=lambda *a: None)
    assert info.value.key == "train.processes"


@pytest.mark.slow
def test_sweep_launches_multi_process_runs_with_torchrun(tmp_path, cache_dir):
    from distillab.sweep import load_grid, run_sweep

    grid = {
        "name": "ddp",
        "baselines": False,
        "base": {
            "data": {"corpus": {"source": "packaged", "name": "python-stdlib", "limit": 150}, "tokenizer": {"vocab_size": 512},
                     "validation_fraction": 0.08, "cache_dir": str(cache_dir)},
            "train": {"batch_size": 2, "seq_len": 32, "processes": 2, "threads": 1, "eval_every": 1000,
                      "log_every": 2},
            "eval": {"max_windows": 4},
        },
        "teachers": {"models": ["cpu-0.1m"], "tokens": [512], "seeds": [42]},
        "students": {"models": ["cpu-0.1m"], "tokens": [256], "seeds": [43]},
        "kd": {"alpha": [0.5]},
        "eval": {"sets": ["validation"], "max_windows": 4},
        # fine-tuned on each run's 2 processes too (`distillab sft` under torchrun), 2 sequences a step
        "sft": {"data": {"corpus": {"source": "files", "paths": [str(tmp_path / "sums.jsonl")]},
                         "validation_fraction": 0.25},
                "train": {"batch_size": 2, "seq_len": 32, "log_every": 1, "checkpoint_every": 2},
                "sft": {"steps": 2, "chat_template": str(tmp_path / "short.jinja")}},
    }
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": f"{a + b}"}]}) + "\n"
        for a in range(4) for b in range(4)))
    (tmp_path / "short.jinja").write_text(  # the models know 32 positions
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}={% generation %}{{ m['content'] }}"
        "{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    status = run_sweep(load_grid(path), tmp_path / "sweep", log=lambda *a: None)
    assert all(s == "done" for s in status.values()), status
    launched = list((tmp_path / "sweep" / "runs").glob("*/launch.yaml"))
    assert len(launched) == 2
    stages = [yaml.safe_load(p.read_text())["train"] for p in (tmp_path / "sweep" / "runs").glob("*/sft-*/launch.yaml")]
    assert [(t["processes"], t["batch_size"], t["grad_accum"]) for t in stages] == [(2, 1, 1)] * 2
    assert len(list((tmp_path / "sweep" / "runs").glob("*/sft-*/final/eval.json"))) == 2
    # the 2-process student matches the same run trained in one process with twice the batch
    from distillab.sweep import plan

    student = next(r for r in plan(load_grid(path), tmp_path / "sweep") if r.role == "student")
    alone = dict(student.config, run_dir=str(tmp_path / "alone"), name="alone")
    alone["train"] = {**alone["train"], "processes": 1, "batch_size": 4}
    single = train(config_from_dict(alone), log=lambda *a: None)
    two = [json.loads(l) for l in (Path(student.config["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(l) for l in (single.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one]
    assert all(b["loss"] == pytest.approx(a["loss"], rel=1e-4) for a, b in zip(one, two))


# ---------------------------------------------------------------------------------------- FSDP2


def torchrun(tmp_path: Path, cache_dir: Path, config: dict, processes: int, *args: str) -> str:
    """`distillab train` on `processes` gloo processes of this machine; returns its output."""
    path = tmp_path / f"{config['name']}-{processes}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "DISTILLAB_CACHE": str(cache_dir)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(processes), "-m", "distillab.cli", "train", str(path), *args], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout + result.stderr


BUDGET = 6 * 8 * 32


def fsdp_run(tmp_path, cache_dir, name, processes, kd=None, **train_keys):
    train_keys = {"batch_size": 8 // processes, "processes": processes, "parallel": "fsdp", "token_budget": BUDGET,
                  "threads": 1, "checkpoint_every": 2, **train_keys}
    return tiny_run(tmp_path, cache_dir, name, train=train_keys, **({"kd": kd} if kd else {}))


@pytest.mark.slow
@pytest.mark.parametrize("distil", [False, True], ids=["lm", "kd"])
def test_fsdp_two_processes_match_one_process(tmp_path, cache_dir, tiny_teacher, distil):
    """FSDP2 on 2 gloo processes (student and teacher sharded) = one plain process with the same
    global batch: the same loss at every logged step and the same final weights."""
    kd = {"teacher": str(tiny_teacher), "alpha": 0.5} if distil else None
    single = train(config_from_dict(tiny_run(tmp_path, cache_dir, "single", **({"kd": kd} if kd else {}),
                                             train={"batch_size": 8, "token_budget": BUDGET, "threads": 1})),
                   log=lambda *a: None)
    torchrun(tmp_path, cache_dir, fsdp_run(tmp_path, cache_dir, "fsdp", 2, kd), 2)
    assert_same_run(single.run_dir, tmp_path / "fsdp")


def test_fsdp_on_a_world_of_one_matches_the_plain_process(tmp_path, cache_dir):
    """train.parallel=fsdp without torchrun: the FSDP code path on one process, same numbers."""
    single = train(config_from_dict(tiny_run(tmp_path, cache_dir, "single",
                                             train={"batch_size": 8, "token_budget": BUDGET, "threads": 1})),
                   log=lambda *a: None)
    sharded = train(config_from_dict(fsdp_run(tmp_path, cache_dir, "fsdp1", 1)), log=lambda *a: None)
    assert_same_run(single.run_dir, sharded.run_dir, rel=1e-5)


def test_a_ddp_model_is_freed_before_its_process_group_is_destroyed(tmp_path, cache_dir, monkeypatch):
    """The order `train` closes a DDP run in (the C++ reducer must not hold the process group's last
    reference, or the group's destructor can hang at the end of a run: `release_then_close`), checked at the
    moment the group is destroyed, after a finished run and after one that failed, on a world of one."""
    import weakref

    import torch
    import torch.distributed as dist

    from distillab.parallelism import mesh_of
    from distillab.train import trainer as trainer_module
    from distillab.train.parallel import DataParallel

    models, alive_at_close = [], []

    class Watched(DataParallel):
        def prepare_model(self, model, *args, **kwargs):
            wrapped = super().prepare_model(model, *args, **kwargs)
            models.append(weakref.ref(wrapped))
            return wrapped

        def close(self):
            alive_at_close.append(sum(ref() is not None for ref in models))
            super().close()

    def ddp_on_one_process(train_config):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return Watched(torch.device("cpu"), 0, 1, mesh_of("ddp", 1), train_config.precision)

    def fail_at_step_2(step):
        if step == 2:
            raise RuntimeError("stopped by the test")

    monkeypatch.setattr(trainer_module, "setup_parallelism", ddp_on_one_process)
    trainer_module.train(config_from_dict(tiny_run(tmp_path, cache_dir, "finished")), log=lambda *a: None)
    with pytest.raises(RuntimeError, match="stopped by the test"):
        trainer_module.train(config_from_dict(tiny_run(tmp_path, cache_dir, "failed")), log=lambda *a: None,
                             on_step=fail_at_step_2)
    assert len(models) == 2 and alive_at_close == [0, 0]
    assert not dist.is_initialized()
