"""Checks for a CUDA machine (marker ``gpu``; skipped without CUDA): run by scripts/gpu_check.sh.

- NCCL DDP on one GPU gives the single-process numbers;
- bf16 autocast: entropy and max logit close to the fp32 run's (bf16 rounding);
- sdpa and flash attention (flash_attention_2, where flash-attn is installed): entropy and max
  logit equal those measured on the eager implementation of the same weights and batch;
- FSDP2 (fully_shard, one GPU, NCCL): the spectra and the regularizer's R of the unsharded run.
ZeRO-3 runs in tests/training/test_zero3.py (CPU accelerator), which gpu_check.sh runs too.
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
from distributed.tiny import PaddedTokens, tiny_bert

from qkmonitor import QKMonitor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ATTENTION = ("attn_entropy", "attn_entropy_norm", "attn_max_logit")


def batch(step: int = 0) -> dict[str, torch.Tensor]:
    data = PaddedTokens()
    return {k: torch.stack([data[4 * step + j][k] for j in range(4)]).cuda() for k in data[0]}


def one_step(model: torch.nn.Module, bf16: bool = False, **settings) -> dict[str, float]:
    model.train()
    monitor = QKMonitor(model, **settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with monitor.step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return monitor.metrics()
    finally:
        monitor.close()


@contextlib.contextmanager
def nccl_group():
    """A one-process NCCL group on this GPU."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        dist.destroy_process_group()


def assert_close(got: dict[str, float], want: dict[str, float], rel: float) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-9), key


def test_nccl_ddp_on_one_gpu_equals_one_process():
    want = one_step(tiny_bert(dropout=0.0).cuda(), regularization=0.5)
    with nccl_group():
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_bert(dropout=0.0).cuda())
        got = one_step(ddp, regularization=0.5)
    assert_close(got, want, rel=1e-5)


def test_bf16_autocast_measures_what_fp32_measures_to_bf16_rounding():
    want = one_step(tiny_bert(dropout=0.0).cuda())
    got = one_step(tiny_bert(dropout=0.0).cuda(), bf16=True)
    assert_close(
        {k: v for k, v in got.items() if k.split("/")[1] in ATTENTION},
        {k: v for k, v in want.items() if k.split("/")[1] in ATTENTION},
        rel=3e-2,
    )


def tiny_llama(implementation: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    model.set_attn_implementation(implementation)
    return model


def attention_metrics(implementation: str) -> dict[str, float]:
    model = tiny_llama(implementation)
    ids = batch()
    ids.pop("token_type_ids", None)
    monitor = QKMonitor(model, statistics=("eig_var",))
    try:
        with monitor.step(), torch.no_grad():
            model(**ids)
        return {k: v for k, v in monitor.metrics().items() if k.split("/")[1] in ATTENTION}
    finally:
        monitor.close()


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_sdpa_and_flash_entropy_and_max_logit_equal_eager(implementation):
    if implementation == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn not installed")
    want = attention_metrics("eager")
    got = attention_metrics(implementation)
    assert_close(got, want, rel=1e-5)  # the same bf16 q and k, measured in float32 or better


def test_fsdp2_on_one_gpu_equals_the_unsharded_run():
    from torch.distributed.fsdp import fully_shard

    want = one_step(tiny_bert(dropout=0.0).cuda(), regularization=0.5, entropy=False)
    with nccl_group():
        model = tiny_bert(dropout=0.0).cuda()
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        got = one_step(model, regularization=0.5, entropy=False)
    assert_close(got, want, rel=1e-5)
