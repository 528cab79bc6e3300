"""Quantized checkpoints: Q/K weights dequantized exactly as their format defines them.

``QuantizedSource(source)`` presents each quantized linear weight of a checkpoint under its plain
name (``...q_proj.weight``) with its logical (out, in) shape, and reads only the stored pieces of
the tensors asked for (packed values, scales, zero points, group indices). Dequantization is
computed in float64, where every format's product (q - z) * scale is exact. The formats, from
``config.json``'s ``quantization_config`` (W[o, i] is the dequantized nn.Linear weight):

- ``fp8`` (DeepSeek-V3, Qwen3-FP8; transformers' FineGrainedFP8): ``weight`` F8 and
  ``weight_scale_inv`` F32 of shape [ceil(out/bo), ceil(in/bi)] for ``weight_block_size``
  [bo, bi] (partial edge blocks included): W[o, i] = w[o, i] * scale_inv[o // bo, i // bi];
  without a block size one scale for the tensor.
- ``compressed-tensors``, formats ``float-quantized`` (FP8), ``int-quantized`` /
  ``naive-quantized`` (int8) and ``pack-quantized`` (int1-8 packed in int32): ``weight`` (or
  ``weight_packed`` + ``weight_shape``), ``weight_scale``, optional ``weight_zero_point`` and
  ``weight_g_idx``; W = (q - z) * scale with the scale per tensor, per output channel, per group
  of ``group_size`` inputs (column i in group g_idx[i], else i // group_size) or per block.
  Packing: element j of a row starts at bit j * bits of the row's little-endian int32 words,
  stored as q + 2^(bits-1); asymmetric zero points are packed the same way along the output dim.
- ``gptq`` (AutoGPTQ / GPTQModel, bits 2, 4, 8): ``qweight`` I32 (in * bits / 32, out), input
  i at bits (i % (32 / bits)) * bits of row i // (32 / bits); ``qzeros`` I32 (groups, out * bits
  / 32) packed the same way along out; ``scales`` (groups, out); ``g_idx`` (in) or i //
  group_size: W[o, i] = scales[g, o] * (q[i, o] - z[g, o]), g = g_idx[i], where the zero point
  is the stored one plus 1 in the original ``gptq`` checkpoint format (AutoGPTQ stored z - 1) and
  the stored one in ``gptq_v2``.
- ``awq`` version ``gemm`` (AutoAWQ, 4 bits): ``qweight`` I32 (in, out / 8), ``qzeros`` I32
  (groups, out / 8), ``scales`` (groups, out); output column 8 w + k sits in nibble
  [0, 4, 1, 5, 2, 6, 3, 7][k] of word w: W[o, i] = scales[i // gs, o] * (q[i, o] - z[i // gs, o]).

A row selection (``read(names, rows)``, see ``qkmonitor.weights.sources``) of an FP8 weight reads
only those rows of ``weight`` (and its whole, small scale); the formats that pack along the output
dimension (GPTQ, AWQ) or are not decoded row by row yet are read whole and then sliced.

Anything else (bitsandbytes, marlin/exllama/gemv layouts, NVFP4, 3-bit GPTQ, ...) is refused by
name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qkmonitor.errors import CorruptWeightsError, QKMonitorError, UnsupportedModelError
from qkmonitor.weights.sources import RowRanges, WeightSource, take_rows

__all__ = ["QuantizedSource", "quantization_config"]

_FP8 = ("F8_E4M3", "F8_E5M2")
_UNPACKED = ("float-quantized", "int-quantized", "naive-quantized")
_AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # output column k of a word -> its nibble


def quantization_config(config: Any) -> dict | None:
    """The config's quantization_config as a dict (transformers keeps a dict or an object)."""
    value = getattr(config, "quantization_config", None)
    if value is None or isinstance(value, dict):
        return value
    return value.to_dict() if hasattr(value, "to_dict") else dict(vars(value))


