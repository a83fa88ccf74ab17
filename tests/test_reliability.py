"""No silently wrong model: each protected fault, reproduced, with the one line a user sees.

The numbered comments follow docs/reliability.md.
"""

import contextlib
import json
import os
import random
import shutil
import stat
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
from distillab.checkpoint import list_checkpoints
from distillab.export import checkpoint_tensors
from distillab.config import config_from_dict, load_config
from distillab.errors import CheckpointError, ConfigError, DataError, DistillabError, StorageError
from distillab.files import LockHeld, exclusive_lock
from distillab.train import train
from distillab.train.guard import NonFiniteError

quiet = lambda *a: None  # noqa: E731


DROP_ROOT_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                      "--bounding-set=-dac_override,-dac_read_search"]


def cli(*args, env=None, cwd=None, respect_permissions=False):
    """`distillab ARGS` in a subprocess; `respect_permissions`: as root, without the capability to
    override file permissions (so a read-only directory is read-only)."""
    prefix = DROP_ROOT_OVERRIDE if respect_permissions and os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-m", "distillab.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})})


def one_line_error(result, *fragments):
    """The process failed with exit 2 and exactly one stderr line holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- 1. divergence


def test_nan_divergence_stops_without_a_final_model(tmp_path, cache_dir):
    config = config_from_dict(tiny_run(tmp_path, cache_dir, "nan", train={"lr": 1e6, "checkpoint_every": 2}))
    with pytest.raises(NonFiniteError, match=r"training diverged (at|by) step \d+: .*(is nan|collapsed to a constant)"):
        train(config, log=quiet)
    run = tmp_path / "nan"
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    for _, checkpoint in list_checkpoints(run / "checkpoints"):  # whatever was kept is finite
        assert all(torch.isfinite(t).all() for _, t in checkpoint_tensors(checkpoint))


def test_skip_policy_drops_updates_then_stops(tmp_path, cache_dir):
    config = config_from_dict(tiny_run(tmp_path, cache_dir, "skip", train={"lr": 1e6, "nonfinite": "skip:2",
                                                                         "checkpoint_every": 100, "eval_every": 100}))
    with pytest.raises(NonFiniteError, match=r"after skipping 2 step\(s\) \(train.nonfinite=skip:2\)"):
        train(config, log=quiet)
    assert not (tmp_path / "skip" / "final").exists()


@pytest.mark.parametrize("steps", [8, 32])
def test_finite_divergence_is_not_marked_done(tmp_path, cache_dir, steps):
    """lr 50 without clipping: the weights blow up (loss far above uniform) or collapse (exactly uniform)."""
    config = tiny_run(tmp_path, cache_dir, "huge", train={"lr": 50.0, "grad_clip": 0.0, "token_budget": steps * 128})
    with pytest.raises(NonFiniteError, match=r"diverged: after \d+ steps the validation loss .* no better than guessing"):
        train(config_from_dict(config), log=quiet)
    assert not (tmp_path / "huge" / "summary.json").exists() and not (tmp_path / "huge" / "final").exists()


def test_a_non_finite_teacher_is_refused_at_load(tmp_path, cache_dir, tiny_teacher):
    broken = tmp_path / "nan-teacher"
    shutil.copytree(tiny_teacher, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    from safetensors.torch import save_file

    save_file(weights, str(broken / "model.safetensors"))
    (broken / "manifest.json").unlink()  # a model directory from elsewhere: no manifest to catch it
    config = config_from_dict(tiny_run(tmp_path, cache_dir, "student", kd={"teacher": str(broken), "alpha": 0.5}))
    with pytest.raises(ConfigError, match="kd.teacher: .*non-finite"):
        train(config, log=quiet)
    assert not (tmp_path / "student").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- 2. corrupt checkpoints


def interrupted(tmp_path, cache_dir, name: str, stop: int = 6) -> Path:
    config = config_from_dict(tiny_run(tmp_path, cache_dir, name, train={"checkpoint_every": 2,
                                                                         "keep_checkpoints": 3}))
    train(config, stop_after_steps=stop, log=quiet)
    return tmp_path / name


@pytest.mark.parametrize("damage", ["overwrite", "truncate"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, cache_dir, damage):
    straight = train(config_from_dict(tiny_run(tmp_path, cache_dir, "straight", train={"checkpoint_every": 2})),
                     log=quiet)
    run = interrupted(tmp_path, cache_dir, "damaged")
    latest = list_checkpoints(run / "checkpoints")[-1][1] / "sharded" / "__0_0.distcp"
    data = bytearray(latest.read_bytes())
    if damage == "overwrite":
        data[-256:] = np.full(64, np.inf, dtype=np.float32).tobytes()
        latest.write_bytes(bytes(data))
    else:
        latest.write_bytes(bytes(data[: len(data) // 2]))
    messages = []
    result = train(config_from_dict(tiny_run(tmp_path, cache_dir, "damaged", train={"checkpoint_every": 2,
                                                                                     "keep_checkpoints": 3})),
                   log=messages.append)
    assert result.completed
    warning = next(m for m in messages if m.startswith("warning:"))
    assert "__0_0.distcp: checksum mismatch" in warning and "falling back" in warning
    assert any("resuming" in m and "from step 4" in m for m in messages)
    assert same_weights(final_weights(run), final_weights(straight.run_dir))


def test_no_verified_checkpoint_is_a_one_line_error(tmp_path, cache_dir):
    run = interrupted(tmp_path, cache_dir, "ruined")
    for _, checkpoint in list_checkpoints(run / "checkpoints"):
        (checkpoint / "trainer_state.pt").write_bytes(b"garbage")
    config_path = run / "config.yaml"
    result = cli("train", str(config_path), env={"DISTILLAB_CACHE": str(cache_dir)})
    one_line_error(result, "no checkpoint verifies against its manifest")


# ----------------------------------------------------------------------------- 3. inputs bound to a run


def test_changed_corpus_between_stop_and_resume_is_refused(tmp_path, cache_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(Path(json.__file__).parent.glob("*.py")):  # real text: a standard-library package
        (corpus / f"{path.stem}.txt").write_text(path.read_text() * 3)
    files = {"corpus": {"source": "files", "name": None, "paths": [str(corpus / "*.txt")]}, "validation_fraction": 0.2}
    config = config_from_dict(tiny_run(tmp_path, cache_dir, "bound", data=files))
    train(config, stop_after_steps=3, log=quiet)
    first = sorted(corpus.glob("*.txt"))[0]
    first.write_text(first.read_text() + "\nan edited line that changes the corpus\n")
    with pytest.raises(DataError, match="changed since .*step_00000003"):
        train(config_from_dict(tiny_run(tmp_path, cache_dir, "bound", data=files)), log=quiet)


def test_resume_without_config_yaml_still_refuses_changed_keys(tmp_path, cache_dir):
    run = interrupted(tmp_path, cache_dir, "orphan", stop=3)
    (run / "config.yaml").unlink()
    changed = tiny_run(tmp_path, cache_dir, "orphan", train={"lr": 1e-3, "data_seed": 7, "checkpoint_every": 2,
                                                             "keep_checkpoints": 3})
    with pytest.raises(ConfigError) as info:
        train(config_from_dict(changed), log=quiet)
    assert info.value.key == "train.data_seed" and "step_00000003" in str(info.value)
    operational = tiny_run(tmp_path, cache_dir, "orphan", train={"checkpoint_every": 2, "keep_checkpoints": 3,
                                                                 "log_every": 1})
    assert train(config_from_dict(operational), log=quiet).completed  # logging cadence may change


# ----------------------------------------------------------------------------- 4. one writer


def test_a_second_process_on_a_run_directory_is_refused(tmp_path, cache_dir):
    config = config_from_dict(tiny_run(tmp_path, cache_dir, "busy"))
    with exclusive_lock(tmp_path / "busy" / ".lock", "test"):
        with pytest.raises(LockHeld, match=rf"run directory .*busy is in use by another process \(pid {os.getpid()}\)"):
            train(config, log=quiet)
    assert train(config, log=quiet).completed  # the lock goes with its holder


@pytest.mark.slow
def test_two_concurrent_trainings_one_wins_one_is_refused(tmp_path, cache_dir):
    values = tiny_run(tmp_path, cache_dir, "race", train={"token_budget": 300 * 4 * 32, "checkpoint_every": 2})
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(values))
    train(config_from_dict(values), stop_after_steps=1, log=quiet)  # data prepared, directory exists
    env = {**os.environ, "DISTILLAB_CACHE": str(cache_dir)}
    command = [sys.executable, "-m", "distillab.cli", "train", str(path)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes = sorted([(p.wait(), p.stderr.read()) for p in (first, second)])
    assert outcomes[0][0] == 0 and outcomes[1][0] == 2 and "in use by another process" in outcomes[1][1]
    rows = [json.loads(line) for line in (tmp_path / "race" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "race" / "summary.json").read_text())
    assert rows[-1]["step"] == summary["steps"] == 300


def test_one_sweep_process_per_sweep_directory(tmp_path):
    from distillab.sweep import grid_from_dict, run_sweep

    spec = grid_from_dict({"name": "g", "students": {"models": ["cpu-0.1m"], "tokens": [256]}, "kd": {"alpha": [0.5]}})
    with exclusive_lock(tmp_path / "sweep" / ".lock", "test"):
        with pytest.raises(LockHeld, match="sweep directory .* is in use"):
            run_sweep(spec, tmp_path / "sweep", log=quiet)


# ----------------------------------------------------------------------------- 5. trained positions


def test_positions_beyond_training_are_refused(tmp_path, cache_dir, tiny_teacher):
    longer = config_from_dict(tiny_run(tmp_path, cache_dir, "long", train={"seq_len": 64},
                                       kd={"teacher": str(tiny_teacher), "alpha": 0.5}))
    with pytest.raises(ConfigError) as info:
        train(longer, log=quiet)
    assert info.value.key == "train.seq_len" and "32 positions" in str(info.value)
    one_line_error(cli("eval", "--checkpoint", str(tiny_teacher), "--seq-len", "128"), "--seq-len: 128 is beyond the 32")


# ----------------------------------------------------------------------------- 6. late failures


def test_a_failed_check_leaves_nothing_that_refuses_the_corrected_command(tmp_path, cache_dir, tiny_teacher):
    empty = tmp_path / "empty-teacher"
    empty.mkdir()
    for kd, key in (({"top_k": 5000}, "kd.top_k"), ({"teacher": str(empty)}, "kd.teacher")):
        bad = tiny_run(tmp_path, cache_dir, "s", kd={"teacher": str(tiny_teacher), "alpha": 0.5, **kd})
        with pytest.raises(ConfigError) as info:
            train(config_from_dict(bad), log=quiet)
        assert info.value.key == key
        assert not (tmp_path / "s" / "config.yaml").exists()
    good = tiny_run(tmp_path, cache_dir, "s", kd={"teacher": str(tiny_teacher), "alpha": 0.5, "top_k": 5})
    assert train(config_from_dict(good), log=quiet).completed


# ----------------------------------------------------------------------------- 7. bad corpus files


def test_binary_and_non_utf8_corpus_files_are_named(tmp_path):
    from distillab.config import CorpusConfig
    from distillab.data.sources import iter_documents

    (tmp_path / "good.txt").write_text("plain text\n" * 10)
    (tmp_path / "blob.txt").write_bytes(random.Random(0).randbytes(4096))
    corpus = CorpusConfig(source="files", name=None, paths=[str(tmp_path / "*.txt")])
    with pytest.raises(DataError, match=r"blob.txt: looks like a binary file"):
        list(iter_documents(corpus, tmp_path))
    (tmp_path / "blob.txt").unlink()
    (tmp_path / "records.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    jsonl = CorpusConfig(source="files", name=None, paths=[str(tmp_path / "records.jsonl")])
    with pytest.raises(DataError, match=r"records.jsonl:2: not UTF-8 \(byte 0xe9"):
        list(iter_documents(jsonl, tmp_path))


# ----------------------------------------------------------------------------- 8. read-only places, --limit 0


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root cannot drop its override")
@pytest.mark.parametrize("read_only", ["run_dir", "cache"])
def test_read_only_places_are_one_line_errors(tmp_path, cache_dir, read_only):
    values = tiny_run(tmp_path, cache_dir, "run")
    values["data"]["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    (tmp_path / "runs").mkdir()
    values["run_dir"] = str(tmp_path / "runs" / "run")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    locked = tmp_path / ("runs" if read_only == "run_dir" else "cache")
    os.chmod(locked, 0o555)
    try:
        result = cli("train", str(tmp_path / "run.yaml"), respect_permissions=True)
    finally:
        os.chmod(locked, 0o755)
    one_line_error(result, str(locked), "writ")


def test_eval_limit_zero_is_one_line(tiny_teacher):
    one_line_error(cli("eval", "--checkpoint", str(tiny_teacher), "--tasks", "piqa", "--limit", "0"),
                   "--limit: must be >= 1")


# ----------------------------------------------------------------------------- 9. empty or degenerate input


def test_empty_config_and_degenerate_grids(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.yaml: the file is empty"):
        load_config(empty)
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nstudents: {models: [cpu-0.1m], tokens: [256]}\nkd: {alpha: []}\n")
    one_line_error(cli("sweep", str(grid), "--out", str(tmp_path / "s")), "kd.alpha: list at least one alpha")
    grid.write_text("name: g\nstudents: {models: [cpu-0.1m], tokens: [256]}\nkd: {alpha: [0.5]}\n")
    one_line_error(cli("sweep", str(grid), "--out", str(tmp_path / "s"), "--workers", "0"), "--workers: must be >= 1")
    assert not (tmp_path / "s" / "report.md").exists()


# ----------------------------------------------------------------------------- 10. paths stay inside


def test_names_cannot_escape_their_output_directory(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("name: ok\n")
    for name in ("../../escape_run", "/abs/path"):
        one_line_error(cli("train", str(config), "--set", f"name={name}", cwd=tmp_path), "name:", "must be a plain name")
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: ../../x\nstudents: {models: [cpu-0.1m], tokens: [256]}\n")
    one_line_error(cli("sweep", str(grid), "--dry-run", cwd=tmp_path), "name:", "plain name")
    assert not (tmp_path.parent / "escape_run").exists() and not (tmp_path.parent / "x").exists()


# ----------------------------------------------------------------------------- 11. dependencies, leftovers


def test_missing_harness_is_refused_before_any_run(tmp_path, monkeypatch):
    import importlib.util

    from distillab.sweep import grid_from_dict, run_sweep

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    spec = grid_from_dict({"name": "g", "students": {"models": ["cpu-0.1m"], "tokens": [256]},
                           "eval": {"tasks": ["piqa"]}})
    with pytest.raises(DistillabError, match=r"pip install 'distillab\[eval\]'"):
        run_sweep(spec, tmp_path / "sweep", log=quiet)
    assert not (tmp_path / "sweep").exists()


def test_leftovers_of_a_killed_preparation_are_removed(tmp_path, cache_dir):
    from distillab.data.shards import prepare_data

    data = config_from_dict(tiny_run(tmp_path, cache_dir, "x", data={"tokenizer": {"vocab_size": 300}})).data
    prepared = prepare_data(data, log=quiet)
    leftover = prepared.path.parent / f".tmp-{prepared.path.name}-killed"
    leftover.mkdir()
    (leftover / "train.bin").write_bytes(b"half")
    prepare_data(data, log=quiet)
    assert not leftover.exists()


# ----------------------------------------------------------------------------- 12. file modes


def test_checkpoint_files_follow_the_umask(tiny_teacher):
    expected = 0o666 & ~_current_umask()
    for path in tiny_teacher.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- crashes at random steps


def crash_at(step_to_crash: int):
    def on_step(step: int) -> None:
        if step == step_to_crash:
            raise KeyboardInterrupt(f"injected crash after step {step}")
    return on_step


def crashed_and_resumed(tmp_path, cache_dir, name: str, crash_step: int) -> Path:
    """Train, crash after `crash_step` (leaving a half-written checkpoint beside), resume to the end."""
    values = tiny_run(tmp_path, cache_dir, name, train={"checkpoint_every": 3, "token_budget": 16 * 4 * 32})
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(values), on_step=crash_at(crash_step), log=quiet)
    leftover = tmp_path / name / "checkpoints" / f".tmp-step_{crash_step + 1:08d}-crash"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a file")
    assert train(config_from_dict(values), log=quiet).completed
    assert not leftover.exists()
    return tmp_path / name


def fault_injection(tmp_path, cache_dir, trials: int, seed: int) -> None:
    values = tiny_run(tmp_path, cache_dir, "straight", train={"checkpoint_every": 3, "token_budget": 16 * 4 * 32})
    straight = train(config_from_dict(values), log=quiet)
    steps = random.Random(seed).sample(range(1, 16), trials)
    for trial, step in enumerate(steps):
        run = crashed_and_resumed(tmp_path, cache_dir, f"crash-{trial}", step)
        assert same_weights(final_weights(run), final_weights(straight.run_dir)), f"crash after step {step}"
        a = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
        b = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]


def test_crashes_at_random_steps_resume_bit_identically(tmp_path, cache_dir):
    fault_injection(tmp_path, cache_dir, trials=2, seed=int.from_bytes(os.urandom(2), "little"))


@pytest.mark.slow
def test_crashes_at_ten_random_steps_resume_bit_identically(tmp_path, cache_dir):
    fault_injection(tmp_path, cache_dir, trials=10, seed=int.from_bytes(os.urandom(2), "little"))


# ============================================================================= round two (issue 19)
# Identities a run binds by content, the faults a cluster throws, and the messages they end in.


def tiny_student(tmp_path, cache_dir, name: str, teacher: Path, **kd) -> dict:
    return tiny_run(tmp_path, cache_dir, name, kd={"teacher": str(teacher), "alpha": 0.5, **kd})


def reseal_checkpoint(folder: Path) -> None:
    """Rewrite a checkpoint's manifest for its current files (as a retrained or tampered one would be)."""
    from distillab.files import sha256_file

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"files": files}))


