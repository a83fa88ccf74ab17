"""An artefact on disk: a directory written atomically, verified by its manifest, addressed by content.

Checkpoints, prepared token shards, packing plans, teacher caches and offline task files are
all built the same way:

- **written atomically**: `AtomicDirectory` assembles the directory under a temporary name
  beside its final place and renames it into place when complete (replacing an older one), so
  a reader sees the old artefact or the new one, never half of one; a failed build is removed,
  and leftovers of a killed one are removed by the next build of the same artefact. A full disk
  or a read-only place ends in one line naming the place, what was being written and what to do
  (`distillab.files.storage_errors`), for every artefact alike. Builders of a shared cache entry
  hold `entry_lock(final)`, so each entry is built once.
- **verified by manifest**: each artefact's manifest records the sha256 (and size) of its
  files; `file_problem` checks one file against its entry, `file_digests` makes the entries of
  a whole directory.
- **addressed by content**: cache entries are named by `distillab.files.stable_hash` of what
  decides their content; a model by `weights_sha256` (weight files without a manifest are hashed
  once and remembered, `remembered_sha256`).

Single files are written atomically by `distillab.files.write_bytes_atomic` and its siblings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from distillab.errors import DataError
from distillab.files import (CACHE_ADVICE, default_cache_dir, file_lock, sha256_file, stable_hash, storage_error,
                             storage_errors, umask, write_text_atomic)

MANIFEST = "manifest.json"  # every artefact's manifest, beside the files it lists
LEFTOVER_PREFIXES = (".tmp-", ".trash-")


# ----------------------------------------------------------------------------- written atomically


class AtomicDirectory:
    """The directory `final`, written atomically. `path` is where its content goes; `commit()`
    renames it into place, `abort()` removes it; as a context manager it commits when the block
    ends normally and aborts when it raises. Making one removes the leftovers of earlier
    interrupted writes of `final`: the caller is its only writer (it holds a lock that says so).

    A write that `final`'s directory refuses (a full disk, a read-only filesystem), while making
    it, inside the block or while committing, ends in one `StorageError` line naming that
    directory, `what` was being written and the `advice`, with the temporary directory removed."""

    def __init__(self, final: Path, what: str = "a cache entry", advice: str = CACHE_ADVICE):
        self.final, self.what, self.advice = Path(final), what, advice
        with storage_errors(self.final.parent, what, advice):
            self.final.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.final.parent, self.final.name)
            self.path = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".tmp-{self.final.name}-"))
            os.chmod(self.path, 0o777 & ~umask())

    def commit(self) -> Path:
        """Give every file the umask's permissions (some writers use 0600), then move into place
        (when that fails, the temporary directory is removed)."""
        with storage_errors(self.final.parent, self.what, self.advice):
            try:
                mode = 0o666 & ~umask()
                for file in self.path.rglob("*"):
                    if file.is_file():
                        os.chmod(file, mode)
                replace_dir(self.path, self.final)
            except BaseException:
                self.abort()
                raise
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is None:
            self.commit()
            return False
        # judged before the partial files go: they may be what filled the disk
        error = storage_error(value, self.final.parent, self.what, self.advice)
        self.abort()
        if error is not None:
            raise error from None
        return False


@contextlib.contextmanager
def removed_on_failure(directory: AtomicDirectory | None, target: Path, what: str, advice: str):
    """Writes into an `AtomicDirectory` made outside the block (`None` on processes that only write
    shards into it): when one fails, the temporary directory is removed, and a full disk or an
    unwritable place under `target`'s directory ends in one line (`storage_error`) on every process."""
    try:
        yield
    except BaseException as exc:
        # judged before the partial files go: they may be what filled the disk
        error = storage_error(exc, Path(target).parent, what, advice)
        if directory is not None:
            directory.abort()
        if error is not None:
            raise error from None
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory into place, replacing any previous `final`."""
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftovers(parent: Path, name: str = "") -> None:
    """Temporary and trash directories of interrupted writes in `parent` (of the artefact `name`
    only, when given). Never in use: callers are the only writers there."""
    if not Path(parent).is_dir():
        return
    prefixes = tuple(f"{prefix}{name}-" if name else prefix for prefix in LEFTOVER_PREFIXES)
    for child in Path(parent).iterdir():
        if child.name.startswith(prefixes):
            shutil.rmtree(child, ignore_errors=True)


@contextlib.contextmanager
def entry_lock(final: Path, advice: str = CACHE_ADVICE):
    """The waiting lock of one cache entry: concurrent builders of `final` take turns. The holder
    finds the leftovers of killed builds of `final` removed. (`advice`: what to do when the
    directory cannot be written.)"""
    final = Path(final)
    with file_lock(final.parent / f".{final.name}.lock", advice):
        remove_leftovers(final.parent, final.name)
        yield


# ----------------------------------------------------------------------------- verified by manifest


def file_digests(directory: Path) -> dict[str, str]:
    """{path relative to `directory`: sha256} of every file under it, in sorted order."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def file_problem(path: Path, sha256: str, size: int | None = None) -> str | None:
    """What is wrong with `path` against its manifest entry (sha256, and size when given): a
    phrase naming the file, or None when it matches."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: missing"
    if size is not None and path.stat().st_size != size:
        return f"{path}: {path.stat().st_size} bytes, the manifest says {size}"
    actual = sha256_file(path)
    if actual != sha256:
        return f"{path}: checksum mismatch (sha256 {actual[:12]}…, the manifest says {sha256[:12]}…)"
    return None


def read_json_manifest(path: Path) -> dict | None:
    """The JSON manifest at `path`; None when it is absent or not valid JSON (an incomplete or
    corrupt artefact: callers say which and what to do)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- addressed by content


def weights_sha256(checkpoint: Path) -> str:
    """What names a model: sha256 over its weight files (their digests from its manifest when it
    has one, else `remembered_sha256`)."""
    checkpoint = Path(checkpoint)
    manifest = read_json_manifest(checkpoint / MANIFEST) or {}
    files = manifest.get("files", {})
    digests = []
    for path in sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("*.bin")):
        digests.append(files.get(path.name) or remembered_sha256(path))
    if not digests:
        raise DataError(f"{checkpoint}: no weight files (*.safetensors)")
    return stable_hash(digests, length=64)


def remembered_sha256(path: Path) -> str:
    """sha256 of a large file that is not expected to change (a model's weights), computed once:
    remembered under the cache directory (sha256/) by the file's path, size, modification time
    and inode, so a file rewritten or replaced is hashed again."""
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
