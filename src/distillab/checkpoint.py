"""Checkpoints: HF model directories (safetensors + tokenizer) plus trainer state, written atomically.

Layout of a checkpoint directory:
    config.json, model.safetensors, generation_config.json   (save_pretrained)
    tokenizer.json, tokenizer_config.json, ...                (the run's tokenizer)
    trainer_state.pt     optimizer state, step, tokens, data position, RNG (resumable ones only)
    distillab.json       what produced it: run config hash, tokenizer fingerprint, data dir
    manifest.json        sha256 of every other file; written last

The directory is assembled under a temporary name and renamed into place, so a crash leaves
either the old checkpoint or the new one, never a half-written one. A directory without a
manifest, or whose files disagree with it, is not a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from distillab.data.shards import make_temp_dir, sha256_file, write_json_atomic
from distillab.errors import CheckpointError

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
META = "distillab.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def save_checkpoint(
    target: Path,
    model,
    tokenizer,
    meta: dict,
    trainer_state: dict | None = None,
) -> Path:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, f".tmp-{target.name}-")
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        files = {}
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                files[str(path.relative_to(tmp))] = sha256_file(path)
        write_json_atomic(tmp / MANIFEST, {"files": files})
        _fsync_dir(tmp)
        if target.exists():
            trash = target.with_name(f".trash-{target.name}-{os.getpid()}")
            os.rename(target, trash)
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: Path, verify_hashes: bool = False) -> bool:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    for name, digest in files.items():
        file = Path(path) / name
        if not file.is_file():
            return False
        if verify_hashes and sha256_file(file) != digest:
            return False
    return True


def verify_checkpoint(path: Path) -> None:
    """Raise a one-line CheckpointError naming the file if the checkpoint is incomplete or corrupt."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}, so the checkpoint is incomplete; resume or retrain the run")
    files = json.loads(manifest.read_text())["files"]
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from checkpoint")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{file}: checksum mismatch against {manifest}; the file is corrupt")


def step_dir(checkpoints: Path, step: int) -> Path:
    return Path(checkpoints) / f"step_{step:08d}"


def list_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints, oldest first."""
    if not Path(checkpoints).is_dir():
        return []
    found = []
    for child in Path(checkpoints).iterdir():
        match = _STEP_DIR.match(child.name)
        if match and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def prune_checkpoints(checkpoints: Path, keep: int, protected: list[int] | tuple = ()) -> None:
    """Keep the newest `keep` checkpoints and every step in `protected`; remove the rest."""
    complete = list_checkpoints(checkpoints)
    for step, path in complete[:-keep]:
        if step not in protected:
            shutil.rmtree(path, ignore_errors=True)
    # leftovers of interrupted writes
    for child in Path(checkpoints).glob(".tmp-*"):
        shutil.rmtree(child, ignore_errors=True)
    for child in Path(checkpoints).glob(".trash-*"):
        shutil.rmtree(child, ignore_errors=True)


def read_meta(path: Path) -> dict:
    meta = Path(path) / META
    if not meta.is_file():
        return {}
    return json.loads(meta.read_text())


def load_trainer_state(path: Path) -> dict:
    state_path = Path(path) / TRAINER_STATE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing; this checkpoint cannot resume training")
    return torch.load(state_path, map_location="cpu", weights_only=True)