def another_teacher(source: Path, target: Path) -> Path:
    """A copy of `source` with other (finite) weights and a manifest that matches them."""
    from safetensors.torch import save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    reseal_checkpoint(target)
    return target


# ----------------------------------------------------------------------------- 13. a finished run binds too


def test_a_finished_run_rerun_with_a_changed_config_is_refused(tmp_path, cache_dir):
    values = tiny_run(tmp_path, cache_dir, "done", train={"token_budget": 4 * 4 * 32})
    assert train(config_from_dict(values), log=quiet).completed
    changed = tiny_run(tmp_path, cache_dir, "done", train={"token_budget": 4 * 4 * 32, "lr": 1e-3})
    with pytest.raises(ConfigError, match=r"train.lr: is 0.001 but the run in .*done was started with 0.003"):
        train(config_from_dict(changed), log=quiet)
    (tmp_path / "done" / "config.yaml").unlink()  # the final model's own record still binds it
    with pytest.raises(ConfigError, match=r"train.lr: is 0.001 but the checkpoint .*final was started with 0.003"):
        train(config_from_dict(changed), log=quiet)
    lines = []
    assert train(config_from_dict(values), log=lines.append).completed  # unchanged: complete, as before
    assert any("already complete" in line for line in lines)


def test_a_run_that_finishes_while_another_loads_is_not_trained_again(tmp_path, cache_dir, monkeypatch):
    """The race, interleaved deterministically: the first `train` builds its trainer (no lock yet); a
    second `train` of the same run then trains it to the end (claiming and releasing the lock, a
    separate open of the lock file as another process's would be); only then does the first claim
    the lock. It must find the run complete, not resume the last checkpoint and retrain the tail."""
    from distillab.train.trainer import Trainer

    values = tiny_run(tmp_path, cache_dir, "race", train={"token_budget": 8 * 4 * 32, "checkpoint_every": 2})
    train(config_from_dict(values), stop_after_steps=6, log=quiet)
    real_build = Trainer.build.__func__
    finished = {}

    def build_then_let_the_other_finish(cls, config, parallel, log=print):
        trainer = real_build(cls, config, parallel, log)
        if finished:  # the second train's own build
            return trainer
        finished["started"] = True
        assert train(config_from_dict(values), log=quiet).completed
        run = tmp_path / "race"
        finished.update(weights=(run / "final" / "model.safetensors").read_bytes(),
                        summary=(run / "summary.json").read_text(), metrics=(run / "metrics.jsonl").read_text())
        return trainer

    monkeypatch.setattr(Trainer, "build", classmethod(build_then_let_the_other_finish))
    lines = []
    result = train(config_from_dict(values), log=lines.append)
    run = tmp_path / "race"
    assert result.completed and any("already complete" in line for line in lines), lines
    assert (run / "final" / "model.safetensors").read_bytes() == finished["weights"]
    assert (run / "summary.json").read_text() == finished["summary"]
    assert (run / "metrics.jsonl").read_text() == finished["metrics"]  # no step trained twice


