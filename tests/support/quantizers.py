"""Quantizers written from the formats' definitions (not qkmonitor's readers), for tests."""

from __future__ import annotations

import math

import torch


def linear_modules(tensors: dict) -> list[str]:
    """Module names of the decoder's linear weights (what quantizers convert)."""
    return [
        n.removesuffix(".weight") for n, t in tensors.items() if t.ndim == 2 and ".layers." in n
    ]


def fp8_block(tensors: dict, block: tuple[int, int]) -> tuple[dict, dict]:
    """(quantized, dequantized) tensors: every linear weight as F8_E4M3 with a float32
    ``weight_scale_inv`` per block (max |w| / 448, partial edge blocks included), and the float64
    values those stand for (w8 * scale)."""
    quantized, dequantized = dict(tensors), dict(tensors)
    for module in linear_modules(tensors):
        w = tensors[f"{module}.weight"].double()
        rows, cols = w.shape
        scale = torch.zeros(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                part = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
                scale[i, j] = float(part.abs().max()) / 448
        full = scale.double().repeat_interleave(block[0], 0)[:rows]
        full = full.repeat_interleave(block[1], 1)[:, :cols]
        w8 = (w / full).to(torch.float8_e4m3fn)
        quantized[f"{module}.weight"] = w8
        quantized[f"{module}.weight_scale_inv"] = scale
        dequantized[f"{module}.weight"] = w8.double() * full
    return quantized, dequantized
