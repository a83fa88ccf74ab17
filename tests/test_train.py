import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_run
from distillab.config import TrainConfig, config_from_dict
from distillab.errors import ConfigError
from distillab.models import LADDER, build_model
from distillab.train import learning_rate, make_plan, train

quiet = lambda *a: None  # noqa: E731


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cosine_schedule_values():
    cfg = TrainConfig(token_budget=100 * 4 * 8, batch_size=4, seq_len=8, lr=1.0, warmup_fraction=0.05)
    plan = make_plan(cfg)
    assert plan.steps == 100 and plan.warmup_steps == 5
    lrs = [learning_rate(s, plan, cfg) for s in range(plan.steps)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[-1] == pytest.approx(0.1)  # cosine ends at 10 % of peak
    middle = 5 + (100 - 1 - 5) / 2
    assert learning_rate(int(middle), plan, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(middle) - 5) / 94)))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_wsd_schedule_values():
    cfg = TrainConfig(token_budget=100 * 4 * 8, batch_size=4, seq_len=8, lr=2.0, schedule="wsd",
                      warmup_fraction=0.1, decay_fraction=0.2)
    plan = make_plan(cfg)
    lrs = [learning_rate(s, plan, cfg) for s in range(plan.steps)]
    assert lrs[9] == pytest.approx(2.0) and lrs[79] == pytest.approx(2.0)
    assert lrs[80] == pytest.approx(2.0)  # decay starts from the peak
    assert lrs[-1] == pytest.approx(0.2)
    assert lrs[90] == pytest.approx(2.0 + (0.2 - 2.0) * 10 / 19)