# ----------------------------------------------------------------------------- 14. inputs bound by content


def test_a_teacher_replaced_between_stop_and_resume_is_refused(tmp_path, cache_dir, tiny_teacher):
    teacher = tmp_path / "teacher-final"
    shutil.copytree(tiny_teacher, teacher)
    values = tiny_student(tmp_path, cache_dir, "student", teacher)
    train(config_from_dict(values), stop_after_steps=3, log=quiet)
    another_teacher(tiny_teacher, teacher)  # same path, other weights
    with pytest.raises(ConfigError, match=r"kd.teacher: the teacher's weights changed since .*step_00000003 was "
                                          r"written \(sha256 \w{12}…, now \w{12}…\); restore it"):
        train(config_from_dict(values), log=quiet)
    shutil.rmtree(teacher)
    shutil.copytree(tiny_teacher, teacher)  # restored: the run finishes, and records what it read
    result = train(config_from_dict(values), log=quiet)
    from distillab.checkpoint import read_meta
    from distillab.artefact import weights_sha256

    assert read_meta(result.final_dir)["inputs"]["teacher_weights_sha256"] == weights_sha256(tiny_teacher)
    another_teacher(tiny_teacher, teacher)  # and a finished run is held to it too
    with pytest.raises(ConfigError, match=r"kd.teacher: the teacher's weights changed since .*final was written"):
        train(config_from_dict(values), log=quiet)


