"""DeepSpeed ZeRO-3 for real (on CPU: DS_ACCELERATOR=cpu, 2 processes over gloo), with
transformers seeing ZeRO-3 as under the Trainer: QKMonitor starts on the engine, its eig_var is
the full weights', the regularizer's gradient gathered from the partitions is exactly
d(lambda R)/dW, and audit() of the engine equals the unsharded audit (tests/distributed/zero3.py).
The Trainer callback under DeepSpeed: test_callback.py's stand-in test covers its gathering."""

from __future__ import annotations

import pytest
from distributed.launch import torchrun

pytest.importorskip("deepspeed", reason="DeepSpeed not installed (scripts/setup.sh installs it)")

pytestmark = pytest.mark.slow


def test_zero3_monitor_regularizer_and_audit_are_exact_on_two_processes():
    ranks = torchrun("zero3.py", 2, (("DS_ACCELERATOR", "cpu"),))
    for result in ranks:
        assert result["steps"] == 1
        assert result["spectra"] < 1e-12  # float64 statistics of the gathered weights
        assert result["gradient"] < 1e-5  # float32 gradient against the float64 reference
        assert result["audit"] < 1e-12
    assert ranks[0] == ranks[1]
