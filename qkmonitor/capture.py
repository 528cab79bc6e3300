"""Attention entropy of a live transformers model, measured in its ordinary forward passes.

``EntropyCapture(model)`` attaches to a model (plain, PEFT, DDP-, FSDP1/2- or compile-wrapped).
While it records (``with capture.recording(): model(**batch)``), every attention module's query
and key are measured by ``qkmonitor.entropy.attention_entropy`` and the per-head sums are
accumulated per (block, layer); ``collect()`` hands them out. Outside recording nothing of the
model is changed: no hooks, the model's own attention implementation, zero overhead.

Two routes, both exact (the measured logits are the ones the model softmaxes):

- ``interface``: models that call transformers' ``AttentionInterface`` (all of
  ``qkmonitor.architectures.ARCHITECTURES`` except Falcon and BLOOM). While recording, the
  model's attention implementation is switched to ``qkmonitor_sdpa`` / ``qkmonitor_eager``:
  the same mask function as the original (so masks arrive in exactly the format the original
  expects) and an attention function that measures, then calls the original (torch SDPA, or the
  module's own ``eager_attention_forward``) with unchanged arguments. Outputs and gradients are
  bit-identical. Only ``sdpa`` and ``eager`` originals are supported: flash and flex attention
  receive masks that do not describe every row (flash gets a 2D padding mask, flex a BlockMask).
- ``hooks``: Falcon and BLOOM compute attention inside their modules. A forward hook on the
  fused ``query_key_value`` projection takes the real q/k of the pass (LoRA and its dropout
  included), and a pre-hook on the attention module its mask, ALiBi and rotary embeddings;
  logits are rebuilt as the module builds them.

Which rows count (SPEC.md): queries with at least one allowed key, minus padding queries.
transformers' masks do not mask padded *query* rows (a right-padded token still attends to the
real tokens), so a self-attention query is taken as padding when it may not attend to its own
position (the padding mask hides its key; causal, sliding-window and bidirectional patterns
always allow it). A cross-attention query reuses the validity found by the self-attention of
the same decoder layer. Decoder tokens are padding only where the model masks them
(``decoder_attention_mask``).

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
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from qkmonitor.entropy import EntropySums, allowed_entries, attention_entropy
from qkmonitor.errors import NotAModelError, QKMonitorError
from qkmonitor.live import LiveLayer, plan_layers

__all__ = ["SUPPORTED_IMPLEMENTATIONS", "EntropyCapture", "LayerKey"]

LayerKey = tuple[str, int]  # (block, layer): the stack names of qkmonitor.architectures
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")
_PREFIX = "qkmonitor_"

#: attention module -> the capture recording it (filled only while recording)
_RECORDING: weakref.WeakKeyDictionary[nn.Module, EntropyCapture] = weakref.WeakKeyDictionary()


def _module_global(module: nn.Module, name: str) -> Any:
    """A name as the module's forward sees it (its modeling file), or None."""
    return inspect.unwrap(type(module).forward).__globals__.get(name)


def _original_attention(original: str, module: nn.Module) -> Callable[..., Any]:
    """The function the model would have called: SDPA's, or the module's own eager one."""
    if original == "eager":
        return _module_global(module, "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS[original]


def _measuring_attention(original: str) -> Callable[..., Any]:
    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        capture = _RECORDING.get(module)
        if capture is not None:
            capture._measure_interface(module, query, key, attention_mask, original, kwargs)
        function = _original_attention(original, module)
        return function(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{_PREFIX}{original}_attention"
    return attention


def _register_implementations() -> None:
    """Register qkmonitor_<original> in transformers' interfaces (idempotent)."""
    for original in SUPPORTED_IMPLEMENTATIONS:
        name = _PREFIX + original
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _measuring_attention(original))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])


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


def _bloom_logits(module: nn.Module, fused: Tensor, inputs: dict[str, Any]) -> _Logits:
    """BLOOM: beta * alibi + inv_norm_factor * q.k (baddbmm), then the float mask."""
    query, key, _ = module._reshape(fused)
    batch, heads = query.shape[:2]
    bias = module.beta * inputs["alibi"].view(batch, heads, 1, -1)
    return _Logits(query, key, module.inv_norm_factor, bias)


def _falcon_logits(module: nn.Module, fused: Tensor, inputs: dict[str, Any]) -> _Logits:
    """Falcon: rotary or ALiBi; SDPA (ALiBi folded into the mask) or its eager branch."""
    query, key, _ = (x.transpose(1, 2) for x in module._split_heads(fused))
    alibi, scaling = inputs["alibi"], module.head_dim**-0.5
    sdpa = module.config._attn_implementation == "sdpa" and not inputs["output_attentions"]
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


