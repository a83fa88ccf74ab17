"""A teacher cache on disk: shards of coded windows, an index, and a manifest.

    DIR/manifest.json      what was captured (teacher weights sha256, tokenizer fingerprint, the
                           training split's sha256 and corpus content hash, seq_len, K, value
                           coding, capture settings, windows) and the sha256 of every other file
    DIR/index.npy          int64 [windows, 4]: window id, shard number, byte offset, byte length
                           (window ids ascending)
    DIR/shard-NNNNN.bin    the coded windows back to back (`distillab.cache.coding`)

A cache is written into a temporary directory beside its final place and renamed into place
(manifest last), so a reader never sees half of one. The manifest records the sha256 of its own
other fields (`seal`), so an edited manifest (say, another `coding.log_step`) is refused rather
than read into wrong log-probabilities; a run binds the cache by the sha256 of the manifest
file (`TeacherCache.manifest_sha256`). Opening checks the manifest, the index's
sha256 and every shard's size; each shard's sha256 is checked the first time a process reads
from it, so a corrupt shard stops the run with a message naming the file before any of its
values are used.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distillab.artefact import MANIFEST, AtomicDirectory, entry_lock, file_problem, read_json_manifest, weights_sha256
from distillab.cache.coding import TopKRows, make_coding
from distillab.errors import DataError
from distillab.files import CACHE_ADVICE, sha256_file, stable_hash, write_bytes_atomic, write_json_atomic

FORMAT = "distillab-teacher-cache/1"
INDEX = "index.npy"
SHARD_BYTES = 64 << 20
# The manifest's field holding the sha256 of its other fields (canonical JSON).
SEAL = "manifest_sha256"


def seal(manifest: dict) -> dict:
    """`manifest` with its seal: the sha256 of the canonical JSON of every other field."""
    fields = {k: v for k, v in manifest.items() if k != SEAL}
    return {**fields, SEAL: stable_hash(fields, length=64)}


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


# ----------------------------------------------------------------------------- writing


class CacheWriter:
    """Appends coded windows (in ascending window id) to shards in a temporary directory;
    `finish` writes the index and the manifest and renames the directory into place. Used as a
    context manager: a block that raises leaves nothing behind (a full disk or a read-only place
    in one line ending in `advice`: `AtomicDirectory`)."""

    def __init__(self, out: Path, shard_bytes: int = SHARD_BYTES, advice: str = CACHE_ADVICE):
        self.out, self.shard_bytes = Path(out), shard_bytes
        self.directory = AtomicDirectory(self.out, "the teacher cache", advice)
        self.tmp = self.directory.path
        self.rows: list[tuple[int, int, int, int]] = []
        self.shards: list[dict] = []
        self.handle = None

    def add(self, window_id: int, blob: bytes) -> None:
        if self.rows and window_id <= self.rows[-1][0]:
            raise ValueError("windows must be added in ascending id order")
        if self.handle is None or self.handle.tell() >= self.shard_bytes:
            self.close_shard()
            self.handle = open(self.tmp / shard_name(len(self.shards)), "wb")
            self.shards.append({"file": shard_name(len(self.shards)), "windows": 0})
        self.rows.append((window_id, len(self.shards) - 1, self.handle.tell(), len(blob)))
        self.handle.write(blob)
        self.shards[-1]["windows"] += 1

    def close_shard(self) -> None:
        if self.handle is None:
            return
        self.handle.flush()
        self.handle.close()
        self.handle = None
        entry = self.shards[-1]
        path = self.tmp / entry["file"]
        entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))

    def finish(self, manifest: dict) -> Path:
        """Write index and manifest (with file sizes and checksums), then move the cache into place."""
        self.close_shard()
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(self.rows, dtype=np.int64).reshape(-1, 4))
        write_bytes_atomic(self.tmp / INDEX, buffer.getvalue())
        stored = sum(s["bytes"] for s in self.shards)
        tokens = len(self.rows) * manifest["seq_len"]
        write_json_atomic(self.tmp / MANIFEST, seal({
            "format": FORMAT, **manifest, "windows": {**manifest.get("windows", {}), "captured": len(self.rows)},
            "tokens": tokens, "bytes": stored, "bytes_per_token": stored / max(tokens, 1),
            "index": {"file": INDEX, "sha256": sha256_file(self.tmp / INDEX)}, "shards": self.shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        return self.directory.commit()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        """On an error: the open shard closed (a full disk may refuse its buffered bytes) and the
        temporary directory removed."""
        if kind is None:
            return False
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
            self.handle = None
        return self.directory.__exit__(kind, value, traceback)


def writer_lock(out: Path, advice: str = CACHE_ADVICE):
    """The lock one capture into `out` holds (a second capture of the same cache waits its turn;
    `advice`: what to do when its directory cannot be written)."""
    return entry_lock(out, advice)


# ----------------------------------------------------------------------------- reading


def read_manifest(path: Path, key: str) -> dict:
    """The manifest of the cache in `path`, or a one-line DataError naming `key` and the file."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.exists():
        raise DataError(f"{key}: {path} holds no teacher cache ({MANIFEST} missing); capture one with "
                        "`distillab teacher cache`")
    manifest = read_json_manifest(manifest_path)
    if manifest is None:
        raise DataError(f"{key}: {manifest_path} is not valid JSON; the cache is corrupt: capture it again")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{key}: {manifest_path} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    if SEAL in manifest and seal(manifest)[SEAL] != manifest[SEAL]:
        raise DataError(f"{key}: {manifest_path} was edited after the capture (its fields no longer match the sha256 "
                        f"it records); the cache cannot be trusted: capture it again")
    return manifest


