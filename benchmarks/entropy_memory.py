"""Peak memory of measuring attention entropy vs an SDPA forward of the same attention.

    .venv/bin/python benchmarks/entropy_memory.py [--length 4096] [--repeats 2]

For each shape at sequence length T (causal, as in a decoder), both run side by side in this
process on the same query/key/value tensors:

- baseline: ``torch.nn.functional.scaled_dot_product_attention`` (the model's own attention);
- qkmonitor: ``attention_entropy`` with its default blocks (what EntropyCapture runs).

Reported: the peak resident memory above what was resident before the call (the inputs), read
from the kernel (Linux: /proc/self/clear_refs resets VmHWM), so every allocation counts,
kernel workspaces included. Target: qkmonitor <= 1.5x the baseline. For scale, the bytes of the
float32 T x T probability matrix that eager attention materializes are printed too.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from qkmonitor.entropy import attention_entropy

SHAPES = [  # batch, query heads, key heads, head_dim, dtype
    (1, 1, 1, 64, torch.float32),
    (1, 8, 8, 64, torch.float32),
    (1, 8, 8, 64, torch.bfloat16),
    (1, 32, 8, 128, torch.bfloat16),
    (2, 16, 16, 64, torch.bfloat16),
]
MIB = 2**20
_LIBC = ctypes.CDLL("libc.so.6")


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def peak_extra(run: Callable[[], object], repeats: int) -> tuple[int, float]:
    """Smallest peak resident bytes above the starting point over `repeats` runs, and seconds."""
    best, seconds = None, 0.0
    for _ in range(repeats):
        gc.collect()
        _LIBC.malloc_trim(0)
        start = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        began = time.perf_counter()
        run()
        seconds = time.perf_counter() - began
        extra = _status("VmHWM") - start
        best = extra if best is None else min(best, extra)
    return best, seconds


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, enable_gqa=True
    )


def entropy(query: torch.Tensor, key: torch.Tensor) -> object:
    return attention_entropy(query, key, query.shape[-1] ** -0.5, is_causal=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--length", type=int, default=4096, help="sequence length T (default: 4096)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per measurement, least peak kept (default: 2)"
    )
    args = parser.parse_args()
    length = args.length
    print(f"T={length}, causal, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    worst = 0.0
    for batch, heads, kv_heads, head_dim, dtype in SHAPES:
        generator = torch.Generator().manual_seed(0)
        query = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
        key = torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(dtype)
        value = torch.randn_like(key)
        sdpa(query[:, :, :64], key[:, :, :64], value[:, :, :64])  # warm-up thread pools
        entropy(query[:, :, :64], key[:, :, :64])
        base, base_seconds = peak_extra(partial(sdpa, query, key, value), args.repeats)
        ours, our_seconds = peak_extra(partial(entropy, query, key), args.repeats)
        ratio = ours / base
        worst = max(worst, ratio)
        matrix = batch * heads * length * length * 4
        print(
            f"B={batch} H={heads} Hkv={kv_heads} d={head_dim} {str(dtype)[6:]:8s} "
            f"sdpa {base / MIB:6.1f} MiB ({base_seconds:5.2f} s)  "
            f"entropy {ours / MIB:6.1f} MiB ({our_seconds:5.2f} s)  ratio {ratio:.2f}x  "
            f"[eager probabilities alone: {matrix / MIB:.0f} MiB]"
        )
    print(f"worst ratio {worst:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