def chat_records(path: Path, n: int = 24) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": f"{2 * i}."}]}
            for i in range(n)]  # ~25 tokens each: within the tiny teacher's 32 positions
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_sft(tmp_path, cache_dir, init: Path, name: str = "sft", **sft) -> dict:
    return {"name": name, "run_dir": str(tmp_path / name),
            "data": {"corpus": {"source": "files", "paths": [str(chat_records(tmp_path / "chats.jsonl"))]},
                     "cache_dir": str(cache_dir), "validation_fraction": 0.2},
            "train": {"batch_size": 2, "seq_len": 32, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
                      "threads": 1},
            "sft": {"init_from": str(init), "steps": 4, **sft}, "eval": {"max_windows": 4, "batch_size": 2}}


def test_a_chat_template_edited_between_stop_and_resume_is_refused(tmp_path, cache_dir, tiny_teacher):
    from distillab.data.chat import DEFAULT_TEMPLATE
    from distillab.sft import sft_config

    template = tmp_path / "chat.jinja"
    template.write_text(DEFAULT_TEMPLATE.read_text())
    values = tiny_sft(tmp_path, cache_dir, tiny_teacher, chat_template=str(template))
    train(sft_config(values), stop_after_steps=2, log=quiet)
    template.write_text(DEFAULT_TEMPLATE.read_text().replace("{{", " {{", 1))  # still valid, renders otherwise
    with pytest.raises(ConfigError, match=r"sft.chat_template: the chat template changed since .*step_00000002 was "
                                          "written"):
        train(sft_config(values), log=quiet)
    assert not (tmp_path / "sft" / "final").exists()


def test_an_sft_config_yaml_records_the_model_it_fine_tunes(tmp_path, cache_dir, tiny_teacher):
    """model.* stays unset in an SFT config (the model is sft.init_from's): config.yaml names the real model."""
    from distillab.sft import sft_config

    values = tiny_sft(tmp_path, cache_dir, tiny_teacher, steps=2)
    result = train(sft_config(values), log=quiet)
    recorded = (result.run_dir / "config.yaml").read_text()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["model"] == "cpu-0.1m" and "# model: cpu-0.1m" in recorded and "cpu-1m" not in recorded
    assert train(sft_config(values), log=quiet).completed  # the recorded config still binds the run


