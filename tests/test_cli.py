"""The qkmonitor command line: tables, exports, exit codes and one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from qkmonitor.cli import main

MINILM_HEADS = 6 * 12


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_default_audits_the_bundled_model(capsys):
    status, out, err = run(capsys, "audit")
    assert status == 0
    assert "all-MiniLM-L6-v2" in err
    assert "mean over heads per layer" in out
    assert f"{MINILM_HEADS} heads; most concentrated" in out


def test_exports_json_and_csv(capsys, tmp_path):
    json_path, csv_path = tmp_path / "audit.json", tmp_path / "audit.csv"
    status, out, _ = run(capsys, "audit", "--json", str(json_path), "--csv", str(csv_path),
                         "--per-head")  # fmt: skip
    assert status == 0
    data = json.loads(json_path.read_text())
    assert set(data) == {"model", "heads"} and len(data["heads"]) == MINILM_HEADS
    assert data["model"]["model_type"] == "bert"
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == MINILM_HEADS
    assert float(rows[5]["eig_var"]) == pytest.approx(data["heads"][5]["eig_var"], rel=1e-12)
    assert "per head" in out


def test_hub_repo_through_the_local_hub(capsys, hub, tmp_path):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, vocab_size=99)  # fmt: skip
    BertModel(config).save_pretrained(tmp_path)
    sha = hub.add_repo("qk/cli-bert", tmp_path)
    status, out, err = run(capsys, "audit", "qk/cli-bert", "--revision", "main")
    assert status == 0 and sha in err and "4 heads" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["audit", "./no-such-folder"], "folder './no-such-folder' does not exist"),
        (["audit", "qk/no-such-repo"], "not found"),
        (["audit", "--json", "/no/such/dir/out.json"], "cannot write '/no/such/dir/out.json'"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, hub, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qkmonitor: error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out


def test_folder_without_config_writes_nothing(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    target = tmp_path / "out.json"
    status, _, err = run(capsys, "audit", str(empty), "--json", str(target))
    assert status == 2 and "no config.json" in err
    assert not target.exists()


def test_console_script_exit_code(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "qkmonitor.cli", "audit", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith("qkmonitor: error: folder")
    assert Path(tmp_path / "missing").exists() is False
