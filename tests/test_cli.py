"""The qkmonitor command line: tables, exports, exit codes and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from qkmonitor import audit
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
        (["audit", "--csv", "/proc/out.csv"], "cannot write '/proc/out.csv'"),
        (
            ["audit", "https://huggingface.co/qk/cli-bert"],
            "a URL; pass the Hub repo id instead: qk/cli-bert",
        ),
        (
            ["card", "hf.co/qk/cli-bert/tree/main"],
            "a URL; pass the Hub repo id instead: qk/cli-bert",
        ),
        (["card", "/no/such/folder"], "folder '/no/such/folder' does not exist"),
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


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A 1-layer BERT of width 32 (2 heads) saved as config + safetensors."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, vocab_size=99)  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(folder)
    return folder


def test_outputs_are_checked_before_the_audit(capsys, tiny_folder, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the audit ran before the output paths were checked")

    monkeypatch.setattr(sys.modules["qkmonitor.audit"], "audit", refuse)
    link = tmp_path / "out.json"
    link.symlink_to("/proc/out.json")
    status, _, err = run(capsys, "audit", str(tiny_folder), "--json", str(link))
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"qkmonitor: error: cannot write '{link}'") and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")
def test_a_full_device_is_an_error_and_stays_a_device(capsys, tiny_folder, tmp_path):
    full = tmp_path / "full"
    os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # what /dev/full is
    status, _, err = run(capsys, "audit", str(tiny_folder), "--json", str(full))
    assert status == 2
    assert err == f"qkmonitor: error: cannot write '{full}': No space left on device\n"
    assert stat.S_ISCHR(os.lstat(full).st_mode) and os.lstat(full).st_rdev == os.makedev(1, 7)


def test_json_to_dev_stdout_into_a_pipe_follows_the_tables(tiny_folder):
    completed = subprocess.run(
        [sys.executable, "-m", "qkmonitor.cli", "audit", str(tiny_folder), "--json", "/dev/stdout"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    tables, _, text = completed.stdout.partition("\n{")
    assert "2 heads; most concentrated" in tables
    assert json.loads("{" + text) == json.loads(audit(tiny_folder).to_json())
    assert os.path.islink("/dev/stdout")


# Sends the process a real SIGINT at the moment it starts importing one module, then runs the
# command as the console script does (the script imports qkmonitor.cli, then calls main).
_INTERRUPT_AT_IMPORT = """
import importlib.abc, os, signal, sys
MODULE = sys.argv.pop(1)
class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == MODULE:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, Interrupt())
from qkmonitor.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("module", ["torch"])  # the first import qkmonitor.audit makes
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tiny_folder, module):
    completed = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_AT_IMPORT, module, "audit", str(tiny_folder)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 130
    assert completed.stderr == "qkmonitor: interrupted\n"