@dataclass
class TeacherCache:
    """An opened, checked cache: rows of any captured windows by id."""

    path: Path
    manifest: dict
    index: np.ndarray
    key: str = "kd.cache"
    manifest_sha256: str = ""  # of the manifest file: what a run that reads the cache records

    @classmethod
    def open(cls, path: str | Path, key: str = "kd.cache") -> "TeacherCache":
        """Check the manifest, the index's sha256 and every shard's presence and size."""
        path = Path(path)
        manifest = read_manifest(path, key)
        index_path = path / manifest["index"]["file"]
        problem = file_problem(index_path, manifest["index"]["sha256"])
        for shard in manifest["shards"]:  # sizes now, each shard's sha256 when it is first read
            shard_path = path / shard["file"]
            if problem is None and (not shard_path.is_file() or shard_path.stat().st_size != shard["bytes"]):
                problem = f"{shard_path}: missing or not the manifest's {shard['bytes']} bytes"
        if problem is not None:
            raise DataError(f"{key}: {problem}; the cache is corrupt: capture it again")
        index = np.load(index_path).reshape(-1, 4)
        return cls(path, manifest, index, key, sha256_file(path / MANIFEST))

    def __post_init__(self):
        self.coding = make_coding(self.manifest["coding"], self.output_rows, self.top_k)
        self.verified: set[int] = set()
        self.handles: dict[int, object] = {}

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def output_rows(self) -> int:
        """The output rows the captured probabilities are normalised over (ids are below it)."""
        return int(self.manifest.get("rows", self.manifest["vocab_size"]))

    @property
    def window_ids(self) -> np.ndarray:
        """The captured window ids, ascending."""
        return self.index[:, 0]

    def missing(self, window_ids: np.ndarray) -> np.ndarray:
        """Those of `window_ids` that were not captured."""
        window_ids = np.asarray(window_ids, dtype=np.int64)
        return window_ids[~np.isin(window_ids, self.window_ids)]

    def shard(self, number: int):
        """An open handle on shard `number`, its sha256 checked the first time."""
        if number not in self.verified:
            entry = self.manifest["shards"][number]
            shard_path = self.path / entry["file"]
            problem = file_problem(shard_path, entry["sha256"])
            if problem is not None:
                raise DataError(f"{self.key}: {problem}; the cache is corrupt or was modified: capture it again")
            self.verified.add(number)
            self.handles[number] = open(shard_path, "rb")
        return self.handles[number]

    def blob(self, window_id: int) -> bytes:
        position = int(np.searchsorted(self.window_ids, window_id))
        if position >= len(self.index) or self.index[position, 0] != window_id:
            raise DataError(f"{self.key}: window {window_id} was not captured ({self.path} holds "
                            f"{len(self.index)} windows); capture the windows this run reads")
        _, number, offset, length = (int(v) for v in self.index[position])
        handle = self.shard(number)
        handle.seek(offset)
        return handle.read(length)

    def rows(self, window_ids) -> TopKRows:
        """The rows of the given windows, concatenated in that order: [len(ids) * seq_len, K]."""
        try:
            parts = [self.coding.decode(self.blob(int(w)), self.seq_len) for w in window_ids]
            return type(parts[0]).concat(parts) if parts else TopKRows.concat(parts)
        except DataError as exc:
            message = str(exc)
            raise DataError(message if message.startswith(self.key) else f"{self.key}: {self.path}: {message}") \
                from None

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


# ----------------------------------------------------------------------------- identity


def teacher_identity(teacher_dir: Path) -> dict:
    """What names a teacher: the sha256 of its weights (wherever its directory lives)."""
    return {"path": str(Path(teacher_dir).resolve()), "weights_sha256": weights_sha256(Path(teacher_dir))}


def data_identity(data) -> dict:
    """What names the captured tokens: the training split's sha256 (corpus, split and tokenizer)."""
    train = data.manifest["splits"]["train"]
    return {"train_sha256": train["sha256"], "train_tokens": train["tokens"],
            "content_sha256": data.manifest["content_sha256"], "source": data.manifest.get("source"),
            "prepared_dir": str(Path(data.path).resolve())}


def first_mismatch(manifest: dict, teacher: dict, fingerprint: str, data: dict) -> str | None:
    """What differs between a cache and the teacher, tokenizer and data a run uses (None: nothing)."""
    captured = manifest["teacher"]["weights_sha256"]
    if captured != teacher["weights_sha256"]:
        return (f"was captured from another teacher (weights sha256 {captured[:12]}…) than kd.teacher "
                f"{teacher['path']} ({teacher['weights_sha256'][:12]}…); capture it again from kd.teacher")
    if manifest["tokenizer_fingerprint"] != fingerprint:
        return (f"was captured with another tokenizer (fingerprint {manifest['tokenizer_fingerprint'][:12]}…) than "
                f"the run's ({fingerprint[:12]}…); capture it again over this run's data")
    captured = manifest["data"]["train_sha256"]
    if captured != data["train_sha256"]:
        return (f"was captured over other training data (train split sha256 {captured[:12]}…, this run's "
                f"{data['train_sha256'][:12]}…); capture it again over this run's data")
    return None
