"""File utilities shared by data preparation, checkpoints, sweeps, evaluation and reports.

Every write that another process (or a later run) may read is atomic: content goes to a
temporary file beside its final place and is renamed into place, so a reader sees the old
version or the new one, never half of one (whole directories: `distillab.artefact`). Files get
the permissions the umask gives (never mkstemp's 0600).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from distillab.errors import DistillabError


def default_cache_dir() -> Path:
    """Where corpora and prepared data live: $DISTILLAB_CACHE, else ~/.cache/distillab."""
    return Path(os.environ.get("DISTILLAB_CACHE", Path.home() / ".cache" / "distillab"))


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj`: the same content always gives the same id."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (mode from the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock that waits its turn (concurrent preparation of one cache entry)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire()
    except PermissionError:
        raise DistillabError(f"{path.parent}: not writable; set DISTILLAB_CACHE or data.cache_dir to a "
                             "directory you can write") from None
    try:
        yield
    finally:
        lock.release()


class LockHeld(DistillabError):
    """Another process holds an exclusive lock (the message names its pid)."""


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str):
    """An exclusive lock that is refused at once when held: one writer per run directory or sweep.

    The holder writes its pid into the lock file once it holds it, so a refusal names it. The
    lock is the kernel's (filelock's native lock), so a killed holder releases it: a stale lock
    file never blocks anyone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), blocking=False, on_acquired=record_pid)
    try:
        lock.acquire()
    except Timeout:
        raise LockHeld(f"{what} is in use by another process (pid {lock_holder(path)}); wait for it to finish or "
                       "stop it first") from None
    except PermissionError:
        raise DistillabError(f"{path.parent}: not writable; choose another directory") from None
    try:
        yield
    finally:
        lock.release()


def record_pid(fd: int) -> None:
    """Into a just-acquired lock file: this process's pid (what a refused process reports)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)


def lock_holder(path: Path) -> str:
    """The pid recorded in a held lock file ("unknown" if it was released meanwhile)."""
    try:
        return Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def check_writable(folder: Path, key: str) -> None:
    """Fail early, with one line naming `key`, when `folder` (or its nearest existing parent) is read-only."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise DistillabError(f"{key}: {probe} is not writable; choose another directory")


def inside(root: Path, name: str, key: str) -> Path:
    """`root / name`, refused when `name` would leave `root` (absolute paths, '..')."""
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or not name.strip():
        raise DistillabError(f"{key}: {name!r} must be a plain name inside {root} (no '/' at the start, no '..'); "
                             "to write elsewhere, give the directory explicitly")
    return Path(root) / candidate
