"""AuditResult: JSON/CSV schema and round trips, summaries, and safe writing of output files."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
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
    "n_kv_heads", "head_dim", "d_in", "qkmonitor_version", "warnings",
}  # fmt: skip
HEAD_KEYS = {
    "block", "layer", "head", "kv_head", "eig_mean", "eig_var", "eig_var_complex",
    "spectral_norm", "positive_fraction", "finite", "eigvals",
}  # fmt: skip
CSV_COLUMNS = [
    "block", "layer", "head", "kv_head", "eig_mean", "eig_var", "eig_var_complex",
    "spectral_norm", "positive_fraction", "finite",
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
    summaries = with_nan.layers()
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


def test_eigvals_are_plain_pairs(result):
    head = result.heads[0]
    assert all(isinstance(z, tuple) and len(z) == 2 for z in head.eigvals)
    assert torch.tensor(head.eigvals).shape == (16, 2)
