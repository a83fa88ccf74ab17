"""Documents: whole texts with stable ids, as every corpus source yields them; records: whole
structured rows (chat records), as structured sources also yield them."""

from __future__ import annotations

from dataclasses import dataclass

from distillab.errors import DataError


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class Record:
    """One record of a structured source (a JSON line, a Parquet row, a dataset row): its id, where it
    is (`file:line`, `hf:path[index]`, `packaged:name[index]`: what an error names) and its fields."""

    id: str
    where: str
    fields: dict


def normalize_text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def looks_binary(raw: bytes) -> bool:
    """NUL bytes, or more than 10 % control characters, in the first 8 KiB: not text."""
    head = raw[:8192]
    if b"\x00" in head:
        return True
    control = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return len(head) > 0 and control / len(head) > 0.10


def decode_text(raw: bytes, where: str) -> str:
    """UTF-8 text (Latin-1 when it is not UTF-8); a DataError naming `where` when it is binary."""
    if looks_binary(raw):
        raise DataError(f"{where}: looks like a binary file, not text; leave it out of data.corpus.paths")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
