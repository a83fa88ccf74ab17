"""Checkpoints: directories written atomically (`distillab.artefact`), verified by a manifest of sha256 hashes.

A step checkpoint (resumable; `checkpoints/step_NNNNNNNN/`):
    sharded/             torch.distributed.checkpoint (DCP): model and optimizer state, each
                         process's shards in its own file (`__<rank>_0.distcp`) and `.metadata`
                         (every tensor's global shape and which file holds which slice)
    trainer_state.pt     step, tokens, data position (sequences read), every process's RNG state,
                         the partial logging window
    config.json, generation_config.json, tokenizer files   (the model's HF config, no weights)
    distillab.json       what produced it: run config, tokenizer fingerprint, data content hash
    manifest.json        sha256 of every other file; written last

The HF model (`final/`, and `distillab export`): config.json, model.safetensors (written one
tensor at a time, `distillab.export`), generation_config.json, tokenizer files, distillab.json,
manifest.json.

Checkpoints written before the sharded format (still read): model.safetensors with full
weights, and the optimizer's own state dict inside trainer_state.pt (`is_sharded_checkpoint`
tells them apart).

A directory is assembled under a temporary name (every process writing its own files into it)
and renamed into place, so a crash leaves either the old checkpoint or the new one, never a
half-written one. A directory without a manifest is not a checkpoint; one whose files disagree
with it is corrupt and is never loaded (`latest_verified` falls back to the previous verified
checkpoint).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch

from distillab.artefact import MANIFEST, AtomicDirectory, file_problem, read_json_manifest, remove_leftovers
from distillab.errors import CheckpointError
from distillab.files import sha256_file, write_json_atomic
from distillab.layout import STEP, step_name

TRAINER_STATE = "trainer_state.pt"
META = "distillab.json"
SHARDED = "sharded"
# what to do when a checkpoint's directory is full or read-only
CHECKPOINT_ADVICE = "choose another run_dir (the last good checkpoint is kept)"


def save_checkpoint(target: Path, model, tokenizer, meta: dict, trainer_state: dict | None = None,
                    state_dict: dict | None = None) -> Path:
    """Write an HF checkpoint of `model` (or of `state_dict` in `model`'s architecture) to `target`."""
    with AtomicDirectory(target, "a checkpoint", CHECKPOINT_ADVICE) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        write_checkpoint_files(tmp, tokenizer, meta, trainer_state)
        write_manifest(tmp)
    return Path(target)


def write_checkpoint_files(tmp: Path, tokenizer, meta: dict, trainer_state: dict | None = None) -> None:
    """The files beside the weights: tokenizer (if any), distillab.json, and a step checkpoint's trainer state.
    An HF model directory is left as `from_pretrained` users expect it (`generation_ready`)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    generation_ready(Path(tmp))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def generation_ready(directory: Path) -> None:
    """An HF model directory's saved settings as a user generating from it expects: `use_cache: true` in
    config.json (training builds models with it off), and the tokenizer's `model_max_length` the
    model's positions (distillab's tokenizers carry no limit, since it cuts windows itself)."""
    config_file, tokenizer_file = directory / "config.json", directory / "tokenizer_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config["use_cache"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_file.is_file() and config.get("max_position_embeddings"):
        settings = json.loads(tokenizer_file.read_text())
        settings["model_max_length"] = int(config["max_position_embeddings"])
        tokenizer_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def write_manifest(tmp: Path, hashes: dict[str, str] | None = None) -> None:
    """manifest.json, last: the sha256 of every file, taken from `hashes` for the files other processes
    wrote and hashed."""
    hashes = hashes or {}
    files = {name: hashes.get(name) or sha256_file(Path(tmp) / name) for name in
             sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file())}
    write_json_atomic(Path(tmp) / MANIFEST, {"files": files})


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether a checkpoint holds its weights and optimizer state in the sharded (DCP) format."""
    return (Path(path) / SHARDED / ".metadata").is_file()


def verify_checkpoint(path: Path, part: tuple[int, int] = (0, 1)) -> None:
    """Raise a one-line CheckpointError naming the file if the checkpoint is incomplete or corrupt.

    `part` = (i, n): hash only every n-th file of the manifest from the i-th (the processes of a
    run share the reading; together they check every file)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}, so the checkpoint is incomplete; resume or retrain the run")
    files = (read_json_manifest(manifest) or {}).get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest}: unreadable; the checkpoint is corrupt")
    for name, digest in sorted(files.items())[part[0]::part[1]]:
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


def latest_verified(checkpoints: Path, log=print, part: tuple[int, int] = (0, 1),
                    agree=lambda error: error) -> tuple[int, Path] | None:
    """The newest checkpoint whose files match its manifest; corrupt newer ones are skipped with a warning.

    None when there is no checkpoint at all; a CheckpointError when there are some but none verifies.
    With several processes each checks its `part` of the files and `agree(error or None)` returns
    the first error any of them found (every process calls it), so all choose the same checkpoint.
    """
    found = list_checkpoints(checkpoints)
    for step, path in reversed(found):
        try:
            verify_checkpoint(path, part)
            error = None
        except CheckpointError as exc:
            error = str(exc)
        error = agree(error)
        if error is None:
            return step, path
        log(f"warning: {error}; falling back to the previous checkpoint")
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
