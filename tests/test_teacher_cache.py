"""The teacher cache: value codings, capture, reading, runs from a cache, and every refusal.

Oracles: top-K rows against float64 log-softmax; the float32 coding must round-trip bit for bit;
the compact coding within its stated rounding; a run from a cache against the online teacher
with the same truncation, step by step.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distillab.capture import capture_teacher_cache, ensure_capture, top_k_rows
from distillab.cache.coding import LOG_STEP, CompactCoding, Float32Coding, TopKRows
from distillab.cache.store import TeacherCache
from distillab.config import config_from_dict
from distillab.data.shards import prepare_data
from distillab.errors import ConfigError, DataError
from distillab.teacher import CachedTeacher
from distillab.train import train

from conftest import tiny_run

QUIET = dict(log=lambda *a: None)
# what the tiny students read: data seed 42, 8 steps x 4 sequences (a capture of just those windows)
READERS = [(42, 32)]


def random_rows(n: int, vocab: int, k: int, seed: int = 0) -> TopKRows:
    """Rows as a teacher would give them: distinct ids, log-probs descending, a tail below 1."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0, 3, size=(n, vocab))).float()
    rows = top_k_rows(logits, k)
    return rows


def float64_top_k(logits: torch.Tensor, k: int):
    logp = torch.log_softmax(logits.double(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-15))
    return ids, values, tail


def test_top_k_rows_equal_float64_log_softmax():
    logits = torch.randn(300, 1000) * 4
    rows = top_k_rows(logits, 16)
    ids, values, tail = float64_top_k(logits, 16)
    assert np.array_equal(rows.ids, ids.numpy())
    np.testing.assert_allclose(rows.logprobs, values.numpy(), atol=2e-5)
    np.testing.assert_allclose(rows.log_tail, tail.numpy(), atol=2e-5)
    # a tail of ~1e-12 is kept as a log, not cancelled to -inf
    sharp = torch.zeros(1, 50)
    sharp[0, 3] = 30.0
    small = top_k_rows(sharp, 1)
    assert np.isfinite(small.log_tail).all() and abs(small.log_tail[0] - (np.log(49) - 30)) < 1e-4


def test_float32_coding_round_trips_exactly():
    rows = random_rows(64, 5000, 12)
    coding = Float32Coding(5000, 12)
    back = coding.decode(coding.encode(rows), 64)
    assert np.array_equal(back.ids, rows.ids)
    assert np.array_equal(back.logprobs, rows.logprobs)
    assert np.array_equal(back.log_tail, rows.log_tail)


@pytest.mark.parametrize("vocab", [512, 151_936, 300_000])
def test_compact_coding_round_trip_within_its_rounding(vocab):
    """Same id set and the same most likely token per row, log-probs within step / 2, rank order
    restored wherever codes differ; vocabularies past 2^17 need no special case."""
    rows = random_rows(48, vocab, 32, seed=vocab)
    coding = CompactCoding(vocab, 32)
    blob = coding.encode(rows)
    back = coding.decode(blob, 48)
    assert np.array_equal(np.sort(back.ids, axis=1), np.sort(rows.ids, axis=1))
    assert np.array_equal(back.ids[:, 0], rows.ids[:, 0])
    original = {(r, int(t)): float(v) for r in range(48) for t, v in zip(rows.ids[r], rows.logprobs[r])}
    for r in range(48):
        for t, v in zip(back.ids[r], back.logprobs[r]):
            assert abs(v - original[(r, int(t))]) <= LOG_STEP / 2 + 1e-6
        assert np.all(np.diff(back.logprobs[r]) <= 0)  # descending
    np.testing.assert_allclose(back.log_tail, rows.log_tail, rtol=1e-3, atol=1e-3)  # float16
    assert len(blob) < 0.75 * len(Float32Coding(vocab, 32).encode(rows))


def test_compact_coding_refuses_a_damaged_window():
    rows = random_rows(8, 512, 4)
    coding = CompactCoding(512, 4)
    blob = bytearray(coding.encode(rows))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(DataError):
        coding.decode(bytes(blob), 8)


# ---------------------------------------------------------------------------------------- capture


@pytest.fixture(scope="module")
def student_config(tmp_path_factory, cache_dir, tiny_teacher):
    folder = tmp_path_factory.mktemp("cache-students")

    def make(name, **kd):
        return config_from_dict(tiny_run(folder, cache_dir, name, train={"threads": 1},
                                         kd={"teacher": str(tiny_teacher), "alpha": 0.5, **kd}))
    return make


