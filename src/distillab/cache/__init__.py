"""The teacher cache: a teacher's top-K per position over a training split, captured once.

    coding.py    how one window's rows become bytes: `compact` (quantised log-probs, delta-coded
                 ids, zlib) or `float32` (exact, uncompressed)
    store.py     shards + index + manifest on disk: atomic writes, sha256 checks, reading by window id

`distillab.capture` runs a teacher over the split's windows into a cache (`distillab teacher
cache`); `distillab.teacher.CachedTeacher` serves a cache to the training loop as a teacher
signal. Nothing here imports either: the format sits below both.
"""
