#!/usr/bin/env bash
# Checks for the first lent GPU, in a few minutes: the gpu-marked tests and the training-overhead
# benchmark. Run from a set-up checkout (bash scripts/setup.sh) on a CUDA machine:
#     bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
# Each block is delimited; a failing block is reported and the script goes on to the next one,
# then exits non-zero if any failed. Without CUDA it says so and exits 1 (no GPU figures).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
failed=()
export HF_HUB_OFFLINE=1

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; nothing measured"
  exit 1
fi
$PY -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

# ==== training (issue 21): gpu-marked tests, ZeRO-3, overhead benchmark ====================
echo "== training: gpu-marked tests (NCCL DDP, bf16, sdpa/flash vs eager, FSDP2)"
$PY -m pytest -q -m gpu tests/training/test_gpu.py || failed+=("training gpu tests")
echo "== training: DeepSpeed ZeRO-3 (real deepspeed, 2 processes, CPU accelerator)"
$PY -m pytest -q tests/training/test_zero3.py || failed+=("training zero3")
echo "== training: overhead of the monitor against sdpa (and flash where installed)"
timeout 300 $PY benchmarks/callback_overhead.py --steps 40 --logging-steps 10 --repeats 3 \
  --attn sdpa flash_attention_2 \
  || failed+=("training overhead benchmark")
# ==== end training ==========================================================================

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all blocks passed"
