#!/usr/bin/env bash
# The GPU check of distillab: <= 8 minutes on one GPU, installs nothing, needs no network.
# Run from the repository root on a CUDA machine with the project's requirements installed:
#
#   OUT_DIR=/tmp/gpu benchmarks/gpu_check.sh
#
# 1. the tests marked `gpu` (fused loss vs float64 on the GPU, FSDP2's bf16 policy on a world of
#    one, compiled blocks, the memory plan against the measured peak);
# 2. `distillab bench` in bf16 at sequence 4,096, vocabulary 128,256: a 0.7B student with an
#    online 0.7B and an online 1.7B teacher (LM step vs a plain loop, MFU against the GPU's bf16
#    dense peak, KD step / (LM step + teacher forward), peak memory vs the memory plan), and the
#    0.7B student with compiled blocks (compile time = the warmup's extra seconds);
# 3. FSDP2 training steps of a 0.15B student with a 0.6B teacher across every GPU present (with one
#    GPU this is the FSDP code path on a world of one: multi-GPU sharding is not exercised).
# Everything lands in $OUT_DIR; benchmarks/README.md records the numbers with the GPU's name.
set -euo pipefail
OUT_DIR=${OUT_DIR:-gpu-check}
RUNS=${RUNS_DIR:-/tmp/distillab-gpu-runs}
mkdir -p "$OUT_DIR" "$RUNS"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 DISTILLAB_PROGRESS=0 DISTILLAB_CACHE=${DISTILLAB_CACHE:-$RUNS/cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
start=$(date +%s)

python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.txt" | tail -n 5

bench() { python3 -m distillab.cli bench --device cuda --precision bfloat16 --vocab-size 128256 --seq-len 4096 \
          --batch-size 4 --steps 8 --warmup 3 --json "$@"; }
bench --model llama-0.7b --teacher llama-0.7b > "$OUT_DIR/bench_0.7b_0.7b.json"
bench --model llama-0.7b --teacher llama-1.7b > "$OUT_DIR/bench_0.7b_1.7b.json"
bench --model llama-0.7b --compile > "$OUT_DIR/bench_0.7b_compiled.json"

cat > "$RUNS/fsdp.yaml" <<YAML
name: gpu-fsdp
run_dir: $RUNS/fsdp-student
data: {corpus: {source: packaged, name: python-stdlib}, tokenizer: {vocab_size: 4096}}
model: {name: qwen3-0.15b}
train: {device: cuda, precision: bfloat16, parallel: fsdp, processes: $GPUS, seq_len: 1024, batch_size: 8,
        token_budget: $((GPUS * 8 * 1024 * 40)), lr: 0.001, log_every: 10, eval_every: 1000, checkpoint_every: 20}
eval: {max_windows: 8}
YAML
python3 -m distillab.cli train "$RUNS/fsdp.yaml" --set name=gpu-fsdp-teacher --set run_dir="$RUNS/fsdp-teacher" \
    --set model.name=qwen3-0.6b --set train.processes=1 --set train.parallel=ddp \
    --set train.token_budget=$((8 * 1024 * 20)) 2>&1 | tail -n 2 | tee "$OUT_DIR/fsdp_teacher.log"
python3 -m distillab.cli train "$RUNS/fsdp.yaml" --dry-run --set kd.alpha=0.5 --set kd.teacher="$RUNS/fsdp-teacher/final" \
    --gpu "$(python3 -c 'import torch; from distillab.gpus import gpu_from_device_name as g; x = g(torch.cuda.get_device_name()); print(x.name if x else "h100-80gb")')" \
    | tee "$OUT_DIR/fsdp_memory_plan.txt"
torchrun --standalone --nproc_per_node "$GPUS" -m distillab.cli train "$RUNS/fsdp.yaml" --set kd.alpha=0.5 \
    --set kd.teacher="$RUNS/fsdp-teacher/final" 2>&1 | tail -n 3 | tee "$OUT_DIR/fsdp_train.log"
python3 - "$RUNS/fsdp-student/metrics.jsonl" <<'PY' | tee "$OUT_DIR/fsdp_steps.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = rows[-1]
print(f"fsdp steps: {last['step']} steps, last loss {last['loss']:.4f}, "
      f"{last.get('tokens_per_s', float('nan')):,.0f} tokens/s over the last window")
PY
[ "$GPUS" = 1 ] && echo "one GPU: the FSDP code path ran on a world of one; multi-GPU sharding was not exercised" \
    | tee -a "$OUT_DIR/fsdp_steps.txt"
echo "gpu_check: $(( $(date +%s) - start )) s" | tee "$OUT_DIR/wall.txt"