@pytest.fixture(scope="module")
def small_cache(tiny_teacher, tmp_path_factory):
    """A float32 top-8 capture of the windows a tiny student reads (the session's data cache)."""
    from distillab.capture import capture_teacher_cache

    folder = tmp_path_factory.mktemp("reliability-caches")
    cache_dir = Path(os.environ["DISTILLAB_CACHE"])
    config = config_from_dict(tiny_run(folder, cache_dir, "capture"))
    return capture_teacher_cache(tiny_teacher, config, 8, out=folder / "exact", coding="float32", threads=1,
                                 readers=[(42, 32)], log=quiet)


def test_an_edited_cache_manifest_is_refused(tmp_path, cache_dir, tiny_teacher, small_cache):
    edited = tmp_path / "edited"
    shutil.copytree(small_cache, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["coding"]["log_step"] = 2 * manifest["coding"].get("log_step", 1.0)
    (edited / "manifest.json").write_text(json.dumps(manifest))
    values = tiny_student(tmp_path, cache_dir, "student", tiny_teacher, cache=str(edited), top_k=8)
    with pytest.raises(DataError, match=r"kd.cache: .*manifest.json was edited after the capture"):
        train(config_from_dict(values), log=quiet)
    assert not (tmp_path / "student").exists()


def test_a_teacher_cache_replaced_between_stop_and_resume_is_refused(tmp_path, cache_dir, tiny_teacher, small_cache):
    from distillab.capture import capture_teacher_cache

    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    values = tiny_student(tmp_path, cache_dir, "student", tiny_teacher, cache=str(cache), top_k=8)
    train(config_from_dict(values), stop_after_steps=3, log=quiet)
    shutil.rmtree(cache)  # the same teacher, captured again otherwise (compact coding): a sound cache, another one
    capture_teacher_cache(tiny_teacher, config_from_dict(values), 8, out=cache, threads=1, readers=[(42, 32)],
                          log=quiet)
    with pytest.raises(ConfigError, match=r"kd.cache: the teacher cache \(its manifest.*\) changed since "
                                          r".*step_00000003 was written"):
        train(config_from_dict(values), log=quiet)


def test_captures_with_another_k_into_one_out_do_not_replace_each_other(tmp_path, cache_dir, tiny_teacher):
    from distillab.capture import capture_teacher_cache
    from distillab.cache.store import TeacherCache

    config = config_from_dict(tiny_run(tmp_path, cache_dir, "capture"))
    out = tmp_path / "shared"
    capture_teacher_cache(tiny_teacher, config, 4, out=out, windows=4, threads=1, log=quiet)
    with pytest.raises(ConfigError, match=r"--out: .*shared already holds another teacher cache \(top_k 4 there, "
                                          r"8 here\); choose another --out"):
        capture_teacher_cache(tiny_teacher, config, 8, out=out, windows=4, threads=1, log=quiet)
    assert TeacherCache.open(out).top_k == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_two_concurrent_captures_with_another_k_one_wins_one_is_refused(tmp_path, cache_dir, tiny_teacher):
    from distillab.cache.store import TeacherCache

    (tmp_path / "data.yaml").write_text(yaml.safe_dump(tiny_run(tmp_path, cache_dir, "capture")))
    env = {**os.environ, "DISTILLAB_CACHE": str(cache_dir)}
    commands = [[sys.executable, "-m", "distillab.cli", "teacher", "cache", str(tmp_path / "data.yaml"),
                 "--teacher", str(tiny_teacher), "--top-k", str(k), "--out", str(tmp_path / "shared"), "--threads", "1",
                 "--windows", "8"]
                for k in (4, 8)]
    running = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for c in commands]
    outcomes = [(p.wait(), p.stderr.read()) for p in running]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    refused = next(err for code, err in outcomes if code == 2)
    assert "already holds another teacher cache" in refused and len(refused.strip().splitlines()) == 1
    winner = 4 if outcomes[0][0] == 0 else 8
    assert TeacherCache.open(tmp_path / "shared").top_k == winner


# ----------------------------------------------------------------------------- 15. full disks, read-only mounts


@contextlib.contextmanager
def mounted(target: Path, *, size: str | None = None, read_only_copy_of: Path | None = None):
    """A tmpfs of `size` at `target` (a small disk to fill), or a read-only bind mount of
    `read_only_copy_of` there (a read-only filesystem: root ignores chmod, not EROFS). Skips the
    test where mounting is not permitted (no root, no CAP_SYS_ADMIN, a restricted container)."""
    target.mkdir(parents=True, exist_ok=True)
    if size is not None:
        steps = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)]]
    else:
        steps = [["mount", "--bind", str(read_only_copy_of), str(target)],
                 ["mount", "-o", "remount,bind,ro", str(target)]]
    done = 0
    try:
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True) if shutil.which("mount") else None
            if result is None or result.returncode != 0:
                pytest.skip(f"mounting is not permitted here ({result.stderr.strip() if result else 'no mount'})")
            done += 1
        yield target
    finally:
        if done:
            subprocess.run(["umount", "--lazy", str(target)], capture_output=True)  # files a traceback holds


def temporary_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith((".tmp-", ".trash-"))]


def test_a_full_disk_during_a_capture_is_one_line_and_leaves_nothing(tmp_path, cache_dir, tiny_teacher):
    from distillab.capture import capture_teacher_cache

    config = config_from_dict(tiny_run(tmp_path, cache_dir, "capture"))
    with mounted(tmp_path / "disk", size="64k") as disk:  # the capture takes ~530 kB
        with pytest.raises(DistillabError) as caught:
            capture_teacher_cache(tiny_teacher, config, 64, out=disk / "cache", coding="float32", windows=32,
                                  threads=1, log=quiet)
        message = str(caught.value)
        assert "no space left on device while writing the teacher cache" in message and str(disk) in message
        assert "\n" not in message and temporary_leftovers(disk) == [] and not (disk / "cache").exists()


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_nothing_partial(tmp_path, cache_dir):
    """1.5 MB: the weights (0.7 MB) fit, the optimizer state does not (torch.save hides the errno)."""
    with mounted(tmp_path / "disk", size="1536k") as disk:
        values = tiny_run(tmp_path, cache_dir, "run", train={"checkpoint_every": 2, "tensorboard": False})
        values["run_dir"] = str(disk / "run")
        with pytest.raises(StorageError) as caught:
            train(config_from_dict(values), log=quiet)
        message = str(caught.value)
        assert "no space left on device while writing a checkpoint" in message and "\n" not in message
        assert temporary_leftovers(disk) == [] and not (disk / "run" / "final").exists()


