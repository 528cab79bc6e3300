#!/usr/bin/env bash
# Checks that need a CUDA device, in one command, from any folder:
#     bash scripts/gpu_check.sh
# Each part is a delimited block owned by the part of the package it checks; any failure stops
# the script (set -e). Put the numbers it prints, with the card's name, in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible; nothing to check')"
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader || true

# ==== audit engine (issue 18 §1-2): audit(device="cuda") ======================================
# gpu-marked tests: the CUDA audit equals the CPU audit (float64, 1e-10), checkpoint and live
"$PYTHON" -m pytest -q -m gpu tests/test_audit.py
# the engine benchmark with CUDA timings beside the CPU ones and the read times
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} "$PYTHON" benchmarks/audit_engine.py \
    --device cuda --llama-layers 32 --deepseek-layers 4 --repeats 2
# ==== end audit engine ========================================================================

# ==== training (issue 21): gpu-marked tests, real ZeRO-3, overhead against sdpa/flash ========
# NCCL DDP on one GPU, bf16, sdpa/flash entropy and max logit equal to eager, FSDP2; the
# max-only pass (QK-Clip's every step) in the GPU's tiles against the full q k^T maximum
"$PYTHON" -m pytest -q -m gpu tests/training/test_gpu.py tests/test_entropy.py
# DeepSpeed ZeRO-3 for real (2 processes, DeepSpeed's CPU accelerator; skipped if not installed)
"$PYTHON" -m pytest -q tests/training/test_zero3.py
# the monitor's cost per step against the same training without it, on sdpa and flash
"$PYTHON" benchmarks/callback_overhead.py --steps 40 --logging-steps 10 --repeats 3 \
    --attn sdpa flash_attention_2
# the same at T=4096, where the max-only pass (QK-Clip's every step) and entropy weigh most
"$PYTHON" benchmarks/callback_overhead.py --length 4096 --batch 1 --steps 20 --logging-steps 10 \
    --repeats 3 --configs monitor qk_clip --attn sdpa flash_attention_2
# ==== end training ============================================================================
