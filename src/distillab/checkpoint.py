"""Checkpoints: HF model directories (safetensors + tokenizer) plus trainer state, written atomically.

Layout of a checkpoint directory:
    config.json, model.safetensors, generation_config.json   (save_pretrained)
    tokenizer.json, tokenizer_config.json, ...                (the run's tokenizer)
    trainer_state.pt     optimizer state, step, tokens, data position, RNG (resumable ones only)
    distillab.json       what produced it: run config, tokenizer fingerprint, data content hash
    manifest.json        sha256 of every other file; written last

The directory is assembled under a temporary name and renamed into place, so a crash leaves
either the old checkpoint or the new one, never a half-written one. A directory without a
manifest is not a checkpoint; one whose files disagree with it is corrupt and is never loaded
(`latest_verified` falls back to the previous verified checkpoint).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch

from distillab.artefact import MANIFEST, AtomicDirectory, file_digests, file_problem, read_json_manifest, \
    remove_leftovers
from distillab.errors import CheckpointError
from distillab.files import write_json_atomic
from distillab.layout import STEP, step_name

TRAINER_STATE = "trainer_state.pt"
META = "distillab.json"


def save_checkpoint(target: Path, model, tokenizer, meta: dict, trainer_state: dict | None = None,
                    state_dict: dict | None = None) -> Path:
    """Write an HF checkpoint of `model` (or of `state_dict` in `model`'s architecture) to `target`."""
    with AtomicDirectory(target, "a checkpoint", "choose another run_dir (the last good checkpoint is kept)") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        write_json_atomic(tmp / MANIFEST, {"files": file_digests(tmp)})
    return Path(target)


def verify_checkpoint(path: Path) -> None:
    """Raise a one-line CheckpointError naming the file if the checkpoint is incomplete or corrupt."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}, so the checkpoint is incomplete; resume or retrain the run")
    files = (read_json_manifest(manifest) or {}).get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest}: unreadable; the checkpoint is corrupt")
    for name, digest in files.items():
        problem = file_problem(path / name, digest)
        if problem is not None:
            raise CheckpointError(f"{problem}; the checkpoint is corrupt")


def verify_model_directory(path: Path) -> bool:
    """Verify a distillab checkpoint (it has a manifest; CheckpointError if corrupt); an HF model
    directory without one is taken as it is. Whether it was verified."""
    if not (Path(path) / MANIFEST).exists():
        return False
    verify_checkpoint(path)
    return True


def step_dir(checkpoints: Path, step: int) -> Path:
    return Path(checkpoints) / step_name(step)


def list_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """Step checkpoints that have a manifest (not yet verified), oldest first."""
    if not Path(checkpoints).is_dir():
        return []
    found = []
    for child in Path(checkpoints).iterdir():
        match = STEP.match(child.name)
        if match and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_verified(checkpoints: Path, log=print) -> tuple[int, Path] | None:
    """The newest checkpoint whose files match its manifest; corrupt newer ones are skipped with a warning.

    None when there is no checkpoint at all; a CheckpointError when there are some but none verifies.
    """
    found = list_checkpoints(checkpoints)
    for step, path in reversed(found):
        try:
            verify_checkpoint(path)
            return step, path
        except CheckpointError as exc:
            log(f"warning: {exc}; falling back to the previous checkpoint")
    if found:
        raise CheckpointError(f"{checkpoints}: no checkpoint verifies against its manifest; delete the run directory "
                              "and train again")
    return None


def prune_checkpoints(checkpoints: Path, keep: int, protected: list[int] | tuple = ()) -> None:
    """Keep the newest `keep` checkpoints and every step in `protected`; remove the rest and the
    leftovers of interrupted writes."""
    complete = list_checkpoints(checkpoints)
    for step, path in complete[:-keep]:
        if step not in protected:
            shutil.rmtree(path, ignore_errors=True)
    remove_leftovers(Path(checkpoints))


def read_meta(path: Path) -> dict:
    meta = Path(path) / META
    if not meta.is_file():
        return {}
    return json.loads(meta.read_text())


def load_trainer_state(path: Path) -> dict:
    state_path = Path(path) / TRAINER_STATE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing; this checkpoint cannot resume training")
    try:  # tensors and plain values only: a pickled object (which could run code) is refused unread
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        reason = "holds pickled objects other than tensors and plain values" \
            if isinstance(exc, pickle.UnpicklingError) else "is unreadable"
        raise CheckpointError(f"{state_path}: {reason}, so it was not loaded; the checkpoint is corrupt or was "
                              "tampered with: delete it to resume from an earlier one") from None


def load_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"), device=str(device))
