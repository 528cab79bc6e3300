"""The result of an audit: model metadata plus one row per (block, layer, head).

JSON schema (``AuditResult.to_json``)::

    {"model": {"source", "kind", "revision", "sha", "model_type", "dtype", "storage", "n_layers",
               "n_heads", "n_kv_heads", "head_dim", "d_in", "qkmonitor_version", "warnings",
               "device", "compute_dtype", "not_audited": [{"module", "class", "reason"}, ...]},
               (n_layers ... d_in: one number per block; device and compute_dtype: where and in
               what the statistics were computed, "" in files written before they existed;
               not_audited: the attention-like modules left out, [] in files written before)
     "heads": [{"block", "layer", "head", "kv_head", "eig_mean", "eig_var", "eig_concentration",
                "eig_var_complex", "spectral_norm", "positive_fraction", "finite",
                "eigvals": [[re, im], ...]}]}

Non-finite statistics (heads whose weights hold NaN/Inf; eig_concentration of a head whose
symmetric part is 0) are written as JSON null. The CSV has the scalar columns of ``heads``, one
row per head. JSON written before eig_concentration existed is read with it derived from
eig_mean and eig_var (it is a function of the two).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path

from qkmonitor.errors import QKMonitorError
from qkmonitor.statistics import HEAD_STATISTICS
from qkmonitor.weights.unaudited import not_audited_line

__all__ = ["STATISTICS", "AuditResult", "HeadResult", "LayerSummary", "ModelInfo"]

#: the per-head scalar statistics, in display order (declared in qkmonitor.spectrum)
STATISTICS: tuple[str, ...] = tuple(statistic.name for statistic in HEAD_STATISTICS)


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
    d_in: dict[str, int] = field(default_factory=dict)  # input width, per block
    qkmonitor_version: str = ""
    warnings: list[str] = field(default_factory=list)
    #: where the statistics were computed ("cpu", "cuda:0", ...; "" in results written before)
    device: str = ""
    #: the dtype they were computed in ("float64"; "" in results written before)
    compute_dtype: str = ""
    #: attention-like modules left out of the audit (a hybrid's linear attention, an attention
    #: module with no q/k pair qkmonitor knows), each {"module": path, "class": its class name,
    #: "reason": one line}; [] in results written before
    not_audited: list[dict[str, str]] = field(default_factory=list)

    def not_audited_line(self) -> str:
        """One line: how many attention-like modules were not audited and why ("" if none)."""
        return not_audited_line(self.not_audited)


def _record(name: str, doc: str, head: list, statistics: list, tail: list) -> type:
    """A frozen dataclass: the ``head`` fields, one float per statistic, the ``tail`` fields."""
    columns = [(statistic, float) for statistic in statistics]
    cls = make_dataclass(name, [*head, *columns, *tail], frozen=True, namespace={"__doc__": doc})
    cls.__module__ = __name__
    return cls


_SPREAD = [statistic.name for statistic in HEAD_STATISTICS if statistic.spread]

HeadResult = _record(
    "HeadResult",
    "Statistics of one query head (docs/metrics.md; one float per STATISTICS), its key head,\n"
    "whether its weights are finite, and its non-zero eigenvalues as (re, im) pairs.",
    [("block", str), ("layer", int), ("head", int), ("kv_head", int)],
    list(STATISTICS),
    [("finite", bool), ("eigvals", list[tuple[float, float]])],
)
LayerSummary = _record(
    "LayerSummary",
    "Mean over a layer's heads of each statistic (STATISTICS), with the spread (min, max)\n"
    "across heads of the declared ones (eig_var_min, eig_var_max).",
    [("block", str), ("layer", int), ("n_heads", int)],
    [*STATISTICS, *(f"{name}_{end}" for name in _SPREAD for end in ("min", "max"))],
    [],
)


def _nan_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _concentration(eig_mean: float, eig_var: float) -> float:
    """eig_mean / sqrt(eig_var + eig_mean^2), as qkmonitor.spectrum.eig_concentration."""
    second = max(eig_var, 0.0) + eig_mean**2
    if not second > 0:  # 0 or NaN
        return math.nan
    return max(-1.0, min(1.0, eig_mean / math.sqrt(second)))


@dataclass
class AuditResult:
    """Per-head QK-eigenspectrum statistics of one model."""

    model: ModelInfo
    heads: list[HeadResult]

    # Convention: what is read off the result without arguments is an attribute (``model``,
    # ``heads``) or a property (``blocks``, ``layers``); what takes arguments is a method.

    @property
    def blocks(self) -> list[str]:
        """Attention stacks in order of appearance ("self", or encoder/decoder/cross)."""
        return list(dict.fromkeys(h.block for h in self.heads))

    @property
    def layers(self) -> list[LayerSummary]:
        """One summary per (block, layer), in order (recomputed from ``heads`` on each read)."""
        groups: dict[tuple[str, int], list[HeadResult]] = {}
        for head in self.heads:
            groups.setdefault((head.block, head.layer), []).append(head)
        summaries = []
        for (block, layer), heads in groups.items():
            values = {s: _nan_mean([getattr(h, s) for h in heads]) for s in STATISTICS}
            for name in _SPREAD:
                finite = [getattr(h, name) for h in heads if math.isfinite(getattr(h, name))]
                values[f"{name}_min"] = min(finite, default=math.nan)
                values[f"{name}_max"] = max(finite, default=math.nan)
            summaries.append(LayerSummary(block=block, layer=layer, n_heads=len(heads), **values))
        return summaries

    def ranked(self, statistic: str, *, magnitude: bool = False) -> list[HeadResult]:
        """Heads with a finite ``statistic``, ascending by it (by its absolute value with
        ``magnitude``: ``ranked("eig_concentration", magnitude=True)[-1]`` is the head whose
        spectrum is most concentrated on a non-zero mean, of either sign)."""

        def key(h: HeadResult) -> float:
            value = getattr(h, statistic)
            return abs(value) if magnitude else value

        return sorted((h for h in self.heads if math.isfinite(getattr(h, statistic))), key=key)

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
            if "eig_concentration" not in row:  # written before it existed
                mean, var = number(row["eig_mean"]), number(row["eig_var"])
                row["eig_concentration"] = _concentration(mean, var)
            for statistic in STATISTICS:
                row[statistic] = number(row[statistic])
            row["eigvals"] = [(number(re), number(im)) for re, im in row["eigvals"]]
            heads.append(HeadResult(**row))
        model = dict(data["model"])
        if isinstance(model.get("d_in"), int):  # written when d_in was one number for all blocks
            model["d_in"] = dict.fromkeys(model.get("n_layers", {}), model["d_in"])
        return cls(model=ModelInfo(**model), heads=heads)

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


_DESCRIPTOR = re.compile(r"/proc/[^/]+/fd/\d+|/dev/fd/\d+")


def _names_a_descriptor(path: str) -> bool:
    """Whether path is, or links through, a descriptor name (/dev/stdout -> /proc/self/fd/1)."""
    current = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on symlinks followed
        if _DESCRIPTOR.fullmatch(current):
            return True
        try:
            link = os.readlink(current)
        except OSError:  # not a symlink (or gone): the chain ends here
            return False
        current = os.path.normpath(os.path.join(os.path.dirname(current), link))
    return False


def _status(path: str | os.PathLike) -> os.stat_result | None:
    """os.stat of what path names (symlinks followed), None if nothing is there."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:  # a symlink loop, a component that is not a folder, ...
        raise QKMonitorError(f"cannot write '{path}': {error.strerror}") from None


