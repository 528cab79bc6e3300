"""Attention entropy and max logit of a live transformers model, measured in its ordinary forwards.

``EntropyCapture(model)`` attaches to a model (plain, PEFT, DDP-, FSDP1/2- or compile-wrapped, or
held by a wrapper such as SentenceTransformer, whose ``[0].auto_model`` is measured).
While it records (``with capture.recording(): model(**batch)``), every attention module's query
and key are measured by ``qkmonitor.entropy.attention_entropy`` and the per-head sums and maximum
scores are accumulated per (block, layer); ``collect()`` hands them out, and ``softcaps`` the
softcap each layer applies (``qkmonitor.entropy.softcapped`` turns a score into the logit).
``recording(entropy=False)`` measures the maximum scores only (no softmax). Outside recording
nothing of the model is changed: no hooks, the model's own attention implementation, zero
overhead.

Two routes, both exact (the measured logits are the ones the model softmaxes):

- ``interface``: models that call transformers' ``AttentionInterface`` (most of them; not Falcon
  and BLOOM). While recording, the
  interface's entry for the model's implementation (``sdpa``, ``eager``, or a flash attention:
  ``flash_attention_2/3/4`` or a Hub kernel wrapped by transformers' ``flash_attention_forward``)
  points to a function that measures, then calls the original with unchanged arguments. The
  model, its config and its implementation name are untouched, so outputs and gradients are
  bit-identical. Masks are read in the implementation's own format: a 4D mask for sdpa and
  eager; for flash, the 2D padding mask, ``cu_seq_lens_*`` or packed ``position_ids``, the
  module's ``is_causal`` and the ``sliding_window`` argument, exactly as transformers hands
  them to the kernel (``qkmonitor.segments``). Flex attention (a BlockMask) is not supported.
- ``hooks``: Falcon and BLOOM compute attention inside their modules. A forward hook on the
  fused ``query_key_value`` projection takes the real q/k of the pass (LoRA and its dropout
  included), and a pre-hook on the attention module its mask, ALiBi and rotary embeddings;
  logits are rebuilt as the module builds them.

Which rows count (docs/metrics.md): queries with at least one allowed key, minus padding queries.
transformers' 4D masks do not mask padded *query* rows (a right-padded token still attends to the
real tokens), so a self-attention query is taken as padding when it may not attend to its own
position (the padding mask hides its key; causal, sliding-window and bidirectional patterns
always allow it); flash's padding mask marks padding queries directly. A cross-attention query
reuses the validity found by the self-attention of the same decoder layer. (Under flash,
transformers also unpads cross-attention queries with the encoder's padding mask, its last Tq
columns; queries it drops attend to nothing and are not counted.) Decoder tokens are
padding only where the model masks them (``decoder_attention_mask``).

Each attention module is measured at most once per forward of the model, so that gradient
checkpointing's recomputation (during backward) is not counted twice.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qkmonitor.entropy import EntropySums, allowed_entries, attention_entropy
from qkmonitor.errors import QKMonitorError
from qkmonitor.segments import SegmentMask
from qkmonitor.weights import transformers_private as hf
from qkmonitor.weights.live import LiveLayer, plan_live, transformers_model

__all__ = ["EntropyCapture", "LayerKey"]

LayerKey = tuple[str, int]  # (block, layer): the stack names of qkmonitor.weights.architectures

#: attention module -> the capture recording it (filled only while recording)
_RECORDING: weakref.WeakKeyDictionary[nn.Module, EntropyCapture] = weakref.WeakKeyDictionary()


def _module_global(module: nn.Module, name: str) -> Any:
    """A name as the module's forward sees it (its modeling file), or None."""
    return inspect.unwrap(type(module).forward).__globals__.get(name)


@dataclass
class _Installed:
    """A measuring function in transformers' attention interface, for one implementation."""

    previous: Callable[..., Any] | None  # the entry it replaced; None for eager (the module's own)
    style: str  # "sdpa", "eager" or "flash": how this implementation reads its arguments
    captures: int  # how many captures are recording through it


#: implementation name -> its measuring function's state, while any capture records with it
_INSTALLED: dict[str, _Installed] = {}


def _registered(name: str) -> Callable[..., Any] | None:
    """The attention function registered for `name`, as it was before qkmonitor's wrapper."""
    installed = _INSTALLED.get(name)
    return installed.previous if installed else ALL_ATTENTION_FUNCTIONS.get(name)


