"""An artefact on disk: a directory written atomically, verified by its manifest, addressed by content.

Checkpoints, prepared token shards, packing plans, teacher caches and offline task files are
all built the same way:

- **written atomically**: `AtomicDirectory` assembles the directory under a temporary name
  beside its final place and renames it into place when complete (replacing an older one), so
  a reader sees the old artefact or the new one, never half of one; a failed build is removed,
  and leftovers of a killed one are removed by the next build of the same artefact. Builders
  of a shared cache entry hold `entry_lock(final)`, so each entry is built once.
- **verified by manifest**: each artefact's manifest records the sha256 (and size) of its
  files; `file_problem` checks one file against its entry, `file_digests` makes the entries of
  a whole directory.
- **addressed by content**: cache entries are named by `distillab.files.stable_hash` of what
  decides their content; a model by `weights_sha256`.

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
from distillab.files import file_lock, sha256_file, stable_hash, umask

MANIFEST = "manifest.json"  # every artefact's manifest, beside the files it lists
LEFTOVER_PREFIXES = (".tmp-", ".trash-")


# ----------------------------------------------------------------------------- written atomically


class AtomicDirectory:
    """The directory `final`, written atomically. `path` is where its content goes; `commit()`
    renames it into place, `abort()` removes it; as a context manager it commits when the block
    ends normally and aborts when it raises. Making one removes the leftovers of earlier
    interrupted writes of `final`: the caller is its only writer (it holds a lock that says so)."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.final.parent, self.final.name)
        self.path = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".tmp-{self.final.name}-"))
        os.chmod(self.path, 0o777 & ~umask())

    def commit(self) -> Path:
        """Give every file the umask's permissions (some writers use 0600), then move into place."""
        mode = 0o666 & ~umask()
        for file in self.path.rglob("*"):
            if file.is_file():
                os.chmod(file, mode)
        replace_dir(self.path, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is None:
            self.commit()
        else:
            self.abort()
        return False


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
def entry_lock(final: Path):
    """The waiting lock of one cache entry: concurrent builders of `final` take turns. The holder
    finds the leftovers of killed builds of `final` removed."""
    final = Path(final)
    with file_lock(final.parent / f".{final.name}.lock"):
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
    """What names a model: sha256 over its weight files (their digests from its manifest when it has one)."""
    checkpoint = Path(checkpoint)
    manifest = read_json_manifest(checkpoint / MANIFEST) or {}
    files = manifest.get("files", {})
    digests = []
    for path in sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("*.bin")):
        digests.append(files.get(path.name) or sha256_file(path))
    if not digests:
        raise DataError(f"{checkpoint}: no weight files (*.safetensors)")
    return stable_hash(digests, length=64)
