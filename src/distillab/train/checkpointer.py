"""Saving and loading a run's checkpoints on every process (torch.distributed.checkpoint), and its final model.

    save     every process writes its own shards of the model and optimizer state into the
             checkpoint's `sharded/` directory (no gather: a process holds its shards plus one
             tensor's serialisation buffer); the main process writes the small files (trainer
             state with every process's RNG state, config, tokenizer, distillab.json); each
             process hashes the files it wrote, the main process writes the manifest with all
             hashes and renames the directory into place. With `train.async_checkpoint` the
             shards are copied to host memory and written in the background; the checkpoint is
             verified and named at the next save (or when training stops), so it never appears
             half-written.
    load     every process checks its part of the newest checkpoint's files (all processes
             agree on the one to use), builds the state of its own layout and reads its slices:
             DCP re-lays the tensors, so a checkpoint written by N processes under any
             parallelism loads on M under any other. Checkpoints of the older format (full
             weights in model.safetensors, the optimizer's own state dict) load on any layout.
    final    the HF model, streamed one gathered tensor at a time (`distillab.export`), the
             parametrisation's query-norm factors folded in (`distillab.models.query_norm_factors`:
             checkpoints hold the weights as trained, so a resume is exact; the HF model loads with
             transformers' own attention scale and gives the same logits).

The model and optimizer states come from torch's distributed state-dict API
(`get_state_dict` / `set_state_dict`), which names every tensor by its parameter's name and
works alike for a plain module, DDP and FSDP2, so one code path serves every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from distillab.artefact import AtomicDirectory, removed_on_failure
from distillab.checkpoint import (CHECKPOINT_ADVICE, SHARDED, is_sharded_checkpoint, latest_verified, load_weights,
                                  verify_checkpoint, write_checkpoint_files, write_manifest)
from distillab.errors import CheckpointError, ConfigError
from distillab.export import export_model
from distillab.files import sha256_file
from distillab.runtime import is_sharded
from distillab.train.parallel import SingleProcess


@dataclass
class PendingSave:
    """A checkpoint being written in the background, named once every process has finished it."""
    future: object
    tmp: Path
    directory: AtomicDirectory | None  # the main process's
    then: Callable[[], None] | None


class Checkpointer:
    def __init__(self, parallel: SingleProcess, async_save: bool = False):
        self.parallel, self.async_save = parallel, async_save
        self.pending: PendingSave | None = None
        self.group = None
        if async_save and distributed(parallel):
            import torch.distributed as dist

            # background writes coordinate on their own CPU (gloo) group, never interleaving with training's
            self.group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ save

    def save(self, target: Path, stepper, optimizer, trainer_state: dict, model, tokenizer, meta: dict,
             then: Callable[[], None] | None = None) -> None:
        """A step checkpoint at `target` (every process calls this); `then` runs on the main process
        once it is named (pruning older checkpoints)."""
        self.wait()
        import torch.distributed.checkpoint as dcp

        directory = AtomicDirectory(target, "a checkpoint", CHECKPOINT_ADVICE) if self.parallel.is_main else None
        tmp = self.parallel.broadcast_object(directory.path if directory else None)
        weights, optimizer_state = model_state(stepper, optimizer)
        state = {"model": weights, "optimizer": optimizer_state}
        rng = self.parallel.all_gather_object(rng_state(self.parallel.device))
        with removed_on_failure(directory, target, "a checkpoint", CHECKPOINT_ADVICE):
            if self.parallel.is_main:
                model.config.save_pretrained(str(tmp))
                write_checkpoint_files(tmp, tokenizer, meta, {**trainer_state, "rng_states": rng})
            if self.async_save:
                future = dcp.async_save(state, checkpoint_id=str(tmp / SHARDED), process_group=self.group,
                                        no_dist=not distributed(self.parallel))
                self.pending = PendingSave(future, tmp, directory, then)
                return
            dcp.save(state, checkpoint_id=str(tmp / SHARDED), no_dist=not distributed(self.parallel))
        self.name(tmp, directory, then)

    def wait(self) -> None:
        """Finish the background save, if one is under way (every process calls this)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        result = pending.future
        with removed_on_failure(pending.directory, pending.tmp, "a checkpoint", CHECKPOINT_ADVICE):
            (getattr(result, "upload_completion", None) or result).result()
        self.name(pending.tmp, pending.directory, pending.then)

    def name(self, tmp: Path, directory: AtomicDirectory | None, then) -> None:
        """Each process hashes its own shard files; the main process writes the manifest and renames."""
        mine = sorted((tmp / SHARDED).glob(f"__{self.parallel.rank}_*.distcp"))
        hashes = self.parallel.all_gather_object({str(p.relative_to(tmp)): sha256_file(p) for p in mine})
        if directory is not None:
            try:
                write_manifest(tmp, {k: v for part in hashes for k, v in part.items()})
                directory.commit()
            except BaseException:
                directory.abort()
                raise
            if then is not None:
                then()
        self.parallel.barrier()

    # ------------------------------------------------------------------ load

    def latest(self, checkpoints: Path, log) -> tuple[int, Path] | None:
        """The newest checkpoint every process verified its part of."""
        return latest_verified(checkpoints, log, part=(self.parallel.rank, self.parallel.world), agree=self.agree)

    def verify(self, source: Path) -> None:
        """Raise the first error any process finds in its part of `source`'s files."""
        try:
            verify_checkpoint(source, (self.parallel.rank, self.parallel.world))
            error = None
        except CheckpointError as exc:
            error = str(exc)
        error = self.agree(error)
        if error is not None:
            raise CheckpointError(error)

    def agree(self, error: str | None) -> str | None:
        return next((e for e in self.parallel.all_gather_object(error) if e), None)

    def load(self, source: Path, stepper, optimizer, state: dict, factors: dict[str, float] | None = None) -> None:
        """Load a verified checkpoint's weights, optimizer state and this process's RNG state into any
        layout; `state` is its trainer state (`load_trainer_state`), `factors` the run's export
        factors (`distillab.models.query_norm_factors`), which the older format saved folded."""
        if is_sharded_checkpoint(source):
            load_sharded(source, stepper, optimizer, distributed(self.parallel))
        else:
            weights = unfolded_weights(load_weights(source), state, factors or {})
            load_full(stepper, optimizer, weights, state["optimizer"])
        restore_rng(state, self.parallel)

    # ------------------------------------------------------------------ final model

    def write_final(self, target: Path, model, tokenizer, meta: dict, factors: dict[str, float] | None = None) -> None:
        """The HF model at `target`, one gathered tensor at a time, the weights in `factors` folded by
        their factor (every process calls this)."""
        self.wait()
        export_model(target, model, tokenizer, meta, full_tensor, write=self.parallel.is_main, factors=factors)
        self.parallel.barrier()


