"""The names of the ``qk/`` log keys: every key says what its number aggregates.

    qk/<statistic>/<reduction>/<layer>     e.g. qk/eig_var/mean/layer_03
    qk/<statistic>/<reduction>             the whole model, e.g. qk/eig_var/mean

<reduction> is how a layer's monitored heads were combined: ``mean``, ``min`` or ``max``, or
``head_05`` for one head (no reduction). A model-wide key applies its reduction again over the
layers' values of the same reduction: ``qk/eig_var/mean`` is the mean over layers of
``qk/eig_var/mean/<layer>``, ``qk/attn_max_logit/max`` the max over layers of
``qk/attn_max_logit/max/<layer>``. <layer> is ``layer_03`` for a model with one attention stack,
``encoder_layer_03`` / ``decoder_layer_03`` / ``cross_layer_03`` for the others (T5, BART).
A statistic of a whole layer (rank_collapse) has no reduction over heads:
``qk/rank_collapse/<layer>``, and ``qk/rank_collapse/mean`` over layers. Training-wide values
have their own names (``qk/reg/R``, ``qk/clip/heads``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MetricKey", "head_key", "layer_key", "layer_tag", "model_key", "parse_key", "summary"]

#: statistics whose summary over heads and layers is not the mean
_SUMMARY = {"attn_max_logit": "max"}
_LAYER = re.compile(r"(?:[a-z]+_)?layer_\d+")


def layer_tag(block: str, layer: int) -> str:
    """``layer_03`` for the single self-attention stack, ``{block}_layer_03`` otherwise."""
    return f"layer_{layer:02d}" if block == "self" else f"{block}_layer_{layer:02d}"


def summary(statistic: str) -> str:
    """How a statistic is summarized over heads and over layers: "max" for the max logit (a
    maximum stays a maximum), "mean" for every other."""
    return _SUMMARY.get(statistic, "mean")


def layer_key(statistic: str, reduction: str, block: str, layer: int) -> str:
    """``qk/eig_var/mean/layer_03``: ``reduction`` over the layer's monitored heads."""
    return f"qk/{statistic}/{reduction}/{layer_tag(block, layer)}"


def head_key(statistic: str, block: str, layer: int, head: int) -> str:
    """``qk/eig_var/head_05/layer_03``: one head's value."""
    return layer_key(statistic, f"head_{head:02d}", block, layer)


def model_key(statistic: str, reduction: str) -> str:
    """``qk/eig_var/mean``: the reduction over layers of the per-layer values of that name."""
    return f"qk/{statistic}/{reduction}"


@dataclass(frozen=True)
class MetricKey:
    """A qk/ key read back: ``reduction`` None for a whole layer's value (rank_collapse),
    ``layer`` None for the whole model or training-wide values."""

    statistic: str
    reduction: str | None
    layer: str | None

    @property
    def per_head(self) -> bool:
        """One head's value (``head_05``)."""
        return self.reduction is not None and self.reduction.startswith("head_")

    @property
    def spread(self) -> bool:
        """The min or max across heads of a statistic summarized by its mean (not the max
        logit's max, which is its summary)."""
        return self.reduction in ("min", "max") and self.reduction != summary(self.statistic)


def parse_key(key: str) -> MetricKey | None:
    """What a qk/ key names, None for any other key."""
    parts = key.split("/")
    if parts[0] != "qk" or len(parts) not in (3, 4):
        return None
    statistic, rest = parts[1], parts[2:]
    if len(rest) == 2:
        return MetricKey(statistic, rest[0], rest[1])
    if _LAYER.fullmatch(rest[0]):
        return MetricKey(statistic, None, rest[0])
    return MetricKey(statistic, rest[0], None)
