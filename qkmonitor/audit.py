"""Audit a model's attention heads from its weights.

Composes the three parts: a source (qkmonitor.weights.sources) reads only the Q/K tensors, the table
(qkmonitor.weights.discovery) says where they are and how to split them into heads, and the
spectrum core (qkmonitor.spectrum) computes every statistic exactly.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import torch
from tqdm.auto import tqdm

from qkmonitor import __version__
from qkmonitor.errors import CorruptWeightsError, QKMonitorError, UnsupportedModelError
from qkmonitor.result import STATISTICS, AuditResult, HeadResult, ModelInfo
from qkmonitor.spectrum import HeadSpectra, head_spectra
from qkmonitor.weights.discovery import plan
from qkmonitor.weights.layout import AttentionLayer, layer_tensors, layer_weights
from qkmonitor.weights.live import full_weights, plan_live, transformers_model
from qkmonitor.weights.mla import mla_heads
from qkmonitor.weights.quantized import QuantizedSource, quantization_config
from qkmonitor.weights.sources import WeightSource, dtype_name, open_source

__all__ = [
    "DEVICES",
    "READ_AHEAD",
    "audit",
    "audit_live",
    "audit_source",
    "compute_device",
]

logger = logging.getLogger(__name__)

_FLOATS = ("F64", "F32", "F16", "BF16")  # storage dtypes whose values are the weights


def _mla_heads(layer: AttentionLayer, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    """An MLA layer's heads, factored through its latents (qkmonitor.weights.mla)."""
    mla = layer.mla
    return mla_heads(
        tensors,
        mla.names,
        mla.dims,
        layer.scale,
        q_latent_scale=mla.q_latent_scale,
        kv_latent_scale=mla.kv_latent_scale,
        dtype=dtype,
    )


#: how many layers the reader may hold ahead of the compute (each holds only its Q/K tensors)
READ_AHEAD = 2


def _read_ahead(
    source: WeightSource, layers: list[AttentionLayer], depth: int = READ_AHEAD
) -> Iterator[dict]:
    """Tensors of each layer in turn, read on CPU by one thread up to ``depth`` layers ahead of
    the consumer: the reads overlap the compute (an audit takes about max(read, compute)), and
    at most depth + 1 layers' tensors are held at once (depth queued, one being computed)."""
    queued = iter(layers)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(source.read, x.tensors, x.rows) for x in islice(queued, depth))
        while pending:
            tensors = pending.popleft().result()
            after = next(queued, None)
            if after is not None:
                pending.append(pool.submit(source.read, after.tensors, after.rows))
            yield tensors


#: the choices of ``audit(device=...)`` and ``qkmonitor audit --device``
DEVICES = ("auto", "cpu", "cuda", "mps")


def compute_device(device: str | torch.device = "auto") -> torch.device:
    """Where an audit computes: "auto" is CUDA when present, else the CPU. Refuses in one line
    a device that is absent, and MPS, which has no float64 (float32 misses the 1e-6 bar)."""
    name = str(device)
    kind = name.split(":")[0]
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in DEVICES:
        raise QKMonitorError(f"unknown device '{name}'; choose one of {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        built = (
            "no CUDA device is visible"
            if torch.backends.cuda.is_built()
            else (f"this torch ({torch.__version__}) is built without CUDA")
        )
        raise QKMonitorError(f"device '{name}' is not available: {built}; use --device cpu")
    if kind == "mps":
        raise QKMonitorError(
            "device 'mps' is not supported: MPS has no float64, and float32 misses the 1e-6 "
            "relative bar of the statistics (3e-5 on Llama-8B-shaped heads); use --device cpu"
        )
    return torch.device(name)


