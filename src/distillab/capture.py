"""`distillab teacher cache`: run a teacher once over a prepared training split and store its top-K.

Windows are the training loop's own (`distillab.data.packing.training_stream`, concat or packed
documents, window ids independent of the data seed); the teacher sees a window exactly as the
student will (its inputs, positions and document mask) and, per target position, the cache keeps
the K most likely next tokens (most likely first), their log-probabilities at T = 1 and the log
of the rest of the mass. Windows are captured in ascending id order and stored by id, so one
capture serves every data-order seed. A capture may hold only some windows: the first N, or
exactly those that given readers (data seed, sequences trained) visit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from distillab import __version__
from distillab.cache.coding import CODINGS, TopKRows, make_coding
from distillab.cache.store import (FORMAT, MANIFEST, CacheWriter, TeacherCache, data_identity, read_manifest,
                                   teacher_identity, writer_lock)
from distillab.config import RunConfig
from distillab.data.loader import ShuffledWindows
from distillab.data.packing import training_stream
from distillab.data.shards import prepare_data
from distillab.errors import ConfigError, DataError, require
from distillab.files import CACHE_ADVICE, default_cache_dir, stable_hash
from distillab.losses.objective import field_problem
from distillab.models import load_causal_lm, model_directory, resolve_spec
from distillab.progress import progress_bar
from distillab.runtime import resolve_device, setup_runtime
from distillab.signals.sampling import draw
from distillab.teacher import OnlineTeacher, check_finite_outputs, check_same_tokenizer

# Rows x vocabulary per top-k extraction chunk (fp32 scratch of 256 MB at most).
ROW_CHUNK_ELEMENTS = 1 << 26
# Logits per teacher forward at most (one window at least).
BATCH_ELEMENTS = 1 << 27


def top_k_rows(logits: torch.Tensor, k: int) -> TopKRows:
    """Logits [rows, V] -> the k most likely tokens per row (most likely first), their log-probs and
    log tail = log of the mass outside them, computed from the excluded logits directly (no
    cancellation when the tail is small). float32 throughout; row chunks bound the scratch."""
    chunk = max(1, ROW_CHUNK_ELEMENTS // logits.shape[-1])
    ids, logprobs, tails = [], [], []
    for start in range(0, logits.shape[0], chunk):
        x = logits[start : start + chunk].float()
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        values, index = x.topk(k, dim=-1)
        rest = torch.logsumexp(x.scatter(-1, index, float("-inf")), dim=-1)
        ids.append(index.cpu())
        logprobs.append((values - lse).cpu())
        tails.append((rest - lse[:, 0]).cpu())
    return TopKRows(torch.cat(ids).numpy().astype(np.int64), torch.cat(logprobs).numpy(), torch.cat(tails).numpy())


def select_windows(n_windows: int, windows: int | None, readers: list | None, stream_for) -> np.ndarray:
    """The window ids to capture, ascending: all, the first `windows`, or those `readers` read.

    readers: [(data_seed, sequences), ...]: the union of what each such run trains on;
    stream_for(data_seed) is the training stream of that seed.
    """
    if readers:
        read = [stream_for(int(seed)).windows_read(int(sequences)) for seed, sequences in readers]
        return np.unique(np.concatenate(read))
    if windows is None:
        return np.arange(n_windows, dtype=np.int64)
    if windows < 1:
        raise ConfigError("--windows", f"must be >= 1, got {windows}")
    return np.arange(min(windows, n_windows), dtype=np.int64)


def load_teacher(teacher_dir: Path, data, device: torch.device, precision: str, seq_len: int,
                 rows: int) -> OnlineTeacher:
    """The teacher, checked like a run's: exists, shares the data's tokenizer, long enough, finite;
    its distribution over `rows` output rows."""
    check_same_tokenizer(Path(teacher_dir), data.tokenizer, key="--teacher")
    teacher = OnlineTeacher(load_causal_lm(teacher_dir, device, key="--teacher"), rows, device,
                            precision, description=f"online:{teacher_dir}")
    if 0 < teacher.positions() < seq_len:
        raise ConfigError("train.seq_len", f"is {seq_len} but the teacher {teacher_dir} was built for "
                                           f"{teacher.positions()} positions")
    check_finite_outputs(teacher, data, seq_len, device)
    return teacher


# What makes two captures the same cache, in the order a difference is reported.
CAPTURE_IDENTITY = (("teacher", lambda m: m["teacher"]["weights_sha256"][:12], "teacher weights sha256"),
                    ("tokenizer", lambda m: m["tokenizer_fingerprint"][:12], "tokenizer fingerprint"),
                    ("data", lambda m: m["data"]["train_sha256"][:12], "train split sha256"),
                    ("seq_len", lambda m: m["seq_len"], "seq_len"), ("packing", lambda m: m.get("packing"), "packing"),
                    ("top_k", lambda m: m["top_k"], "top_k"), ("coding", lambda m: m["coding"], "coding"))


def capture_difference(existing: dict, manifest: dict) -> str | None:
    """How the capture in `existing` differs from the one `manifest` describes (None: the same)."""
    for _, value, label in CAPTURE_IDENTITY:
        if value(existing) != value(manifest):
            return f"{label} {value(existing)} there, {value(manifest)} here"
    return None


def existing_capture(out: Path) -> dict | None:
    """The manifest of the sound cache in `out`; None when there is none, or only a damaged one
    (which a capture may replace). A directory holding something else is refused."""
    if not out.exists() or not any(out.iterdir()):
        return None
    if not (out / MANIFEST).exists():
        raise ConfigError("--out", f"{out} exists and is not a teacher cache; choose another directory")
    try:
        return read_manifest(out, "--out")
    except DataError:
        return None


def reusable(out: Path, existing: dict | None, manifest: dict, ids: np.ndarray) -> bool:
    """Whether `out` already holds this capture (same identity, at least these windows). Another
    capture there (another K, teacher, coding, ...) is refused, never replaced: two captures into
    one --out must not silently overwrite each other."""
    if existing is None:
        return False
    difference = capture_difference(existing, manifest)
    if difference is not None:
        raise ConfigError("--out", f"{out} already holds another teacher cache ({difference}); choose another --out, "
                                   "or delete it to capture this one there")
    try:
        return len(TeacherCache.open(out, "--out").missing(ids)) == 0
    except DataError:
        return False


def capture_teacher_cache(teacher_dir: str | Path, config: RunConfig, top_k: int, out: str | Path | None = None,
                          coding: str = "compact", windows: int | None = None, readers: list | None = None,
                          device: str = "auto", threads: int | None = None, log=print,
                          proposal_temperature: float = 1.0) -> Path:
    """`distillab teacher cache`: prepare `config.data`, then `ensure_capture` at `config.train`'s
    seq_len and precision. Returns the cache directory."""
    setup_runtime(threads)
    torch_device = resolve_device(device, key="--device")
    data = prepare_data(config.data, log)
    return ensure_capture(Path(teacher_dir), data, config, top_k, out, coding, windows, readers, torch_device, log,
                          proposal_temperature)


def capture_for_run(config: RunConfig, cache: dict, log=print) -> Path:
    """A sweep's planned cache (`distillab.sweep.caches`) for the student `config`: captured by the
    first of its students to start, reused by the rest."""
    setup_runtime(config.train.threads)
    device = resolve_device(config.train.device)
    data = prepare_data(config.data, log)
    rows = resolve_spec(config.model).rows(data.vocab_size)
    return ensure_capture(model_directory(config.kd.teacher), data, config, int(cache["top_k"]), out=cache["dir"],
                          readers=cache["readers"], device=device, log=log, coding=cache.get("coding", "compact"),
                          proposal_temperature=float(cache.get("proposal_temperature", 1.0)), rows=rows)


def default_cache_path(config: RunConfig, manifest: dict, ids: np.ndarray) -> Path:
    """A content-addressed directory under the data cache for this capture."""
    root = default_cache_dir() if config.data.cache_dir is None else Path(config.data.cache_dir).expanduser()
    return root / "teacher_caches" / stable_hash({**manifest, "teacher": manifest["teacher"]["weights_sha256"],
                                                 "data": manifest["data"]["train_sha256"],
                                                 "windows": stable_hash(ids.tolist())})


def teacher_rows(teacher_dir: Path) -> int:
    """The output rows of the model in `teacher_dir` (its config.json)."""
    return int(json.loads((Path(teacher_dir) / "config.json").read_text())["vocab_size"])


def ensure_capture(teacher_dir: Path, data, config: RunConfig, top_k: int, out: str | Path | None = None,
                   coding: str = "compact", windows: int | None = None, readers: list | None = None,
                   device: torch.device = torch.device("cpu"), log=print, proposal_temperature: float = 1.0,
                   rows: int | None = None) -> Path:
    """The cache of the teacher in `teacher_dir` over prepared `data`'s training split (as
    `config` packs it, at its seq_len), its probabilities over `rows` output rows (the students';
    default: the teacher's own): reused when `out` (default: content-addressed) already holds it,
    captured otherwise. Concurrent callers for one cache capture it once: the others wait on its
    lock and then reuse it."""
    if coding not in CODINGS:
        raise ConfigError("--coding", f"must be one of {', '.join(CODINGS)}, got {coding!r}")
    if not (teacher_dir / "config.json").is_file():
        raise ConfigError("--teacher", f"{teacher_dir} is not an HF model directory (no config.json); name a "
                                       "teacher's final directory")
    rows = rows or teacher_rows(teacher_dir)
    if coding == "sampled":  # the objective's own rules for kd.samples and kd.proposal_temperature
        for key, name, value in (("--samples", "samples", top_k),
                                 ("--proposal-temperature", "proposal_temperature", proposal_temperature)):
            problem = field_problem(name, value)
            require(problem is None, key, problem)
    elif not 1 <= top_k <= rows:
        raise ConfigError("--top-k", f"must be in [1, {rows}] (the output rows), got {top_k}")
    seq_len, packing, precision = config.train.seq_len, config.data.packing, config.train.precision
    stream = training_stream(data, seq_len, 0, packing, log)
    ids = select_windows(stream.n_windows, windows, readers,
                         lambda seed: training_stream(data, seq_len, seed, packing, lambda *a: None))
    manifest = {"teacher": teacher_identity(teacher_dir), "tokenizer_fingerprint": data.fingerprint,
                "vocab_size": data.vocab_size, "data": data_identity(data), "seq_len": seq_len, "packing": packing,
                "top_k": top_k, "coding": make_coding({"name": coding, "samples": top_k,
                                                       "proposal_temperature": proposal_temperature},
                                                      rows, top_k).describe(),
                "windows": {"of": stream.n_windows, "all": len(ids) == stream.n_windows},
                # the rows probabilities are normalised over, when more than the tokenizer's
                **({"rows": rows} if rows != data.vocab_size else {})}
    advice = "choose another --out" if out is not None else CACHE_ADVICE
    out = Path(out) if out is not None else default_cache_path(config, manifest, ids)
    with writer_lock(out, advice):
        if reusable(out, existing_capture(out), manifest, ids):
            log(f"teacher cache: {out} already holds this capture; reusing it")
            return out
        teacher = load_teacher(teacher_dir, data, device, precision, seq_len, rows)
        manifest["capture"] = {"precision": precision, "device": str(device), "distillab_version": __version__,
                               "torch": torch.__version__, "format": FORMAT}
        codec = make_coding(manifest["coding"], rows, top_k)
        write_capture(teacher, stream, ids, codec, out, manifest, log, advice)
    return out


def write_capture(teacher: OnlineTeacher, stream: ShuffledWindows, ids: np.ndarray, coding, out: Path, manifest: dict,
                  log, advice: str = CACHE_ADVICE) -> None:
    """Run the teacher over the windows `ids` (ascending), batch by batch, and write the cache
    (`advice`: what to do when `out`'s directory is full or read-only)."""
    seq_len, k = stream.seq_len, manifest["top_k"]
    per_batch = max(1, BATCH_ELEMENTS // (seq_len * teacher.vocab_size))
    what = f"{k} draws" if coding.name == "sampled" else f"top-{k}"
    log(f"teacher cache: capturing {what} of {teacher.description} over {len(ids):,} of {stream.n_windows:,} windows "
        f"({len(ids) * seq_len:,} tokens, {manifest['coding']['name']} coding) into {out}")
    with CacheWriter(out, advice=advice) as writer:
        with progress_bar(total=len(ids), desc="teacher cache", unit="window") as bar:
            for start in range(0, len(ids), per_batch):
                batch_ids = ids[start : start + per_batch]
                logits = teacher.signal(stream.window(batch_ids).to(teacher.device))
                flat = logits.reshape(-1, logits.shape[-1])
                rows = draw(flat, batch_ids.tolist(), coding.samples, coding.proposal_temperature) \
                    if coding.name == "sampled" else top_k_rows(flat, k)
                for i, window_id in enumerate(batch_ids):
                    part = slice(i * seq_len, (i + 1) * seq_len)
                    writer.add(int(window_id), coding.encode(type(rows)(*(getattr(rows, f.name)[part]
                                                                          for f in dataclasses.fields(rows)))))
                bar.update(len(batch_ids))
        manifest["capture"]["batch_windows"] = per_batch
        writer.finish(manifest)
    stored = sum(s["bytes"] for s in writer.shards)
    log(f"teacher cache: wrote {out}: {stored / 1e6:,.1f} MB, {stored / max(len(ids) * seq_len, 1):.1f} bytes/token")
