"""HF model directories written one tensor at a time: `final/` of a run, and `distillab export`.

No process ever holds the whole model to write it: the safetensors header is written first
from the tensors' names, shapes and dtypes (known without their values), then each tensor is
fetched whole (gathered from its shards, or read from a sharded checkpoint), appended and
freed. The directory loads with `AutoModelForCausalLM.from_pretrained` like one written by
`save_pretrained`: the same tensor names (a tied output layer left out), config.json with the
model's architecture, generation_config.json, the run's tokenizer. Under a parametrisation whose
attention scale is not transformers' own (MaxText Qwen3), the query norms' weights are written
folded (times `distillab.models.query_norm_factors`), so `from_pretrained` gives the trained
model's logits; step checkpoints keep the weights as trained.

The safetensors layout (the format's specification): 8 bytes little-endian header length N,
N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}} padded
with spaces to a multiple of 8, then the tensors' bytes back to back in header order.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Callable

import torch

from distillab.artefact import AtomicDirectory, removed_on_failure
from distillab.checkpoint import (CHECKPOINT_ADVICE, SHARDED, is_sharded_checkpoint, latest_verified, list_checkpoints,
                                  read_meta, verify_checkpoint, write_checkpoint_files, write_manifest)
from distillab.errors import CheckpointError
from distillab.layout import RunLayout

# DCP warns on every call without a process group that it assumes a single process: intended here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

WEIGHTS = "model.safetensors"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def exported_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what an HF checkpoint of `model` holds: its parameters (a tied one under its
    first name only: loading ties the output layer to the embeddings again) and persistent buffers."""
    persistent = set(model.state_dict(keep_vars=True))
    named = [*model.named_parameters(), *model.named_buffers()]
    return [(name, tensor) for name, tensor in named if name in persistent]


class SafetensorsStream:
    """A safetensors file written tensor by tensor, in the order of `entries` [(name, dtype, shape)]."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in entries:
            size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.expected = [(name, dtype, tuple(shape)) for name, dtype, shape in entries]
        self.handle = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(text)) + text)
        self.written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.expected[self.written]
        if (name, tensor.dtype, tuple(tensor.shape)) != expected:
            raise ValueError(f"{name} {tensor.dtype} {tuple(tensor.shape)} written where {expected} was declared")
        self.handle.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self.written += 1

    def close(self) -> None:
        if self.written != len(self.expected):
            raise ValueError(f"{len(self.expected) - self.written} declared tensors were not written")
        self.handle.close()


def write_hf_model(directory: Path, config, generation_config, entries: list[tuple[str, torch.dtype, tuple]],
                   fetch: Callable[[str], torch.Tensor], write: bool = True) -> None:
    """config.json, generation_config.json and model.safetensors in `directory`; `fetch(name)` gives
    each full tensor in `entries` order. With `write=False` (the other processes of a sharded run)
    every tensor is still fetched, since fetching gathers it from every process, and nothing is written."""
    stream = SafetensorsStream(Path(directory) / WEIGHTS, entries) if write else None
    for name, _, _ in entries:
        tensor = fetch(name)
        if stream is not None:
            stream.write(name, tensor)
        del tensor
    if stream is not None:
        stream.close()
        config.save_pretrained(str(directory))
        if generation_config is not None:
            generation_config.save_pretrained(str(directory))


def export_model(target: Path, model: torch.nn.Module, tokenizer, meta: dict, full_tensor, write: bool,
                 factors: dict[str, float] | None = None) -> None:
    """The HF directory of a live (possibly sharded) model at `target`, atomically; `full_tensor(t)`
    gives the whole of `t` (a collective under sharding: every process calls `export_model`); each
    tensor named in `factors` is written times its factor (`distillab.models.query_norm_factors`)."""
    tensors = exported_tensors(model)
    entries = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors]
    by_name = dict(tensors)
    fetch = folded(lambda name: full_tensor(by_name[name]), factors)
    directory = AtomicDirectory(target, "a model", CHECKPOINT_ADVICE) if write else None
    with removed_on_failure(directory, target, "a model", CHECKPOINT_ADVICE):
        model.config.architectures = [type(model).__name__]
        write_hf_model(directory.path if write else None, model.config, getattr(model, "generation_config", None),
                       entries, fetch, write)
        if directory is not None:
            write_checkpoint_files(directory.path, tokenizer, meta)
            write_manifest(directory.path)
            directory.commit()


def folded(fetch: Callable[[str], torch.Tensor], factors: dict[str, float] | None) -> Callable[[str], torch.Tensor]:
    """`fetch` with each tensor named in `factors` multiplied by its factor: the weights as trained
    under a parametrisation whose attention scale differs from transformers' own, folded so the HF
    model gives the same logits (`distillab.models.query_norm_factors`)."""
    if not factors:
        return fetch
    return lambda name: fetch(name) * factors[name] if name in factors else fetch(name)


# ------------------------------------------------------------------------------ from a checkpoint on disk


def checkpoint_to_export(run_dir: Path, step: int | None) -> tuple[int, Path]:
    """(step, the verified step checkpoint) of a run to export: `step`, or the newest."""
    run = RunLayout(run_dir)
    checkpoints = run.checkpoints
    if step is None:
        found = latest_verified(checkpoints)
        if found is None:
            raise CheckpointError(f"{checkpoints}: no checkpoint to export; train the run first")
        return found
    source = run.step(step)
    if not source.is_dir():
        kept = ", ".join(str(s) for s, _ in list_checkpoints(checkpoints)) or "none"
        raise CheckpointError(f"{source}: no checkpoint at step {step} (steps kept: {kept}); use --step with one of "
                              "them, or keep it with train.keep_steps")
    verify_checkpoint(source)
    return step, source


def export_checkpoint(run_dir: Path, step: int | None = None, out: Path | None = None, log=print) -> Path:
    """`distillab export`: the HF directory of a run's step checkpoint, one tensor in memory at a time
    (one process; the checkpoint may come from any number of processes and any parallelism)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    step, source = checkpoint_to_export(run_dir, step)
    out = Path(out) if out else RunLayout(run_dir).exported(step)
    config = AutoConfig.from_pretrained(str(source))
    model = meta_model(config)
    entries = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in exported_tensors(model)]
    generation = GenerationConfig.from_pretrained(str(source)) if (source / "generation_config.json").is_file() \
        else None
    with AtomicDirectory(out) as tmp:
        write_hf_model(tmp, config, generation, entries, folded(checkpoint_reader(source), checkpoint_factors(source)))
        write_checkpoint_files(tmp, AutoTokenizer.from_pretrained(str(source)),
                               {**read_meta(source), "exported_from": str(source)})
        write_manifest(tmp)
    log(f"export: {source} -> {out}")
    return out


