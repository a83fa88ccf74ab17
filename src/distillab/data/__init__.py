"""Corpora, tokenizers, token shards and the batch loader."""