def _implementation_style(name: str) -> str | None:
    """How an attention implementation takes its mask: "sdpa" or "eager" (a 4D mask), "flash"
    (transformers' flash_attention_forward with its 2D/varlen masks), or None (unsupported)."""
    if name in ("sdpa", "eager"):
        return name
    if (
        ALL_MASK_ATTENTION_FUNCTIONS.get(name) is flash_attention_mask
        and _registered(name) is flash_attention_forward
    ):
        return "flash"
    return None


def _measuring_attention(name: str) -> Callable[..., Any]:
    """Measures for the capture recording the module (if any), then runs the original."""

    @torch.compiler.disable  # eager, outside a torch.compile graph, and no guards on who records
    def measure(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        attention_mask: Tensor | None,
        kwargs: dict[str, Any],
    ) -> None:
        installed = _INSTALLED.get(name)  # None: called after the last capture stopped
        capture = _RECORDING.get(module)
        if capture is not None and installed is not None:
            capture._measure_interface(module, query, key, attention_mask, installed.style, kwargs)

    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        measure(module, query, key, attention_mask, kwargs)
        function = _registered(name) or _module_global(module, "eager_attention_forward")
        return function(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"qkmonitor_measuring_{name}"
    return attention


def _install(name: str) -> None:
    """Route `name` through a measuring function (reference-counted over captures)."""
    installed = _INSTALLED.get(name)
    if installed is None:
        style = _implementation_style(name)
        assert style is not None, name
        functions = hf.attention_functions()
        _INSTALLED[name] = _Installed(functions.get(name), style, 1)
        functions[name] = _measuring_attention(name)
    else:
        installed.captures += 1


def _uninstall(name: str) -> None:
    """Undo one `_install`; the last one restores transformers' own entry."""
    installed = _INSTALLED[name]
    installed.captures -= 1
    if installed.captures == 0:
        del _INSTALLED[name]
        functions = hf.attention_functions()
        if installed.previous is None:
            functions.pop(name, None)
        else:
            functions[name] = installed.previous


def _flash_segments(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    mask: Tensor | None,
    kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor, SegmentMask | None, bool]:
    """What transformers' flash_attention_forward gives the kernel, in the capture's terms.

    Returns (query, key, segments, is_causal); query and key are flattened to one row when the
    kernel runs on explicit ``cu_seq_lens`` (it flattens the batch then). segments is None when
    the plain causal (or full) pattern describes every row.
    """
    is_causal = kwargs.get("is_causal")
    is_causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    window = kwargs.get("sliding_window")
    (batch, heads, q_len, head_dim), k_len = query.shape, key.shape[2]
    pattern = {"is_causal": is_causal, "window": window}
    if mask is not None:  # the padding mask wins over packing, as in _flash_attention_forward
        segments = SegmentMask.from_padding(mask, q_len, **pattern)
        return query, key, segments, False
    bounds = [kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k")]
    lengths = [kwargs.get(name) for name in ("max_length_q", "max_length_k")]
    if all(value is not None for value in (*bounds, *lengths)):
        query = query.transpose(0, 1).reshape(1, heads, batch * q_len, head_dim)
        key = key.transpose(0, 1).reshape(1, key.shape[1], batch * k_len, head_dim)
        segments = SegmentMask.from_boundaries(*bounds, batch * q_len, batch * k_len, **pattern)
        return query, key, segments, False
    positions = kwargs.get("position_ids")
    if positions is not None and batch == 1 and positions.shape[-1] == q_len > 1:
        positions = positions.reshape(-1)
        start = positions.min()
        if not torch.equal(positions, torch.arange(q_len, device=positions.device) + start):
            starts = (positions == start).nonzero().flatten()  # as transformers' flash packing
            bounds = torch.cat([starts, starts.new_tensor([q_len])])
            segments = SegmentMask.from_boundaries(bounds, bounds, q_len, k_len, **pattern)
            return query, key, segments, False
    if window is None and q_len == k_len:
        return query, key, None, is_causal
    segments = SegmentMask.from_padding(
        torch.ones(batch, k_len, dtype=torch.bool, device=key.device), q_len, **pattern
    )
    return query, key, segments, False


def _self_query_mask(mask: Tensor | None, batch: int, q_len: int, k_len: int) -> Tensor | None:
    """(B, Tq) bool: queries that may attend to their own position (keys end with the queries)."""
    if mask is None or k_len < q_len:
        return None
    rows = torch.arange(q_len, device=mask.device)
    own = mask[..., rows if mask.shape[-2] > 1 else 0, rows + (k_len - q_len)]
    return allowed_entries(own).any(dim=1).expand(batch, q_len)


# --- hook route: modules that compute attention themselves -------------------------------------


@dataclass(frozen=True)
class _Logits:
    """Everything but the mask that defines one module's attention logits."""

    query: Tensor  # (B, H, T, d)
    key: Tensor  # (B, Hkv, T, d)
    scaling: float
    bias: Tensor | None = None  # broadcastable to (B, H, T, T)
    is_causal: bool = False
    sink: Tensor | None = None  # (H,) attention-sink logits (s_aux)


def _bloom_logits(module: nn.Module, fused: Tensor, inputs: dict[str, Any]) -> _Logits:
    """BLOOM: beta * alibi + inv_norm_factor * q.k (baddbmm), then the float mask."""
    query, key, _ = hf.bloom_split(module, fused)
    batch, heads = query.shape[:2]
    bias = module.beta * inputs["alibi"].view(batch, heads, 1, -1)
    return _Logits(query, key, module.inv_norm_factor, bias)


def _falcon_logits(module: nn.Module, fused: Tensor, inputs: dict[str, Any]) -> _Logits:
    """Falcon: rotary or ALiBi; SDPA (ALiBi folded into the mask) or its eager branch."""
    query, key, _ = (x.transpose(1, 2) for x in hf.falcon_split(module, fused))
    alibi, scaling = inputs["alibi"], module.head_dim**-0.5
    sdpa = hf.attn_implementation(module.config) == "sdpa" and not inputs["output_attentions"]
    is_causal = sdpa and inputs["attention_mask"] is None and query.shape[2] > 1
    if alibi is None:
        cos, sin = inputs["position_embeddings"]
        rotate = _module_global(module, "apply_rotary_pos_emb")
        query, key = rotate(query, key, cos, sin)
        return _Logits(query, key, scaling, is_causal=is_causal)
    if sdpa:
        return _Logits(query, key, scaling, is_causal=is_causal)
    bias = alibi.view(*query.shape[:2], 1, -1) * module.inv_norm_factor
    return _Logits(query, key, module.inv_norm_factor, bias)


#: model_type -> how its attention modules build their logits from the fused qkv projection
_HOOK_ROUTES: dict[str, Callable[[nn.Module, Tensor, dict[str, Any]], _Logits]] = {
    "bloom": _bloom_logits,
    "falcon": _falcon_logits,
}


class EntropyCapture:
    """Measures attention entropy per (block, layer) and head during a model's forward passes.

    model: a transformers model, possibly PEFT-, DDP-, FSDP-, DeepSpeed- or compile-wrapped.
    layers: the attention layers to measure, from ``qkmonitor.weights.live.plan_live(model)``
        (default: all of them; planning under FSDP1 gathers shapes, a collective).
    key_chunk, query_chunk: block sizes passed to ``attention_entropy`` (None: its defaults,
        which differ between the entropy pass and the max-only pass).

    ``unsupported`` is None, or one line saying why this model's entropy cannot be measured
    (then recording does nothing and ``collect()`` returns {}). ``route`` is "interface" or
    "hooks". ``keys`` lists the (block, layer) keys that recording fills. ``softcaps``: per
    (block, layer) measured so far, the logit softcap its attention applies (None: none).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[LiveLayer] | None = None,
        key_chunk: int | None = None,
        query_chunk: int | None = None,
    ) -> None:
        self.model = transformers_model(model)
        self.key_chunk, self.query_chunk = key_chunk, query_chunk
        model_type = getattr(self.model.config, "model_type", None)
        self.route = "hooks" if model_type in _HOOK_ROUTES else "interface"
        self._hook_logits = _HOOK_ROUTES.get(model_type)
        self._modules: dict[nn.Module, LayerKey] = {}
        self._originals: dict[int, str] = {}  # id(config) -> its attn_implementation
        self._installed: list[str] = []  # the implementations routed through qkmonitor now
        self._sums: dict[LayerKey, EntropySums] = {}
        self.softcaps: dict[LayerKey, float | None] = {}
        self._entropy = True  # whether this recording computes entropy or maximum scores only
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._seen: set[nn.Module] = set()
        self._inputs: dict[nn.Module, dict[str, Any]] = {}
        self._last_query_mask: Tensor | None = None
        self.unsupported = self._plan(model, layers)

    @property
    def keys(self) -> list[LayerKey]:
        """The (block, layer) keys measured, in model order."""
        return list(self._modules.values())

    @property
    def recording_now(self) -> bool:
        """Whether forwards are being measured."""
        return bool(self._handles)

    def _plan(self, model: nn.Module, layers: Sequence[LiveLayer] | None) -> str | None:
        """Map attention modules to keys; the reason entropy is unsupported, or None."""
        if layers is None:
            try:
                layers, _ = plan_live(model)
            except QKMonitorError as error:
                return str(error)
        self._modules = {layer.module: layer.key for layer in layers}
        reason = self._read_implementations()
        if reason or self.route == "hooks":
            return reason
        names = set(self._originals.values())
        if getattr(self.model.config, "reorder_and_upcast_attn", False) and "eager" in names:
            return "GPT-2's reorder_and_upcast_attn bypasses the attention interface; use sdpa"
        if "eager" in names and any(
            _module_global(module, "eager_attention_forward") is None for module in self._modules
        ):
            return "this model's eager attention has no eager_attention_forward to delegate to"
        for module in self._modules:
            if getattr(module, "compressor", None) is not None:  # DeepSeek-V4's CSA/HCA layers
                return (
                    f"{type(module).__name__}.compressor appends pooled keys after the tokens' "
                    "keys, which the capture's masks (keys ending with the queries) do not read"
                )
            interface = _module_global(module, "ALL_ATTENTION_FUNCTIONS")
            if not isinstance(interface, AttentionInterface) or names & set(
                hf.local_attention_functions(interface)
            ):
                return (
                    f"{type(module).__name__} computes attention without transformers' shared "
                    "AttentionInterface; qkmonitor cannot see its attention logits"
                )
        return None

    def _read_implementations(self) -> str | None:
        """Note each (sub)model's current attention implementation; why unsupported, or None."""
        self._originals = {
            id(module.config): hf.attn_implementation(module.config)
            for module in self.model.modules()
            if isinstance(module, PreTrainedModel)
        }
        for name in sorted(set(self._originals.values())):
            style = _implementation_style(name)
            if style is None or (style == "flash" and self.route == "hooks"):
                supported = "'sdpa' or 'eager'" + (" or flash attention" * (self.route != "hooks"))
                return (
                    f"attention entropy needs attn_implementation {supported} (this model uses "
                    f"'{name}'); load it with attn_implementation='sdpa'"
                )
        return None

    def start(self, *, entropy: bool = True) -> None:
        """Measure every forward from now on (no-op when unsupported or already recording);
        entropy=False: maximum scores only."""
        if self.unsupported or self.recording_now:
            return
        self._entropy = entropy
        self.unsupported = self._read_implementations()  # it may have changed since attaching
        if self.unsupported:
            return
        # every hook runs eagerly, outside a torch.compile graph (dynamo-disabled): the
        # measurement neither enters the model's graph nor adds guards that recompile it
        eager = torch.compiler.disable
        self._handles.append(self.model.register_forward_pre_hook(eager(self._new_pass)))
        if self.route == "hooks":
            for module in self._modules:
                self._handles.append(
                    module.register_forward_pre_hook(eager(self._keep_inputs), with_kwargs=True)
                )
                self._handles.append(
                    module.query_key_value.register_forward_hook(
                        eager(self._fused_qkv_hook(module))
                    )
                )
        else:
            self._installed = sorted(set(self._originals.values()))
            for name in self._installed:
                _install(name)
            for module in self._modules:
                _RECORDING[module] = self

    def stop(self) -> None:
        """Stop measuring; the model and transformers are exactly as before ``start``."""
        if not self.recording_now:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._modules:
            _RECORDING.pop(module, None)
        for name in self._installed:
            _uninstall(name)
        self._installed = []
        self._seen.clear()
        self._inputs.clear()
        self._last_query_mask = None

    @contextmanager
    def recording(self, *, entropy: bool = True) -> Iterator[EntropyCapture]:
        """``with capture.recording(): model(**batch)`` measures the forwards inside
        (entropy=False: maximum scores only)."""
        self.start(entropy=entropy)
        try:
            yield self
        finally:
            self.stop()

    def collect(self, reset: bool = True) -> dict[LayerKey, EntropySums]:
        """Per (block, layer): sums and counts (tensors (H,), float64, on the model's device)."""
        sums = dict(self._sums)
        if reset:
            self._sums.clear()
        return sums

    def detach(self) -> None:
        """Stop recording and forget the model; later ``start`` calls do nothing."""
        self.stop()
        self._modules.clear()
        self._sums.clear()
        self.unsupported = "the entropy capture was detached from the model"

    # --- measuring ----------------------------------------------------------------------------

    def _new_pass(self, module: nn.Module, args: tuple) -> None:
        self._seen.clear()
        self._last_query_mask = None

    def _first_time(self, module: nn.Module) -> bool:
        """True once per module and model forward (recomputation under checkpointing: False)."""
        if module in self._seen:
            return False
        self._seen.add(module)
        return True

    def _add(
        self,
        module: nn.Module,
        logits: _Logits,
        mask: Tensor | None,
        softcap: float | None = None,
        segments: SegmentMask | None = None,
    ) -> None:
        """Measure one module's attention; mask is 4D (or None), segments flash's form."""
        block, layer = self._modules[module]
        query, key = logits.query, logits.key
        batch, _, q_len, _ = query.shape
        if block == "cross":
            query_mask = self._last_query_mask
            if query_mask is not None and query_mask.shape != (batch, q_len):
                query_mask = None
        else:
            if segments is not None:
                query_mask = segments.query_mask
            else:
                query_mask = _self_query_mask(mask, batch, q_len, key.shape[2])
            self._last_query_mask = query_mask
        sums = attention_entropy(
            query,
            key,
            logits.scaling,
            mask,
            is_causal=logits.is_causal,
            segments=segments,
            query_mask=query_mask,
            bias=logits.bias,
            softcap=softcap,
            sink=logits.sink,
            entropy=self._entropy,
            key_chunk=self.key_chunk,
            query_chunk=self.query_chunk,
        )
        total = self._sums.get((block, layer))
        self._sums[(block, layer)] = sums if total is None else total + sums
        self.softcaps[(block, layer)] = softcap

    @torch.no_grad()
    def _measure_interface(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        mask: Tensor | None,
        style: str,
        kwargs: dict[str, Any],
    ) -> None:
        """Called by the measuring attention function with the original's arguments."""
        if not self._first_time(module):
            return
        scaling = kwargs.get("scaling")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if style == "flash":
            query, key, segments, is_causal = _flash_segments(module, query, key, mask, kwargs)
            sink = kwargs.get("s_aux")
            logits = _Logits(query, key, scaling, kwargs.get("position_bias"), is_causal, sink)
            self._add(module, logits, None, kwargs.get("softcap"), segments)
            return
        is_causal = False
        if style == "sdpa" and mask is None:  # as transformers' sdpa_attention_forward
            flag = kwargs.get("is_causal")
            flag = getattr(module, "is_causal", True) if flag is None else flag
            is_causal = bool(flag) and query.shape[2] > 1
            if is_causal:
                key = key[:, :, : query.shape[2]]
        # eager functions that take s_aux fold it into their softmax; torch SDPA ignores it
        sink = kwargs.get("s_aux") if style == "eager" else None
        logits = _Logits(query, key, scaling, kwargs.get("position_bias"), is_causal, sink)
        self._add(module, logits, mask, kwargs.get("softcap"))

    def _keep_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        self._inputs[module] = bound.arguments

    def _fused_qkv_hook(self, module: nn.Module) -> Callable[..., None]:
        def measure(projection: nn.Module, args: tuple, fused: Tensor) -> None:
            inputs = self._inputs.pop(module, None)
            if inputs is None or not self._first_time(module):
                return
            cache = inputs.get("layer_past")
            if cache is not None and cache.get_seq_length(module.layer_idx) > 0:
                return  # decoding with past keys: not measured on this route
            with torch.no_grad():  # nothing saved for backward: checkpointing counts tensors
                logits = self._hook_logits(module, fused, inputs)
                self._add(module, logits, inputs["attention_mask"])

        return measure
