"""Run tests/distributed/train.py under torchrun once per test session, with 1 and 2 processes."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("train.py")
TIMEOUT = 240  # seconds; a hang in a collective fails the test instead of blocking the suite


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.cache
def torchrun_results() -> dict[int, list[dict]]:
    """processes (1, 2) -> what each rank saved, in rank order."""
    results = {}
    for processes in (1, 2):
        out = tempfile.mkdtemp(prefix=f"qkmonitor-ddp{processes}-")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(SCRIPT),
            out,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr[-4000:]
        results[processes] = [torch.load(Path(out) / f"rank{rank}.pt") for rank in range(processes)]
    return results
