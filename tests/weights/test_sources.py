"""Weight sources: safetensors headers and byte ranges, shards, pickles, in-memory models."""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.checks import one_line_error
from support.models import CASES_BY_ID, build

from qkmonitor.audit import audit_source
from qkmonitor.errors import (
    CorruptWeightsError,
    ModelNotFoundError,
    NotAModelError,
    QKMonitorError,
    UnsafeWeightsError,
)
from qkmonitor.weights.live import live_weights
from qkmonitor.weights.sources import LocalSource, ModelSource, open_source

LLAMA = CASES_BY_ID["llama"]


def _write_raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _config_only(folder: Path, llama_folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text((llama_folder / "config.json").read_text())
    return folder


# --- local safetensors -------------------------------------------------------------------------


def test_local_source_reads_headers_then_exact_tensors(llama, llama_folder):
    source = open_source(llama_folder)
    assert isinstance(source, LocalSource)
    assert source.kind == "local" and source.sha is None
    state = llama.state_dict()
    name = "model.layers.1.self_attn.k_proj.weight"
    assert source.shapes()[name] == tuple(state[name].shape)
    assert source.dtypes()[name] == "F32"
    tensors = source.read([name])
    assert list(tensors) == [name]
    torch.testing.assert_close(tensors[name], state[name], rtol=0, atol=0)
    assert source.byte_size([name]) == state[name].nbytes


def test_sharded_checkpoint_equals_unsharded(llama, llama_folder, tmp_path):
    llama.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(shards) > 2
    sharded, single = open_source(tmp_path), open_source(llama_folder)
    assert sharded.shapes() == single.shapes()
    assert sharded.dtypes() == single.dtypes()
    names = [n for n in single.shapes() if "self_attn" in n]
    for name, tensor in sharded.read(names).items():
        torch.testing.assert_close(tensor, single.read([name])[name], rtol=0, atol=0)


def test_only_requested_byte_ranges_are_read(llama_folder, monkeypatch):
    """Reading Q/K touches exactly those tensors' byte ranges, nothing else of the file."""
    source = open_source(llama_folder)
    reads = []
    original = LocalSource._read_range

    def spy(self, file, start, end):
        reads.append((file, start, end))
        return original(self, file, start, end)

    monkeypatch.setattr(LocalSource, "_read_range", spy)
    audit_source(source)
    wanted = {n for n in source.shapes() if n.endswith(("q_proj.weight", "k_proj.weight"))}
    specs = {(s.file, s.start, s.end) for n, s in source._specs.items() if n in wanted}
    assert sorted(reads) == sorted(specs)


ROWS = [(1, 3), (3, 4), (9, 12), (0, 1)]  # adjacent ranges merge; any order is kept


def test_row_selection_reads_only_those_rows(llama, llama_folder, tmp_path, monkeypatch):
    """read(names, rows) equals the whole tensor's rows, from one byte range per run of adjacent
    rows, for a single file, shards and a model in memory; byte_size counts the same bytes."""
    name = "model.layers.1.self_attn.q_proj.weight"
    want = llama.state_dict()[name][[1, 2, 3, 9, 10, 11, 0]]
    row_bytes = llama.state_dict()[name][0].nbytes
    llama.save_pretrained(tmp_path, max_shard_size="20KB")
    reads = []
    original = LocalSource._read_range

    def spy(self, file, start, end):
        reads.append(end - start)
        return original(self, file, start, end)

    monkeypatch.setattr(LocalSource, "_read_range", spy)
    for source in (open_source(llama_folder), open_source(tmp_path), ModelSource(llama)):
        reads.clear()
        got = source.read([name], {name: ROWS})[name]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert source.byte_size([name], {name: ROWS}) == 7 * row_bytes
        if source.kind == "local":
            assert reads == [3 * row_bytes, 3 * row_bytes, row_bytes]
    with pytest.raises(ValueError, match="not within"):
        open_source(llama_folder).read([name], {name: [(0, 10_000)]})


def test_missing_config(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    message = one_line_error(NotAModelError, lambda: open_source(tmp_path))
    assert "config.json" in message


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"hidden_size": 64}', "model_type"),
        ('{"model_type": "llama", "num_attention_heads": "x"}', "invalid"),
        ('{"model_type": "llama", "num_attention_heads": 3, "hidden_size": 64}', "invalid"),
    ],
)
def test_bad_config(tmp_path, config, needle):
    (tmp_path / "config.json").write_text(config)
    save_file({"x": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert needle in one_line_error(NotAModelError, lambda: open_source(tmp_path))


def test_no_weights(tmp_path, llama_folder):
    folder = _config_only(tmp_path / "m", llama_folder)
    assert "no model weights" in one_line_error(NotAModelError, lambda: open_source(folder))


def test_paths_that_are_not_model_folders(tmp_path, llama_folder):
    one_line_error(ModelNotFoundError, lambda: open_source(str(tmp_path / "missing")))
    one_line_error(ModelNotFoundError, lambda: open_source("./not/a/folder"))
    file = tmp_path / "file.json"
    file.write_text("{}")
    one_line_error(NotAModelError, lambda: open_source(file))
    message = one_line_error(QKMonitorError, lambda: open_source(llama_folder, revision="main"))
    assert "revision" in message


def test_truncated_safetensors(tmp_path, llama_folder):
    folder = _config_only(tmp_path / "m", llama_folder)
    data = (llama_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = one_line_error(CorruptWeightsError, lambda: open_source(folder))
    assert "truncated" in message


def test_truncated_inside_the_header(tmp_path, llama_folder):
    folder = _config_only(tmp_path / "m", llama_folder)
    data = (llama_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    one_line_error(CorruptWeightsError, lambda: open_source(folder))
    (folder / "model.safetensors").write_bytes(data[:5])
    one_line_error(CorruptWeightsError, lambda: open_source(folder))


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(4096),  # garbage: a random 8-byte "length"
        struct.pack("<Q", 20) + b"\xff\xfe not json at all" + b"\x00" * 64,
        struct.pack("<Q", 6) + b"[1, 2]" + b"\x00" * 64,
        struct.pack("<Q", 40) + b'{"a": {"dtype": "F32", "shape": [2]}}   ' + b"\x00" * 8,
        struct.pack("<Q", 56) + b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": 7}}',
    ],
    ids=["random", "not-utf8", "not-a-dict", "no-offsets", "bad-offsets"],
)
def test_malformed_header(tmp_path, llama_folder, content):
    folder = _config_only(tmp_path / "m", llama_folder)
    (folder / "model.safetensors").write_bytes(content)
    one_line_error(CorruptWeightsError, lambda: open_source(folder))


def test_inverted_data_offsets(tmp_path, llama_folder):
    folder = _config_only(tmp_path / "m", llama_folder)
    header = {"a.q_proj.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}
    _write_raw_safetensors(folder / "model.safetensors", header, b"\x00" * 8)
    one_line_error(CorruptWeightsError, lambda: open_source(folder))


def test_tensor_bytes_disagree_with_shape(tmp_path, llama_folder):
    folder = _config_only(tmp_path / "m", llama_folder)
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
    _write_raw_safetensors(folder / "model.safetensors", header, b"\x00" * 8)
    source = open_source(folder)
    one_line_error(CorruptWeightsError, lambda: source.read(["w"]))


def test_unsupported_dtype(tmp_path, llama_folder):
    folder = _config_only(tmp_path / "m", llama_folder)
    header = {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}
    _write_raw_safetensors(folder / "model.safetensors", header, b"\x00" * 8)
    message = one_line_error(CorruptWeightsError, lambda: open_source(folder).read(["w"]))
    assert "C64" in message


def test_index_naming_a_missing_shard(tmp_path, llama):
    llama.save_pretrained(tmp_path, max_shard_size="20KB")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    assert "missing" in one_line_error(CorruptWeightsError, lambda: open_source(tmp_path))


def test_index_without_weight_map(tmp_path, llama_folder):
    folder = _config_only(tmp_path / "m", llama_folder)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    one_line_error(CorruptWeightsError, lambda: open_source(folder))


# --- pickles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_pickle_only_needs_permission(tmp_path, llama, llama_folder, legacy):
    folder = _config_only(tmp_path / "m", llama_folder)
    state = llama.state_dict()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    message = one_line_error(UnsafeWeightsError, lambda: open_source(folder))
    assert "pytorch_model.bin" in message and "allow" in message
    source = open_source(folder, allow_pickle=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert source.dtypes()[name] == "F32"
    torch.testing.assert_close(source.read([name])[name], state[name], rtol=0, atol=0)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def test_pickle_is_never_executed(tmp_path, llama_folder, monkeypatch):
    folder = _config_only(tmp_path / "m", llama_folder)
    torch.save({"w": _Exploit()}, folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    message = one_line_error(CorruptWeightsError, lambda: open_source(folder, allow_pickle=True))
    assert "weights_only" in message
    assert not (tmp_path / "EXPLOITED").exists()


def test_safetensors_preferred_over_pickle(tmp_path, llama):
    llama.save_pretrained(tmp_path)
    torch.save({"junk": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    source = open_source(tmp_path)
    assert "junk" not in source.shapes()


# --- in-memory models ---------------------------------------------------------------------------


def test_model_source_names_match_the_checkpoint(llama, llama_folder):
    source = ModelSource(llama)
    assert source.kind == "model" and source.config is llama.config
    on_disk = open_source(llama_folder).shapes()
    attention = {n: s for n, s in on_disk.items() if "self_attn" in n}
    assert {n: source.shapes()[n] for n in attention} == attention
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not source.read([name])[name].requires_grad


def test_model_without_config():
    one_line_error(NotAModelError, lambda: open_source(torch.nn.Linear(2, 2)))


def _lora(model, targets, **kwargs):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs
    )
    return get_peft_model(model, config)


def test_live_weights_merge_lora_and_keep_autograd():
    import copy

    base = build(LLAMA)
    peft_model = _lora(copy.deepcopy(base), ["q_proj", "k_proj"])
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    weights = dict(live_weights(peft_model))
    suffix = "model.layers.1.self_attn.q_proj.weight"
    (name,) = [n for n in weights if n.endswith(suffix)]
    effective = weights[name]()
    torch.testing.assert_close(effective, merged[suffix], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(effective, base.state_dict()[suffix])
    assert not any("lora_" in n or "base_layer" in n for n in weights)
    effective.sum().backward()  # gradients reach the adapter, not the frozen base
    module = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    assert module.lora_B["default"].weight.grad is not None

    with peft_model.disable_adapter():
        torch.testing.assert_close(weights[name](), base.state_dict()[suffix], rtol=0, atol=0)
    peft_model.merge_adapter()
    torch.testing.assert_close(weights[name](), merged[suffix], rtol=1e-6, atol=1e-7)


# --- hostile files, through a folder and through the Hub ------------------------------------------

_TENSOR = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
HOSTILE_HEADERS = {
    "offset-1e999": _TENSOR.replace(b"[0, 8]", b"[0, 1e999]"),
    "shape-1e999": _TENSOR.replace(b"[2]", b"[1e999]"),
    "nested-200k-deep": b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    "int-5000-digits": _TENSOR.replace(b"[0, 8]", b"[0, " + b"9" * 5000 + b"]"),
    "float-offset": _TENSOR.replace(b"[0, 8]", b"[0, 8.0]"),
    "negative-dim": _TENSOR.replace(b"[2]", b"[-2]"),
    "offsets-not-a-pair": _TENSOR.replace(b"[0, 8]", b"[0, 4, 8]"),
}
HOSTILE_CONFIGS = {
    "number-1e999": ('"rope_theta": 1e999', "out of range"),
    "nested-200k-deep": ('"x": ' + "[" * 200_000 + "]" * 200_000, "nested too deeply"),
    "nested-100-deep": ('"x": ' + "[" * 100 + "]" * 100, "levels deep"),
    "int-5000-digits": ('"vocab_size": ' + "9" * 5000, "out of range"),
    "model-type-list": ('"model_type": ["llama"]', "model_type is list"),
    "17-MB": ('"padding": "' + "x" * (17 * 2**20) + '"', "larger than 16 MB"),
}


@pytest.fixture(params=["local", "hub"])
def opened(request, hub):
    """Open a folder as given (local) or as a new repo of the LocalHub holding a copy (hub)."""

    def open_folder(folder: Path, **kwargs):
        if request.param == "local":
            return open_source(folder, **kwargs)
        repo = f"qk/hostile-{uuid.uuid4().hex[:12]}"
        hub.add_repo(repo, folder)
        return open_source(repo, **kwargs)

    return open_folder


@pytest.mark.parametrize("header", HOSTILE_HEADERS.values(), ids=HOSTILE_HEADERS.keys())
def test_hostile_safetensors_header(tmp_path, llama_folder, opened, header):
    folder = _config_only(tmp_path / "m", llama_folder)
    _write_raw_safetensors(folder / "model.safetensors", header, b"\x00" * 8)
    one_line_error(CorruptWeightsError, lambda: opened(folder))


@pytest.mark.parametrize(("entry", "needle"), HOSTILE_CONFIGS.values(), ids=HOSTILE_CONFIGS.keys())
def test_hostile_config(tmp_path, llama_folder, opened, entry, needle):
    folder = tmp_path / "m"
    folder.mkdir()
    config = (llama_folder / "config.json").read_text().rstrip().rstrip("}")
    (folder / "config.json").write_text(config + f", {entry}}}")
    (folder / "model.safetensors").write_bytes((llama_folder / "model.safetensors").read_bytes())
    assert needle in one_line_error(NotAModelError, lambda: opened(folder))


def _index(folder: Path, weight_map: dict) -> None:
    text = json.dumps({"metadata": {}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(text)


def test_index_whose_shard_names_are_lists(tmp_path, llama_folder, opened):
    folder = _config_only(tmp_path / "m", llama_folder)
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    _index(folder, {"w": ["model.safetensors"]})
    assert "not a plain file name" in one_line_error(CorruptWeightsError, lambda: opened(folder))


@pytest.mark.parametrize(
    "shard",
    ["../other/model.safetensors", "../../qk/other/resolve/main/model.safetensors",
     "/etc/passwd", "./model.safetensors", "a//b.safetensors"],
)  # fmt: skip
def test_index_cannot_point_outside_the_checkpoint(tmp_path, llama_folder, opened, shard):
    (tmp_path / "other").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "other" / "model.safetensors")
    folder = _config_only(tmp_path / "m", llama_folder)
    save_file({"v": torch.zeros(2)}, folder / "model.safetensors")
    _index(folder, {"v": "model.safetensors", "w": shard})
    assert "not a plain file name" in one_line_error(CorruptWeightsError, lambda: opened(folder))


def test_hub_index_shard_must_be_listed_at_the_commit(tmp_path, llama_folder, hub):
    folder = _config_only(tmp_path / "m", llama_folder)
    save_file({"v": torch.zeros(2)}, folder / "model.safetensors")
    _index(folder, {"v": "model.safetensors", "w": "sub/model-2.safetensors"})
    sha = hub.add_repo("qk/index-unlisted", folder)
    message = one_line_error(CorruptWeightsError, lambda: open_source("qk/index-unlisted"))
    assert "sub/model-2.safetensors" in message and sha in message


def test_local_shard_linked_outside_the_folder_is_refused(tmp_path, llama_folder):
    (tmp_path / "other").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "other" / "secret.safetensors")
    folder = _config_only(tmp_path / "m", llama_folder)
    save_file({"v": torch.zeros(2)}, folder / "model-1.safetensors")
    (folder / "model-2.safetensors").symlink_to(tmp_path / "other" / "secret.safetensors")
    _index(folder, {"v": "model-1.safetensors", "w": "model-2.safetensors"})
    message = one_line_error(CorruptWeightsError, lambda: open_source(folder))
    assert "outside the folder" in message
    (folder / "model.safetensors.index.json").unlink()  # found without an index: the same
    assert "outside" in one_line_error(CorruptWeightsError, lambda: open_source(folder))


def test_hugging_face_cache_snapshot_links_are_inside(tmp_path, llama_folder, llama):
    """A snapshot folder of the HF cache links every file to the repo's blobs/ folder."""
    repo = tmp_path / "models--qk--llama"
    snapshot, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in ("config.json", "model.safetensors"):
        (blobs / file.upper()).write_bytes((llama_folder / file).read_bytes())
        (snapshot / file).symlink_to(Path("../../blobs") / file.upper())
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors = open_source(snapshot).read([name])
    torch.testing.assert_close(tensors[name], llama.state_dict()[name], rtol=0, atol=0)
