"""Models in memory: their transformers model, effective weights, attention layers, and full
Q/K weights one layer at a time.

``transformers_model(model)`` finds the transformers model inside parallel, compile, PEFT and
user wrappers; ``live_weights(model)`` yields the effective weight of every weighted module
(LoRA merged, autograd kept). ``plan_live(model)`` locates every attention layer of a live
model (PEFT-, DDP-, compile- or accelerate-wrapped, FSDP- or DeepSpeed-sharded, or held by a
wrapper such as SentenceTransformer) with discovery's plan (``qkmonitor.weights.discovery``)
and those getters.

``full_weights(layer)`` yields that layer's raw tensors as full (unsharded) tensors:

- plain and DDP models: the parameters themselves, nothing is copied;
- FSDP2 (``fully_shard``): parameters are DTensors outside forward; ``full_tensor()`` all-gathers
  one tensor at a time;
- FSDP1: ``FullyShardedDataParallel.summon_full_params`` on the innermost FSDP unit holding the
  layer, without recursion, so only that unit's parameters are materialized;
- DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters`` over the layer's own parameters.
  (accelerate's wrapper of it is a no-op unless zero.Init was used, although ZeRO-3 partitions
  parameters either way, so the partitioned ``ds_id`` attribute decides here.)

Every gather is a collective: all ranks must call ``full_weights`` for the same layers in the
same order, which callers guarantee by iterating over the same plan. Inside a module's forward
(``in_forward=True``) FSDP already holds full parameters (and refuses to summon them), so only
ZeRO-3, which gathers per leaf module, is gathered there.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from qkmonitor.errors import NotAModelError
from qkmonitor.weights import discovery
from qkmonitor.weights.layout import AttentionLayer, Packing

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "LiveLayer",
    "full_weights",
    "is_sharded",
    "live_weights",
    "plan_live",
    "transformers_model",
    "unwrap_parallel",
]


def unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP, DataParallel, DeepSpeed, the outer FSDP1 unit and torch.compile
    (accelerate's ``extract_model_from_parallel``, so also what ``Accelerator.prepare`` wraps);
    PEFT and other wrappers are kept."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The one transformers model that ``model`` is or holds.

    Unwraps parallel and compile wrappers (``unwrap_parallel``) and PEFT; a module that holds
    a transformers model (SentenceTransformer's ``[0].auto_model``, a user's wrapper) gives
    that model, if it holds exactly one (nested ones, e.g. a vision tower, belong to it).
    Raises NotAModelError otherwise.
    """
    from transformers import PreTrainedModel

    model = unwrap_parallel(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if isinstance(model, PreTrainedModel):
        return model
    outermost: dict[str, PreTrainedModel] = {}
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(
            name.startswith(f"{outer}.") for outer in outermost
        ):
            outermost[name] = module
    if len(outermost) == 1:
        return next(iter(outermost.values()))
    what = type(model).__name__
    if not outermost:
        raise NotAModelError(f"{what} is not a transformers model and holds none; pass one")
    raise NotAModelError(
        f"{what} holds {len(outermost)} transformers models ({', '.join(outermost)}); "
        "pass the one to monitor"
    )


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether parameters are sharded (FSDP1 flat or FSDP2 DTensor shards, DeepSpeed ZeRO-3)."""
    if any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        return True
    return any(hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in model.parameters())


def live_weights(model: torch.nn.Module) -> Iterator[tuple[str, Callable[[], Tensor]]]:
    """(state-dict style name, getter of the effective weight) for every weighted module.

    A PEFT tuner layer (LoRA on q/k, ...) is reported under its own name with the weight its
    forward uses, unless merged or disabled; its inner base_layer and adapter modules are
    skipped. Plain LoRA is base + sum of active adapters' scaled B A, with autograd kept so the
    regularizer can use it; other tuners (DoRA, LoHa, LoKr, IA3, OFT, VeRA, ...) are merged by
    PEFT on a copy of the layer, values only.
    """
    skipped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skipped):
            continue
        if hasattr(module, "base_layer") and hasattr(module, "active_adapters"):
            skipped.append(name + ".")
            if isinstance(module.get_base_layer(), nn.MultiheadAttention):
                yield f"{name}.in_proj_weight", _merged_in_proj(module)
            else:
                yield name + ".weight", _adapted_weight(module)
        elif isinstance(module, nn.MultiheadAttention):
            for parameter in _IN_PROJ:  # its own parameters, not a Linear child's .weight
                if isinstance(getattr(module, parameter, None), Tensor):
                    yield f"{name}.{parameter}", (lambda m=module, p=parameter: getattr(m, p))
        elif isinstance(getattr(module, "weight", None), Tensor):
            yield name + ".weight", (lambda m=module: m.weight)


#: nn.MultiheadAttention's own q/k projection parameters (packed, or q/k apart where vdim differs)
_IN_PROJ = ("in_proj_weight", "q_proj_weight", "k_proj_weight")


def _merged_in_proj(module: torch.nn.Module) -> Callable[[], Tensor]:
    """PEFT's LoRA on an nn.MultiheadAttention merges into in_proj_weight around each forward:
    the effective in_proj_weight of a merged copy (values only)."""

    def effective() -> Tensor:
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            return module.get_base_layer().in_proj_weight
        merged = copy.deepcopy(module)
        merged.merge(adapter_names=list(module.active_adapters))
        return merged.get_base_layer().in_proj_weight.detach()

    return effective


def _adapted_weight(module: torch.nn.Module) -> Callable[[], Tensor]:
    def effective() -> Tensor:
        weight = module.get_base_layer().weight
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            return weight
        adapters = [
            adapter
            for adapter in module.active_adapters
            if any(adapter in getattr(module, n, {}) for n in module.adapter_layer_names)
        ]
        variants = getattr(module, "lora_variant", {})
        if all(a in getattr(module, "lora_A", {}) and a not in variants for a in adapters):
            for adapter in adapters:  # plain LoRA: the delta is additive, keep autograd
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            return weight
        # DoRA rescales, IA3 and OFT multiply, ...: let PEFT merge a copy
        merged = copy.deepcopy(module)
        merged.merge(adapter_names=adapters)
        return merged.get_base_layer().weight.detach()

    return effective


#: infixes that wrappers insert into module paths; stripped before matching the table
_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class LiveLayer:
    """One attention layer of a live model."""

    plan: AttentionLayer
    #: the attention module: its output (or first output) is the attention output
    module: nn.Module
    #: module path of ``module`` in the model
    name: str
    #: raw tensor name (as in ``plan``) -> getter of the effective tensor
    getters: dict[str, Callable[[], Tensor]]
    #: the modules that own this layer's Q/K tensors (and QK-norm gains)
    owners: tuple[nn.Module, ...]
    #: FSDP1 only: the innermost FullyShardedDataParallel unit holding the Q/K weights
    fsdp_unit: nn.Module | None = None

    @property
    def key(self) -> tuple[str, int]:
        """(block, layer index), e.g. ("self", 3)."""
        return self.plan.block, self.plan.layer

    def owner(self, tensor: str) -> nn.Module:
        """The module that owns one of ``plan.tensors`` (``owners`` follows their order)."""
        names = list(dict.fromkeys(_owner(n) for n in self.plan.tensors))
        return self.owners[names.index(_owner(tensor))]


def _clean(name: str) -> str:
    for infix in _WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name


def _owner(name: str) -> str:
    """The path of the module that owns a tensor name of ``live_weights``."""
    return name.rpartition(".")[0]


def _stored_shape(module: nn.Module, parameter: str = "weight") -> tuple[int, ...]:
    """The full shape of a module's weight (or other parameter: nn.MultiheadAttention's
    in_proj_weight), without computing an adapted weight or gathering."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    weight = getattr(base, parameter)
    ds_shape = getattr(weight, "ds_shape", None)  # ZeRO-3 keeps the full shape here
    return tuple(ds_shape) if ds_shape is not None else tuple(weight.shape)


