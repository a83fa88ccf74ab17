"""Corpus sources: each yields whole documents with stable ids, in a fixed order.

- `files`: local text (one document per file), JSON lines and Parquet (one per record).
- `hf`: HF `datasets` (hub names or local dataset directories / data files), streaming.
- `packaged`: real text shipped inside registry packages, fetched once and cached
  (`distillab.data.packaged`).

Structured sources (JSON lines, Parquet, HF datasets, packaged chat sets) also yield whole
records (`iter_records`), for readers that need more than one text field (chat records).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from distillab.config import CorpusConfig
from distillab.data.documents import Document, Record, decode_text, normalize_text
from distillab.data.packaged import iter_packaged, iter_packaged_records
from distillab.errors import DataError


@dataclass(frozen=True)
class Source:
    """How one kind of corpus yields documents (and records), which config keys name its content, and its label."""

    documents: Callable[[CorpusConfig, Path], Iterator[Document]]
    identity_keys: tuple[str, ...]
    describe: Callable[[CorpusConfig], str]
    records: Callable[[CorpusConfig, Path], Iterator[Record]]


def iter_documents(corpus: CorpusConfig, cache_dir: Path) -> Iterator[Document]:
    """The non-empty documents among the corpus' first `limit` records (all without a limit), in a
    fixed order, newlines normalised. Empty records count towards the limit, as in `take(limit)`."""
    documents = SOURCES[corpus.source].documents(corpus, cache_dir)
    for count, document in enumerate(documents):
        if corpus.limit is not None and count >= corpus.limit:
            return
        if document.text.strip():
            yield Document(document.id, normalize_text(document.text))


def iter_records(corpus: CorpusConfig, cache_dir: Path) -> Iterator[Record]:
    """The corpus' first `limit` records (all without a limit), whole, in a fixed order (chat records
    for `distillab sft`). Plain-text files have no records."""
    for count, record in enumerate(SOURCES[corpus.source].records(corpus, cache_dir)):
        if corpus.limit is not None and count >= corpus.limit:
            return
        yield record


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


JSON_LINES = (".jsonl", ".jsonl.gz", ".json")


def _iter_files(corpus: CorpusConfig, cache_dir: Path) -> Iterator[Document]:
    for path in _expand(corpus.paths):
        name = path.name
        if name.endswith(JSON_LINES):
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


def _file_records(corpus: CorpusConfig, cache_dir: Path) -> Iterator[Record]:
    for path in _expand(corpus.paths):
        if path.name.endswith(JSON_LINES):
            yield from _jsonl_records(path)
        elif path.name.endswith(".parquet"):
            yield from _parquet_records(path)
        else:
            raise DataError(f"{path}: records come from JSON lines (.jsonl) or Parquet files, not from plain text; "
                            "list only those in data.corpus.paths")


def _jsonl_records(path: Path) -> Iterator[Record]:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 (byte {raw[exc.start]:#04x} at column "
                                f"{exc.start + 1}); JSON lines must be UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{where}: not valid JSON") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: not a JSON object (one record per line)")
            yield Record(str(record.get("id", f"{path.stem}:{line_number}")), where, record)


def _iter_jsonl(path: Path, field: str | list[str]) -> Iterator[Document]:
    for record in _jsonl_records(path):
        yield Document(id=record.id, text=_text_of(record.fields, field, record.where))


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    return pq.ParquetFile(path)


def _iter_parquet(path: Path, field: str) -> Iterator[Document]:
    table = _parquet_file(path)
    if field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (set data.corpus.text_field)")
    row = 0
    for batch in table.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            yield Document(id=f"{path.stem}:{row}", text=text or "")
            row += 1


def _parquet_records(path: Path) -> Iterator[Record]:
    row = 0
    for batch in _parquet_file(path).iter_batches():
        for record in batch.to_pylist():
            yield Record(str(record.get("id", f"{path.stem}:{row}")), f"{path}[row {row}]", record)
            row += 1


# ----------------------------------------------------------------------------- hf datasets


def _iter_hf(corpus: CorpusConfig, cache_dir: Path) -> Iterator[Document]:
    """Records of an HF dataset as documents (their text field or fields)."""
    for record in _hf_records(corpus, cache_dir):
        yield Document(id=record.id, text=_text_of(record.fields, corpus.text_fields or corpus.text_field,
                                                   record.where))


def _hf_records(corpus: CorpusConfig, cache_dir: Path) -> Iterator[Record]:
    """Records of an HF dataset; with `hf_configs`, of each configuration in turn (ids prefixed by it)."""
    if not corpus.hf_configs:
        yield from _hf_config_records(corpus, corpus.hf_config)
        return
    for name in corpus.hf_configs:
        for record in _hf_config_records(corpus, name):
            yield Record(f"{name}/{record.id}", record.where, record.fields)


def _hf_config_records(corpus: CorpusConfig, hf_config: str | None) -> Iterator[Record]:
    path = corpus.path or ""
    where = f"hf:{path}" + (f"/{hf_config}" if corpus.hf_configs else "")
    for index, record in enumerate(_hf_dataset(corpus, hf_config)):
        doc_id = record.get("id", index) if isinstance(record, dict) else index
        yield Record(str(doc_id), f"{where}[{index}]", record if isinstance(record, dict) else {})


def _hf_dataset(corpus: CorpusConfig, hf_config: str | None):
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
    return dataset


SOURCES: dict[str, Source] = {
    "files": Source(_iter_files, ("paths", "text_field", "text_fields"), lambda c: "files:" + ",".join(c.paths),
                    _file_records),
    "hf": Source(_iter_hf, ("path", "hf_config", "hf_configs", "split", "data_files", "text_field", "text_fields"),
                 lambda c: f"hf:{c.path}" + (f"/{'+'.join(c.hf_configs)}" if c.hf_configs else
                                             f"/{c.hf_config}" if c.hf_config else "") + f"[{c.split}]",
                 _hf_records),
    "packaged": Source(lambda c, cache_dir: iter_packaged(c.name or "", cache_dir), ("name",),
                       lambda c: f"packaged:{c.name}",
                       lambda c, cache_dir: iter_packaged_records(c.name or "", cache_dir)),
}