@pytest.fixture(scope="module")
def exact_cache(student_config, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("caches") / "exact"
    return capture_teacher_cache(tiny_teacher, student_config("capture"), 8, out=out, coding="float32", threads=1,
                                 readers=READERS, **QUIET)


def test_capture_stores_the_teachers_top_k_of_the_windows_read(exact_cache, student_config, tiny_teacher):
    """The capture holds exactly the windows its readers visit; read back in any order, it equals
    the teacher's own logits' top-8."""
    from distillab.models import load_causal_lm
    from distillab.data.packing import training_stream

    config = student_config("check")
    data = prepare_data(config.data, lambda *a: None)
    stream = training_stream(data, 32, 42, "concat", lambda *a: None)
    cache = TeacherCache.open(exact_cache)
    read = stream.windows_read(32)
    assert np.array_equal(cache.window_ids, read) and len(read) == 32
    assert np.array_equal(np.sort(stream.window_indices(0, 32)), read)
    model = load_causal_lm(Path(tiny_teacher), torch.device("cpu"))
    ids = np.array([read[5], read[0], read[-1]])
    with torch.no_grad():
        logits = model(input_ids=stream.window(ids).inputs).logits
    expected = top_k_rows(logits.reshape(-1, logits.shape[-1]), 8)
    got = cache.rows(ids)
    assert np.array_equal(got.ids, expected.ids)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-6)
    np.testing.assert_allclose(got.log_tail, expected.log_tail, atol=1e-6)


def test_capture_is_reused_not_repeated(exact_cache, student_config, tiny_teacher):
    lines = []
    again = capture_teacher_cache(tiny_teacher, student_config("capture"), 8, out=exact_cache, coding="float32",
                                  threads=1, readers=READERS, log=lines.append)
    assert again == exact_cache and any("reusing" in line for line in lines)


def losses(run) -> list[float]:
    rows = [json.loads(line) for line in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "ce" in row]


def test_a_run_from_the_cache_matches_the_online_top_k_run(exact_cache, student_config):
    """float32 coding: equal to the online teacher with kd.top_k = 8 at every logged step;
    compact coding: within its rounding (log-probs within 1/128 nat)."""
    online = train(student_config("online", top_k=8), **QUIET)
    cached = train(student_config("cached", top_k=8, cache=str(exact_cache)), **QUIET)
    assert len(losses(online)) >= 4
    np.testing.assert_allclose(losses(cached), losses(online), rtol=1e-5, atol=1e-6)
    compact = student_config("compact-capture")
    path = capture_teacher_cache(compact.kd.teacher, compact, 8, out=Path(exact_cache).parent / "compact", threads=1,
                                 readers=READERS, **QUIET)
    from_compact = train(student_config("from-compact", top_k=4, temperature=2.0, cache=str(path)), **QUIET)
    online_4 = train(student_config("online-4", top_k=4, temperature=2.0), **QUIET)
    np.testing.assert_allclose(losses(from_compact), losses(online_4), rtol=2e-3)
    assert losses(from_compact) != losses(online_4)  # the rounding is real, and small


# ---------------------------------------------------------------------------------------- refusals


def copy_with_manifest(cache: Path, target: Path, edit) -> Path:
    """A copy of `cache` whose manifest says it was captured otherwise (sealed again, as a real
    capture's would be: an edit without a new seal is refused as such, tests/test_reliability.py)."""
    from distillab.cache.store import seal

    shutil.copytree(cache, target)
    manifest = json.loads((target / "manifest.json").read_text())
    edit(manifest)
    (target / "manifest.json").write_text(json.dumps(seal(manifest)))
    return target


def refusal(config, match: str):
    with pytest.raises((ConfigError, DataError), match=match) as caught:
        train(config, **QUIET)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_another_teacher_is_refused(exact_cache, student_config, tmp_path, cache_dir):
    other = train(config_from_dict(tiny_run(tmp_path, cache_dir, "other", train={"init_seed": 7, "threads": 1})),
                  **QUIET).final_dir
    config = student_config("wrong-teacher", top_k=8, cache=str(exact_cache))
    config.kd = dataclasses.replace(config.kd, teacher=str(other))
    refusal(config, "captured from another teacher")


def test_another_tokenizer_or_data_is_refused(exact_cache, student_config, tmp_path):
    def tokenizer(m):
        m["tokenizer_fingerprint"] = "0" * 64

    def data(m):
        m["data"]["train_sha256"] = "0" * 64
    for name, edit, match in (("tok", tokenizer, "another tokenizer"), ("data", data, "other training data")):
        path = copy_with_manifest(exact_cache, tmp_path / name, edit)
        refusal(student_config(f"wrong-{name}", top_k=8, cache=str(path)), match)


