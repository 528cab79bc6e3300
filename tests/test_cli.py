"""The qkmonitor command line: tables, exports, exit codes and one-line errors."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import re
import stat
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
from rich.console import Console
from support.models import CASES_BY_ID, build
from transformers import BertConfig, BertModel

import qkmonitor
from qkmonitor import audit
from qkmonitor.cli import head_rows, layer_rows, main, print_table
from qkmonitor.result import STATISTICS
from qkmonitor.weights.targets import BUNDLED, bundled_model_path

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
    words = " ".join(out.split())  # the headline is wrapped at the console's width
    assert f"{MINILM_HEADS} heads. Widest logit spread (largest eig_var): layer 0 head 2" in words
    assert "Most concentrated spectrum (largest |eig_concentration|): layer 0 head 7" in words
    assert "|value| <= sqrt(head_dim / width) = 0.289" in words  # sqrt(32 / 384)


def test_help_defines_the_numbers_and_points_to_the_definitions(capsys):
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    words = " ".join(capsys.readouterr().out.split())
    assert "eig_concentration: eig_mean / RMS eigenvalue" in words
    assert "docs/metrics.md" in words


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


def _in_terminal(argv: list[str], columns: int) -> tuple[int, str]:
    """Run a command with stdout on a pseudo-terminal ``columns`` wide; its output, ANSI-free."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm-256color"}
    child = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, env=env, close_fds=True
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    status = child.wait(timeout=300)
    text = b"".join(chunks).decode().replace("\r", "")
    return status, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_tables_stay_whole_in_an_80_column_terminal():
    """The console script in a real 80-column terminal: nothing cut, every number exact."""
    script = Path(sys.executable).with_name("qkmonitor")
    status, out = _in_terminal([str(script), "audit", "--per-head"], 80)
    assert status == 0
    assert "…" not in out and "..." not in out
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    for header in ("eig_mean", "eig_var", "eig_concen-", "tration", "spectral", "fraction"):
        assert header in out
    result = audit(bundled_model_path())
    layers, heads = out.split("\nper head")
    rows = {}
    for line in heads.splitlines():
        cells = line.split()
        if len(cells) == 2 + len(STATISTICS) and cells[0].isdigit() and cells[1].isdigit():
            rows[(int(cells[0]), int(cells[1]))] = [float(cell) for cell in cells[2:]]
    assert len(rows) == MINILM_HEADS
    for head in result.heads:
        for got, statistic in zip(rows[(head.layer, head.head)], STATISTICS, strict=True):
            want = getattr(head, statistic)
            assert got == pytest.approx(want, rel=5e-3, abs=0), (head.layer, head.head, statistic)
    layer_rows = [line.split() for line in layers.splitlines() if re.match(r"^ +[0-5] +12 ", line)]
    assert len(layer_rows) == 6 and all(len(cells) == 8 for cells in layer_rows)
    assert [float(cells[3]) for cells in layer_rows] == pytest.approx(
        [s.eig_var for s in result.layers], rel=5e-3
    )


def _printed(rows, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=False)
    print_table(console, "per head", rows)
    out = console.file.getvalue()
    assert "…" not in out and max(len(line.rstrip()) for line in out.splitlines()) <= width
    return out


def test_too_narrow_for_a_table_stacks_the_cells():
    result = audit(bundled_model_path())
    rows = head_rows(result)
    assert rows.keys == 2  # layer, head (no block column for one stack, no kv column without GQA)
    out = _printed(rows, 40)
    assert out.count("eig_concentration") == out.count("eig_var_complex") == MINILM_HEADS
    head = result.heads[26]
    block = out.split(f"layer {head.layer} head {head.head}\n")[1].split("\n")[: len(STATISTICS)]
    assert [float(line.split()[-1]) for line in block] == pytest.approx(
        [getattr(head, s) for s in STATISTICS], rel=5e-3
    )


def test_optional_columns_give_way_before_the_table_does():
    """BART (three blocks: a block column) at 80 columns: the layer table leaves out the
    spectral norm and says so; at 60 the per-head table keeps its first four statistics."""
    result = qkmonitor.audit(build(CASES_BY_ID["bart"]))
    out = _printed(layer_rows(result), 80)
    assert "spectral" not in out.split("(left out")[0]
    assert "(left out at this width: spectral norm; every column: --json, --csv)" in out
    assert "eig_concen-" in out and out.count("encoder") == 2  # one row per encoder layer
    first = result.layers[0]
    row = next(line.split() for line in out.splitlines() if line.lstrip().startswith("encoder"))
    assert [float(cell) for cell in row[3:]] == pytest.approx(
        [first.eig_mean, first.eig_var, first.eig_var_min, first.eig_var_max,
         first.eig_concentration], rel=5e-3
    )  # fmt: skip
    wide = _printed(layer_rows(result), 120)
    assert "left out" not in wide and "spectral" in wide
    narrow = " ".join(_printed(head_rows(result), 66).split())
    assert "eig_var_ " in narrow and " complex " in narrow  # its two-line header
    assert "(left out at this width: spectral norm, positive fraction; every column:" in narrow


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


def _piped(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The console script with stdout into a pipe, as ``qkmonitor ... | jq .`` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "qkmonitor.cli", *argv],
        capture_output=True, text=True, check=False, timeout=120, cwd=cwd,
    )  # fmt: skip


