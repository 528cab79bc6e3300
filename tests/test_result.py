"""AuditResult: JSON/CSV schema and round trips, summaries, and safe writing of output files."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from support.models import CASES_BY_ID, build

import qkmonitor
from qkmonitor.errors import QKMonitorError
from qkmonitor.result import (
    STATISTICS,
    AuditResult,
    HeadResult,
    LayerSummary,
    check_writable,
    write_atomically,
)

MODEL_KEYS = {
    "source", "kind", "revision", "sha", "model_type", "dtype", "storage", "n_layers", "n_heads",
    "n_kv_heads", "head_dim", "d_in", "qkmonitor_version", "warnings", "device", "compute_dtype",
    "not_audited",
}  # fmt: skip
HEAD_KEYS = {
    "block", "layer", "head", "kv_head", "eig_mean", "eig_var", "eig_concentration",
    "eig_var_complex", "spectral_norm", "positive_fraction", "finite", "eigvals",
}  # fmt: skip
CSV_COLUMNS = [
    "block", "layer", "head", "kv_head", "eig_mean", "eig_var", "eig_concentration",
    "eig_var_complex", "spectral_norm", "positive_fraction", "finite",
]  # fmt: skip


@pytest.fixture(scope="module")
def result() -> AuditResult:
    """A real audit: BART, so that there are three blocks with different head counts."""
    return qkmonitor.audit(build(CASES_BY_ID["bart"]))


@pytest.fixture
def with_nan(result) -> AuditResult:
    """The result with one head marked non-finite, as audit reports NaN weights."""
    heads = list(result.heads)
    nan = math.nan
    heads[1] = replace(
        heads[1],
        **dict.fromkeys(STATISTICS, nan),
        finite=False,
        eigvals=[(nan, nan)] * len(heads[1].eigvals),
    )
    model = replace(result.model, warnings=["encoder layer 0 head 1: NaN or Inf"])
    return AuditResult(model=model, heads=heads)


def _same(a: AuditResult, b: AuditResult) -> bool:
    """Equality with NaN == NaN."""

    def norm(value):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, list | tuple):
            return [norm(v) for v in value]
        return value

    rows = [[norm(getattr(h, f.name)) for f in fields(HeadResult)] for h in a.heads]
    other = [[norm(getattr(h, f.name)) for f in fields(HeadResult)] for h in b.heads]
    return a.model == b.model and rows == other


def test_json_schema_keys(result):
    data = json.loads(result.to_json())
    assert set(data) == {"model", "heads"}
    assert set(data["model"]) == MODEL_KEYS
    assert len(data["heads"]) == len(result.heads) == 2 * 4 + 2 * 2 + 2 * 2
    for row in data["heads"]:
        assert set(row) == HEAD_KEYS
        assert all(len(pair) == 2 for pair in row["eigvals"])
    assert data["model"]["n_heads"] == {"encoder": 4, "decoder": 2, "cross": 2}


def test_json_round_trip(result, tmp_path):
    path = tmp_path / "audit.json"
    text = result.to_json(path)
    assert path.read_text() == text
    back = AuditResult.from_json(path)
    assert back == result  # floats survive exactly (repr round trip)


def test_json_without_storage_still_reads(result, tmp_path):
    """Results written before the storage field existed load, with storage unknown ("")."""
    assert result.model.storage == "f32"  # an in-memory float32 model
    data = result.to_dict()
    del data["model"]["storage"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    assert AuditResult.from_json(path).model.storage == ""


def test_not_audited_round_trips_and_older_json_reads_it_as_empty(result, tmp_path):
    """The attention-like modules left out survive JSON; files written before the field load
    with none, and the one line that names them is empty then."""
    left_out = [
        {"module": f"layers.{i}.self_attn", "class": "KimiLinearDeltaAttention", "reason": "r"}
        for i in (0, 2)
    ] + [{"module": "head.attention", "class": "MultiheadAttention", "reason": "s"}]
    partial = AuditResult(model=replace(result.model, not_audited=left_out), heads=result.heads)
    path = tmp_path / "audit.json"
    partial.to_json(path)
    back = AuditResult.from_json(path)
    assert back.model.not_audited == left_out and back == partial
    assert back.model.not_audited_line() == (
        "3 attention-like modules not audited (listed in not_audited): 2 "
        "KimiLinearDeltaAttention (it r); 1 MultiheadAttention (it s)"
    )
    data = partial.to_dict()
    del data["model"]["not_audited"]
    path.write_text(json.dumps(data))
    old = AuditResult.from_json(path).model
    assert old.not_audited == [] and old.not_audited_line() == ""


def test_json_with_one_d_in_for_all_blocks_still_reads(result, tmp_path):
    """Results written when d_in was one number read it as that width for every block."""
    data = result.to_dict()
    assert data["model"]["d_in"] == dict.fromkeys(data["model"]["n_layers"], 64)
    data["model"]["d_in"] = 64
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    assert AuditResult.from_json(path).model.d_in == result.model.d_in


def test_json_nan_becomes_null_and_back(with_nan, tmp_path):
    path = tmp_path / "audit.json"
    text = with_nan.to_json(path)

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    data = json.loads(text, parse_constant=refuse)  # strict JSON: no NaN/Infinity tokens
    row = data["heads"][1]
    assert row["finite"] is False
    assert all(row[s] is None for s in STATISTICS)
    assert all(pair == [None, None] for pair in row["eigvals"])
    back = AuditResult.from_json(path)
    assert _same(back, with_nan)
    assert math.isnan(back.heads[1].eig_var)


def test_json_without_eig_concentration_derives_it(with_nan, tmp_path):
    """JSON written before eig_concentration existed: it is a function of eig_mean and eig_var."""
    data = with_nan.to_dict()
    for row in data["heads"]:
        del row["eig_concentration"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    back = AuditResult.from_json(path)
    derived = [
        replace(h, eig_concentration=o.eig_concentration)
        for h, o in zip(back.heads, with_nan.heads, strict=True)
    ]
    assert _same(AuditResult(back.model, derived), with_nan)  # the rest as written
    assert math.isnan(back.heads[1].eig_concentration)  # the NaN head stays NaN
    # derived in Python's math, computed in torch's: the two may differ in the last bit
    assert all(
        math.isclose(b.eig_concentration, h.eig_concentration, rel_tol=1e-12, abs_tol=1e-15)
        for b, h in zip(back.heads, with_nan.heads, strict=True)
        if h.finite
    )
    assert any(abs(h.eig_concentration) > 0.01 for h in back.heads if h.finite)


def test_csv_columns_and_values(with_nan, tmp_path):
    path = tmp_path / "audit.csv"
    text = with_nan.to_csv(path)
    assert path.read_text() == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(with_nan.heads)
    for row, head in zip(rows, with_nan.heads, strict=True):
        assert (row["block"], int(row["layer"]), int(row["head"])) == (
            head.block,
            head.layer,
            head.head,
        )
        assert row["finite"] == str(head.finite)
        for statistic in STATISTICS:
            value = float(row[statistic])
            want = getattr(head, statistic)
            assert value == want or (math.isnan(value) and math.isnan(want))


def test_layer_summaries(with_nan):
    summaries = with_nan.layers
    assert all(isinstance(s, LayerSummary) for s in summaries)
    assert [(s.block, s.layer) for s in summaries] == [
        (b, i) for b in ("encoder", "decoder", "cross") for i in range(2)
    ]
    first = summaries[0]
    heads = [h for h in with_nan.heads if (h.block, h.layer) == ("encoder", 0)]
    finite = [h for h in heads if h.finite]
    assert first.n_heads == len(heads) == 4 and len(finite) == 3
    for statistic in STATISTICS:
        want = sum(getattr(h, statistic) for h in finite) / len(finite)
        assert math.isclose(getattr(first, statistic), want, rel_tol=1e-12)
    assert first.eig_var_min == min(h.eig_var for h in finite)
    assert first.eig_var_max == max(h.eig_var for h in finite)


def test_ranked_and_grid(with_nan):
    ranked = with_nan.ranked("eig_var")
    assert len(ranked) == len(with_nan.heads) - 1
    values = [h.eig_var for h in ranked]
    assert values == sorted(values)
    by_magnitude = with_nan.ranked("eig_concentration", magnitude=True)
    by_size = [abs(h.eig_concentration) for h in by_magnitude]
    assert by_size == sorted(abs(h.eig_concentration) for h in with_nan.heads if h.finite)
    signed = [h.eig_concentration for h in with_nan.ranked("eig_concentration")]
    assert signed == sorted(signed) and signed != sorted(signed, key=abs)  # BART has both signs
    grid = with_nan.grid("eig_var", "cross")
    assert len(grid) == 2 and all(len(row) == 2 for row in grid)
    assert grid[1][0] == next(
        h.eig_var for h in with_nan.heads if (h.block, h.layer, h.head) == ("cross", 1, 0)
    )
    assert math.isnan(with_nan.grid("eig_var")[0][1])  # default block: the first, encoder
    assert with_nan.blocks == ["encoder", "decoder", "cross"]


# --- writing files ------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_atomically_replaces_whole_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    write_atomically(path, "new content ✓")
    assert path.read_text(encoding="utf-8") == "new content ✓"
    assert _leftovers(tmp_path) == []


def test_failed_rename_keeps_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    path.write_text("old")

    def refuse(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(QKMonitorError, match="No space left") as caught:
        write_atomically(path, "new")
    assert "\n" not in str(caught.value)
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_interrupted_write_keeps_old_file_and_no_temporary(tmp_path, monkeypatch):
    """Whatever stops the write (full disk, Ctrl-C), the target is old or new, never partial."""
    path = tmp_path / "out.json"
    path.write_text("old")
    real_fdopen = os.fdopen

    class Interrupted(BaseException):
        pass

    def fdopen(handle, *args, **kwargs):
        out = real_fdopen(handle, *args, **kwargs)

        def write(text):
            out.buffer.write(text[:3].encode())
            raise Interrupted

        out.write = write
        return out

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(Interrupted):
        write_atomically(path, "new content")
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_written_file_has_the_usual_permissions(tmp_path):
    """Like open(path, 'w'): 0o666 minus the umask (mkstemp alone would give 0o600)."""
    umask = os.umask(0o022)
    try:
        write_atomically(tmp_path / "new.json", "{}")
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
        existing = tmp_path / "existing.md"
        existing.write_text("x")
        existing.chmod(0o664)
        write_atomically(existing, "y")
        assert stat.S_IMODE(existing.stat().st_mode) == 0o664
    finally:
        os.umask(umask)


def test_check_writable(tmp_path):
    check_writable([None, tmp_path / "fine.json"])
    for bad in (tmp_path / "missing" / "x.json", tmp_path):
        with pytest.raises(QKMonitorError) as caught:
            check_writable([bad])
        assert "\n" not in str(caught.value)
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(QKMonitorError):
        check_writable([afile / "x.json"])
    with pytest.raises(QKMonitorError):
        write_atomically(tmp_path / "missing" / "x.json", "{}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_check_writable_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(QKMonitorError, match="read-only"):
            check_writable([folder / "x.json"])
    finally:
        folder.chmod(0o700)


def _same_node(path: Path, before: os.stat_result) -> bool:
    after = os.lstat(path)
    return (after.st_ino, after.st_mode, after.st_rdev) == (
        before.st_ino,
        before.st_mode,
        before.st_rdev,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")
def test_device_nodes_are_written_in_place_and_write_errors_reported(tmp_path):
    """As root, /dev/null and /dev/full stay devices; /dev/full's ENOSPC is an error."""
    null, full = tmp_path / "null", tmp_path / "full"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    link = tmp_path / "full-link"
    link.symlink_to(full)
    nodes = {path: os.lstat(path) for path in (null, full, link)}
    check_writable([null, full, link])
    write_atomically(null, "{}")
    for target in (full, link):
        with pytest.raises(QKMonitorError, match="No space left on device") as caught:
            write_atomically(target, "{}")
        assert str(caught.value).startswith(f"cannot write '{target}'")
    assert all(_same_node(path, before) for path, before in nodes.items())
    assert _leftovers(tmp_path) == []