@pytest.mark.parametrize("form", ["atomic directory", "sharded writes"])
def test_a_full_disk_is_named_though_removing_the_partial_files_frees_it(tmp_path, monkeypatch, form):
    """A writer that hides the errno (torch.save's "unexpected pos", as DCP raised it when a preset's
    rehearsal filled this machine's disk) is judged while its partial files still fill the disk:
    removing them frees more than the nearly-full mark, which must not turn the one line into a traceback."""
    import collections

    from distillab import files
    from distillab.artefact import AtomicDirectory, removed_on_failure

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda place: usage(1 << 40, 0, 0 if temporary_leftovers(
        tmp_path) else 1 << 36))  # full while the partial files exist, 64 GiB free once they are gone
    target = tmp_path / "checkpoint"
    with pytest.raises(StorageError, match="no space left on device while writing a checkpoint") as caught:
        if form == "atomic directory":
            with AtomicDirectory(target, "a checkpoint", "choose another run_dir") as tmp:
                (tmp / "shard").write_bytes(b"partial")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        directory = AtomicDirectory(target, "a checkpoint", "choose another run_dir")
        with removed_on_failure(directory, target, "a checkpoint", "choose another run_dir"):
            (directory.path / "shard").write_bytes(b"partial")
            raise RuntimeError("CheckpointException ranks:dict_keys([0])\n... unexpected pos 704 vs 598")
    assert "\n" not in str(caught.value) and temporary_leftovers(tmp_path) == [] and not target.exists()


def test_a_full_data_cache_is_one_line_and_leaves_nothing(tmp_path, cache_dir):
    from distillab.data.shards import prepare_data

    with mounted(tmp_path / "disk", size="64k") as disk:  # the tokenizer and shards take ~250 kB
        values = tiny_run(tmp_path, cache_dir, "run")
        values["data"]["cache_dir"] = str(disk)
        with pytest.raises(DistillabError) as caught:
            prepare_data(config_from_dict(values).data, log=quiet)
        message = str(caught.value)
        assert message.startswith(f"{disk}/prepared: no space left on device while writing prepared data")
        assert "data.cache_dir" in message and "\n" not in message and temporary_leftovers(disk) == []


def test_a_read_only_out_or_data_cache_is_one_line(tmp_path, cache_dir, tiny_teacher):
    """A read-only mount (EROFS, which root meets too), for `teacher cache --out` and data.cache_dir;
    the advice names the right setting (not DISTILLAB_CACHE for --out). (A DistillabError is the
    CLI's one line, exit 2.)"""
    from distillab.capture import capture_teacher_cache

    (tmp_path / "src").mkdir()
    with mounted(tmp_path / "ro", read_only_copy_of=tmp_path / "src") as read_only:
        config = config_from_dict(tiny_run(tmp_path, cache_dir, "capture"))
        with pytest.raises(DistillabError) as caught:
            capture_teacher_cache(tiny_teacher, config, 4, out=read_only / "cache", windows=2, threads=1, log=quiet)
        line = str(caught.value)
        assert str(read_only) in line and "read-only filesystem" in line and "choose another --out" in line
        assert "DISTILLAB_CACHE" not in line and "\n" not in line
        values = tiny_run(tmp_path, cache_dir, "run")
        values["data"]["cache_dir"] = str(read_only / "data")
        with pytest.raises(DistillabError, match=rf"{read_only}/data/prepared: not writable \(read-only filesystem\); "
                                                 r"set data.cache_dir"):
            train(config_from_dict(values), log=quiet)
        assert temporary_leftovers(tmp_path / "src") == []


# ----------------------------------------------------------------------------- 16. config values YAML misreads


def test_kd_cache_off_is_accepted_and_other_keys_stay_strict(tmp_path):
    path = tmp_path / "student.yaml"
    path.write_text("kd: {teacher: t, alpha: 0.5, cache: off}\n")
    assert load_config(path).kd.cache == "off"
    path.write_text("kd: {teacher: t, alpha: 0.5, cache: no}\ntrain: {tensorboard: off}\n")
    config = load_config(path)
    assert config.kd.cache == "off" and config.train.tensorboard is False
    path.write_text("train: {nonfinite: off}\n")
    with pytest.raises(ConfigError, match="train.nonfinite: must be a string, got False"):
        load_config(path)
    path.write_text("kd: {teacher: t, alpha: 0.5, cache: on}\n")
    with pytest.raises(ConfigError, match="kd.cache: must be a string, got True"):
        load_config(path)


@pytest.mark.parametrize("override, key", [("train.token_budget=.inf", "train.token_budget"),
                                           ("train.lr=.nan", "train.lr"), ("train.lr=.inf", "train.lr"),
                                           ("kd.temperature=-.inf", "kd.temperature")])
def test_infinite_and_nan_numbers_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"{key}: must be a finite number, got -?(inf|nan)"):
        load_config(None, [override])


def yaml_bomb() -> tuple[list[str], str]:
    """Nine levels of nine aliases each: a few hundred bytes that would expand to 9^9 values."""
    levels = ["&a [" + ",".join(['"lol"'] * 9) + "]"]
    for level in "bcdefghi":
        levels.append(f"&{level} [" + ",".join([f"*{chr(ord(level) - 1)}"] * 9) + "]")
    return levels, "[" + ", ".join(levels) + "]"


def test_a_yaml_bomb_is_refused_before_it_expands(tmp_path):
    levels, flow = yaml_bomb()
    path = tmp_path / "bomb.yaml"
    path.write_text("".join(f"l{i}: {level}\n" for i, level in enumerate(levels)) +
                    "data:\n  validation_documents: *i\n")
    assert len(path.read_bytes()) < 600
    with pytest.raises(ConfigError, match=r"bomb.yaml: its aliases \(\*name\) expand to more than 100,000 values"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"data.validation_documents: its aliases .* expand to more than"):
        load_config(None, [f"data.validation_documents={flow}"])
    path.write_text("x: &x [*x]\n")
    with pytest.raises(ConfigError, match="refers to a value that contains it"):
        load_config(path)
    path.write_text("defaults: &fast {lr: 0.001}\ntrain: *fast\n")  # an ordinary alias still works
    with pytest.raises(ConfigError, match="defaults: unknown key"):
        load_config(path)
    path.write_text("train: &fast {lr: 0.001}\n")
    assert load_config(path).train.lr == 0.001


