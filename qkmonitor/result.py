"""The result of an audit: model metadata plus one row per (block, layer, head).

JSON schema (``AuditResult.to_json``)::

    {"model": {"source", "kind", "revision", "sha", "model_type", "dtype", "storage", "n_layers",
               "n_heads", "n_kv_heads", "head_dim", "d_in", "qkmonitor_version", "warnings"},
     "heads": [{"block", "layer", "head", "kv_head", "eig_mean", "eig_var", "eig_var_complex",
                "spectral_norm", "positive_fraction", "finite", "eigvals": [[re, im], ...]}]}

Non-finite statistics (heads whose weights hold NaN/Inf) are written as JSON null. The CSV has
the scalar columns of ``heads``, one row per head.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from qkmonitor.errors import QKMonitorError

__all__ = ["STATISTICS", "AuditResult", "HeadResult", "LayerSummary", "ModelInfo"]

#: the per-head scalar statistics, in display order
STATISTICS = ("eig_mean", "eig_var", "eig_var_complex", "spectral_norm", "positive_fraction")


@dataclass(frozen=True)
class ModelInfo:
    """What was audited."""

    source: str  # repo id, folder, or class name
    kind: str  # "hub", "local" or "model"
    model_type: str
    revision: str | None = None  # as requested
    sha: str | None = None  # the commit actually read (Hub)
    dtype: str = ""  # dtype of the Q/K tensors as audited (F64 when dequantized)
    #: how the Q/K weights are stored: "bf16", "fp8-block-128x128", "gptq-int4-g128", ...
    storage: str = ""
    n_layers: dict[str, int] = field(default_factory=dict)  # per block
    n_heads: dict[str, int] = field(default_factory=dict)
    n_kv_heads: dict[str, int] = field(default_factory=dict)
    head_dim: dict[str, int] = field(default_factory=dict)
    d_in: int = 0
    qkmonitor_version: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HeadResult:
    """Statistics of one query head (SPEC.md)."""

    block: str
    layer: int
    head: int
    kv_head: int
    eig_mean: float
    eig_var: float
    eig_var_complex: float
    spectral_norm: float
    positive_fraction: float
    finite: bool
    eigvals: list[tuple[float, float]]


@dataclass(frozen=True)
class LayerSummary:
    """Mean over a layer's heads of each statistic, with the spread of eig_var."""

    block: str
    layer: int
    n_heads: int
    eig_mean: float
    eig_var: float
    eig_var_complex: float
    spectral_norm: float
    positive_fraction: float
    eig_var_min: float
    eig_var_max: float


def _nan_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class AuditResult:
    """Per-head QK-eigenspectrum statistics of one model."""

    model: ModelInfo
    heads: list[HeadResult]

    @property
    def blocks(self) -> list[str]:
        """Attention stacks in order of appearance ("self", or encoder/decoder/cross)."""
        return list(dict.fromkeys(h.block for h in self.heads))

    def layers(self) -> list[LayerSummary]:
        """One summary per (block, layer), in order."""
        groups: dict[tuple[str, int], list[HeadResult]] = {}
        for head in self.heads:
            groups.setdefault((head.block, head.layer), []).append(head)
        summaries = []
        for (block, layer), heads in groups.items():
            means = {s: _nan_mean([getattr(h, s) for h in heads]) for s in STATISTICS}
            variances = [h.eig_var for h in heads if math.isfinite(h.eig_var)]
            summaries.append(
                LayerSummary(
                    block=block,
                    layer=layer,
                    n_heads=len(heads),
                    **means,
                    eig_var_min=min(variances, default=math.nan),
                    eig_var_max=max(variances, default=math.nan),
                )
            )
        return summaries

    def ranked(self, statistic: str = "eig_var") -> list[HeadResult]:
        """Finite heads sorted by a statistic, ascending (eig_var: most concentrated first)."""
        return sorted(
            (h for h in self.heads if math.isfinite(getattr(h, statistic))),
            key=lambda h: getattr(h, statistic),
        )

    def grid(self, statistic: str, block: str | None = None) -> list[list[float]]:
        """layer x head matrix of a statistic for one block (heatmaps)."""
        block = block or self.blocks[0]
        rows: dict[int, dict[int, float]] = {}
        for h in self.heads:
            if h.block == block:
                rows.setdefault(h.layer, {})[h.head] = getattr(h, statistic)
        width = max((max(r) + 1 for r in rows.values()), default=0)
        return [[rows[layer].get(i, math.nan) for i in range(width)] for layer in sorted(rows)]

    def to_dict(self) -> dict:
        """The JSON-ready form (schema in the module docstring); NaN becomes None."""
        heads = []
        for head in self.heads:
            row = asdict(head)
            for statistic in STATISTICS:
                row[statistic] = _json_number(row[statistic])
            row["eigvals"] = [[_json_number(re), _json_number(im)] for re, im in head.eigvals]
            heads.append(row)
        return {"model": asdict(self.model), "heads": heads}

    @classmethod
    def from_dict(cls, data: dict) -> AuditResult:
        """Inverse of to_dict."""

        def number(value: float | None) -> float:
            return math.nan if value is None else float(value)

        heads = []
        for row in data["heads"]:
            row = dict(row)
            for statistic in STATISTICS:
                row[statistic] = number(row[statistic])
            row["eigvals"] = [(number(re), number(im)) for re, im in row["eigvals"]]
            heads.append(HeadResult(**row))
        return cls(model=ModelInfo(**data["model"]), heads=heads)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The result as JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            write_atomically(path, text)
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> AuditResult:
        """Read a result written by to_json."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """One row per head with the scalar columns; written atomically to ``path`` if given."""
        columns = [f.name for f in fields(HeadResult) if f.name != "eigvals"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(h) for h in self.heads)
        if path is not None:
            write_atomically(path, buffer.getvalue())
        return buffer.getvalue()


def check_writable(paths: Iterable[str | os.PathLike | None]) -> None:
    """Fail before any work if an output file cannot be created."""
    for path in paths:
        if path is None:
            continue
        parent = Path(path).resolve().parent
        if Path(path).is_dir():
            raise QKMonitorError(f"output path '{path}' is a folder; name a file")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise QKMonitorError(
                f"cannot write '{path}': folder '{parent}' is missing or read-only"
            )


def _file_mode(target: Path) -> int:
    """The existing file's mode, else what open(path, "w") would give: 0o666 minus the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write text to path via a temporary file and rename: never a half-written file."""
    check_writable([path])
    target = Path(path)
    handle, temporary = tempfile.mkstemp(dir=target.resolve().parent, prefix=f".{target.name}.")
    try:
        os.chmod(temporary, _file_mode(target))  # mkstemp creates it 0o600
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.replace(temporary, target)
    except BaseException as error:  # Ctrl-C or a full disk: no temporary file left behind
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise QKMonitorError(f"cannot write '{path}': {error.strerror}") from None
        raise
