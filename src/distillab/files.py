"""File utilities shared by data preparation, checkpoints, sweeps, evaluation and reports.

Every write that another process (or a later run) may read is atomic: content goes to a
temporary file or directory beside its final place and is renamed into place, so a reader
sees the old version or the new one, never half of one. Files get the permissions the umask
gives (never mkstemp's 0600).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

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


def remembered_sha256(path: Path) -> str:
    """sha256 of a large file that is not expected to change (a model's weights), computed once:
    remembered under the cache directory by the file's path, size, modification time and inode,
    so a file rewritten or replaced is hashed again."""
    path = Path(path)
    stat = path.stat()
    key = stable_hash([str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev])
    memo = default_cache_dir() / "sha256" / key
    with contextlib.suppress(OSError):
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    digest = sha256_file(path)
    with contextlib.suppress(OSError):  # only a shortcut: a read-only cache just hashes again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, digest)
    return digest


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A temporary directory beside its final place, with normal (umask) permissions."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o777 & ~umask())
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory into place, replacing any previous `final`."""
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def fix_permissions(folder: Path) -> None:
    """Give every file under `folder` the umask's permissions (some writers use 0600)."""
    mode = 0o666 & ~umask()
    for path in Path(folder).rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


def remove_stale_temp_dirs(parent: Path, prefixes: tuple[str, ...] = (".tmp-", ".trash-")) -> None:
    """Leftovers of writes interrupted by a crash (never in use: callers hold the lock)."""
    if not Path(parent).is_dir():
        return
    for child in Path(parent).iterdir():
        if child.name.startswith(prefixes):
            shutil.rmtree(child, ignore_errors=True)


# Errors of a place that cannot take a write: permissions, a read-only filesystem, a full disk.
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# A failed write that hides its errno (torch.save: "unexpected pos") ran out of space when less
# than this is left on the filesystem.
NEARLY_FULL_BYTES = 64 << 20
HIDDEN_WRITE_ERRORS = ("unexpected pos", "PytorchStreamWriter", "I/O error")


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


def storage_error(exc: BaseException, path: Path, what: str, advice: str) -> DistillabError | None:
    """A one-line error for a write under `path` (`what` is being written) that failed because the
    place is full or read-only; None for any other failure."""
    if out_of_space(exc, path):
        return DistillabError(f"{path}: no space left on device while writing {what}; nothing partial was kept: free "
                              f"space, or {advice}")
    if isinstance(exc, OSError) and exc.errno in UNWRITABLE:
        cause = "read-only filesystem" if exc.errno == errno.EROFS else "permission denied"
        return DistillabError(f"{path}: not writable ({cause}) for {what}; {advice}")
    return None


@contextlib.contextmanager
def storage_errors(path: Path, what: str, advice: str):
    """Inside, a full disk or a read-only place under `path` ends in one line (`storage_error`)."""
    try:
        yield
    except Exception as exc:
        error = storage_error(exc, path, what, advice)
        if error is None:
            raise
        raise error from None


CACHE_ADVICE = "set data.cache_dir (or DISTILLAB_CACHE) to a directory you can write"


@contextlib.contextmanager
def file_lock(path: Path, advice: str = CACHE_ADVICE):
    """An exclusive advisory lock that waits its turn (concurrent preparation of one cache entry).
    `advice`: what to do when its directory cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        cause = "read-only filesystem" if exc.errno == errno.EROFS else "permission denied"
        raise DistillabError(f"{path.parent}: not writable ({cause}); {advice}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class LockHeld(DistillabError):
    """Another process holds an exclusive lock (the message names its pid)."""


# How long a lock whose recorded holder has exited may take to be released (the kernel releases
# it as the holder's files close; a killed worker may still be closing them).
RELEASE_GRACE_S = 5.0


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


def try_flock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False


def claim_or_wait_for_dead_holder(handle) -> str | None:
    """Take the lock at once, or (when the pid it names has exited) as soon as the kernel releases it;
    None when taken, else the holder's pid as recorded."""
    deadline = time.monotonic() + RELEASE_GRACE_S
    while not try_flock(handle):
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        if not holder.isdigit() or process_alive(int(holder)) or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)
    return None


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str):
    """An exclusive lock that is refused at once when held: one writer per run directory or sweep.

    The holder's pid is written into the lock file, so the refusal names it. The lock is the
    kernel's (flock), so a killed holder releases it: a stale lock file never blocks anyone, and
    a lock whose holder has just been killed is taken once the kernel releases it (within
    `RELEASE_GRACE_S`).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        raise DistillabError(f"{path.parent}: not writable; choose another directory") from None
    with handle:
        holder = claim_or_wait_for_dead_holder(handle)
        if holder is not None:
            gone = holder.isdigit() and not process_alive(int(holder))
            note = ", which has exited; a process it started still holds the lock" if gone else ""
            raise LockHeld(f"{what} is in use by another process (pid {holder}{note}); wait for it to finish or stop "
                           "it first")
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
