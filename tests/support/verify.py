"""audit() of a saved tiny model against the behavioural reference (tests/support/behaviour.py).

``verify(config, folder)`` builds the model, saves it, audits the folder and compares every head
with the reference's W^h through naive float64 statistics. Outcomes: "exact", "refused" (a
one-line QKMonitorError), "wrong" (a head differs, or an attention module the model runs is not
audited, or one is audited that the model does not run), "unverifiable" (the reference could not
run the model: no dummy input, or its attention bypasses the attention interface).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import qkmonitor
from qkmonitor.errors import QKMonitorError
from qkmonitor.weights.discovery import plan
from qkmonitor.weights.sources import open_source
from support.behaviour import build, model_class, probe_model
from support.naive import naive_stats, relative_errors


@dataclass
class Outcome:
    status: str  # exact | refused | wrong | unverifiable | unbuildable
    detail: str = ""
    heads: int = 0


MAX_PARAMETERS = 5_000_000


def parameter_count(config) -> int:
    """Parameters of the config's base model, counted on the meta device (no memory)."""
    import copy

    import torch

    with torch.device("meta"):
        model = model_class(config)._from_config(copy.deepcopy(config))
    return sum(p.numel() for p in model.parameters())


def _loaded_names(model, names: list[str]) -> dict[str, str]:
    """Checkpoint name -> the parameter it loads into, by transformers' own key conversion
    (save_pretrained may write the old key layout); used only to pair modules with layers."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()  # values not None: transformers then adds or strips the prefix
    prefix = model.base_model_prefix or None
    return {n: rename_source_key(n, renamings, converters, prefix, meta)[0] for n in names}


def verify(config, folder: Path, tolerance: float = 1e-6) -> Outcome:
    try:
        size = parameter_count(config)
        if size > MAX_PARAMETERS:
            return Outcome("unbuildable", f"the shrunken config still has {size:.2e} parameters")
        model = build(config)
    except Exception as error:
        return Outcome("unbuildable", f"{type(error).__name__}: {str(error)[:120]}")
    try:
        model.save_pretrained(folder)
    except Exception as error:
        return Outcome("unbuildable", f"save_pretrained: {type(error).__name__}")
    try:
        result = qkmonitor.audit(folder)
    except QKMonitorError as error:
        return Outcome("refused", str(error))
    try:
        probed, failed = probe_model(model)
    except Exception as error:
        return Outcome("unverifiable", f"reference: {type(error).__name__}: {str(error)[:150]}")
    if not probed:
        reason = f"cannot probe {failed[0]}" if failed else "no attention module was run"
        return Outcome("unverifiable", f"reference: {reason}")
    source = open_source(folder)
    layers, _ = plan(source.config, source.shapes())
    heads = {(h.block, h.layer, h.head): h for h in result.heads}
    loaded = _loaded_names(model, [layer.q for layer in layers])
    by_path: dict[str, object] = {}
    for layer in layers:
        # a layer whose q/k the model ties to another layer's (read from that layer's tensor)
        # is its own module: its path, where the model runs it
        name = loaded.get(layer.q, layer.q)
        if any(layer.path in (p.path, *failed) for p in probed):
            name = f"{layer.path}.q"
        owner = next((p.path for p in probed if name.startswith(p.path + ".")), None)
        if owner is None and any(name.startswith(path + ".") for path in failed):
            return Outcome("unverifiable", f"the reference cannot probe the module of {layer.q}")
        if owner is None:
            return Outcome("wrong", f"audited {layer.q} which no attention call uses")
        if owner in by_path:
            return Outcome("wrong", f"{owner} audited twice")
        by_path[owner] = layer
    # a pooling head the model builds and runs but whose output it discards is listed, not
    # audited (tests/weights/test_discovery.py checks the discarding against the model)
    discarded = {r["module"] for r in result.model.not_audited if "whose output" in r["reason"]}
    # queries and keys of different widths: listed, and the model's own form must be rectangular
    widths = {r["module"] for r in result.model.not_audited if "different widths" in r["reason"]}
    square = [
        p.path
        for p in probed
        if p.path in widths and p.matrices[0].shape[0] == p.matrices[0].shape[1]
    ]
    if square:
        return Outcome("wrong", f"{square[0]} is listed as not square; the model's W^h is square")
    discarded |= widths
    missing = [p.path for p in probed if p.path not in by_path and p.path not in discarded]
    if missing:
        return Outcome("wrong", f"attention module {missing[0]} is not audited")
    count = 0
    for module in probed:
        if module.path in discarded:
            continue
        layer = by_path[module.path]
        if layer.n_heads != len(module.matrices):
            return Outcome(
                "wrong", f"{module.path}: {layer.n_heads} heads, model has {len(module.matrices)}"
            )
        for h, matrix in enumerate(module.matrices):
            head = heads[(layer.block, layer.layer, h)]
            want = naive_stats(matrix, layer.head_dim)
            if module.kv_of_head is not None and head.kv_head != module.kv_of_head[h]:
                return Outcome(
                    "wrong",
                    f"{module.path} head {h}: key head {head.kv_head}, model "
                    f"uses {module.kv_of_head[h]}",
                )
            errors = relative_errors(head, want, label="behaviour")
            bad = {k: v for k, v in errors.items() if not v <= tolerance}
            if bad:
                return Outcome("wrong", f"{module.path} head {h}: {bad}")
            count += 1
    direct = sum(p.direct for p in probed if p.path in by_path)
    return Outcome("exact", f"{direct} modules called on their own" if direct else "", count)
