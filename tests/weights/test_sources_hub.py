"""qkmonitor.weights.sources' Hub path, through the real huggingface_hub client and LocalHub."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from qkmonitor import audit
from qkmonitor.errors import (
    AccessDeniedError,
    ModelNotFoundError,
    NotAModelError,
    UnsafeWeightsError,
)
from qkmonitor.weights.sources import open_source

STATISTICS = ("eig_mean", "eig_var", "eig_var_complex", "spectral_norm", "positive_fraction")


@pytest.fixture(scope="module")
def sharded_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded Llama checkpoint whose MLP weights dwarf its Q/K weights."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="1MB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _header_bytes(folder: Path) -> int:
    total = 0
    for shard in folder.glob("*.safetensors"):
        with shard.open("rb") as handle:
            total += 8 + struct.unpack("<Q", handle.read(8))[0]
    return total


#: what an audit needs of each architecture here (docs/metrics.md), by tensor name: Q/K weights,
#: QK-norm gains, MLA's latent path (q_a, q_b, kv_a with their norms; kv_b_proj separately, as
#: only its key rows count) and the FP8 block scales of those weights
_NEEDED = (
    "q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight", "q_a_proj.weight",
    "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "q_a_layernorm.weight",
    "kv_a_layernorm.weight", "q_a_proj.weight_scale_inv", "q_b_proj.weight_scale_inv",
    "kv_a_proj_with_mqa.weight_scale_inv", "kv_b_proj.weight_scale_inv",
)  # fmt: skip


def _needed_bytes(folder: Path) -> int:
    """Bytes of the tensors in _NEEDED, over every shard, plus kv_b_proj's key rows:
    qk_nope_head_dim of each head's qk_nope_head_dim + v_head_dim rows (config.json's sizes)."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    total = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = handle.get_tensor(name)
                if name.endswith(_NEEDED):
                    total += tensor.nbytes
                elif name.endswith("kv_b_proj.weight"):
                    nope = config["qk_nope_head_dim"]
                    total += tensor.nbytes * nope // (nope + config["v_head_dim"])
    return total


def test_hub_audit_equals_local_and_reads_only_qk(hub, fresh_hub_cache, sharded_llama_folder):
    sha = hub.add_repo("qk/llama-sharded", sharded_llama_folder)
    hub.reset_counters()
    remote = audit("qk/llama-sharded")
    local = audit(sharded_llama_folder)
    assert remote.model.sha == sha and remote.model.kind == "hub"
    assert [(h.block, h.layer, h.head) for h in remote.heads] == [
        (h.block, h.layer, h.head) for h in local.heads
    ]
    for ours, theirs in zip(remote.heads, local.heads, strict=True):
        for statistic in STATISTICS:
            assert getattr(ours, statistic) == getattr(theirs, statistic)
    shard_bytes = sum(
        hub.file_bytes_sent("qk/llama-sharded", shard.name)
        for shard in sharded_llama_folder.glob("*.safetensors")
    )
    checkpoint = sum(shard.stat().st_size for shard in sharded_llama_folder.glob("*.safetensors"))
    assert shard_bytes <= 1.1 * _needed_bytes(sharded_llama_folder) + _header_bytes(
        sharded_llama_folder
    )
    assert shard_bytes < checkpoint / 5  # the MLP weights were never fetched
    json_bytes = hub.bytes_sent - shard_bytes  # model info, config.json, the index
    assert json_bytes < 50_000


def _deepseek_v3(folder: Path, fp8: bool) -> Path:
    """A 2-layer DeepSeek-V3 (MLA; value rows 8 of each head's 16 kv_b_proj rows), in float32
    or FP8 with 16 x 16 block scales (quantized by tests/support, not by qkmonitor)."""
    from safetensors.torch import load_file, save_file
    from support.models import deepseek_v3_config
    from support.quantizers import fp8_block
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = deepseek_v3_config()
    DeepseekV3ForCausalLM(config).save_pretrained(folder)
    if fp8:
        quantized, _ = fp8_block(load_file(folder / "model.safetensors"), (16, 16))
        save_file(quantized, folder / "model.safetensors", metadata={"format": "pt"})
        values = json.loads((folder / "config.json").read_text())
        values["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16],
        }  # fmt: skip
        (folder / "config.json").write_text(json.dumps(values))
    return folder


def _gemma3(folder: Path) -> Path:
    """A composite model: a SigLIP vision tower and a Gemma 3 text decoder with QK-norm."""
    from support.behaviour import build, shrink

    build(shrink("gemma3")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["composite", "mla", "mla-fp8"])