def test_demo_workers_below_one_are_one_line(tmp_path):
    from distillab.study.demo import run_demo
    from distillab.study.scaling import run_scaling

    for workers in (0, -1):
        with pytest.raises(DistillabError, match=rf"--workers: must be >= 1, got {workers}"):
            run_demo("quick", tmp_path / "demo", workers=workers, log=quiet)
        with pytest.raises(DistillabError, match=rf"--workers: must be >= 1, got {workers}"):
            run_scaling(tmp_path / "demo", workers=workers, quick=True, log=quiet)
    assert not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------- 17. a pickle in trainer_state.pt


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_payload_in_trainer_state_is_refused_in_one_line(tmp_path, cache_dir):
    values = tiny_run(tmp_path, cache_dir, "run")
    train(config_from_dict(values), stop_after_steps=3, log=quiet)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**state, "extra": Payload(str(marker))}, checkpoint / "trainer_state.pt")
    reseal_checkpoint(checkpoint)  # the manifest updated too: only the loader stands in the way
    with pytest.raises(CheckpointError, match=r"trainer_state.pt: holds pickled objects other than tensors and plain "
                                              r"values, so it was not loaded"):
        train(config_from_dict(values), log=quiet)
    assert not marker.exists()


# ----------------------------------------------------------------------------- 18. sweep workers die with their driver


DRIVER = """
import os, sys, time
from distillab.sweep.execute import LocalWorkers
workers = LocalWorkers(sys.argv[1], 1, 1)
print(workers.pool.submit(os.getpid).result(), flush=True)
workers.pool.submit(time.sleep, 120)
time.sleep(120)
"""