def _written_directly(path: str | os.PathLike) -> bool:
    """Devices, FIFOs and descriptor names (/dev/stdout) are written in place, never replaced."""
    found = _status(path)
    if found is not None and not stat.S_ISREG(found.st_mode):
        return True
    return found is not None and _names_a_descriptor(os.fspath(path))


def _own_stream(path: str | os.PathLike) -> int | None:
    """1 or 2 when path is this process's stdout or stderr (say /dev/stdout into a pipe)."""
    found = _status(path)
    for fd in (1, 2):
        try:
            if found is not None and os.path.samestat(found, os.fstat(fd)):
                return fd
        except OSError:  # that descriptor is closed
            continue
    return None


def check_writable(paths: Iterable[str | os.PathLike | None]) -> None:
    """Fail before any work if an output cannot be written.

    A regular file (or a name not taken yet) needs a folder where a file can be created: the
    folder of the symlink's target when the path is a symlink, tried by creating and removing
    an empty temporary file there (which also catches /proc, read-only and full file systems).
    A device, a FIFO or a descriptor name such as /dev/stdout needs write permission.
    """
    for path in paths:
        if path is None:
            continue
        if Path(path).is_dir():
            raise QKMonitorError(f"output path '{path}' is a folder; name a file")
        if _written_directly(path):
            found = _status(path)
            if found is not None and stat.S_ISSOCK(found.st_mode) and _own_stream(path) is None:
                raise QKMonitorError(f"cannot write '{path}': it is a socket; name a file")
            if not os.access(path, os.W_OK) and _own_stream(path) is None:
                raise QKMonitorError(f"cannot write '{path}': permission denied")
            continue
        parent = Path(os.path.realpath(path)).parent
        if not parent.is_dir():
            raise QKMonitorError(
                f"cannot write '{path}': folder '{parent}' is missing or read-only"
            )
        try:
            handle, probe = tempfile.mkstemp(dir=parent, prefix=".qkmonitor-probe-")
        except OSError as error:
            raise QKMonitorError(
                f"cannot write '{path}': no file can be created in folder '{parent}' "
                f"({error.strerror}; is it read-only?)"
            ) from None
        os.close(handle)
        os.unlink(probe)


def _file_mode(target: Path) -> int:
    """The existing file's mode, else what open(path, "w") would give: 0o666 minus the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _write_directly(path: str | os.PathLike, data: bytes) -> None:
    """Write to a device, FIFO or descriptor in place; this process's own stdout/stderr is
    written through its descriptor, after what Python has buffered for it."""
    fd = _own_stream(path)
    opened = fd is None
    try:
        if opened:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        else:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as error:
        raise QKMonitorError(f"cannot write '{path}': {error.strerror}") from None
    finally:
        if opened and fd is not None:
            os.close(fd)


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write text to path: a regular file is replaced via a temporary file and a rename (never
    half-written); a symlink is followed, and its target replaced in the target's folder (the
    link stays); devices, FIFOs and /dev/stdout are written in place, errors reported."""
    check_writable([path])
    if _written_directly(path):
        _write_directly(path, text.encode("utf-8"))
        return
    target = Path(os.path.realpath(path))
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
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