def distributed(parallel: SingleProcess) -> bool:
    """Whether the run's processes write and read together through the default process group (a
    plain single process never does, even beside a group someone else started: a rehearsal's)."""
    return parallel.uses_process_group



def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor on the CPU; a collective for a shard."""
    return (tensor.full_tensor() if is_sharded(tensor) else tensor).detach().cpu()


def model_state(stepper, optimizer) -> tuple[dict, dict]:
    """This process's model and optimizer state, tensors named by parameter (shards stay shards)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(stepper, optimizer)


def load_sharded(source: Path, stepper, optimizer, together: bool) -> None:
    """A sharded checkpoint read into this process's layout (`together`: with the other processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, optim = model_state(stepper, optimizer)
    state = {"model": model, "optimizer": optim}
    try:
        dcp.load(state, checkpoint_id=str(source / SHARDED), no_dist=not together)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError("model", f"{source} does not match the configured model ({first[:200]})") from None
    set_state_dict(stepper, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full(stepper, optimizer, weights: dict, optimizer_state: dict) -> None:
    """A checkpoint of the older format (full tensors, the optimizer's state dict by parameter index),
    laid out like this process's model (each full tensor sharded like its parameter)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    expected, _ = model_state(stepper, optimizer)
    model = getattr(stepper, "module", stepper)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(weights) - set(expected) or set(expected) - set(weights) - tied:
        raise ConfigError("model", "the checkpoint does not match the configured model")
    for name in tied - set(weights):
        weights[name] = weights["model.embed_tokens.weight"]
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {names[id(params[int(i)])]: entry for i, entry in optimizer_state["state"].items()},
               "param_groups": [{**group, "params": [names[id(params[int(i)])] for i in group["params"]]}
                                for group in optimizer_state["param_groups"]]}
    set_state_dict(stepper, optimizer, model_state_dict=weights, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))


def unfolded_weights(saved: dict, state: dict, factors: dict[str, float]) -> dict:
    """The weights as trained from an older-format checkpoint, which saved them folded (a plain HF
    model): the unfolded tensors its trainer state kept (exact), else the saved ones divided by their
    factors. Sharded checkpoints hold the weights as trained and need none of this."""
    raw = state.get("unfolded_weights") or {}
    return {name: raw[name] if name in raw else tensor / factors[name] if name in factors else tensor
            for name, tensor in saved.items()}


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, parallel: SingleProcess) -> None:
    """This process's RNG state when the checkpoint had as many processes; else the main process's."""
    states = state.get("rng_states") or [{"cpu": state["torch_rng"]}]
    mine = states[parallel.rank] if len(states) == parallel.world else states[0]
    torch.set_rng_state(mine["cpu"])
    if "cuda" in mine and parallel.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], parallel.device)
