"""A model folder on disk: config.json plus safetensors weights read by byte range (pickles
only when allowed), every file checked to be inside the folder."""

from __future__ import annotations

import os
from pathlib import Path

from qkmonitor.errors import CorruptWeightsError, ModelNotFoundError, NotAModelError, QKMonitorError
from qkmonitor.untrusted_json import one_line, parse_json
from qkmonitor.weights.checkpoint import (
    MAX_CONFIG,
    MAX_INDEX,
    SAFETENSORS_INDEX,
    FileSource,
    check_deadline,
    config_values,
    load_config,
    load_pickles,
    weight_files,
)

__all__ = ["LocalSource"]

_CHUNK = 16 * 2**20  # bytes read between two deadline checks (local files)


class LocalSource(FileSource):
    """A model folder on disk: config.json plus safetensors weights (or pickle, if allowed)."""

    kind = "local"

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        allow_pickle: bool = False,
        deadline: float | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.name = str(folder)
        self.deadline = deadline
        if not self.folder.is_dir():
            raise ModelNotFoundError(f"folder '{folder}' does not exist", missing="folder")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise NotAModelError(
                f"'{folder}' has no config.json: point qkmonitor at a transformers model folder"
            )
        raw = _read_capped(config_path, MAX_CONFIG, NotAModelError)
        self.config = load_config(config_values(raw, str(config_path)), self.name)
        available = sorted(p.name for p in self.folder.iterdir() if p.is_file())
        index = self.folder / SAFETENSORS_INDEX
        fmt, files = weight_files(
            available,
            lambda: parse_json(
                _read_capped(index, MAX_INDEX, NotAModelError), str(index), MAX_INDEX
            ),
            f"'{folder}'",
            allow_pickle,
        )
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise CorruptWeightsError(
                f"'{folder}': shard {missing[0]} named by the index is missing"
            )
        for file in files:
            self._check_inside(file)
        if fmt == "pickle":
            super().__init__([], load_pickles([self.folder / f for f in files]))
        else:
            super().__init__(files)

    def _check_inside(self, file: str) -> None:
        """Refuse a weight file whose real path (links followed) is outside the folder.

        A snapshot folder of the Hugging Face cache (``.../snapshots/<sha>``) links its files to
        that repo's ``blobs`` folder, which counts as inside.
        """
        root = self.folder.resolve()
        roots = [root]
        if root.parent.name == "snapshots":
            roots.append(root.parent.parent / "blobs")
        real = (self.folder / file).resolve()
        if not any(real.is_relative_to(allowed) for allowed in roots):
            raise CorruptWeightsError(
                f"'{self.name}': {file} leads to {real}, outside the folder; refusing to read it "
                "(copy the file into the folder instead of linking to it)"
            )

    def _path(self, file: str) -> Path:
        return self.folder / file

    def _size_and_prefix(self, file: str) -> tuple[int, bytes]:
        path = self._path(file)
        with path.open("rb") as handle:
            return path.stat().st_size, handle.read(64 * 1024)

    def _read_range(self, file: str, start: int, end: int) -> bytearray:
        buffer = bytearray(end - start)
        with self._path(file).open("rb", buffering=0) as handle:
            handle.seek(start)
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                check_deadline(self.deadline, f"reading {file} of '{self.name}'")
                count = handle.readinto(view[done : done + _CHUNK])
                if not count:
                    raise CorruptWeightsError(f"{file} is truncated; re-download it")
                done += count
        return buffer


def _read_capped(path: Path, limit: int, error: type[QKMonitorError]) -> bytes:
    """A file's bytes, at most limit + 1 of them (so that `parse_json` can say it is too big)."""
    try:
        with path.open("rb") as handle:
            return handle.read(limit + 1)
    except OSError as problem:
        raise error(f"{path} cannot be read ({one_line(problem)})") from None
