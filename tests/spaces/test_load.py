"""Concurrent load: 20 simultaneous /audit requests through the queue all complete correctly."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from support.checks import same_bits
from transformers import LlamaConfig, LlamaForCausalLM

from qkmonitor import audit

REQUESTS = 20


@pytest.fixture(scope="module")
def targets(hub, models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(repo id, revision) -> local folder, for ten audits that are not cached yet."""
    root = tmp_path_factory.mktemp("load-models")
    found = {}
    for index in range(8):
        torch.manual_seed(100 + index)
        config = LlamaConfig(
            vocab_size=99, hidden_size=64, num_hidden_layers=2 + index % 3,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )  # fmt: skip
        folder = root / f"llama-{index}"
        LlamaForCausalLM(config).save_pretrained(folder)
        hub.add_repo(f"qk/load-{index}", folder)
        found[(f"qk/load-{index}", "")] = folder
    found[("qk/tiny-bert", "")] = models.bert
    found[("qk/tiny-llama", "finetuned")] = models.llama_tuned
    return found


@pytest.fixture
def in_flight(service, monkeypatch) -> dict[str, int]:
    """Counts the audits computing at once (cache misses), and the most seen."""
    counts = {"now": 0, "most": 0}
    lock = threading.Lock()
    compute = service.audit_source

    def counted(*args, **kwargs):
        with lock:
            counts["now"] += 1
            counts["most"] = max(counts["most"], counts["now"])
        try:
            return compute(*args, **kwargs)
        finally:
            with lock:
                counts["now"] -= 1

    monkeypatch.setattr(service, "audit_source", counted)
    return counts


def test_twenty_simultaneous_audits_all_complete_correctly(url, launched, targets, in_flight):
    client = Client(url, verbose=False, max_workers=REQUESTS)
    requests = [list(targets)[i % len(targets)] for i in range(REQUESTS)]
    start = time.monotonic()
    jobs = [client.submit(repo, revision, api_name="/audit") for repo, revision in requests]
    answers = [job.result(timeout=120) for job in jobs]
    elapsed = time.monotonic() - start
    for (repo, revision), (summary, result) in zip(requests, answers, strict=True):
        expected = audit(targets[(repo, revision)]).to_dict()
        assert same_bits(result["heads"], expected["heads"]), repo
        assert result["model"]["source"] == repo and repo in summary
        assert result["model"]["revision"] == (revision or None)
    assert in_flight["most"] <= launched[1].concurrency  # the queue's limit held
    print(f"{REQUESTS} simultaneous audits in {elapsed:.1f} s, {in_flight['most']} at once at most")


def test_queue_limits_are_configured(launched):
    demo, settings = launched
    assert demo._queue.max_size == settings.queue_size
    limits = {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values()}
    for name in ("audit", "compare", "push_card"):  # Space.audit limits audits after its cache
        assert limits[name][1] is None
    assert limits["attention"] == ("forward", 1)