def test_k_larger_than_captured_is_refused(exact_cache, student_config):
    message = refusal(student_config("big-k", top_k=9, cache=str(exact_cache)), "kd.top_k")
    assert "holds only the top 8" in message


def test_other_seq_len_and_missing_windows_are_refused(exact_cache, student_config, tmp_path):
    config = student_config("short", top_k=8, cache=str(exact_cache))
    config.train.seq_len = 16
    refusal(config, "captured at seq_len 32")
    partial = capture_teacher_cache(config.kd.teacher, student_config("p"), 8, out=tmp_path / "partial", windows=2,
                                    threads=1, **QUIET)
    refusal(student_config("partial", top_k=8, cache=str(partial)), "reads .* others")


def test_a_corrupt_shard_or_missing_cache_is_refused(exact_cache, student_config, tmp_path):
    broken = Path(shutil.copytree(exact_cache, tmp_path / "broken"))
    shard = broken / "shard-00000.bin"
    payload = bytearray(shard.read_bytes())
    payload[100] ^= 0xFF
    shard.write_bytes(bytes(payload))
    refusal(student_config("corrupt", top_k=8, cache=str(broken)), "checksum mismatch")
    refusal(student_config("missing", top_k=8, cache=str(tmp_path / "nothing")), "holds no teacher cache")


def test_cli_capture(tiny_teacher, tmp_path, cache_dir, capsys):
    from distillab.cli import main

    config = tmp_path / "student.yaml"
    import yaml

    config.write_text(yaml.safe_dump(tiny_run(tmp_path, cache_dir, "cli")))
    code = main(["teacher", "cache", "--teacher", str(tiny_teacher), "--data", str(config), "--top-k", "4",
                 "--out", str(tmp_path / "cli-cache"), "--threads", "1", "--windows", "16"])
    assert code == 0
    cache = TeacherCache.open(tmp_path / "cli-cache")
    assert cache.top_k == 4 and cache.manifest["coding"]["name"] == "compact"
    assert main(["teacher", "cache", "--teacher", str(tmp_path), "--data", str(config), "--top-k", "4"]) == 2
    assert "--teacher" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_a_sweep_captures_one_cache_per_teacher_and_its_students_read_it(tmp_path, cache_dir):
    """kd.cache: auto (the default): a teacher serving students at top-k 4 and 8 gets one top-8
    cache; the dry run shows it with its storage and FLOPs; every student trains from it; the
    results count the teacher's inference once; `kd.cache: off` keeps the online teacher."""
    from distillab.study.results import collect_rows
    from distillab.sweep import compute_summary, format_plan, load_grid, plan, run_sweep
    from test_sweep import grid_file

    grid = grid_file(tmp_path, cache_dir, kd={"alpha": [0.2, 0.5], "top_k": [4, 8]})
    spec = load_grid(grid)
    runs = plan(spec, tmp_path / "sweep")
    students = [r for r in runs if r.role == "student"]
    assert len(students) == 4 and len({r.config["kd"]["cache"] for r in students}) == 1
    cache = students[0].info["teacher_cache"]
    assert cache["top_k"] == 8 and cache["students"] == 4
    text = format_plan(runs, compute_summary(runs, spec))
    assert "teacher caches" in text and "top-8" in text and "4 students" in text and "saves" in text
    summary = compute_summary(runs, spec)
    shares = [summary["per_run"][r.id]["teacher_inference"] for r in students]
    assert len(set(shares)) == 1 and shares[0] > 0  # one capture, split equally

    status = run_sweep(spec, tmp_path / "sweep", workers=1, log=lambda *a: None)
    assert set(status.values()) == {"done"}
    stored = TeacherCache.open(cache["dir"])
    assert stored.top_k == 8
    for student in students:
        assert cache["dir"] in (Path(student.config["run_dir"]) / "final" / "distillab.json").read_text()
    rows = collect_rows(tmp_path / "sweep")
    assert all(r["cached_teacher"] for r in rows if r["role"] == "student")

    off = plan(load_grid(grid_file(tmp_path, cache_dir, kd={"alpha": [0.2, 0.5], "top_k": [4], "other": {"cache": ["off"]}})),
               tmp_path / "sweep-off")
    assert not any(r.info.get("teacher_cache") for r in off)