@pytest.mark.parametrize("signal_name", ["SIGKILL", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_sweep_workers_die_with_their_driver(tmp_path, signal_name):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    stop_driver_and_check_worker_gone(driver, signal_name, int(driver.stdout.readline()))


def stop_driver_and_check_worker_gone(driver: subprocess.Popen, signal_name: str, worker: int) -> None:
    """Send the driver `signal_name`: its worker must be gone within 10 s (killed here if not)."""
    import signal

    from distillab.files import process_alive

    try:
        driver.send_signal(getattr(signal, signal_name))
        driver.wait(timeout=60)
        deadline = time.monotonic() + 10
        while process_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(worker), f"the worker {worker} outlived its driver"
    finally:
        if process_alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_lock_whose_holder_exited_is_named_so_and_a_dead_ones_is_taken(tmp_path, monkeypatch):
    import signal

    import distillab.files

    lock = tmp_path / ".lock"
    lock.write_text("999999999")  # a lock file naming a pid that no longer exists, not held: taken
    with exclusive_lock(lock, "run directory x"):
        assert lock.read_text() == str(os.getpid())
    # held by a process that the (exited) holder left behind: refused after the grace, saying so
    script = ("import fcntl, os, sys, time\nh = open(sys.argv[1], 'a+'); fcntl.flock(h, fcntl.LOCK_EX)\n"
              "h.seek(0); h.truncate(); h.write(str(os.getpid())); h.flush()\nchild = os.fork()\n"
              "if child == 0:\n    time.sleep(60)\n    os._exit(0)\nprint(os.getpid(), child, flush=True)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True)
    pid, child = (int(v) for v in holder.stdout.readline().split())
    holder.wait()
    monkeypatch.setattr(distillab.files, "RELEASE_GRACE_S", 0.2)
    try:
        with pytest.raises(LockHeld, match=rf"\(pid {pid}, which has exited; a process it started still holds"):
            with exclusive_lock(lock, "run directory x"):
                pass
    finally:
        os.kill(child, signal.SIGKILL)


# ----------------------------------------------------------------------------- 19. NaN models, collapse, warnings


def nan_copy(source: Path, target: Path) -> Path:
    """A model directory from elsewhere (no manifest to catch it) with a NaN weight."""
    from safetensors.torch import save_file

    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "manifest.json").unlink()
    return target


def test_sft_from_nan_weights_is_refused_at_load(tmp_path, cache_dir, tiny_teacher):
    from distillab.sft import sft_config

    broken = nan_copy(tiny_teacher, tmp_path / "nan-model")
    with pytest.raises(ConfigError, match=r"sft.init_from: .*nan-model: weight model.norm.weight holds non-finite "
                                          "values"):
        train(sft_config(tiny_sft(tmp_path, cache_dir, broken)), log=quiet)
    assert not (tmp_path / "sft").exists()  # refused before the run directory was made


def test_eval_of_a_nan_model_is_refused_and_writes_nothing(tmp_path, tiny_teacher):
    from distillab.evaluate.run import evaluate_checkpoint

    broken = nan_copy(tiny_teacher, tmp_path / "nan-model")
    with pytest.raises(DataError, match=r"nan-model: weight model.norm.weight holds non-finite values .* so it is "
                                        "not evaluated"):
        evaluate_checkpoint(broken, ["validation"], threads=1, log=quiet)
    assert not (broken / "eval.json").exists()


def uniform_outputs(checkpoint: Path) -> bool:
    from distillab.models import load_causal_lm

    model = load_causal_lm(checkpoint, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=torch.arange(32).view(1, -1)).logits
    return bool(((logits.amax(-1) - logits.amin(-1)) < 1e-4).all())


def test_a_collapse_to_uniform_is_caught_at_the_next_checkpoint_and_never_kept(tmp_path, cache_dir):
    """lr 50 without clipping collapses the model onto uniform guessing by step 8 (the loss first blows
    up, then sits at log V): no evaluation before the end, so only the checkpoint check can catch it."""
    values = tiny_run(tmp_path, cache_dir, "collapse", train={"lr": 50.0, "grad_clip": 0.0, "token_budget": 32 * 128,
                                                              "eval_every": 100, "checkpoint_every": 8})
    with pytest.raises(NonFiniteError, match=r"diverged by step 8: the model's outputs are uniform over the "
                                             r"vocabulary .* so the checkpoint is not written"):
        train(config_from_dict(values), log=quiet)
    kept = list_checkpoints(tmp_path / "collapse" / "checkpoints")
    assert all(not uniform_outputs(path) for _, path in kept)
    assert not (tmp_path / "collapse" / "final").exists()


def test_settings_that_do_nothing_are_warned_about(tmp_path, cache_dir, tiny_teacher):
    lines = []
    values = tiny_run(tmp_path, cache_dir, "warm", train={"warmup_steps": 50})
    train(config_from_dict(values), stop_after_steps=1, log=lines.append)
    assert any(line.startswith("warning: train.warmup_steps: 50 is not shorter than the run's 8 steps") for line in lines)
    lines.clear()
    values = tiny_student(tmp_path, cache_dir, "scheduled", tiny_teacher, alpha_schedule={"start": 0.0})
    train(config_from_dict(values), stop_after_steps=1, log=lines.append)
    assert any(line.startswith("warning: kd.alpha_schedule.start/end: ignored with kd.alpha_schedule.shape=constant")
               for line in lines)


def test_a_teacher_with_exactly_uniform_outputs_is_warned_about(tmp_path, cache_dir, tiny_teacher, caplog):
    """A final norm of zeros: every hidden state 0, every logit 0 (an untrained or collapsed teacher)."""
    from safetensors.torch import save_file

    flat = tmp_path / "flat-teacher"
    shutil.copytree(tiny_teacher, flat)
    weights = load_file(str(flat / "model.safetensors"))
    weights["model.norm.weight"].zero_()
    save_file(weights, str(flat / "model.safetensors"), metadata={"format": "pt"})
    reseal_checkpoint(flat)
    with caplog.at_level("WARNING", logger="distillab"):
        train(config_from_dict(tiny_student(tmp_path, cache_dir, "student", flat)), stop_after_steps=1, log=quiet)
    assert any("kd.teacher: the teacher's outputs are exactly uniform" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- 20. messages that misled


def test_a_jinja_syntax_error_is_named_as_such(tiny_teacher, tmp_path):
    from distillab.data.chat import chat_template
    from distillab.data.tokenizer import load_tokenizer

    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{% generation %}{{ m['content'] }{% endgeneration %}\n{% endfor %}")
    with pytest.raises(ConfigError, match=r"sft.chat_template: .*broken.jinja: not a valid Jinja template \(line 2: "):
        chat_template(load_tokenizer(tiny_teacher), str(broken))


def test_the_cause_of_a_failed_torchrun_is_distillabs_line_not_the_last_one():
    """What torchrun prints when a rank refuses a changed global batch: the rank's one line, then
    torchrun's own report and interpreter-shutdown warnings."""
    from distillab.sweep.execute import cause_line

    stderr = ("distillab: error: config error: train.batch_size: is 4 but the checkpoint runs/x/checkpoints/"
              "step_00000002 was started with 8; use a new run_dir or delete the old one\n"
              "E1203 10:00:00.000000 123 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 2)\n"
              "Traceback (most recent call last):\n  File \"torchrun\", line 8, in <module>\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
              "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There "
              "appear to be 1 leaked semaphore objects to clean up at shutdown\n  warnings.warn('resource_tracker: "
              "There appear to be %d '\n")
    assert cause_line(stderr).startswith("config error: train.batch_size: is 4 but the checkpoint")
    assert cause_line("RuntimeError: boom\n/x/matplotlib/__init__.py:1: UserWarning: font cache\n  warnings.warn(x)\n") \
        == "RuntimeError: boom"


def tiny_grid(tmp_path, cache_dir, teacher_tokens: int, **train) -> Path:
    base = tiny_run(tmp_path, cache_dir)
    grid = {"name": "g", "baselines": False,
            "base": {"data": base["data"], "eval": {"max_windows": 2},
                     "train": {"batch_size": 4, "seq_len": 32, "threads": 1, "checkpoint_every": 4, **train}},
            "teachers": {"models": ["cpu-0.1m"], "tokens": [teacher_tokens], "seeds": [42]},
            "students": {"models": ["cpu-0.1m"], "tokens": [512], "seeds": [43]},
            "kd": {"alpha": [0.5]}, "eval": {"sets": ["validation"], "max_windows": 2}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.slow
def test_a_failed_sweep_ends_with_its_cause_and_records_blocked_students(tmp_path, cache_dir):
    """A teacher that fails (lr 1e6 diverges at once): the sweep's last stderr line says what failed
    (not a warning printed on the way out), and its student is blocked in status.json, as the
    driver said, and in the results table (it said "pending")."""
    from distillab.study.results import collect_rows

    result = cli("sweep", str(tiny_grid(tmp_path, cache_dir, 1024, lr=1e6)), "--out", str(tmp_path / "sweep"))
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("distillab: error: sweep: 1 failed, 1 blocked of 2 runs;") and "diverged" in last, last
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in (tmp_path / "sweep").glob("runs/*/status.json")}
    assert sorted(statuses.values()) == ["blocked", "failed"]
    rows = {row["run_id"]: row for row in collect_rows(tmp_path / "sweep")}
    assert all(rows[run_id]["status"] == s for run_id, s in statuses.items())


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_a_sweep_killed_mid_run_resumes_at_once_without_a_held_lock(tmp_path, cache_dir, signal_name):
    """kill -9 (or SIGTERM) of the driver while its worker trains the teacher; the sweep run again at
    once finishes: the orphaned worker did not keep training and holding the teacher's lock."""
    grid = tiny_grid(tmp_path, cache_dir, 300 * 128)  # ~4 s of training after the first checkpoint: killed mid-run
    command = [sys.executable, "-m", "distillab.cli", "sweep", str(grid), "--out", str(tmp_path / "sweep")]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "sweep").glob("runs/*/checkpoints/step_*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    worker = next(json.loads(p.read_text())["pid"] for p in (tmp_path / "sweep").glob("runs/*/status.json")
                  if json.loads(p.read_text())["status"] == "running")
    stop_driver_and_check_worker_gone(driver, signal_name, worker)
    again = cli("sweep", str(grid), "--out", str(tmp_path / "sweep"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "in use by another process" not in again.stderr