@dataclass(frozen=True)
class _Weight:
    """How one quantized linear weight is stored: its pieces and how to decode them."""

    shape: tuple[int, ...]  # logical (out, in)
    pieces: tuple[str, ...]  # stored tensor names to read
    decode: Callable[[dict[str, Tensor]], Tensor]
    storage: str
    error: QKMonitorError | None = None  # why it cannot be read, raised only if it is needed
    #: decode selected rows from pieces[0] read at those rows (the other pieces whole); None
    #: where the stored rows are not the weight's rows (then read whole, and sliced)
    decode_rows: Callable[[dict[str, Tensor], RowRanges], Tensor] | None = None


def _lazily(shape: Sequence[int], build: Callable[..., _Weight], *args: Any) -> _Weight:
    """build(*args), or a weight that refuses to be read, with the reason, if its layout is not one
    qkmonitor reads: a checkpoint's other quantized tensors (MoE experts, ...) must not stop the
    audit of its Q/K weights."""
    try:
        return build(*args)
    except QKMonitorError as error:
        return _Weight(tuple(shape), (), _raise(error), "unreadable", error)
    except (ValueError, TypeError, KeyError, IndexError) as error:  # shapes of another rank
        wrapped = UnsupportedModelError(f"cannot read this quantized weight layout ({error})")
        return _Weight(tuple(shape), (), _raise(wrapped), "unreadable", wrapped)


def _raise(error: QKMonitorError) -> Callable[[dict[str, Tensor]], Tensor]:
    def refuse(raw: dict[str, Tensor]) -> Tensor:
        raise error

    return refuse


