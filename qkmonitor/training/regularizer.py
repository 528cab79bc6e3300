"""The spectral (LocAteR-style) regularizer: lambda * R added to the training objective.

    R = mean over the regularized heads of eig_var(W^h) / eig_var_0

eig_var_0 is that same mean on the weights at the start of training, fixed then (and saved in
checkpoints), so R = 1 when training starts whatever the model's size, width or initialization,
and lambda is the weight of "relative spectral spread" against the task loss: lambda * R costs
lambda (in the loss's units, nats for language modelling) at the start, and the regularizer
pulls eig_var down with a force of lambda per e-fold of it. eig_mean is left free.
R's gradient is taken in closed form (``qkmonitor.spectrum.eig_var_gradient``, from traces: exact,
in float32 outside autocast, never an eigendecomposition, no autograd graph of its own); only
the cheap map from the layer's tensors to per-head Q/K slices goes through autograd.

Where the gradient enters, and why
----------------------------------
The Trainer's loss is out of a callback's reach, and the full Q/K weights exist only inside a
module's forward under FSDP and ZeRO-3. So lambda * grad R is computed inside the attention
module's forward (a forward hook), from the full weights it holds there, and is carried into
backward by an identity autograd function on the module's output whose backward returns that
gradient for the Q/K tensors. The optimizer then sees it through the ordinary gradient path:

- exactly once per optimizer step: the hook injects only during the first gradient-enabled
  forward of each layer after ``arm()`` (called at each optimizer step's first micro-batch), so
  gradient accumulation (any number of micro-batches, a short last one included) does not
  multiply it;
- several processes: every rank injects the same lambda * grad R (weights are replicated or
  gathered), and DDP/FSDP/ZeRO average gradients over ranks, which leaves it unchanged;
- independent of how the task loss is normalized (per micro-batch mean, num_items_in_batch, a
  user's compute_loss_func): the injected gradient does not go through the loss;
- fp16 loss scaling: the injected gradient is multiplied by the current scale of accelerate's
  GradScaler (DDP and FSDP), since the scaler unscales all gradients before clipping and
  stepping; bf16 and fp32 need no scale. DeepSpeed's own fp16 loss scaler is not read: the
  callback refuses that combination at on_train_begin (bf16 works);
- before clipping, like any term of the loss: total objective = task loss + lambda * R, and
  gradient clipping (max_grad_norm) acts on the gradient of that total;
- PEFT: the gradient is taken with respect to the effective weight (base + LoRA delta) and flows
  through autograd to the trainable adapter matrices; frozen weights receive nothing;
- sharding: FSDP holds full parameters during the module's forward, ZeRO-3 gathers the layer's
  own parameters there (``qkmonitor.weights.live.full_weights``), and the gradient for the full
  parameter goes through the framework's own reduce-scatter (tested on CPU for FSDP1, FSDP2
  and real DeepSpeed ZeRO-3, with QKMonitor and with the Trainer's callback).

Gradient checkpointing: with the reentrant variant the first forward runs without gradients and
is skipped; the recomputation in backward injects. With the non-reentrant variant the first
forward injects and the recomputation is skipped (it is disarmed by then). Everything the
injection computes, from reading the effective weight on (a LoRA weight is built there as
base + B A), runs in an isolated block whose saved tensors the checkpoint does not count, so the
skipped recomputation saves exactly what the original forward saved (TRL's SFTTrainer turns
non-reentrant checkpointing on by default; tested with LoRA on q/k/v, both variants).

Memory: the injected gradients (Q/K sized, in the parameters' dtype) live from the first
micro-batch's forward to its backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from qkmonitor.errors import UnsupportedModelError
from qkmonitor.spectrum import eig_var_gradient
from qkmonitor.weights.layout import layer_weights
from qkmonitor.weights.live import LiveLayer, full_weights

__all__ = ["SpectralRegularizer", "penalty_gradients"]


def penalty_gradients(
    layer: LiveLayer, tensors: dict[str, Tensor], heads: Sequence[int] | None, factor: float
) -> list[Tensor]:
    """factor * d(sum of eig_var over the regularized heads) / d(each tensor requiring grad).

    The per-head gradient comes in closed form; autograd carries it back through the slicing,
    transposes and gains that turn the layer's tensors into per-head Q/K weights.
    """
    wq, wk = layer_weights(layer.plan, tensors)
    weights = None
    if heads is not None:
        weights = torch.zeros(wq.shape[-3], dtype=torch.float32, device=wq.device)
        weights[list(heads)] = 1.0
    grad_q, grad_k = eig_var_gradient(wq.detach(), wk.detach(), layer.plan.scale, weights)
    pairs = [(w, (g * factor).to(w.dtype)) for w, g in ((wq, grad_q), (wk, grad_k))]
    pairs = [(w, g) for w, g in pairs if w.requires_grad]
    wanted = [t for t in tensors.values() if t.requires_grad]
    return list(torch.autograd.grad([w for w, _ in pairs], wanted, [g for _, g in pairs]))


class _AddGradient(torch.autograd.Function):
    """Identity on ``carrier``; in backward, also returns fixed gradients for ``weights``."""

    @staticmethod
    def forward(ctx: Any, carrier: Tensor, *weights_then_gradients: Tensor) -> Tensor:
        half = len(weights_then_gradients) // 2
        ctx.gradients = weights_then_gradients[half:]
        return carrier.view_as(carrier)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        gradients = ctx.gradients
        del ctx.gradients
        return (grad, *gradients, *(None,) * len(gradients))


@contextlib.contextmanager
def _isolated(device_type: str) -> Iterator[None]:
    """A side computation with its own autograd inside a module's forward, invisible to it.

    Autocast is off for its backward too (on CPU that runs on this thread, whose autocast
    state would turn its matmuls into bf16), and the tensors it saves for backward bypass any
    saved-tensor hooks of the surrounding forward (non-reentrant gradient checkpointing counts
    them, and its recomputation, disarmed, would not save them again).
    """
    with (
        torch.autocast(device_type, enabled=False),
        torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
    ):
        yield


def _first_tensor(output: Any, where: str) -> Tensor:
    """The module output's first tensor (the attention output)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise UnsupportedModelError(
        f"{where} returns {type(output).__name__}, not a tensor or a tuple starting with one; "
        "the regularizer cannot attach its gradient there (train with regularization=0)"
    )