@pytest.mark.parametrize("target", ["-", "/dev/stdout"])
def test_json_to_stdout_is_all_that_stdout_holds(tiny_folder, tmp_path, target):
    completed = _piped("audit", str(tiny_folder), "--json", target, "--per-head", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == json.loads(audit(tiny_folder).to_json())
    assert "wrote" not in completed.stderr and "Traceback" not in completed.stderr
    assert list(tmp_path.iterdir()) == []  # no file named "-"


def test_csv_to_stdout_is_all_that_stdout_holds(tiny_folder, tmp_path):
    completed = _piped("audit", str(tiny_folder), "--csv", "-", "--json", "out.json", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    rows = list(csv.DictReader(io.StringIO(completed.stdout)))
    want = audit(tiny_folder)
    assert [(int(r["layer"]), int(r["head"])) for r in rows] == [(0, 0), (0, 1)]
    assert [float(r["eig_var"]) for r in rows] == pytest.approx(
        [h.eig_var for h in want.heads], rel=1e-12
    )
    assert json.loads((tmp_path / "out.json").read_text())["heads"][1]["head"] == 1
    assert completed.stderr.strip().endswith("wrote out.json")


def test_json_and_csv_cannot_both_go_to_stdout(capsys, tiny_folder):
    status, out, err = run(capsys, "audit", str(tiny_folder), "--json", "-", "--csv", "/dev/stdout")
    assert status == 2 and out == ""
    assert err == (
        "qkmonitor: error: --json and --csv cannot both go to stdout; write one to a file\n"
    )


def test_the_bundled_model_has_one_name(capsys):
    status, out, _ = run(capsys, "audit", "--json", "-")
    assert status == 0
    data = json.loads(out)
    assert data["model"]["source"] == BUNDLED == "bundled:all-MiniLM-L6-v2"
    assert len(data["heads"]) == MINILM_HEADS
    status, out, _ = run(capsys, "audit", BUNDLED)  # the name is also accepted as the target
    assert status == 0 and out.startswith(f"{BUNDLED} (bert): mean over heads per layer")


_LONG_URL = "https://huggingface.co/org/" + "n" * 96 + "/commit/" + "0123456789abcdef" * 5


def test_urls_are_never_wrapped(capsys, monkeypatch):
    """Commit URLs longer than any console's width stay one line on stdout and stderr."""
    from qkmonitor.hub import card, space

    done = space.Deployment(url=_LONG_URL + "/space", changed=True, commit_url=_LONG_URL,
                            paths=["app.py"])  # fmt: skip
    monkeypatch.setattr(space, "deploy", lambda *args, **kwargs: done)
    status, out, err = run(capsys, "space", "deploy", "org/qk-audit")
    assert status == 0
    assert err == f"committed 1 files: {_LONG_URL}\n" and out == f"{_LONG_URL}/space\n"
    update = card.CardUpdate(changed=True, text="", commit_url=_LONG_URL)
    monkeypatch.setattr(card, "update_card", lambda *args, **kwargs: update)
    status, out, _ = run(capsys, "card", "org/name", "--direct")
    assert status == 0 and out == f"updated the card: {_LONG_URL}\n"


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


def test_device_flag_computes_there_and_refuses_an_absent_device_in_one_line(capsys, tmp_path):
    """--device cpu is the default's numbers; an absent CUDA (or MPS) is one line, exit 1."""
    status, out, _ = run(capsys, "audit", "--device", "cpu", "--json", str(tmp_path / "a.json"))
    assert status == 0
    result = qkmonitor.AuditResult.from_json(tmp_path / "a.json")
    assert (result.model.device, result.model.compute_dtype) == ("cpu", "float64")
    if torch.cuda.is_available():
        return
    for device in ("cuda", "mps"):
        status, out, err = run(capsys, "audit", str(bundled_model_path()), "--device", device)
        assert status != 0 and not out and len(err.strip().splitlines()) == 1
        assert f"device '{device}'" in err


def test_a_partial_audit_names_the_modules_it_left_out(capsys, tiny_folder, tmp_path):
    """A hybrid (OLMo hybrid: linear, softmax, linear attention): the report says in one line
    how many attention-like modules were not audited and why; a full audit prints no such line."""
    from support.behaviour import build as build_tiny
    from support.behaviour import shrunken_dict
    from transformers import CONFIG_MAPPING

    values = shrunken_dict("olmo_hybrid")
    values.pop("model_type", None)
    kinds = ["linear_attention", "full_attention", "linear_attention"]
    values.update(num_hidden_layers=3, layer_types=kinds)
    build_tiny(CONFIG_MAPPING["olmo_hybrid"](**values)).save_pretrained(tmp_path / "hybrid")
    status, out, _ = run(capsys, "audit", str(tmp_path / "hybrid"))
    assert status == 0
    (line,) = [line for line in out.splitlines() if "not audited" in line]
    assert line == (
        "2 attention-like modules not audited (listed in not_audited): 2 OlmoHybridGatedDeltaNet "
        "(it mixes neighbouring tokens into its queries or keys (conv1d): W^h of the projections "
        "alone is not what it computes)"
    )
    status, out, _ = run(capsys, "audit", str(tiny_folder))
    assert status == 0 and "not audited" not in out