def audit_source(
    source: WeightSource,
    *,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> AuditResult:
    """Audit every attention head of an opened source (quantized checkpoints dequantized).

    Reads (and dequantization) run on CPU ahead of the compute (``READ_AHEAD`` layers); the
    statistics are computed on ``device`` (``compute_device``: "auto", "cpu", "cuda", ...)."""
    target = compute_device(device)
    if source.kind != "model" and quantization_config(source.config):
        source = QuantizedSource(source)
    shapes = source.shapes()
    try:
        layers, warnings = plan(source.config, shapes)
    except CorruptWeightsError as error:  # a Q/K weight in a format it cannot read says that
        if isinstance(source, QuantizedSource) and error.tensor is not None:
            source.check([error.tensor])
        raise
    if isinstance(source, QuantizedSource):
        source.check(layer_tensors(layers))  # a Q/K layout it cannot dequantize, before any work
    dtypes = source.dtypes()
    stored = {name: dtypes.get(name, "?") for name in layer_tensors(layers)}
    quantized = [(name, dtype) for name, dtype in stored.items() if dtype not in _FLOATS]
    if quantized:  # FP8/int weights without their scales would give meaningless numbers
        name, dtype = quantized[0]
        raise UnsupportedModelError(
            f"{name} is stored as {dtype}: a quantized weight without a quantization_config "
            "that qkmonitor reads; audit the unquantized (bf16/fp16/fp32) model"
        )
    q_and_k = list(dict.fromkeys(n for layer in layers for n in (layer.q, layer.k)))
    if isinstance(source, QuantizedSource):
        storage = source.storage_of(q_and_k)
    else:
        storage = "+".join(sorted({dtypes.get(n, "?").lower() for n in q_and_k}))
    total = source.byte_size(
        layer_tensors(layers), {n: r for layer in layers for n, r in layer.rows.items()}
    )
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="reading Q/K",
        disable=not progress,
        leave=False,
    )
    with bar:

        def tensors() -> Iterator[dict[str, torch.Tensor]]:
            for layer, read in zip(layers, _read_ahead(source, layers), strict=True):
                bar.update(source.byte_size(layer.tensors, layer.rows))
                yield read

        heads, used = _audit_layers(layers, tensors(), dtype, warnings, target)
    info = ModelInfo(
        source=source.name,
        kind=source.kind,
        model_type=getattr(source.config, "model_type", "unknown"),
        revision=getattr(source, "revision", None),
        sha=source.sha,
        dtype=dtypes.get(layers[0].q, ""),
        storage=storage,
        **_shape_info(layers),
        qkmonitor_version=__version__,
        warnings=warnings,
        not_audited=warnings.not_audited,
        device=used,
        compute_dtype=str(dtype).removeprefix("torch."),
    )
    return AuditResult(model=info, heads=heads)


def audit_live(
    model: torch.nn.Module,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
) -> AuditResult:
    """Audit a model in memory: plain, PEFT (LoRA merged), DDP-, accelerate- or
    compile-wrapped, held by a wrapper (SentenceTransformer), or sharded by FSDP1/FSDP2/ZeRO-3.
    The statistics are computed on ``device`` (``compute_device``), by default where the
    weights are.

    Sharded models are gathered one layer at a time (``qkmonitor.weights.live``): a collective,
    so every rank must call this, in the same order with respect to other collectives; called on
    one rank only, it waits forever for the others. Every rank gets the same result.
    """
    inner = transformers_model(model)
    layers, warnings = plan_live(model)
    seen_dtype: list[torch.dtype] = []

    def tensors() -> Iterator[dict[str, torch.Tensor]]:
        for layer in layers:
            with torch.no_grad(), full_weights(layer) as full:
                for name, tensor in full.items():
                    if not tensor.is_floating_point():
                        raise UnsupportedModelError(
                            f"{name} is held as {tensor.dtype} (a quantized model): not "
                            "supported; audit the unquantized model"
                        )
                seen_dtype.append(full[layer.plan.q].dtype)
                yield {name: tensor.detach() for name, tensor in full.items()}

    target = None if device is None else compute_device(device)
    plans = [layer.plan for layer in layers]
    heads, used = _audit_layers(plans, tensors(), dtype, warnings, target)
    info = ModelInfo(
        source=type(inner).__name__,
        kind="model",
        model_type=getattr(inner.config, "model_type", "unknown"),
        revision=None,
        sha=None,
        dtype=dtype_name(seen_dtype[0]),
        storage="+".join(sorted({dtype_name(d).lower() for d in seen_dtype})),
        **_shape_info([layer.plan for layer in layers]),
        qkmonitor_version=__version__,
        warnings=warnings,
        not_audited=warnings.not_audited,
        device=used,
        compute_dtype=str(dtype).removeprefix("torch."),
    )
    return AuditResult(model=info, heads=heads)


