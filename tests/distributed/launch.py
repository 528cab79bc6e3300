"""Run the scripts of tests/distributed under torchrun (gloo, CPU), once per test session."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TIMEOUT = 240  # seconds; a hang in a collective fails the test instead of blocking the suite


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.cache
def torchrun(script: str, processes: int, env: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """What each rank of ``torchrun --nproc_per_node processes script OUT`` saved, by rank
    (``env``: extra environment variables, as (name, value) pairs)."""
    out = tempfile.mkdtemp(prefix=f"qkmonitor-{Path(script).stem}{processes}-")
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
        str(Path(__file__).with_name(script)),
        out,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **dict(env)}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(Path(out) / f"rank{rank}.pt") for rank in range(processes)]


def torchrun_results() -> dict[int, list[dict]]:
    """train.py with 1 and 2 processes: processes -> what each rank saved."""
    return {processes: torchrun("train.py", processes) for processes in (1, 2)}