def _fsdp1_units(model: nn.Module) -> dict[str, nn.Module]:
    """Clean module path -> FSDP1 unit, for every FullyShardedDataParallel unit of the model."""
    if not torch.distributed.is_available():
        return {}
    from torch.distributed.fsdp import FullyShardedDataParallel

    return {
        (_clean(name + ".") if name else ""): module
        for name, module in model.named_modules()
        if isinstance(module, FullyShardedDataParallel)
    }


def plan_live(model: nn.Module) -> tuple[list[LiveLayer], discovery.PlanNotes]:
    """Every attention layer of ``model`` in table order, and warnings for the user (with
    ``not_audited``, the attention-like modules left out).

    Under FSDP1, shapes are read with the whole model summoned to CPU memory once (sharded
    FSDP1 parameters do not keep their shapes). Raises UnsupportedModelError (no attention
    layers, unknown layout) or NotAModelError.
    """
    units = _fsdp1_units(model)
    with contextlib.ExitStack() as stack:
        if units:  # under no_grad: FSDP1 summoned under grad mode breaks later forwards
            root = next(iter(units.values()))
            # to CPU memory from an accelerator (FSDP1 fails offloading what is on CPU already)
            offload = next(root.parameters()).device.type != "cpu"
            stack.enter_context(torch.no_grad())
            stack.enter_context(
                root.summon_full_params(root, writeback=False, offload_to_cpu=offload)
            )
        getters = {_clean(name): get for name, get in live_weights(model)}
        modules = {_clean(name): module for name, module in model.named_modules()}
        shapes = {
            name: _stored_shape(modules[_owner(name)], name.rpartition(".")[2]) for name in getters
        }
        for name, get, shape in _raw_parameters(model):
            if name not in getters:
                getters[name], shapes[name] = get, shape
    plans, warnings = discovery.plan(transformers_model(model).config, shapes)
    layers = []
    for plan in plans:
        owner_names = [_owner(n) for n in plan.tensors]
        q_path, k_path = _owner(plan.q), _owner(plan.k)
        if plan.q_pre and plan.k_pre:  # Aria: the module holding both and the inner attention
            path = _attention_path(_owner(plan.q_pre), _owner(plan.k_pre))
        elif plan.packing in (
            Packing.IN_PROJ_QKV,
            Packing.IN_PROJ_SEPARATE,
            Packing.HEAD_PARAMETERS,
        ):
            path = q_path  # its own parameters: nn.MultiheadAttention's, XLNet's q and k
        else:
            path = _attention_path(q_path, k_path)
        layers.append(
            LiveLayer(
                plan=plan,
                module=modules[path],
                name=path,
                getters={n: getters[n] for n in plan.tensors},
                owners=tuple(modules[n] for n in dict.fromkeys(owner_names)),
                fsdp_unit=_innermost(units, q_path),
            )
        )
    return layers, warnings


