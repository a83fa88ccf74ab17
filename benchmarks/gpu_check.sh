#!/usr/bin/env bash
# The GPU check of distillab: <= 10 minutes on one GPU, installs nothing, needs no network. Every figure
# goes to one JSON (benchmarks/gpu_check.py describes them; benchmarks/README.md records them with the
# GPU's name). Run from the repository root on a CUDA machine with the project's requirements installed:
#
#   OUT=gpu_check.json benchmarks/gpu_check.sh
#
#   bench       0.7B student + online 1.7B teacher, bf16, sequence 4,096: MFU (target >= 40 %), LM step vs
#               a plain loop (>= 1.0x), KD / (LM + teacher forward) (<= 1.05), memory plan vs peak (+-15 %)
#   checkpoint  the 0.7B student's sharded (DCP) checkpoint: save, async save, load and HF export seconds
#   gpu_tests   pytest -m gpu tests/test_gpu.py
set -euo pipefail
OUT=${OUT:-gpu_check.json}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 DISTILLAB_PROGRESS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
timeout 600 python3 benchmarks/gpu_check.py --out "$OUT" "$@"
python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(r.get('gpu'), r.get('wall_seconds'))" "$OUT"
