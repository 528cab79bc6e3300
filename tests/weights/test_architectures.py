"""The architectures qkmonitor supported first against an independent naive reference.

tests/support/models.py writes out, per model_type (BERT family, GPT-2, GPT-NeoX, BLOOM, the three
Falcon layouts, Llama, Qwen, Gemma 1-3, Phi, Phi-3, T5, BART, ...), its own reading of the
modeling code. For each a tiny random model is built from its config; the audit of its saved folder
and of the model object must give, head by head, the numbers that tests/support/naive.py gets
from the full d_in x d_in matrix (float64 eigendecompositions) of its own reading of the
modeling code. That reading is itself checked against the model's real pre-softmax logits.
"""

from __future__ import annotations

import ast
import collections
import inspect
import math

import pytest
import torch
from support.checks import one_line_error
from support.models import CASES, CASES_BY_ID, VARIANTS, build
from support.naive import NaiveReference, content_logit_errors, naive_layers

import qkmonitor
from qkmonitor.errors import UnsupportedModelError
from qkmonitor.weights import architectures
from qkmonitor.weights.discovery import plan
from qkmonitor.weights.layout import output_dim, qk_rows, split_heads
from qkmonitor.weights.sources import open_source

#: cases the audit refuses, with the one-line reason
REFUSED = {"phi-qk-layernorm": "removes the mean (LayerNorm)"}


AUDITED = [case for case in CASES + VARIANTS if case.id not in REFUSED]


@pytest.fixture(scope="module", params=AUDITED, ids=lambda case: case.id)
def built(request):
    return request.param, build(request.param)


def test_layernorm_qk_norm_is_refused(tmp_path):
    """Phi's qk_layernorm is a LayerNorm: its centering is not a gain, so no W^h is claimed."""
    model = build(CASES_BY_ID["phi-qk-layernorm"])
    model.save_pretrained(tmp_path)
    for target in (tmp_path, model):
        message = one_line_error(UnsupportedModelError, lambda t=target: qkmonitor.audit(t))
        assert REFUSED["phi-qk-layernorm"] in message


def test_naive_reading_reproduces_the_models_logits(built):
    """x_i^T W^h y_j equals the model's own pre-softmax logit (biases/positions removed)."""
    case, model = built
    errors = content_logit_errors(model, rope=case.rope)
    assert max(errors.values()) < 2e-6, errors


def test_audit_of_folder_and_model_match_naive(built, tmp_path):
    case, model = built
    model.save_pretrained(tmp_path)
    from_folder = qkmonitor.audit(tmp_path)
    assert from_folder.model.kind == "local"
    assert from_folder.model.model_type == case.model_type
    assert from_folder.model.warnings == []
    reference = NaiveReference(model)
    reference.assert_matches(from_folder)

    from_model = qkmonitor.audit(model)
    assert from_model.model.kind == "model"
    reference.assert_matches(from_model)
    for a, b in zip(from_folder.heads, from_model.heads, strict=True):
        assert (a.block, a.layer, a.head) == (b.block, b.layer, b.head)
        assert math.isclose(a.eig_var, b.eig_var, rel_tol=1e-12)


def test_planned_scale_is_the_modules_scale(built):
    """plan()'s scale per layer equals the scale the instantiated module applies."""
    _, model = built
    source = open_source(model)
    planned, _ = plan(source.config, source.shapes())
    scales = {(p.block, p.layer): p.scale for p in planned}
    reference = {(n.block, n.layer): n.scale for n in naive_layers(model)}
    assert scales.keys() == reference.keys()
    for key, scale in reference.items():
        assert math.isclose(scales[key], scale, rel_tol=1e-12), (key, scales[key], scale)


def test_qk_rows_index_the_heads_that_split_heads_cuts(built):
    """qk_rows (what QK-Clip rescales) names exactly the rows split_heads reads, per packing."""
    _, model = built
    source = open_source(model)
    planned, _ = plan(source.config, source.shapes())
    for layer in planned:
        tensors = source.read(layer.tensors)
        wq, wk = split_heads(layer, tensors[layer.q], tensors[layer.k])
        q_rows, k_rows = qk_rows(layer)
        dim = output_dim(layer.packing)
        assert torch.equal(tensors[layer.q].movedim(dim, 0)[q_rows], wq), layer.q
        assert torch.equal(tensors[layer.k].movedim(dim, 0)[k_rows], wk), layer.k


def test_codegen_mp4_packing_cuts_queries_and_keys_as_its_forward():
    """CodeGen's qkv_proj rows: 4 model-parallel chunks, each [q; v; k] of E/4 rows; the query
    of a token is the q parts in chunk order (CodeGenAttention.forward's view and split). With 8
    heads a chunk holds two heads, so a wrong stride would mix heads."""
    from qkmonitor.weights.layout import AttentionLayer, Packing

    heads, d, d_in = 8, 4, 32
    embed = heads * d
    weight = torch.randn(3 * embed, d_in, dtype=torch.float64)
    x = torch.randn(5, d_in, dtype=torch.float64)
    qkv = (x @ weight.T).view(5, 4, 3 * embed // 4)  # as CodeGenAttention.forward, mp_num 4
    query, _, key = qkv.split(embed // 4, dim=-1)
    query, key = query.reshape(5, heads, d), key.reshape(5, heads, d)
    layer = AttentionLayer(
        "self", 0, "w", "w", Packing.MP4_QVK, heads, heads, d, d_in, d**-0.5, True
    )
    wq, wk = split_heads(layer, weight, weight)
    assert torch.allclose(torch.einsum("hdi,ti->thd", wq, x), query, atol=1e-12)
    assert torch.allclose(torch.einsum("hdi,ti->thd", wk, x), key, atol=1e-12)
    q_rows, k_rows = qk_rows(layer)
    assert torch.equal(weight[q_rows], wq) and torch.equal(weight[k_rows], wk)


def test_module_rules_name_each_class_once():
    """A dict literal keeps the last of two rows for one class silently: none may repeat."""
    tree = ast.parse(inspect.getsource(architectures))
    (table,) = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "MODULE_RULES"
    ]
    keys = []
    for key, value in zip(table.keys, table.values, strict=True):
        if key is not None:
            keys.append(key.value)
        else:  # **dict.fromkeys([...], rule)
            keys += [element.value for element in value.args[0].elts]
    repeated = [k for k, n in collections.Counter(keys).items() if n > 1]
    assert not repeated and len(keys) == len(architectures.MODULE_RULES)
