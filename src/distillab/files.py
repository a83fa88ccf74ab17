"""File utilities shared by data preparation, checkpoints, sweeps, evaluation and reports.

Every write that another process (or a later run) may read is atomic: content goes to a
temporary file beside its final place and is renamed into place, so a reader sees the old
version or the new one, never half of one (whole directories: `distillab.artefact`). Files get
the permissions the umask gives (never mkstemp's 0600). A write that its place refuses (a full
disk, a read-only filesystem, no permission) ends in one line naming the place and what to do
(`storage_errors`), never in an OSError traceback.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from distillab.errors import DistillabError, StorageError


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


# ----------------------------------------------------------------------------- places that refuse a write

# Errors of a place that cannot take a write: permissions, a read-only filesystem, a full disk.
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# A failed write that hides its errno (torch.save: "unexpected pos") ran out of space when less
# than this is left on the filesystem.
NEARLY_FULL_BYTES = 64 << 20
HIDDEN_WRITE_ERRORS = ("unexpected pos", "PytorchStreamWriter", "I/O error")
CACHE_ADVICE = "set data.cache_dir (or DISTILLAB_CACHE) to a directory you can write"


def out_of_space(exc: BaseException, path: Path) -> bool:
    """Whether a write under `path` that raised `exc` failed for want of disk space: ENOSPC / EDQUOT,
    or a writer that hides the errno (torch.save, safetensors) on a filesystem with (almost) nothing left."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        return True
    if not any(sign in str(exc) for sign in HIDDEN_WRITE_ERRORS):
        return False
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def storage_error(exc: BaseException, path: Path, what: str, advice: str) -> StorageError | None:
    """The one-line error for a write under `path` (of `what`, when named) that failed because the
    place is full, read-only or not ours; None for any other failure (and for one already named)."""
    if isinstance(exc, StorageError):
        return None
    if out_of_space(exc, path):
        writing = f" while writing {what}" if what else ""
        return StorageError(f"{path}: no space left on device{writing}; nothing partial was kept: free space, or "
                            f"{advice}")
    if isinstance(exc, OSError) and exc.errno in UNWRITABLE:
        cause = "read-only filesystem" if exc.errno == errno.EROFS else "permission denied"
        return StorageError(f"{path}: not writable ({cause}){f' for {what}' if what else ''}; {advice}")
    return None


@contextlib.contextmanager
def storage_errors(path: Path, what: str, advice: str):
    """Inside, a full disk or an unwritable place under `path` ends in one line (`storage_error`)."""
    try:
        yield
    except Exception as exc:
        error = storage_error(exc, path, what, advice)
        if error is None:
            raise
        raise error from None


# ----------------------------------------------------------------------------- locks


@contextlib.contextmanager
def file_lock(path: Path, advice: str = CACHE_ADVICE):
    """An exclusive lock that waits its turn (concurrent preparation of one cache entry). A place
    that cannot take the lock file ends in one line ending in `advice`."""
    path = Path(path)
    lock = FileLock(str(path))
    with storage_errors(path.parent, "", advice):
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class LockHeld(DistillabError):
    """Another process holds an exclusive lock (the message names its pid)."""


# How long a lock whose recorded holder has exited may take to be released (the kernel releases
# it as the holder's files close; a killed worker may still be closing them).
RELEASE_GRACE_S = 5.0


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str):
    """An exclusive lock that is refused at once when held: one writer per run directory or sweep.

    The holder writes its pid into the lock file once it holds it, so a refusal names it (and says
    when that process has exited, leaving a process it started holding the lock). The lock is the
    kernel's (filelock's native lock), so a killed holder releases it: a stale lock file never
    blocks anyone, and a lock whose recorded holder has just been killed is taken once the kernel
    releases it (within `RELEASE_GRACE_S`).
    """
    path = Path(path)
    lock = FileLock(str(path), blocking=False, on_acquired=record_pid)
    with storage_errors(path.parent, "", "choose another directory"):
        path.parent.mkdir(parents=True, exist_ok=True)
        holder = acquire_unless_held(lock, path)
    if holder is not None:
        gone = holder.isdigit() and not process_alive(int(holder))
        note = ", which has exited; a process it started still holds the lock" if gone else ""
        raise LockHeld(f"{what} is in use by another process (pid {holder}{note}); wait for it to finish or stop "
                       "it first")
    try:
        yield
    finally:
        lock.release()


def acquire_unless_held(lock: FileLock, path: Path) -> str | None:
    """Take the non-blocking `lock` at once, or, when the pid its file records has exited, as soon
    as the kernel releases it (within `RELEASE_GRACE_S`). None when taken, else the recorded holder."""
    deadline = time.monotonic() + RELEASE_GRACE_S
    while True:
        try:
            lock.acquire()
            return None
        except Timeout:
            holder = lock_holder(path)
            if not holder.isdigit() or process_alive(int(holder)) or time.monotonic() > deadline:
                return holder
            time.sleep(0.05)


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


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie that has already closed its files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


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
