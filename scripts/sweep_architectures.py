"""The architecture sweep (tests/support/sweep.py) from the repository root, with this
checkout's qkmonitor, under whichever Python runs it: the pinned transformers or another one.

    .venv/bin/python scripts/sweep_architectures.py [model_type ...] [--json out.json]
    .venv-newest/bin/python scripts/sweep_architectures.py ...    # the newest transformers

Every model_type is built tiny from its config, audited, and each head compared with what the
model itself computes; it prints exact / refused / wrong / unverifiable / unbuildable.
"""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # support.*, then this checkout's qkmonitor
    runpy.run_module("support.sweep", run_name="__main__", alter_sys=True)
