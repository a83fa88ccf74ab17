"""Run under torchrun by tests/test_sharded.py (one process per rank, gloo on the CPU).

    python -m torch.distributed.run ... tests/sharded_worker.py init PARALLEL NODES SPECS_JSON OUT_JSON [PARAMETRISATION]
        each student of SPECS_JSON ({name: spec}) built on the meta device and materialised shard by
        shard; every tensor is gathered and compared, bit for bit, with `models.build_model` (a plain
        single-process build); one launch, one process group, for every spec
    python -m torch.distributed.run ... tests/sharded_worker.py save-memory CONFIG_YAML OUT_JSON
        one training step, then each process's peak resident memory while it writes its checkpoint
"""

import json
import os
import re
import sys
from pathlib import Path

import torch


def compare_initial_weights(parallel_name: str, nodes: int, specs: dict, parametrisation: str = "hf") -> dict | None:
    """{name: {"tensors": n, "mismatches": [names], "tied", "scaling"}} for each spec of `specs` on rank 0
    (None elsewhere); "scaling" says whether every layer's attention scale equals the reference's."""
    from distillab.config import TrainConfig
    from distillab.models import ModelSpec
    from distillab.train.world import setup_parallelism

    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = setup_parallelism(TrainConfig(processes=world, nodes=nodes, parallel=parallel_name, device="cpu",
                                             threads=1))
    try:
        results = {name: compare_one(parallel, ModelSpec(**values), parametrisation) for name, values in specs.items()}
    finally:
        parallel.close()
    return results if parallel.is_main else None


def compare_one(parallel, spec, parametrisation: str) -> dict:
    from distillab.models import build_model

    vocab, seq_len, seed, eos = 300, 32, 1234, 7
    stepper = parallel.build_model(spec, vocab, seq_len, seed, eos, parametrisation=parametrisation)
    reference = build_model(spec, vocab, seq_len, seed, eos, parametrisation=parametrisation) if parallel.is_main \
        else None
    mismatches, count = [], 0
    for name, tensor in [*stepper.named_parameters(), *stepper.named_buffers()]:
        whole = (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()
        count += 1
        if reference is not None:
            expected = reference.get_parameter(name) if name in dict(reference.named_parameters()) else \
                reference.get_buffer(name)
            if whole.dtype != expected.dtype or not torch.equal(whole, expected.detach()):
                mismatches.append(name)
    tied = spec.tie_embeddings and stepper.lm_head.weight is stepper.model.embed_tokens.weight
    if reference is None:
        return {}
    scaling = all(a.self_attn.scaling == b.self_attn.scaling for a, b in zip(stepper.model.layers, reference.model.layers))
    return {"tensors": count, "mismatches": mismatches, "tied": tied, "scaling": scaling}


def peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_save(config_path: str) -> dict:
    """Train one step with a checkpoint; measure rank 0's peak resident memory around the save."""
    from distillab.config import load_config
    from distillab.train import checkpointer as module
    from distillab.train import train

    measured = {}
    save = module.Checkpointer.save

    def measured_save(self, target, stepper, optimizer, *args, **kwargs):
        local = [p.to_local() if hasattr(p, "to_local") else p for p in stepper.parameters()]
        largest = max(p.numel() for p in stepper.parameters()) * 4  # a DTensor's numel is its global size
        state = sum(t.numel() for t in local) * 4 * 3  # weights + AdamW's two moments, fp32
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = rss_kib()
        save(self, target, stepper, optimizer, *args, **kwargs)
        measured.update(rank=self.parallel.rank, before_kib=before, peak_kib=peak_kib(), shard_state_bytes=state,
                        largest_tensor_bytes=largest,
                        full_state_bytes=sum(p.numel() for p in stepper.parameters()) * 4 * 3)

    module.Checkpointer.save = measured_save
    train(load_config(config_path), stop_after_steps=1, log=lambda *a: None)
    return measured


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "init":
        parallel_name, nodes, specs_json, out, *parametrisation = args
        result = compare_initial_weights(parallel_name, int(nodes), json.loads(specs_json), *parametrisation)
    else:
        config_path, out = args
        result = measure_save(config_path)
    rank = int(os.environ.get("RANK", "0"))
    if result is not None:
        Path(f"{out}.{rank}").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
