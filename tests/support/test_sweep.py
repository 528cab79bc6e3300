"""scripts/sweep_architectures.py: the sweep from the repository root, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_sweep_script_checks_a_model_type_from_the_repository_root(tmp_path):
    out = tmp_path / "sweep.json"
    run = subprocess.run(
        [sys.executable, "scripts/sweep_architectures.py", "bert", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "exact 1" in run.stdout
    assert json.loads(out.read_text())["bert"]["status"] == "exact"