def _raw_parameters(model: nn.Module) -> Iterator[tuple[str, Callable[[], Tensor], tuple]]:
    """(clean name, getter, full shape) of every parameter a module holds under a name other
    than weight or bias (Swin v2's per-head ``logit_scale``), and of every persistent buffer
    (LeViT's BatchNorm ``running_var``): a plan may need one beside the Q/K weights."""
    for path, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if name in ("weight", "bias"):
                continue
            shape = getattr(parameter, "ds_shape", None) or parameter.shape  # ZeRO-3: full
            yield _clean(f"{path}.{name}" if path else name), (lambda p=parameter: p), tuple(shape)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                clean = _clean(f"{path}.{name}" if path else name)
                yield clean, (lambda b=buffer: b), tuple(buffer.shape)


def _attention_path(q_path: str, k_path: str) -> str:
    """The module holding both projections; for a fused qkv projection, its parent."""
    common = []
    for x, y in zip(q_path.split("."), k_path.split("."), strict=False):
        if x != y:
            break
        common.append(x)
    path = ".".join(common)
    return path.rpartition(".")[0] if path == q_path else path


def _parameters(layer: LiveLayer) -> list[nn.Parameter]:
    return list(dict.fromkeys(p for owner in layer.owners for p in owner.parameters()))


def is_zero3(layer: LiveLayer) -> bool:
    """True when the layer's parameters are partitioned by DeepSpeed ZeRO-3."""
    return any(hasattr(p, "ds_id") for p in _parameters(layer))


def _innermost(units: dict[str, nn.Module], path: str) -> nn.Module | None:
    """The FSDP1 unit with the longest path that contains the module at ``path``."""
    containing = [prefix for prefix in units if (path + ".").startswith(prefix)]
    return units[max(containing, key=len)] if containing else None


@contextlib.contextmanager
def full_weights(layer: LiveLayer, *, in_forward: bool = False) -> Iterator[dict[str, Tensor]]:
    """The layer's raw tensors (names as in ``layer.plan``), full, valid inside the block.

    Outside forward, sharded parameters are gathered for this layer only; a collective, so every
    rank must enter it for the same layers in the same order. Autograd is kept, except for FSDP1
    outside forward (monitoring only), where the gather runs under no_grad.
    """
    with contextlib.ExitStack() as stack:
        if is_zero3(layer):
            import deepspeed  # only reachable when DeepSpeed partitioned the parameters

            stack.enter_context(
                deepspeed.zero.GatheredParameters(_parameters(layer), modifier_rank=None)
            )
        elif layer.fsdp_unit is not None and not in_forward:
            unit = layer.fsdp_unit
            stack.enter_context(torch.no_grad())  # see plan_live
            stack.enter_context(unit.summon_full_params(unit, recurse=False, writeback=False))
        yield {name: _full(get()) for name, get in layer.getters.items()}


def _full(tensor: Tensor) -> Tensor:
    """A DTensor (FSDP2) all-gathered; any other tensor as is."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor
