"""DeepSpeed ZeRO-3 for real (on CPU: DS_ACCELERATOR=cpu, 2 processes over gloo), with
transformers seeing ZeRO-3 as under the Trainer (tests/distributed/zero3.py, one launch):
QKMonitor starts on the engine, its eig_var is the full weights', the regularizer's gradient
gathered from the partitions is exactly d(lambda R)/dW, audit() of the engine equals the
unsharded audit, and the Trainer with TrainingArguments(deepspeed=...) and QKMonitorCallback
logs what the same run logs in one process without DeepSpeed, gathering one layer at a time."""

from __future__ import annotations

import pytest
from distributed.launch import torchrun

pytest.importorskip("deepspeed", reason="DeepSpeed not installed (scripts/setup.sh installs it)")

pytestmark = pytest.mark.slow


def zero3() -> list[dict]:
    return torchrun("zero3.py", 2, (("DS_ACCELERATOR", "cpu"),))


def test_zero3_monitor_regularizer_and_audit_are_exact_on_two_processes():
    ranks = zero3()
    for result in ranks:
        assert result["steps"] == 1
        assert result["spectra"] < 1e-12  # float64 statistics of the gathered weights
        assert result["gradient"] < 1e-5  # float32 gradient against the float64 reference
        assert result["audit"] < 1e-12
    assert ranks[0] == ranks[1]


def test_trainer_callback_under_zero3_logs_the_single_process_values():
    """train.py's monitored run (regularizer on, entropy, max logit, rank collapse, per head;
    3 SGD steps, 2 accumulation steps): under ZeRO-3 on 2 processes as on 1 without DeepSpeed."""
    (single,) = torchrun("train.py", 1)  # shared with test_callback.py's run in one session
    rank0, rank1 = zero3()
    assert rank0["sharded"] and rank1["sharded"]  # the callback saw partitioned parameters
    assert rank0["logs"] == rank1["logs"] and len(rank0["logs"]) == 3
    assert rank0["gathers"] == rank1["gathers"]  # collectives: every rank in the same order
    assert any("attn_max_logit" in key for key in single["logs"][0])
    for sharded, one in zip(rank0["logs"], single["logs"], strict=True):
        assert sharded.keys() == one.keys()
        for key, value in one.items():
            assert sharded[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_trainer_callback_under_zero3_gathers_one_layer_at_a_time():
    """DeepSpeed's GatheredParameters, recorded in the same run: only one attention layer's Q/K
    parameters at a time, never nested; the reference eig_var at train begin, the regularizer in
    each of the 3 steps' forward and the statistics at each of the 3 logged steps, per layer."""
    events = zero3()[0]["gathers"]
    kinds = [kind for kind, _ in events]
    assert kinds == ["enter", "exit"] * (len(events) // 2)  # never two layers at once
    gathered = [layer for kind, layer in events if kind == "enter"]
    assert -1 not in gathered  # each a layer's own Q/K parameters, nothing else
    assert sorted(gathered) == [0] * 7 + [1] * 7
