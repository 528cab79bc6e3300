"""A Hub repo at one commit: config.json, safetensors headers, then Q/K byte ranges only, every
request made by `qkmonitor.hub.client`."""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch import Tensor

from qkmonitor.errors import CorruptWeightsError, NotAModelError
from qkmonitor.hub.client import RepoInfo, get_file, hub_timeout, model_info
from qkmonitor.untrusted_json import parse_json
from qkmonitor.weights.checkpoint import (
    MAX_CONFIG,
    MAX_INDEX,
    SAFETENSORS_INDEX,
    FileSource,
    config_values,
    load_config,
    load_pickles,
    weight_files,
)

__all__ = ["HubSource"]

_PARALLEL_RANGES = 8  # concurrent range requests of one row selection over HTTP


class HubSource(FileSource):
    """A Hub repo at one commit: config, safetensors headers, then Q/K byte ranges only.

    timeout: seconds any one wait for the Hub may take (default: $QKMONITOR_HUB_TIMEOUT, else
    15; see `qkmonitor.hub.client`); deadline: a `time.monotonic` value after which every
    read, in progress or not, fails with TimeLimitError (also settable later as ``.deadline``).
    Opening asks the Hub for the repo's model info; `HubSource.at_commit` opens a revision
    already resolved by `qkmonitor.hub.client.model_info`, without asking again.
    """

    kind = "hub"

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> None:
        seconds = hub_timeout(timeout)
        info = model_info(
            repo_id, revision=revision, token=token, timeout=seconds, deadline=deadline
        )
        self._open(info, token, allow_pickle, seconds, deadline)

    @classmethod
    def at_commit(
        cls,
        info: RepoInfo,
        *,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> HubSource:
        """The source of a revision already resolved (its commit and files in ``info``): reads
        config.json and the headers at ``info.sha``, with no model-info request of its own."""
        source = cls.__new__(cls)
        source._open(info, token, allow_pickle, hub_timeout(timeout), deadline)
        return source

    def _open(
        self,
        info: RepoInfo,
        token: str | bool | None,
        allow_pickle: bool,
        timeout: float,
        deadline: float | None,
    ) -> None:
        repo_id = info.repo_id
        self.name, self.revision, self._token = repo_id, info.revision, token
        self.timeout, self.deadline = timeout, deadline
        self._sizes: dict[str, int] = {}
        self.sha, available = info.sha, list(info.files)
        where = f"Hub repo '{repo_id}'"
        if "config.json" not in available:
            raise NotAModelError(f"{where} has no config.json; is it a transformers model?")
        raw = self._fetch("config.json", MAX_CONFIG)
        self.config = load_config(config_values(raw, f"{repo_id}/config.json"), where)
        fmt, files = weight_files(
            available,
            lambda: parse_json(
                self._fetch(SAFETENSORS_INDEX, MAX_INDEX),
                f"{repo_id}/{SAFETENSORS_INDEX}",
                MAX_INDEX,
            ),
            where,
            allow_pickle,
        )
        listed = set(available)
        unlisted = [f for f in files if f not in listed]
        if unlisted:
            raise CorruptWeightsError(
                f"{where}: shard {unlisted[0][:100]!r} named by the index is not a file of the "
                f"repo at commit {self.sha}; refusing the index"
            )
        if fmt == "pickle":
            FileSource.__init__(self, [], self._load_pickles(files))
        else:
            FileSource.__init__(self, files)

    def _get(self, file: str, **bounds: Any) -> tuple[bytearray, int | None]:
        """One bounded GET of a file of the pinned commit (see `client.get_file` for
        ``bounds``)."""
        return get_file(
            self.name,
            self.sha,
            file,
            token=self._token,
            timeout=self.timeout,
            deadline=self.deadline,
            asked=self.revision,
            **bounds,
        )

    def _fetch(self, file: str, limit: int) -> bytearray:
        """A whole small file, at most limit + 1 bytes of it (`parse_json` refuses more)."""
        return self._get(file, limit=limit + 1)[0]

    def _load_pickles(self, files: list[str]) -> dict[str, Tensor]:
        folder = Path(tempfile.mkdtemp(prefix="qkmonitor-pickles-"))
        try:
            paths = []
            for file in files:  # top-level names (see weight_files)
                path = folder / file
                with path.open("w+b") as sink:
                    self._get(file, sink=sink)
                paths.append(path)
            return load_pickles(paths)  # memory-mapped tensors outlive the unlinked files
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _size_and_prefix(self, file: str) -> tuple[int, bytes]:
        # 8 bytes give the header length; the header itself is then fetched exactly, so an
        # audit transfers headers and Q/K tensors and nothing else.
        data, total = self._get(file, span=(0, 7))
        assert total is not None  # a range answer always carries it
        self._sizes[file] = total
        return total, bytes(data)

    def _read_range(self, file: str, start: int, end: int) -> bytearray:
        if end <= start:
            return bytearray()
        return self._get(file, span=(start, end - 1), size=self._sizes.get(file))[0]

    def _read_spans(self, file: str, spans: list[tuple[int, int]]) -> list[bytes | bytearray]:
        # one request each (the Hub's CDN answers one range per request), a few at a time over
        # huggingface_hub's shared, thread-safe connection pool, so latency does not add up
        if len(spans) < 2:
            return super()._read_spans(file, spans)
        with ThreadPoolExecutor(min(_PARALLEL_RANGES, len(spans))) as pool:
            return list(pool.map(lambda span: self._read_range(file, *span), spans))