def test_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    before = os.lstat(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_atomically(fifo, "through the pipe ✓")
    reader.join(timeout=10)
    assert received == ["through the pipe ✓".encode()]
    assert _same_node(fifo, before) and _leftovers(tmp_path) == []


def test_dev_stdout_into_a_pipe_is_written_in_order_and_never_replaced(tmp_path):
    """A descriptor name is written through the process's own stream: after the text already
    printed, into a pipe or a redirected file, and the link itself stays."""
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    program = (
        "import sys\nfrom qkmonitor.result import write_atomically\n"
        "print('table', flush=False)\n"
        "for path in sys.argv[1:]:\n    write_atomically(path, '{\"ok\": 1}\\n')\n"
    )
    piped = subprocess.run(
        [sys.executable, "-c", program, "/dev/stdout", str(link)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == 'table\n{"ok": 1}\n{"ok": 1}\n'
    redirected = tmp_path / "out.txt"
    with redirected.open("w") as out:
        subprocess.run([sys.executable, "-c", program, str(link)], stdout=out, check=True)
    assert redirected.read_text() == 'table\n{"ok": 1}\n'
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"
    assert os.path.islink("/dev/stdout")


def _other_file_system(tmp_path: Path) -> Path:
    """A fresh folder on a file system other than tmp_path's (tmpfs /dev/shm), else skip."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to link to")
    return Path(tempfile.mkdtemp(dir=shm, prefix="qkmonitor-test-"))


def test_symlinked_output_on_another_file_system_is_replaced_through_the_link(tmp_path):
    other = _other_file_system(tmp_path)
    try:
        target = other / "audit.json"
        target.write_text("old")
        target.chmod(0o640)
        link = tmp_path / "audit.json"
        link.symlink_to(target)
        dangling = tmp_path / "new.json"
        dangling.symlink_to(other / "new.json")
        check_writable([link, dangling])
        write_atomically(link, "new ✓")
        write_atomically(dangling, "created")
        assert link.is_symlink() and target.read_text(encoding="utf-8") == "new ✓"
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
        assert dangling.is_symlink() and (other / "new.json").read_text() == "created"
        assert _leftovers(tmp_path) == [] and _leftovers(other) == []
    finally:
        shutil.rmtree(other)


@pytest.mark.parametrize("where", ["/proc/out.csv", "link to /proc", "link to a missing folder"])
def test_unwritable_targets_are_refused_before_any_work(tmp_path, where):
    path = Path(where)
    if where.startswith("link"):
        path = tmp_path / "out.csv"
        path.symlink_to("/proc/out.csv" if "proc" in where else tmp_path / "gone" / "out.csv")
    with pytest.raises(QKMonitorError, match=f"cannot write '{path}'") as caught:
        check_writable([path])
    assert "\n" not in str(caught.value)
    assert not os.path.lexists("/proc/out.csv")


def test_eigvals_are_plain_pairs(result):
    head = result.heads[0]
    assert all(isinstance(z, tuple) and len(z) == 2 for z in head.eigvals)
    assert torch.tensor(head.eigvals).shape == (16, 2)


def test_every_view_of_the_statistics_is_derived_from_their_declaration():
    """HEAD_STATISTICS is the one list: the result's rows, summaries, columns, the training
    monitor's choices and the plots' labels all follow it, in its order."""
    from qkmonitor import plots
    from qkmonitor.statistics import HEAD_STATISTICS
    from qkmonitor.training.monitor import SPECTRAL_STATISTICS

    names = [s.name for s in HEAD_STATISTICS]
    assert list(STATISTICS) == list(SPECTRAL_STATISTICS) == names
    assert [f.name for f in fields(HeadResult)][4:-2] == names
    spread = [f"{s.name}_{end}" for s in HEAD_STATISTICS if s.spread for end in ("min", "max")]
    assert [f.name for f in fields(LayerSummary)][3:] == names + spread == [
        *names, "eig_var_min", "eig_var_max"
    ]  # fmt: skip
    assert {s.name: s.label for s in HEAD_STATISTICS}.items() <= plots.LABELS.items()
    assert {s.name: s.unit for s in HEAD_STATISTICS}.items() <= plots.UNITS.items()
    assert {"eig_var", "eig_var_complex", "spectral_norm"} == plots.LOG_SCALE
