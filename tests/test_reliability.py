"""No silently wrong model: each protected fault, reproduced, with the one line a user sees.

The numbered comments follow docs/reliability.md.
"""

import json
import os
import random
import shutil
import stat
import subprocess
import sys
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
from distillab.errors import ConfigError, DataError, DistillabError
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
    with pytest.raises(NonFiniteError, match=r"training diverged at step \d+: .* is nan"):
        train(config, log=quiet)
    run = tmp_path / "nan"
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    for _, checkpoint in list_checkpoints(run / "checkpoints"):  # whatever was kept is finite
        assert all(torch.isfinite(t).all() for _, t in checkpoint_tensors(checkpoint))


def test_skip_policy_drops_updates_then_stops(tmp_path, cache_dir):
    config = config_from_dict(tiny_run(tmp_path, cache_dir, "skip", train={"lr": 1e6, "nonfinite": "skip:2"}))
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