def _unpack_rows(words: Tensor, bits: int, count: int) -> Tensor:
    """Values 0 .. 2^bits - 1 of each row of int32 words, element j at bit j * bits (LSB first)."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:  # no value spans two words
        shifts = torch.arange(0, 32, bits)
        values = (unsigned[..., None] >> shifts) & ((1 << bits) - 1)
        return values.flatten(-2)[..., :count]
    # dense packing of other widths: expand every word to its bits, regroup by value
    bit_array = (unsigned[..., None] >> torch.arange(32)) & 1
    bit_array = bit_array.flatten(-2)[..., : count * bits].unflatten(-1, (count, bits))
    return (bit_array << torch.arange(bits)).sum(-1)


def _expand(scale: Tensor, shape: tuple[int, int], block: tuple[int, int]) -> Tensor:
    """A per-block scale (ceil(out / bo), ceil(in / bi)) expanded to every element."""
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def _times_blocks(weight: Tensor, scale: Tensor, shape: tuple[int, int], block: tuple) -> Tensor:
    """weight * scale[o // bo, i // bi] in float64, in place on one padded copy of the weight."""
    (rows, cols), (bo, bi) = shape, block
    out = torch.zeros(scale.shape[0] * bo, scale.shape[1] * bi, dtype=torch.float64)
    out[:rows, :cols] = weight
    out.view(scale.shape[0], bo, scale.shape[1], bi).mul_(scale[:, None, :, None])
    return out[:rows, :cols]


def _float64(tensor: Tensor) -> Tensor:
    return tensor.to(torch.float64)


class QuantizedSource(WeightSource):
    """A source whose quantized linear weights read as float64, under their plain names.

    Wraps any WeightSource. ``storage`` names the format (e.g. ``fp8-block-128x128``,
    ``gptq-int4-g128``, ``compressed-tensors-int4-group32``, ``awq-int4-g128``). Raises
    UnsupportedModelError, one line, for a quantization method or layout it cannot read.
    """

    def __init__(self, source: WeightSource) -> None:
        self._source = source
        self.kind, self.name, self.sha, self.config = (
            source.kind,
            source.name,
            source.sha,
            source.config,
        )
        self.revision = getattr(source, "revision", None)
        self._config = quantization_config(source.config) or {}
        shapes, dtypes = source.shapes(), source.dtypes()
        method = str(self._config.get("quant_method", "")).lower()
        readers = {"fp8": self._fp8, "compressed-tensors": self._compressed, "gptq": self._gptq}
        readers["awq"] = self._awq
        if method not in readers:
            raise UnsupportedModelError(
                f"quantization method '{method or '?'}' is not supported; qkmonitor reads fp8, "
                "compressed-tensors, gptq and awq checkpoints (or audit the unquantized model)"
            )
        self._weights: dict[str, _Weight] = readers[method](shapes, dtypes)
        pieces = {piece for weight in self._weights.values() for piece in weight.pieces}
        self._shapes = {n: s for n, s in shapes.items() if n not in pieces}
        self._dtypes = {n: d for n, d in dtypes.items() if n not in pieces}
        for name, weight in self._weights.items():
            self._shapes[name], self._dtypes[name] = weight.shape, "F64"
        formats = sorted({w.storage for w in self._weights.values() if w.error is None})
        self.storage = "+".join(formats) if formats else method

    # -- WeightSource ---------------------------------------------------------------------------

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtypes(self) -> dict[str, str]:
        return dict(self._dtypes)

    def byte_size(self, names: Iterable[str], rows: Mapping[str, RowRanges] | None = None) -> int:
        names = list(names)
        return self._source.byte_size(self._pieces(names), self._piece_rows(names, rows))

    def read(
        self, names: Iterable[str], rows: Mapping[str, RowRanges] | None = None
    ) -> dict[str, Tensor]:
        names, rows = list(names), rows or {}
        self.check(names)
        raw = self._source.read(self._pieces(names), self._piece_rows(names, rows))
        out = {}
        for name in names:
            weight = self._weights.get(name)
            if weight is None:
                out[name] = raw[name]
            elif name in rows and weight.decode_rows is not None:
                out[name] = weight.decode_rows(raw, rows[name])
            elif name in rows:
                out[name] = take_rows(weight.decode(raw), rows[name], name)
            else:
                out[name] = weight.decode(raw)
        return out

    def _piece_rows(
        self, names: list[str], rows: Mapping[str, RowRanges] | None
    ) -> dict[str, RowRanges]:
        """The row selection of the stored pieces that hold the selected weights' rows."""
        out: dict[str, RowRanges] = {}
        for name, ranges in (rows or {}).items():
            weight = self._weights.get(name)
            if name not in names or (weight is not None and weight.decode_rows is None):
                continue
            out[name if weight is None else weight.pieces[0]] = ranges
        return out

    def check(self, names: Iterable[str]) -> None:
        """Raise, one line naming the tensor, if any of these cannot be dequantized."""
        for name in names:
            weight = self._weights.get(name)
            if weight is not None and weight.error is not None:
                raise type(weight.error)(f"{name}: {weight.error}")

    def storage_of(self, names: Iterable[str]) -> str:
        """The storage formats of these tensors, e.g. "fp8-block-128x128" or "bf16"."""
        kinds = {
            self._weights[n].storage if n in self._weights else self._dtypes[n].lower()
            for n in names
        }
        return "+".join(sorted(kinds))

    def _pieces(self, names: Iterable[str]) -> list[str]:
        pieces: list[str] = []
        for name in names:
            weight = self._weights.get(name)
            pieces.extend(weight.pieces if weight else (name,))
        return list(dict.fromkeys(pieces))

    # -- formats --------------------------------------------------------------------------------

    def _fp8(self, shapes: Mapping, dtypes: Mapping) -> dict[str, _Weight]:
        block = self._config.get("weight_block_size")
        if block is not None and (
            len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)
        ):
            raise UnsupportedModelError(f"fp8 weight_block_size {block!r} is not two sizes")
        out = {}
        for scale_name in shapes:
            if scale_name.endswith(".weight_scale_inv"):
                name = scale_name.removesuffix("_scale_inv")
                guess = shapes.get(name, ())
                out[name] = _lazily(guess, self._fp8_weight, name, block, shapes, dtypes)
        return out

    @staticmethod
    def _fp8_weight(name: str, block: list | None, shapes: Mapping, dtypes: Mapping) -> _Weight:
        scale_name = f"{name}_scale_inv"
        if dtypes.get(name) not in _FP8 or len(shapes.get(name, ())) != 2:
            raise UnsupportedModelError(
                f"stored as {dtypes.get(name)} {tuple(shapes.get(name, ()))} with a "
                "weight_scale_inv; qkmonitor reads 2-d F8_E4M3/F8_E5M2 weights"
            )
        shape, scale_shape = tuple(shapes[name]), tuple(shapes[scale_name])
        _float_scale(scale_name, dtypes[scale_name])
        if block is None:
            if math.prod(scale_shape) != 1:
                raise CorruptWeightsError(
                    f"{scale_name} has shape {scale_shape}; without weight_block_size the fp8 "
                    "scale is one value"
                )
            storage = "fp8-tensor"
        else:
            blocks = tuple(math.ceil(size / b) for size, b in zip(shape, block, strict=True))
            if scale_shape != blocks:
                raise CorruptWeightsError(
                    f"{scale_name} has shape {scale_shape}, {blocks} expected for {shape} in "
                    f"{block[0]}x{block[1]} blocks"
                )
            storage = f"fp8-block-{block[0]}x{block[1]}"

        def decode(raw: dict[str, Tensor]) -> Tensor:
            scale = _float64(raw[scale_name])
            if block is None:
                return _float64(raw[name]) * scale.reshape(())
            return _times_blocks(raw[name], scale, shape, tuple(block))

        def decode_rows(raw: dict[str, Tensor], ranges: RowRanges) -> Tensor:
            if block is None:
                return decode(raw)  # one scale: the selected rows decode alone
            block_of = torch.cat([torch.arange(a, b) for a, b in ranges]) // block[0]
            scale = _float64(raw[scale_name])[block_of].repeat_interleave(block[1], 1)
            return _float64(raw[name]) * scale[:, : shape[1]]  # the same products as decode

        return _Weight(shape, (name, scale_name), decode, storage, decode_rows=decode_rows)

    def _compressed(self, shapes: Mapping, dtypes: Mapping) -> dict[str, _Weight]:
        fmt = str(self._config.get("format", "dense"))
        groups = self._config.get("config_groups") or {}
        out = {}
        for scale_name in shapes:
            if not scale_name.endswith(".weight_scale"):
                continue
            module = scale_name.removesuffix(".weight_scale")
            packed = f"{module}.weight_packed" in shapes
            if packed or dtypes.get(f"{module}.weight") in (*_FP8, "I8"):
                guess = shapes.get(f"{module}.weight_packed" if packed else f"{module}.weight")

                def build(module=module, packed=packed) -> _Weight:
                    args = _group_args(groups, module)
                    group_format = str(args.pop("__format__", None) or fmt)
                    wanted = ("pack-quantized",) if packed else _UNPACKED
                    if group_format not in wanted:
                        raise UnsupportedModelError(
                            f"compressed-tensors format '{group_format}' is not supported "
                            "(qkmonitor reads pack-quantized, float-quantized, int-quantized)"
                        )
                    make = _packed_weight if packed else _unpacked_weight
                    return make(module, args, shapes, dtypes)

                out[f"{module}.weight"] = _lazily(guess, build)
        return out

    def _gptq(self, shapes: Mapping, dtypes: Mapping) -> dict[str, _Weight]:
        config = self._config
        fmt = str(config.get("checkpoint_format") or config.get("format") or "gptq").lower()
        bits = config.get("bits")
        if fmt not in ("gptq", "gptq_v2") or bits not in (2, 4, 8):
            raise UnsupportedModelError(
                f"GPTQ checkpoint format '{fmt}' with {bits} bits is not supported; qkmonitor "
                "reads the gptq and gptq_v2 formats with 2, 4 or 8 bits"
            )
        out = {}
        for qweight in shapes:
            if not qweight.endswith(".qweight"):
                continue
            module = qweight.removesuffix(".qweight")
            rows, *rest = shapes[qweight]
            guess = (*rest[-1:], rows * 32 // bits)  # (out, in) when 2-d
            weight = _lazily(guess, self._gptq_weight, module, fmt, bits, shapes, dtypes)
            out[f"{module}.weight"] = weight
        return out

    def _gptq_weight(
        self, module: str, fmt: str, bits: int, shapes: Mapping, dtypes: Mapping
    ) -> _Weight:
        per_word = 32 // bits
        names = _require(module, ("qweight", "qzeros", "scales"), shapes)
        g_idx = f"{module}.g_idx" if f"{module}.g_idx" in shapes else None
        rows, out_features = shapes[names[0]]
        in_features = rows * per_word
        n_groups = shapes[names[2]][0]
        group_size = _group_size(self._config.get("group_size"), in_features, n_groups, module)
        _expect(names[1], shapes, (n_groups, math.ceil(out_features / per_word)))
        _expect(names[2], shapes, (n_groups, out_features))
        _float_scale(names[2], dtypes[names[2]])
        if g_idx:
            _expect(g_idx, shapes, (in_features,))
        plus_one = fmt == "gptq"

        def decode(raw: dict[str, Tensor]) -> Tensor:
            q = _unpack_rows(raw[names[0]].t(), bits, in_features)  # (out, in)
            zeros = _unpack_rows(raw[names[1]], bits, out_features) + plus_one  # (groups, out)
            scales = _float64(raw[names[2]])  # (groups, out)
            group = raw[g_idx].to(torch.int64) if g_idx else torch.arange(in_features) // group_size
            if group.numel() and (group.min() < 0 or group.max() >= scales.shape[0]):
                raise CorruptWeightsError(f"{g_idx} names groups that do not exist")
            return scales[group].t() * (q - zeros[group].t())

        pieces = (*names, g_idx) if g_idx else names
        label = f"g{group_size}" if group_size < in_features else "channel"
        storage = f"gptq{'_v2' if not plus_one else ''}-int{bits}-{label}"
        return _Weight((out_features, in_features), pieces, decode, storage)

    def _awq(self, shapes: Mapping, dtypes: Mapping) -> dict[str, _Weight]:
        config = self._config
        version = str(config.get("version") or config.get("format") or "gemm").lower()
        bits = config.get("bits", config.get("w_bit"))
        if version != "gemm" or bits != 4:
            raise UnsupportedModelError(
                f"AWQ version '{version}' with {bits} bits is not supported; qkmonitor reads "
                "4-bit AWQ in the gemm layout"
            )
        out = {}
        for qweight in shapes:
            if not qweight.endswith(".qweight"):
                continue
            module = qweight.removesuffix(".qweight")
            rows, *rest = shapes[qweight]
            guess = (*(8 * w for w in rest[-1:]), rows)  # (out, in) when 2-d
            out[f"{module}.weight"] = _lazily(guess, self._awq_weight, module, shapes, dtypes)
        return out

    def _awq_weight(self, module: str, shapes: Mapping, dtypes: Mapping) -> _Weight:
        names = _require(module, ("qweight", "qzeros", "scales"), shapes)
        in_features, words = shapes[names[0]]
        out_features = words * 8
        n_groups = shapes[names[2]][0]
        group_size = _group_size(self._config.get("group_size"), in_features, n_groups, module)
        _expect(names[1], shapes, (n_groups, words))
        _expect(names[2], shapes, (n_groups, out_features))
        _float_scale(names[2], dtypes[names[2]])

        def decode(raw: dict[str, Tensor]) -> Tensor:
            order = torch.tensor(_AWQ_NIBBLE).repeat(words) + torch.arange(out_features) // 8 * 8
            q = _unpack_rows(raw[names[0]], 4, out_features)[:, order]  # (in, out)
            zeros = _unpack_rows(raw[names[1]], 4, out_features)[:, order]  # (groups, out)
            group = torch.arange(in_features) // group_size
            return (_float64(raw[names[2]])[group] * (q - zeros[group])).t()

        storage = f"awq-int4-g{group_size}"
        return _Weight((out_features, in_features), names, decode, storage)


def _require(module: str, suffixes: tuple[str, ...], shapes: Mapping) -> tuple[str, ...]:
    names = tuple(f"{module}.{suffix}" for suffix in suffixes)
    missing = [name for name in names if name not in shapes]
    if missing:
        raise CorruptWeightsError(f"quantized weight {module} has no {missing[0]}")
    return names


def _expect(name: str, shapes: Mapping, shape: tuple[int, ...]) -> None:
    if tuple(shapes[name]) != tuple(shape):
        raise CorruptWeightsError(
            f"{name} has shape {tuple(shapes[name])}, {tuple(shape)} expected from its weight"
        )


def _float_scale(name: str, dtype: str) -> None:
    if dtype not in ("F64", "F32", "F16", "BF16"):
        raise UnsupportedModelError(f"{name} is stored as {dtype}; qkmonitor reads float scales")


def _group_size(configured: Any, in_features: int, n_groups: int, module: str) -> int:
    """Group size from the config, checked against the number of scale rows."""
    size = in_features if configured in (None, -1) else int(configured)
    if size <= 0 or math.ceil(in_features / size) != n_groups:
        raise CorruptWeightsError(
            f"{module}: {n_groups} scale groups do not fit {in_features} inputs in groups of "
            f"{configured}"
        )
    return size


def _group_args(groups: Mapping, module: str) -> dict:
    """The weight quantization args of the config group whose targets match the module.

    compressed-tensors' precedence: an exact module name, then a ``re:`` pattern, then a layer
    class name (Q/K projections are Linear layers). Two matching groups at the same level with
    different args are ambiguous and refused.
    """
    levels: dict[int, list[dict]] = {}
    for group in groups.values():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not weights:
            continue
        for target in group.get("targets", []):
            if target == module:
                level = 0
            elif target.startswith("re:") and re.match(target[3:], module):
                level = 1
            elif target == "Linear":
                level = 2
            else:
                continue
            levels.setdefault(level, []).append({**weights, "__format__": group.get("format")})
    for level in sorted(levels):
        found = [dict(args) for args in {repr(a): a for a in levels[level]}.values()]
        if len(found) > 1:
            raise UnsupportedModelError(
                f"{module}: several compressed-tensors config groups match it; cannot tell "
                "which quantization applies"
            )
        return found[0]
    raise UnsupportedModelError(
        f"{module} has quantized weights but no compressed-tensors config group names it"
    )


def _scheme(module: str, args: Mapping, shape: tuple[int, int], scale_shape: tuple) -> tuple:
    """(label, expand): the strategy's name and a function spreading the scale over W."""
    strategy = str(args.get("strategy") or "tensor")
    rows, cols = shape
    if strategy == "tensor" and math.prod(scale_shape) == 1:
        return "tensor", lambda s, g: s.reshape(1, 1)
    if strategy == "channel" and tuple(scale_shape) in ((rows, 1), (rows,)):
        return "channel", lambda s, g: s.reshape(rows, 1)
    if strategy == "group":
        size = int(args.get("group_size") or 0)
        if size > 0 and tuple(scale_shape) == (rows, math.ceil(cols / size)):

            def by_group(s: Tensor, g_idx: Tensor | None) -> Tensor:
                group = torch.arange(cols) // size if g_idx is None else g_idx.to(torch.int64)
                if group.numel() and (group.min() < 0 or group.max() >= s.shape[1]):
                    raise CorruptWeightsError(f"{module}.weight_g_idx names missing groups")
                return s[:, group]

            return f"group{size}", by_group
    if strategy == "block":
        block = tuple(args.get("block_structure") or ())
        if len(block) == 2 and tuple(scale_shape) == tuple(
            math.ceil(n / b) for n, b in zip(shape, block, strict=True)
        ):
            return f"block-{block[0]}x{block[1]}", lambda s, g: _expand(s, shape, block)
    raise UnsupportedModelError(
        f"{module}: compressed-tensors strategy '{strategy}' with scale shape "
        f"{tuple(scale_shape)} for weight {shape} is not supported"
    )


def _quant_args(module: str, args: Mapping, *, packed: bool) -> int:
    bits, kind = int(args.get("num_bits", 8)), str(args.get("type", "int"))
    if packed and (kind != "int" or not 1 <= bits <= 8):
        raise UnsupportedModelError(f"{module}: pack-quantized {kind}{bits} is not supported")
    if args.get("dynamic") not in (None, False):
        raise UnsupportedModelError(f"{module}: dynamic weight quantization has no stored scale")
    return bits


def _optional(module: str, suffix: str, shapes: Mapping) -> str | None:
    name = f"{module}.{suffix}"
    return name if name in shapes else None


def _group_index(module: str, label: str, shapes: Mapping) -> str | None:
    """weight_g_idx (activation order: input i in group g_idx[i]), meaningful for groups only."""
    name = _optional(module, "weight_g_idx", shapes)
    if name and not label.startswith("group"):
        raise UnsupportedModelError(f"{name} comes with a {label} scale; cannot tell its meaning")
    return name


def _packed_weight(module: str, args: dict, shapes: Mapping, dtypes: Mapping) -> _Weight:
    bits = _quant_args(module, args, packed=True)
    packed, scale = f"{module}.weight_packed", f"{module}.weight_scale"
    shape_name = _require(module, ("weight_shape",), shapes)[0]
    rows, words = shapes[packed]
    scale_shape = tuple(shapes[scale])
    if args.get("strategy") == "group" and args.get("group_size"):
        cols = scale_shape[-1] * int(args["group_size"])  # exact: groups must divide in
    else:
        cols = words * 32 // bits  # exact unless in is not a multiple of 32 / bits: checked
    label, expand = _scheme(module, args, (rows, cols), scale_shape)
    _float_scale(scale, dtypes[scale])
    zero = _optional(module, "weight_zero_point", shapes)
    g_idx = _group_index(module, label, shapes)
    symmetric = args.get("symmetric", True)
    if not symmetric and zero is None:
        raise CorruptWeightsError(f"{module} is asymmetric but has no weight_zero_point")

    def decode(raw: dict[str, Tensor]) -> Tensor:
        stored = tuple(int(v) for v in raw[shape_name].reshape(-1).tolist())
        if stored != (rows, cols):
            raise UnsupportedModelError(
                f"{module}: weight_shape {stored} is not the {(rows, cols)} its packing implies; "
                f"inputs that are not a multiple of {32 // bits} are not supported"
            )
        q = _unpack_rows(raw[packed], bits, cols) - (1 << (bits - 1))
        scale_full = expand(_float64(raw[scale]), raw.get(g_idx) if g_idx else None)
        if zero is None or symmetric:
            return q * scale_full
        z = raw[zero]
        if z.dtype == torch.int32 and label != "tensor":  # packed along the output dim
            n = scale_shape[1] if len(scale_shape) == 2 else 1
            z = _unpack_rows(z.t(), bits, rows).t()[:, :n] - (1 << (bits - 1))
        return (q - expand(_float64(z), raw.get(g_idx) if g_idx else None)) * scale_full

    pieces = tuple(n for n in (packed, scale, shape_name, zero, g_idx) if n)
    storage = f"compressed-tensors-int{bits}-{label}"
    return _Weight((rows, cols), pieces, decode, storage)


def _unpacked_weight(module: str, args: dict, shapes: Mapping, dtypes: Mapping) -> _Weight:
    bits = _quant_args(module, args, packed=False)
    name, scale = f"{module}.weight", f"{module}.weight_scale"
    shape = tuple(shapes[name])
    if len(shape) != 2:
        raise UnsupportedModelError(f"{name} has shape {shape}; qkmonitor reads 2-d weights")
    label, expand = _scheme(module, args, shape, tuple(shapes[scale]))
    _float_scale(scale, dtypes[scale])
    zero = _optional(module, "weight_zero_point", shapes)
    g_idx = _group_index(module, label, shapes)
    asymmetric = zero is not None and not args.get("symmetric", True)

    def decode(raw: dict[str, Tensor]) -> Tensor:
        g = raw.get(g_idx) if g_idx else None
        q = _float64(raw[name])
        if asymmetric:
            q = q - expand(_float64(raw[zero]), g)
        return q * expand(_float64(raw[scale]), g)

    pieces = tuple(n for n in (name, scale, zero if asymmetric else None, g_idx) if n)
    dtype = "fp8" if dtypes[name] in _FP8 else f"int{bits}"
    return _Weight(shape, pieces, decode, f"compressed-tensors-{dtype}-{label}")