def _replace_first_tensor(output: Any, change: Callable[[Tensor], Tensor], where: str) -> Any:
    """The module output with its first tensor (the attention output) passed through change."""
    changed = change(_first_tensor(output, where))
    return changed if isinstance(output, Tensor) else type(output)([changed, *output[1:]])


class SpectralRegularizer:
    """lambda * R on a model's attention layers, by gradient injection in forward (module doc).

    layers: the regularized layers (every rank passes the same list, in the same order);
    strength: lambda (>= 0); reference: eig_var_0 > 0; heads: head indices regularized in each
    layer (None: all).
    """

    def __init__(
        self,
        layers: Sequence[LiveLayer],
        strength: float,
        reference: float,
        heads: Sequence[int] | None = None,
    ) -> None:
        if strength < 0:
            raise ValueError(f"regularization strength must be >= 0, got {strength}")
        if not reference > 0:
            raise ValueError(f"reference eig_var must be > 0, got {reference}")
        self.layers = list(layers)
        self.strength = strength
        self.reference = reference
        self.heads = heads
        per_layer = [len(heads) if heads is not None else la.plan.n_heads for la in self.layers]
        self.n_heads = sum(per_layer)
        self._pending: set[int] = set()
        self._loss_scale = 1.0
        #: layers whose training forward held no trainable Q/K weight (frozen, or adapted by a
        #: PEFT tuner other than plain LoRA, whose merged weight carries no gradient)
        self.untrainable: set[str] = set()
        self._handles: list[RemovableHandle] = []

    @property
    def coefficient(self) -> float:
        """lambda / (number of regularized heads * eig_var_0): d(lambda R)/d(sum of eig_var)."""
        return self.strength / (self.n_heads * self.reference)

    def attach(self) -> None:
        """Register the forward hooks (first, before any framework hook on the same module)."""
        for index, layer in enumerate(self.layers):
            # eager, outside any torch.compile graph: tracing it would guard on which layers
            # are still armed and recompile the model at every arming
            hook = torch.compiler.disable(self._hook(index, layer))
            self._handles.append(layer.module.register_forward_hook(hook, prepend=True))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def arm(self, loss_scale: float = 1.0) -> None:
        """Inject lambda * grad R (times ``loss_scale``) in each layer's next training forward."""
        self._pending = set(range(len(self.layers)))
        self._loss_scale = loss_scale

    @property
    def loss_scale(self) -> float:
        """The loss scale the injected gradient carries (set by ``arm``)."""
        return self._loss_scale

    def _hook(self, index: int, layer: LiveLayer) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if index not in self._pending or not torch.is_grad_enabled() or not module.training:
                return None
            self._pending.discard(index)
            # isolated from the getters on: a LoRA weight is built there (base + B A), and the
            # tensors that product saves must not count in a checkpointed forward
            with (
                _isolated(_first_tensor(output, layer.name).device.type),
                full_weights(layer, in_forward=True) as tensors,
            ):
                trainable = [name for name, t in tensors.items() if t.requires_grad]
                if not trainable:
                    self.untrainable.add(layer.name)
                    return None
                leaves = {n: t.detach().requires_grad_(n in trainable) for n, t in tensors.items()}
                scale = self.coefficient * self._loss_scale
                gradients = penalty_gradients(layer, leaves, self.heads, scale)
                weights = [tensors[n] for n in trainable]
                # applied while the weights are full, so autograd records their full shapes
                return _replace_first_tensor(
                    output,
                    lambda carrier: _AddGradient.apply(carrier, *weights, *gradients),
                    layer.name,
                )

        return hook