def _unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside DDP/FSDP/DeepSpeed/compile and PEFT wrappers."""
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise NotAModelError(
            f"{type(model).__name__} is not a transformers model; attention entropy needs one"
        )
    return model


class EntropyCapture:
    """Measures attention entropy per (block, layer) and head during a model's forward passes.

    model: a transformers model, possibly PEFT-, DDP-, FSDP-, DeepSpeed- or compile-wrapped.
    layers: the attention layers to measure, from ``qkmonitor.live.plan_layers(model)``
        (default: all of them; planning under FSDP1 gathers shapes, a collective).
    key_chunk, query_chunk: block sizes passed to ``attention_entropy``.

    ``unsupported`` is None, or one line saying why this model's entropy cannot be measured
    (then recording does nothing and ``collect()`` returns {}). ``route`` is "interface" or
    "hooks". ``keys`` lists the (block, layer) keys that recording fills.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[LiveLayer] | None = None,
        key_chunk: int = 512,
        query_chunk: int | None = None,
    ) -> None:
        self.model = _unwrap(model)
        self.key_chunk, self.query_chunk = key_chunk, query_chunk
        model_type = getattr(self.model.config, "model_type", None)
        self.route = "hooks" if model_type in _HOOK_ROUTES else "interface"
        self._hook_logits = _HOOK_ROUTES.get(model_type)
        self._modules: dict[nn.Module, LayerKey] = {}
        self._originals: dict[int, str] = {}
        self._sums: dict[LayerKey, EntropySums] = {}
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
                layers, _ = plan_layers(model)
            except QKMonitorError as error:
                return str(error)
        self._modules = {layer.module: layer.key for layer in layers}
        reason = self._read_implementations()
        if reason or self.route == "hooks":
            return reason
        if getattr(self.model.config, "reorder_and_upcast_attn", False) and "eager" in set(
            self._originals.values()
        ):
            return "GPT-2's reorder_and_upcast_attn bypasses the attention interface; use sdpa"
        if "eager" in self._originals.values() and any(
            _module_global(module, "eager_attention_forward") is None for module in self._modules
        ):
            return "this model's eager attention has no eager_attention_forward to delegate to"
        _register_implementations()
        self._switch(measuring=True)
        switched = self.model.config._attn_implementation.startswith(_PREFIX)
        self._switch(measuring=False)
        if not switched:
            return (
                f"{type(self.model).__name__} computes attention without transformers' "
                "AttentionInterface; qkmonitor cannot see its attention logits"
            )
        return None

    def _read_implementations(self) -> str | None:
        """Note each (sub)model's current attention implementation; why unsupported, or None."""
        self._originals = {
            id(module.config): module.config._attn_implementation
            for module in self.model.modules()
            if isinstance(module, PreTrainedModel)
        }
        unsupported = sorted(set(self._originals.values()) - set(SUPPORTED_IMPLEMENTATIONS))
        if unsupported:
            return (
                f"attention entropy needs attn_implementation 'sdpa' or 'eager' (this model uses "
                f"'{unsupported[0]}'); load it with attn_implementation='sdpa'"
            )
        return None

    def _switch(self, measuring: bool) -> None:
        """Set every (sub)model's attention implementation to its measuring twin, or back."""
        done: set[int] = set()
        for module in self.model.modules():
            if isinstance(module, PreTrainedModel) and id(module.config) not in done:
                original = self._originals[id(module.config)]
                module.set_attn_implementation(_PREFIX + original if measuring else original)
                done.add(id(module.config))

    def start(self) -> None:
        """Measure every forward from now on (no-op when unsupported or already recording)."""
        if self.unsupported or self.recording_now:
            return
        self.unsupported = self._read_implementations()  # it may have changed since attaching
        if self.unsupported:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._new_pass))
        if self.route == "hooks":
            for module in self._modules:
                self._handles.append(
                    module.register_forward_pre_hook(self._keep_inputs, with_kwargs=True)
                )
                self._handles.append(
                    module.query_key_value.register_forward_hook(self._fused_qkv_hook(module))
                )
        else:
            for module in self._modules:
                _RECORDING[module] = self
            self._switch(measuring=True)

    def stop(self) -> None:
        """Stop measuring; the model is exactly as before ``start``."""
        if not self.recording_now:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.route == "interface":
            self._switch(measuring=False)
            for module in self._modules:
                _RECORDING.pop(module, None)
        self._seen.clear()
        self._inputs.clear()
        self._last_query_mask = None

    @contextmanager
    def recording(self) -> Iterator[EntropyCapture]:
        """``with capture.recording(): model(**batch)`` measures the forwards inside."""
        self.start()
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
    ) -> None:
        block, layer = self._modules[module]
        query, key = logits.query, logits.key
        batch, _, q_len, _ = query.shape
        if block == "cross":
            query_mask = self._last_query_mask
            if query_mask is not None and query_mask.shape != (batch, q_len):
                query_mask = None
        else:
            query_mask = _self_query_mask(mask, batch, q_len, key.shape[2])
            self._last_query_mask = query_mask
        sums = attention_entropy(
            query,
            key,
            logits.scaling,
            mask,
            is_causal=logits.is_causal,
            query_mask=query_mask,
            bias=logits.bias,
            softcap=softcap,
            key_chunk=self.key_chunk,
            query_chunk=self.query_chunk,
        )
        total = self._sums.get((block, layer))
        self._sums[(block, layer)] = sums if total is None else total + sums

    @torch.no_grad()
    def _measure_interface(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        mask: Tensor | None,
        original: str,
        kwargs: dict[str, Any],
    ) -> None:
        """Called by the measuring attention function with the original's arguments."""
        if not self._first_time(module):
            return
        scaling = kwargs.get("scaling")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        is_causal = False
        if original == "sdpa" and mask is None:  # as transformers' sdpa_attention_forward
            flag = kwargs.get("is_causal")
            flag = getattr(module, "is_causal", True) if flag is None else flag
            is_causal = bool(flag) and query.shape[2] > 1
            if is_causal:
                key = key[:, :, : query.shape[2]]
        logits = _Logits(query, key, scaling, kwargs.get("position_bias"), is_causal)
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