def _audit_layers(
    layers: list[AttentionLayer],
    tensors: Iterator[dict[str, torch.Tensor]],
    dtype: torch.dtype,
    warnings: list[str],
    device: torch.device | None,
) -> tuple[list[HeadResult], str]:
    """Every head's statistics, layer by layer, on ``device`` (None: where the tensors are),
    and that device's name; warns (and records) NaN/Inf heads."""
    heads: list[HeadResult] = []
    used = "" if device is None else str(device)
    for layer, raw in zip(layers, tensors, strict=True):
        if device is not None and device.type != "cpu":
            raw = {name: tensor.to(device, non_blocking=True) for name, tensor in raw.items()}
        elif device is not None:
            raw = {name: tensor.cpu() for name, tensor in raw.items()}
        if layer.mla is not None:
            stats = head_spectra(_mla_heads(layer, raw, dtype), dtype=dtype)
        else:
            # heads only split stay in their stored dtype: head_spectra converts them key head
            # by key head (a whole float64 layer in fresh memory costs ~10x the copy)
            wq, wk = layer_weights(layer, raw, dtype, stored_if_split=True)
            stats = head_spectra(wq, wk, layer.scale, dtype=dtype)
        used = used or str(stats.eig_mean.device)
        heads.extend(_rows(layer, stats))
    for head in heads:
        if not head.finite:
            warnings.append(
                f"{head.block} layer {head.layer} head {head.head}: NaN or Inf in its Q/K "
                "weights; its statistics are NaN"
            )
    for message in warnings:
        logger.warning(message)
    return heads, used


def _shape_info(layers: list[AttentionLayer]) -> dict:
    """ModelInfo's per-block shape fields."""
    return {
        "n_layers": _per_block(layers, lambda block: len(block)),
        "n_heads": _per_block(layers, lambda block: block[0].n_heads),
        "n_kv_heads": _per_block(layers, lambda block: block[0].n_kv_heads),
        "head_dim": _per_block(layers, lambda block: block[0].head_dim),
        "d_in": _per_block(layers, lambda block: block[0].d_in),
    }


def _per_block(layers: list[AttentionLayer], value) -> dict[str, int]:
    blocks: dict[str, list[AttentionLayer]] = {}
    for layer in layers:
        blocks.setdefault(layer.block, []).append(layer)
    return {name: value(block) for name, block in blocks.items()}


def _rows(layer: AttentionLayer, stats: HeadSpectra) -> Iterator[HeadResult]:
    group = layer.n_heads // layer.n_kv_heads
    columns = {name: getattr(stats, name).tolist() for name in STATISTICS}
    finite = stats.finite.tolist()
    eigvals = torch.view_as_real(stats.eigvals).tolist()
    for head in range(layer.n_heads):
        yield HeadResult(
            block=layer.block,
            layer=layer.layer,
            head=head,
            kv_head=head // group,
            **{name: values[head] for name, values in columns.items()},
            finite=finite[head],
            eigvals=[(re, im) for re, im in eigvals[head]],
        )


def audit(
    model: str | os.PathLike | torch.nn.Module,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    device: str | torch.device = "auto",
) -> AuditResult:
    """Per-head QK-eigenspectrum statistics of a model.

    Args:
        model: a Hub repo id (``"org/name"``), a local model folder, or a model in memory
            (``audit_live``: PEFT with LoRA on q/k merged; DDP-, accelerate-, compile-wrapped;
            a SentenceTransformer; FSDP/ZeRO-3-sharded, then called on every rank).
        revision: branch, tag or commit sha of a Hub repo; the sha read is recorded.
        token: Hub token for gated/private repos (default: HF_TOKEN / the saved login).
        allow_pickle: read ``.bin``/``.pt`` checkpoints with torch's weights_only loader
            when no safetensors exist (refused by default).
        dtype: computation dtype; float64 (default) agrees with a naive float64
            eigendecomposition to ~1e-12; float32 is faster but, on Llama-8B-shaped heads,
            off by up to 6e-7 in the statistics and 3e-6 (of the spectral radius) in eigvals.
        progress: show a progress bar while reading tensors.
        device: where the statistics are computed: "auto" (CUDA when present, else the CPU;
            a model in memory: where its weights are), "cpu", "cuda" or "cuda:N". Reads stay
            on CPU, ahead of the compute. float64 on every device: float32 misses the 1e-6
            bar (docs/benchmarks.md); MPS, which has no float64, is refused. The result
            records both (``result.model.device``, ``.compute_dtype``).

    Raises:
        qkmonitor.errors.QKMonitorError: a one-line explanation of bad input.
    """
    if isinstance(model, torch.nn.Module):
        if revision is not None:
            raise QKMonitorError("revision applies to Hub repos, not to a model in memory")
        return audit_live(model, dtype=dtype, device=None if device == "auto" else device)
    target = compute_device(device)  # refused before any request
    source = open_source(model, revision=revision, token=token, allow_pickle=allow_pickle)
    return audit_source(source, dtype=dtype, progress=progress, device=target)