def checkpoint_tensors(source: Path):
    """(name, full tensor) of a step checkpoint's model, one tensor in memory at a time."""
    from transformers import AutoConfig

    read = checkpoint_reader(Path(source))
    for name, _ in exported_tensors(meta_model(AutoConfig.from_pretrained(str(source)))):
        yield name, read(name)


def checkpoint_factors(source: Path) -> dict[str, float]:
    """The factors to fold into a step checkpoint's weights on export: its run's parametrisation's
    (`distillab.models.query_norm_factors`) for a sharded checkpoint, which holds the weights as
    trained; none for the older format, which saved them folded already."""
    if not is_sharded_checkpoint(source):
        return {}
    from transformers import AutoConfig

    from distillab.models import query_norm_factors

    parametrisation = read_meta(source).get("results_config", {}).get("model.parametrisation", "hf")
    return query_norm_factors(meta_model(AutoConfig.from_pretrained(str(source))), parametrisation)


def meta_model(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def checkpoint_reader(source: Path) -> Callable[[str], torch.Tensor]:
    """name -> the full tensor from a step checkpoint: from its sharded files (only that tensor's
    bytes are read), or from the model.safetensors of the older format."""
    if not is_sharded_checkpoint(source):
        from safetensors import safe_open

        handle = safe_open(str(source / WEIGHTS), framework="pt")
        return handle.get_tensor
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(source / SHARDED)).read_metadata().state_dict_metadata

    def read(name: str) -> torch.Tensor:
        key = f"model.{name}"
        if key not in metadata:
            raise CheckpointError(f"{source / SHARDED}: no tensor {name}; the checkpoint does not match its "
                                  "config.json")
        stored = metadata[key]
        tensor = torch.empty(tuple(stored.size), dtype=stored.properties.dtype)
        dcp.load({"model": {name: tensor}}, checkpoint_id=str(source / SHARDED), no_dist=True)
        return tensor
    return read