def test_same_seed_same_initial_weights():
    a = build_model(LADDER["cpu-0.1m"], 100, 16, seed=43).state_dict()
    b = build_model(LADDER["cpu-0.1m"], 100, 16, seed=43).state_dict()
    c = build_model(LADDER["cpu-0.1m"], 100, 16, seed=44).state_dict()
    assert_bit_identical(a, b)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_teacher_then_student_end_to_end(tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM

    teacher_cfg = config_from_dict(tiny_run(tmp_path, cache_dir, "teacher", model={"name": "cpu-0.3m"}))
    teacher = train(teacher_cfg, log=quiet)
    assert teacher.completed
    student_cfg = config_from_dict(
        tiny_run(tmp_path, cache_dir, "student", kd={"teacher": str(teacher.final_dir), "alpha": 0.5, "temperature": 2.0},
                 train={"init_seed": 43, "data_seed": 43})
    )
    student = train(student_cfg, log=quiet)
    assert student.completed and student.steps == 8 and student.tokens == 8 * 4 * 32

    rows = [json.loads(line) for line in (student.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for row in rows:
        assert {"step", "tokens", "loss", "ce", "kd", "lr", "tokens_per_s"} <= row.keys()
        assert row["kd"] > 0 and row["loss"] == pytest.approx(0.5 * row["ce"] + 0.5 * row["kd"], rel=1e-6)
    assert "eval/validation/loss" in rows[-1]
    teacher_rows = [json.loads(l) for l in (teacher.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] == 0 and r["loss"] == pytest.approx(r["ce"]) for r in teacher_rows)

    # the checkpoint is a plain HF model: load it and recompute the held-out loss independently
    model = AutoModelForCausalLM.from_pretrained(str(student.final_dir)).eval()
    saved_tokenizer = json.loads((student.final_dir / "tokenizer_config.json").read_text())
    assert model.config.use_cache is True and saved_tokenizer["model_max_length"] == 32  # as generation expects
    manifest_dir = Path(json.loads((student.final_dir / "distillab.json").read_text())["data_dir"])
    meta = json.loads((manifest_dir / "manifest.json").read_text())
    tokens = np.memmap(manifest_dir / "validation.bin", dtype=meta["dtype"], mode="r")
    n_windows = (len(tokens) - 1) // 32
    starts = np.linspace(0, n_windows - 1, 8).round().astype(int) * 32
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in starts:
            window = torch.tensor(np.asarray(tokens[s : s + 33], dtype=np.int64))[None]
            logp = torch.log_softmax(model(window[:, :-1]).logits.double(), dim=-1)
            nll -= float(logp[0, torch.arange(32), window[0, 1:]].sum())
            count += 32
    assert student.eval["validation"]["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert student.eval["validation"]["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)

    # a finished run is not retrained
    again = train(student_cfg, log=quiet)
    assert again.completed and again.steps == 8


def test_resume_is_bit_identical(tmp_path, cache_dir):
    straight = train(config_from_dict(tiny_run(tmp_path, cache_dir, "straight")), log=quiet)
    interrupted_cfg = config_from_dict(tiny_run(tmp_path, cache_dir, "interrupted"))
    first = train(interrupted_cfg, stop_after_steps=5, log=quiet)
    assert not first.completed and first.steps == 5
    resumed = train(interrupted_cfg, log=quiet)
    assert resumed.completed and resumed.steps == 8
    assert_bit_identical(weights(straight.run_dir), weights(resumed.run_dir))
    a = [json.loads(l) for l in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]


def test_resume_refuses_a_changed_config(tmp_path, cache_dir):
    cfg = config_from_dict(tiny_run(tmp_path, cache_dir, "run"))
    train(cfg, stop_after_steps=3, log=quiet)
    changed = config_from_dict(tiny_run(tmp_path, cache_dir, "run", train={"lr": 1e-3}))
    with pytest.raises(ConfigError) as info:
        train(changed, log=quiet)
    assert info.value.key == "train.lr"


def test_gradient_accumulation_weights_micro_batches_by_target_tokens():
    """Two micro-batches with unequal target counts give the gradient of one batch's mean loss."""
    import copy

    from distillab.train import train_step

    model = build_model(LADDER["cpu-0.1m"], 64, 16, seed=0)
    ids = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    inputs, labels = ids[:, :-1], ids[:, 1:].clone()
    labels[:3, :10] = -100  # the first micro-batch has 30 fewer targets
    reference = copy.deepcopy(model)
    logits = reference(input_ids=inputs).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100).backward()

    from distillab.data.loader import Batch
    from distillab.losses.objective import KDObjective
    from distillab.train.parallel import SingleProcess

    accumulated = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in accumulated.named_parameters()}
    sgd = torch.optim.SGD(accumulated.parameters(), lr=1.0)  # new = old - grad
    batches = [Batch(inputs[:4], labels[:4], torch.arange(4)), Batch(inputs[4:], labels[4:], torch.arange(4, 8))]
    out = train_step(accumulated, sgd, batches, KDObjective(), None, SingleProcess(torch.device("cpu")), step=0,
                     steps=1, grad_clip=0.0)
    assert out.targets == 8 * 16 - 30
    for name, param in accumulated.named_parameters():
        expected = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(before[name] - param.detach(), expected, rtol=1e-4, atol=1e-7)


def test_teacher_with_another_tokenizer_is_refused(tmp_path, cache_dir):
    teacher = train(config_from_dict(tiny_run(tmp_path, cache_dir, "t", data={"tokenizer": {"vocab_size": 300}})),
                    log=quiet)
    cfg = config_from_dict(tiny_run(tmp_path, cache_dir, "s", kd={"teacher": str(teacher.final_dir), "alpha": 0.5}))
    with pytest.raises(ConfigError) as info:
        train(cfg, log=quiet)
    assert info.value.key == "kd.teacher" and "tokenizer" in str(info.value)
    missing = config_from_dict(tiny_run(tmp_path, cache_dir, "s2", kd={"teacher": str(tmp_path / "nope"), "alpha": 0.5}))
    with pytest.raises(ConfigError, match="kd.teacher"):
        train(missing, log=quiet)


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_weights(tmp_path, cache_dir):
    """SIGKILL at an arbitrary moment (possibly mid-checkpoint), rerun, compare with an uninterrupted run."""
    # long enough (200 steps) that the kill lands mid-run even on a fast machine
    budget = {"token_budget": 200 * 4 * 32, "checkpoint_every": 2, "log_every": 4, "eval_every": 1000}
    straight = train(config_from_dict(tiny_run(tmp_path, cache_dir, "straight", train=budget)), log=quiet)
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(tiny_run(tmp_path, cache_dir, "killed", train=budget)))
    command = [sys.executable, "-m", "distillab.cli", "train", str(config_path)]
    env = {**os.environ, "DISTILLAB_CACHE": str(cache_dir)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(checkpoints.glob("step_*")) and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it could be killed"
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stdout
    assert_bit_identical(weights(straight.run_dir), weights(tmp_path / "killed"))


def test_teacher_with_padded_vocabulary_is_sliced(tmp_path, cache_dir):
    """A teacher whose output layer has padding rows (e.g. 151,936 vs 152,064) gives the same signal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillab.evaluate.run import evaluate_checkpoint
    from distillab.teacher import OnlineTeacher

    teacher = train(config_from_dict(tiny_run(tmp_path, cache_dir, "t")), log=quiet)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.final_dir))
    model = AutoModelForCausalLM.from_pretrained(str(teacher.final_dir))
    model.resize_token_embeddings(len(tokenizer) + 64, mean_resizing=False)
    padded = tmp_path / "padded"
    model.save_pretrained(str(padded))
    tokenizer.save_pretrained(str(padded))
    assert model.config.vocab_size == len(tokenizer) + 64

    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    from distillab.data.loader import Batch

    batch = Batch(ids, ids, torch.arange(2))
    plain = OnlineTeacher.load(teacher.final_dir, tokenizer, torch.device("cpu")).signal(batch)
    sliced = OnlineTeacher.load(padded, tokenizer, torch.device("cpu")).signal(batch)
    assert sliced.shape == plain.shape == (2, 16, len(tokenizer))
    torch.testing.assert_close(sliced, plain)
    with torch.no_grad():  # the teacher's projection path equals the model's own forward
        direct = model(input_ids=ids).logits[..., : len(tokenizer)]
    torch.testing.assert_close(sliced, direct, rtol=1e-5, atol=1e-5)

    a = evaluate_checkpoint(teacher.final_dir, ["validation"], seq_len=32, max_windows=4, out=tmp_path / "a.json",
                            log=quiet)
    b = evaluate_checkpoint(padded, ["packaged:milton"], seq_len=32, max_windows=4, out=tmp_path / "b.json", log=quiet)
    c = evaluate_checkpoint(teacher.final_dir, ["packaged:milton"], seq_len=32, max_windows=4,
                            out=tmp_path / "c.json", log=quiet)
    assert b["sets"]["packaged:milton"]["loss"] == pytest.approx(c["sets"]["packaged:milton"]["loss"], rel=1e-6)
    assert a["sets"]["validation"]["loss"] > 0

    student = train(config_from_dict(tiny_run(tmp_path, cache_dir, "s", kd={"teacher": str(padded), "alpha": 0.5})),
                    log=quiet)
    assert student.completed


def first_step_terms(config, teacher_dir: Path, kd_rows) -> tuple[float, float]:
    """(CE, KD) of a run's first step, recomputed in float64 from its initial weights, its first batch
    and the teacher: independent of the loss code. `kd_rows(log_p_teacher, log_q_student, labels)`."""
    from transformers import AutoModelForCausalLM

    from distillab.data.loader import WindowStream
    from distillab.data.shards import prepare_data
    from distillab.models import resolve_spec

    data = prepare_data(config.data, log=quiet)
    t = config.train
    model = build_model(resolve_spec(config.model), data.vocab_size, t.seq_len, t.init_seed,
                        data.tokenizer.eos_token_id).double()
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).double()
    batch = WindowStream(data.tokens("train"), t.seq_len, t.data_seed).batch(0, t.batch_size)
    with torch.no_grad():
        log_q = torch.log_softmax(model(input_ids=batch.inputs).logits, -1).reshape(-1, data.vocab_size)
        log_p = torch.log_softmax(teacher(input_ids=batch.inputs).logits, -1).reshape(-1, data.vocab_size)
    labels = batch.labels.reshape(-1)
    ce = -log_q[torch.arange(len(labels)), labels].mean()
    return float(ce), float(kd_rows(log_p, log_q, labels).mean())


def top5_kl(log_p, log_q, labels):
    top = log_p.topk(5, dim=-1)
    p = torch.softmax(top.values, dim=-1)  # renormalised over the teacher's 5 most likely tokens
    return (p * (torch.log(p) - log_q.gather(1, top.indices))).sum(-1)


def hard_ce(log_p, log_q, labels):
    return -log_q.gather(1, log_p.argmax(-1, keepdim=True)).squeeze(1)


def test_top_k_and_hard_label_students_log_the_independently_computed_terms(tmp_path, cache_dir, tiny_teacher):
    for name, kd, kd_rows in (("topk", {"top_k": 5}, top5_kl), ("hard", {"divergence": "hard"}, hard_ce)):
        cfg = config_from_dict(tiny_run(tmp_path, cache_dir, name, train={"token_budget": 4 * 4 * 32, "log_every": 1},
                                        kd={"teacher": str(tiny_teacher), "alpha": 0.3, **kd}))
        result = train(cfg, log=quiet)
        first = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
        ce, kd_value = first_step_terms(cfg, tiny_teacher, kd_rows)
        assert result.completed and first["step"] == 1
        assert first["ce"] == pytest.approx(ce, rel=1e-5) and first["kd"] == pytest.approx(kd_value, rel=1e-5)
        assert first["loss"] == pytest.approx(0.7 * ce + 0.3 * kd_value, rel=1e-5)
    with pytest.raises(ConfigError) as info:
        train(config_from_dict(tiny_run(tmp_path, cache_dir, "big-k", kd={"teacher": str(tiny_teacher),
                                                                         "alpha": 0.5, "top_k": 100_000})), log=quiet)
    assert info.value.key == "kd.top_k"


def test_metrics_reach_tensorboard_and_hold_what_a_kd_run_watches(tmp_path, cache_dir, tiny_teacher):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config_from_dict(tiny_run(tmp_path, cache_dir, "watched", kd={"teacher": str(tiny_teacher), "alpha": 0.4},
                                    train={"token_budget": 4 * 4 * 32, "log_every": 1}))
    result = train(cfg, log=quiet)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert {"ce", "kd", "loss", "alpha", "temperature", "lr", "grad_norm", "tokens_per_s", "teacher_entropy",
                "top1_agreement"} <= row.keys()
        assert row["alpha"] == 0.4 and row["temperature"] == 1.0 and 0 <= row["top1_agreement"] <= 1
    # the first row's teacher entropy and agreement, recomputed from the teacher and the initial student
    from transformers import AutoModelForCausalLM

    from distillab.data.loader import WindowStream
    from distillab.data.shards import prepare_data
    from distillab.models import resolve_spec

    data = prepare_data(cfg.data, log=quiet)
    batch = WindowStream(data.tokens("train"), 32, cfg.train.data_seed).batch(0, 4)
    student = build_model(resolve_spec(cfg.model), data.vocab_size, 32, cfg.train.init_seed).double()
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_teacher)).double()
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(input_ids=batch.inputs).logits, -1)
        agree = (student(input_ids=batch.inputs).logits.argmax(-1) == log_p.argmax(-1)).double().mean()
    assert rows[0]["teacher_entropy"] == pytest.approx(float(-(log_p.exp() * log_p).sum(-1).mean()), rel=1e-5)
    assert rows[0]["top1_agreement"] == pytest.approx(float(agree), abs=1e-9)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    for key in ("loss", "ce", "kd", "lr", "teacher_entropy", "eval/validation/loss"):  # grouped: train/loss, ...
        scalars = {e.step: e.value for e in events.Scalars(key if "/" in key else f"train/{key}")}
        expected = {r["step"]: r[key] for r in rows if key in r}
        assert scalars.keys() == expected.keys()
        assert all(scalars[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())


def test_wsd_branch_equals_an_independent_run(tmp_path, cache_dir):
    """A budget branched from a WSD trunk's stable phase ends bit-identical to training it alone."""
    per_step = 4 * 32
    wsd = {"schedule": "wsd", "warmup_steps": 2, "decay_fraction": 0.25, "checkpoint_every": 100}
    trunk = train(config_from_dict(tiny_run(tmp_path, cache_dir, "trunk",
                                            train={**wsd, "token_budget": 24 * per_step, "keep_steps": [9]})),
                  log=quiet)
    branch_point = tmp_path / "trunk" / "checkpoints" / "step_00000009"
    assert branch_point.exists() and trunk.completed
    branch = train(config_from_dict(tiny_run(tmp_path, cache_dir, "branch",
                                             train={**wsd, "token_budget": 12 * per_step,
                                                    "branch_from": str(branch_point)})), log=quiet)
    alone = train(config_from_dict(tiny_run(tmp_path, cache_dir, "alone", train={**wsd, "token_budget": 12 * per_step})),
                  log=quiet)
    assert branch.steps == alone.steps == 12
    assert_bit_identical(weights(branch.run_dir), weights(alone.run_dir))
    rows = [json.loads(l) for l in (branch.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] > 9  # the branch trained only the decay

    with pytest.raises(ConfigError, match="only in train.token_budget"):
        train(config_from_dict(tiny_run(tmp_path, cache_dir, "other-lr",
                                        train={**wsd, "lr": 1e-3, "token_budget": 12 * per_step,
                                               "branch_from": str(branch_point)})), log=quiet)
    with pytest.raises(ConfigError, match="decay starts at step"):
        train(config_from_dict(tiny_run(tmp_path, cache_dir, "other-budget",
                                        train={**wsd, "token_budget": 16 * per_step,
                                               "branch_from": str(branch_point)})), log=quiet)


def test_alpha_and_temperature_schedules_are_in_force_at_every_step(tmp_path, cache_dir, tiny_teacher):
    kd = {"teacher": str(tiny_teacher), "alpha": 0.6, "temperature": 2.0,
          "alpha_schedule": {"shape": "linear", "start": 0.0},
          "temperature_schedule": {"shape": "wsd", "start": 1.0, "end": 1.0, "warmup_fraction": 0.25,
                                   "decay_fraction": 0.25}}
    result = train(config_from_dict(tiny_run(tmp_path, cache_dir, "scheduled", kd=kd,
                                             train={"log_every": 1, "token_budget": 9 * 4 * 32})), log=quiet)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        progress = (row["step"] - 1) / 8
        assert row["alpha"] == pytest.approx(0.6 * progress)
        expected_t = 1 + progress / 0.25 if progress < 0.25 else 2.0 if progress <= 0.75 else 2 - (progress - 0.75) / 0.25
        assert row["temperature"] == pytest.approx(expected_t)
        assert row["loss"] == pytest.approx((1 - row["alpha"]) * row["ce"] + row["alpha"] * row["kd"], rel=1e-6)
