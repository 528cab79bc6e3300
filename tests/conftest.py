"""Shared pytest configuration.

Hub: every test session talks to a `LocalHub` (tests/support/hub_server.py) instead of
huggingface.co. huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HOME`` when it is imported, so the
server starts and the environment is set here, at conftest import time, before any test module
imports huggingface_hub or transformers. The session also gets an empty ``HF_HOME`` (no saved token,
no warm cache) and no ``HF_TOKEN`` or offline switches from the caller's environment.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.hub_server import LocalHub

if TYPE_CHECKING:
    import torch

if "huggingface_hub" in sys.modules:
    raise RuntimeError(
        "huggingface_hub was imported before tests/conftest.py, so it would ignore the LocalHub "
        "endpoint; import it lazily in whatever plugin or conftest loads first."
    )

for _variable in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
):
    os.environ.pop(_variable, None)

_HF_HOME = tempfile.mkdtemp(prefix="qkmonitor-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"  # uploads take the LFS path LocalHub implements

_HUB = LocalHub()
atexit.register(_HUB.shutdown)
os.environ["HF_ENDPOINT"] = _HUB.url


@pytest.fixture(scope="session")
def hub() -> LocalHub:
    """The session's LocalHub. Add repos and tokens to it; use repo ids unique to your test."""
    return _HUB


@pytest.fixture
def fresh_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty download cache for this test (huggingface_hub and transformers), so files come
    over HTTP again and `LocalHub.bytes_sent` sees them."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def llama() -> torch.nn.Module:
    """The tiny random Llama of support.models' cases (GQA, RoPE), built once; read only."""
    from support.models import CASES_BY_ID, build  # after the environment above is set

    return build(CASES_BY_ID["llama"])


@pytest.fixture(scope="session")
def llama_folder(llama: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """That Llama saved as a local checkpoint folder (config.json + model.safetensors)."""
    folder = tmp_path_factory.mktemp("llama")
    llama.save_pretrained(folder)
    return folder