def test_hub_audit_transfers_at_most_a_tenth_more_than_it_needs(
    hub, fresh_hub_cache, tmp_path, kind
):
    """Through the local Hub, an audit of a composite, an MLA and an FP8 MLA checkpoint equals the
    local one and transfers at most 1.1x the bytes it needs plus the safetensors header: MLA
    reads kv_b_proj's key rows, one range request per head, not its value rows."""
    folder = _gemma3(tmp_path) if kind == "composite" else _deepseek_v3(tmp_path, kind == "mla-fp8")
    repo = f"qk/{kind}"
    hub.add_repo(repo, folder)
    hub.reset_counters()
    remote, local = audit(repo), audit(folder)
    assert [(h.block, h.layer, h.head) for h in remote.heads] == [
        (h.block, h.layer, h.head) for h in local.heads
    ]
    for ours, theirs in zip(remote.heads, local.heads, strict=True):
        for statistic in STATISTICS:
            assert getattr(ours, statistic) == getattr(theirs, statistic)
    if kind == "composite":
        assert {h.block for h in remote.heads} == {"text", "vision"}
    else:
        assert remote.model.storage == ("fp8-block-16x16" if kind == "mla-fp8" else "f32")
    sent = hub.file_bytes_sent(repo, "model.safetensors")
    needed = _needed_bytes(folder)
    assert needed <= sent - _header_bytes(folder) <= 1.1 * needed


def test_revision_by_branch_tag_and_sha_is_recorded(hub, tmp_path):
    torch.manual_seed(1)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        vocab_size=99,
    )  # fmt: skip
    first, second = tmp_path / "first", tmp_path / "second"
    BertModel(config).save_pretrained(first)
    BertModel(config).save_pretrained(second)
    old = hub.add_repo("qk/bert-revisions", first)
    new = hub.add_repo("qk/bert-revisions", second)
    hub.create_tag("qk/bert-revisions", "v1", old)
    by_sha, by_tag, head = (
        audit("qk/bert-revisions", revision=old),
        audit("qk/bert-revisions", revision="v1"),
        audit("qk/bert-revisions"),
    )
    assert by_sha.model.sha == by_tag.model.sha == old and head.model.sha == new
    assert by_tag.model.revision == "v1"
    assert by_sha.heads[0].eig_var == by_tag.heads[0].eig_var != head.heads[0].eig_var
    assert by_sha.heads[0].eig_var == audit(first).heads[0].eig_var


def test_nonexistent_repo(hub):
    with pytest.raises(ModelNotFoundError, match="not found"):
        audit("qk/does-not-exist")


def test_bad_revision(hub, sharded_llama_folder):
    hub.add_repo("qk/llama-revision", sharded_llama_folder)
    with pytest.raises(ModelNotFoundError, match="revision 'nope' not found"):
        audit("qk/llama-revision", revision="nope")


def test_gated_repo_needs_a_token_with_access(hub, sharded_llama_folder, monkeypatch):
    hub.add_repo("qk/llama-gated", sharded_llama_folder, gated=True)
    with pytest.raises(AccessDeniedError, match=r"gated.*HF_TOKEN"):
        audit("qk/llama-gated")
    hub.add_token("hf_granted_reader", "granted")
    hub.grant_access("qk/llama-gated", "granted")
    monkeypatch.setenv("HF_TOKEN", "hf_granted_reader")
    assert len(audit("qk/llama-gated").heads) == 8


def test_private_repo_is_not_found_without_token(hub, sharded_llama_folder):
    hub.add_repo("secret-org/llama", sharded_llama_folder, private=True)
    with pytest.raises(ModelNotFoundError, match="HF_TOKEN"):
        audit("secret-org/llama")
    hub.add_token("hf_secret_member", "member", orgs=["secret-org"])
    assert audit("secret-org/llama", token="hf_secret_member").model.sha


def test_pickle_only_repo_is_refused(hub, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    torch.save({"encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4)},
               folder / "pytorch_model.bin")  # fmt: skip
    hub.add_repo("qk/pickled", folder)
    with pytest.raises(UnsafeWeightsError, match="allow-pickle"):
        audit("qk/pickled")


def test_allowed_pickle_is_downloaded_then_removed(hub, tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    weight = torch.randn(4, 4)
    torch.save({"encoder.layer.0.attention.self.query.weight": weight},
               folder / "pytorch_model.bin")  # fmt: skip
    hub.add_repo("qk/pickled-allowed", folder)
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    source = open_source("qk/pickled-allowed", allow_pickle=True)
    name = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(source.read([name])[name], weight, rtol=0, atol=0)
    assert not list(downloads.iterdir())  # the temporary copy is gone


def test_repo_without_config(hub, tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    hub.add_repo("qk/just-a-readme", tmp_path)
    with pytest.raises(NotAModelError, match=r"config\.json"):
        audit("qk/just-a-readme")


def test_invalid_repo_id():
    with pytest.raises(ModelNotFoundError, match="valid Hub repo id"):
        audit("bad id with spaces")
