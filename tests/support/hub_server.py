"""A local stand-in for the Hugging Face Hub, for tests.

`LocalHub` serves model, dataset and Space repositories over HTTP on 127.0.0.1 with the endpoints,
headers and error signals of the real Hub, so that the unmodified ``huggingface_hub`` client and
``transformers`` talk to it through ``HF_ENDPOINT``. Written against huggingface_hub 2.4 and
transformers 5.24.

Repositories hold commits on branches (``main``, any branch, ``refs/pr/N``) and tags; a revision is
a branch, a tag, ``refs/pr/N`` or a commit sha (full, or a unique prefix of 7 characters or more).
File contents live on disk in a content-addressed store, so large files are never held in memory.

Endpoints (the client code that calls each is in ``huggingface_hub/hf_api.py`` unless named); each
``/api/models/...`` route also answers as ``/api/spaces/...`` and ``/api/datasets/...``, and the
``/{repo}/resolve`` and LFS routes under a ``/spaces/`` or ``/datasets/`` prefix, for repos of
that type (`LocalHub` methods take ``repo_type``):

- ``GET /api/models/{repo}[/revision/{rev}]`` model_info (``?blobs=1``, ``?expand=``)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` list_repo_tree (``?recursive=``)
- ``POST /api/models/{repo}/paths-info/{rev}`` get_paths_info
- ``GET /api/models/{repo}/refs``, ``GET /api/models/{repo}/commits/{rev}``
- ``GET /api/models/{repo}/discussions`` get_repo_discussions (``?type=``, ``?status=``,
  ``?author=``, ``?p=``; pages of `DISCUSSIONS_PAGE_SIZE`, newest first): the pull requests that
  commits with ``create_pr`` opened (LocalHub has no other discussions)
- ``POST /api/models/{repo}/branch/{branch}``, ``POST /api/models/{repo}/tag/{rev}``
- ``HEAD|GET /{repo}/resolve/{rev}/{path}`` with Range (file_download.py, hf_file_system.py)
- ``PUT /api/models/{repo}/settings`` update_repo_settings (``visibility`` or ``private``)
- ``POST /api/spaces/{repo}/hardware`` request_space_hardware (``flavor``; the plan rules of
  ``/api/repos/create``, except that anyone may move a Space to the free cpu-basic)
- ``POST /api/repos/create`` (``type`` model, dataset or space; a Space needs ``sdk``, takes
  ``hardware``, and without a paid plan (`LocalHub.set_paid`) is refused with 402 unless it is
  one of a personal account's first 2 ZeroGPU Spaces),
  ``GET /api/whoami-v2``, ``POST /api/validate-yaml``,
  ``GET /api/agent-harnesses`` (utils/_detect_agent.py; answered with an empty registry)
- ``POST /api/models/{repo}/preupload/{rev}``, ``POST /api/models/{repo}/commit/{rev}``
  (_commit_api.py), ``POST /{repo}.git/info/lfs/objects/batch`` and the upload/verify links it
  hands out (lfs.py; like a presigned URL, the upload link needs no token)

Errors carry ``X-Error-Code`` / ``X-Error-Message`` headers and a ``{"error": ...}`` body, which
``huggingface_hub.utils._http.hf_raise_for_status`` turns into its typed exceptions:

- unknown or private repo: 401 without a token, 404 with one; ``RepoNotFound``
  -> ``RepositoryNotFoundError``
- gated repo file without access: 401 without a token, 403 with one; ``GatedRepo``
  -> ``GatedRepoError`` (metadata and listings of a gated repo stay readable, as on the Hub)
- unknown revision: 404 ``RevisionNotFound`` -> ``RevisionNotFoundError``
- missing file: 404 ``EntryNotFound`` (plus ``X-Repo-Commit``) -> ``RemoteEntryNotFoundError``
- unknown token: 401 "Invalid credentials in Authorization header" -> ``HfHubHTTPError``
- write without a token: 401 "Invalid username or password."; on repo endpoints it also carries
  ``RepoNotFound``, because against https://huggingface.co the client maps such a 401 to
  ``RepositoryNotFoundError`` with a regex that needs https, which this server lacks
- write without the right: 403 -> ``HfHubHTTPError``; existing repo, branch or tag: 409
- README metadata that fails the schema check (`metadata_errors`: a license outside `LICENSES`,
  ``tags`` not a list of strings): ``POST /api/validate-yaml`` answers 400 with
  ``{"errors": [{"message": ...}]}`` (huggingface_hub's ``create_commit`` and ``upload_folder``
  then raise ``ValueError("Invalid metadata in README.md ...")`` before uploading), and a commit
  that writes such a README.md anyway is refused with 400
- ``parentCommit`` that is no longer the head: 412 "A commit has happened since. Please refresh
  and try again." -> ``HfHubHTTPError`` (status and text as in huggingface_hub's own test
  ``test_create_commit_conflict`` against the Hub)
- unsatisfiable Range: 416 with ``Content-Range: bytes */size``

Faults: ``LocalHub.stalled(prefix)`` holds the requests whose path starts with ``prefix`` without
an answer until its block ends, as a Hub that stops sending bytes.

Simplifications: Spaces are repos only (they never build nor run); no pagination (one page)
except for discussions; pull requests are opened by commits only, have no comments and are never
merged (`close_pull_request` closes one); ``expand`` of tree listings is accepted and ignored;
the metadata check covers ``license`` and ``tags`` only; a multi-range header is ignored (200
with the whole file, which RFC 9110 allows); LFS files are served directly, not through a CDN
redirect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, NamedTuple, Self
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
"""Files at least this large are stored as LFS objects, as the Hub does."""

DEFAULT_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
    "*.zst", "*tfevents*",
)  # fmt: skip
"""LFS patterns of the ``.gitattributes`` the Hub puts in a new repo; used when a repo has none."""

DISCUSSIONS_PAGE_SIZE = 50
"""Discussions per page of a listing, as on the Hub."""

_CHUNK = 1 << 20
_SAMPLE_SIZE = 512
_DEFAULT_BRANCH = "main"
_PR_REF = re.compile(r"refs/pr/\d+")
_SHA_PREFIX = re.compile(r"[0-9a-f]{7,40}")
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")
_COMMIT_CONFLICT = "A commit has happened since. Please refresh and try again."


class RequestRecord(NamedTuple):
    """One request the hub answered: the body bytes it sent back (0 for HEAD)."""

    method: str
    path: str
    range: str | None
    nbytes: int


# --- README metadata ---------------------------------------------------------------------------

#: licenses the metadata check accepts (a subset of the Hub's list; anything else is refused)
LICENSES = frozenset(
    {
        "apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0",
        "gpl-3.0", "llama2", "llama3", "llama3.1", "gemma", "openrail", "other", "unknown",
    }
)  # fmt: skip
_YAML_BLOCK = re.compile(r"\A(?:\ufeff)?---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(?:\r?\n|\Z)", re.S)


def metadata_errors(card: str) -> list[str]:
    """What the Hub's schema check refuses in a README's YAML header, as the Hub words it (one
    message per field): a ``license`` outside `LICENSES`, ``tags`` that are not a list of
    strings, a header that is not a mapping. A card without a header has no errors."""
    import yaml

    match = _YAML_BLOCK.match(card)
    if match is None:
        return []
    try:
        values = yaml.safe_load(match.group(1) or "")
    except yaml.YAMLError:
        return ["metadata is not valid YAML"]
    if values is None:
        return []
    if not isinstance(values, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    license_ = values.get("license")
    if license_ is not None and not (isinstance(license_, str) and license_ in LICENSES):
        errors.append(f'"license" must be one of the Hub\'s license ids, not {license_!r}')
    tags = values.get("tags")
    if tags is not None and not (
        isinstance(tags, list) and all(isinstance(tag, str) for tag in tags)
    ):
        errors.append('"tags" must be an array of strings')
    return errors


# --- storage -------------------------------------------------------------------------------------


class _Blob(NamedTuple):
    sha256: str
    size: int


class _BlobStore:
    """Contents stored on disk under their sha256, written atomically."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._root = root
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        return self._root / sha256

    def size(self, sha256: str) -> int | None:
        with self._lock:
            return self._sizes.get(sha256)

    def read(self, sha256: str, limit: int = -1) -> bytes:
        with self.path(sha256).open("rb") as file:
            return file.read(limit)

    def add_file(self, source: Path) -> _Blob:
        with source.open("rb") as file:
            return self.add_stream(iter(lambda: file.read(_CHUNK), b""))

    def add_bytes(self, data: bytes) -> _Blob:
        return self.add_stream([data])

    def add_stream(self, chunks: Iterable[bytes]) -> _Blob:
        digest, size = hashlib.sha256(), 0
        fd, incoming = tempfile.mkstemp(dir=self._root, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            sha256 = digest.hexdigest()
            os.replace(incoming, self.path(sha256))
        except BaseException:
            Path(incoming).unlink(missing_ok=True)
            raise
        with self._lock:
            self._sizes[sha256] = size
        return _Blob(sha256, size)


def _git_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(blob: _Blob) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{blob.sha256}\nsize {blob.size}\n"
    ).encode()


@dataclass(frozen=True)
class _Entry:
    """A file of a commit: its content, and its git object id (of the blob or LFS pointer)."""

    blob: _Blob
    lfs: bool
    oid: str

    @classmethod
    def create(cls, store: _BlobStore, blob: _Blob, *, lfs: bool) -> _Entry:
        content = _lfs_pointer(blob) if lfs else store.read(blob.sha256)
        return cls(blob, lfs, _git_hash(content))

    @property
    def upload_oid(self) -> str:
        """The id the upload client compares with: sha256 for LFS files, git sha1 otherwise."""
        return self.blob.sha256 if self.lfs else self.oid


def _lfs_patterns(gitattributes: str | None) -> tuple[str, ...]:
    if gitattributes is None:
        return DEFAULT_LFS_PATTERNS
    lines = (line.split() for line in gitattributes.splitlines())
    return tuple(parts[0] for parts in lines if parts and "filter=lfs" in parts[1:])


def _matches(pattern: str, path: str) -> bool:
    pattern = pattern.lstrip("/")
    target = path if "/" in pattern else PurePosixPath(path).name
    return fnmatchcase(target, pattern)


def _is_lfs(path: str, size: int, sample: bytes, patterns: Iterable[str]) -> bool:
    """Whether the Hub would store this file with LFS: large, binary, or a .gitattributes match."""
    if size == 0:
        return False
    return size >= LFS_SIZE_THRESHOLD or b"\0" in sample or any(_matches(p, path) for p in patterns)


# --- repositories --------------------------------------------------------------------------------


class _HubError(Exception):
    """An HTTP error answer, in the Hub's format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or {}
        header_text = message.encode("ascii", "backslashreplace").decode()  # headers are latin-1
        self.headers = {"X-Error-Message": header_text, **(headers or {})}
        if code is not None:
            self.headers["X-Error-Code"] = code

    def response(self) -> _Response:
        return _json({"error": self.message, **self.details}, self.status, self.headers)


def _revision_not_found(revision: str) -> _HubError:
    return _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


def _entry_not_found(message: str, commit: _Commit) -> _HubError:
    return _HubError(404, message, code="EntryNotFound", headers={"X-Repo-Commit": commit.sha})


@dataclass(frozen=True)
class _Commit:
    sha: str
    parent: _Commit | None
    files: Mapping[str, _Entry]
    title: str
    message: str
    author: str
    date: datetime

    def history(self) -> Iterator[_Commit]:
        commit: _Commit | None = self
        while commit is not None:
            yield commit
            commit = commit.parent

    def directories(self) -> set[str]:
        parents = (PurePosixPath(path).parents for path in self.files)
        return {str(folder) for folders in parents for folder in folders} - {"."}


def _make_commit(
    parent: _Commit | None, files: Mapping[str, _Entry], title: str, message: str, author: str
) -> _Commit:
    """A commit whose sha is the sha1 of its parent, author, message and file manifest."""
    manifest = "".join(f"{path} {entry.oid}\n" for path, entry in sorted(files.items()))
    basis = f"parent {parent.sha if parent else ''}\nauthor {author}\n\n{title}\n\n{message}\n"
    sha = hashlib.sha1((basis + manifest).encode()).hexdigest()
    return _Commit(sha, parent, dict(files), title, message, author, datetime.now(UTC))


@dataclass
class _PullRequest:
    num: int
    title: str
    author: str
    created_at: datetime
    status: str = "open"


@dataclass
class _Repo:
    repo_id: str
    private: bool
    gated: bool
    kind: str = "model"  # or "dataset", "space"
    sdk: str | None = None  # a Space's
    hardware: str | None = None  # a Space's requested hardware (create_repo's space_hardware)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    branches: dict[str, _Commit] = field(default_factory=dict)  # includes refs/pr/N
    tags: dict[str, _Commit] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    granted_users: set[str] = field(default_factory=set)
    pull_requests: list[_PullRequest] = field(default_factory=list)

    def resolve(self, revision: str) -> _Commit:
        """The commit of a branch, tag, refs/pr/N or (a unique prefix of) a commit sha."""
        commit = self.branches.get(revision) or self.tags.get(revision)
        if commit is not None:
            return commit
        if _SHA_PREFIX.fullmatch(revision):
            found = [c for sha, c in self.commits.items() if sha.startswith(revision)]
            if len(found) == 1:
                return found[0]
        raise _revision_not_found(revision)

    def branch_head(self, branch: str) -> _Commit:
        """The head of a branch (or refs/pr/N): the only revisions a commit can go to."""
        if branch not in self.branches:
            raise _revision_not_found(branch)
        return self.branches[branch]

    def push(self, branch: str, commit: _Commit) -> None:
        self.branches[branch] = self.commits.setdefault(commit.sha, commit)

    def open_pull_request(self, commit: _Commit) -> int:
        """Open a pull request titled like ``commit``, with it as ``refs/pr/N``; return N."""
        number = len(self.pull_requests) + 1
        self.pull_requests.append(_PullRequest(number, commit.title, commit.author, commit.date))
        self.push(f"refs/pr/{number}", commit)
        return number


@dataclass(frozen=True)
class _Token:
    user: str
    orgs: frozenset[str]
    can_write: bool
    write_repos: frozenset[str]

    def owns(self, repo_id: str) -> bool:
        return repo_id.split("/")[0] in {self.user, *self.orgs}

    def can_read(self, repo: _Repo) -> bool:
        return not repo.private or self.owns(repo.repo_id) or repo.repo_id in self.write_repos

    def can_download(self, repo: _Repo) -> bool:
        return (
            not repo.gated
            or self.owns(repo.repo_id)
            or repo.repo_id in self.write_repos
            or self.user in repo.granted_users
        )

    def can_push(self, repo_id: str) -> bool:
        return (self.can_write and self.owns(repo_id)) or repo_id in self.write_repos

    def can_open_pr(self, repo_id: str) -> bool:
        return self.can_write or repo_id in self.write_repos

    def role(self) -> str:
        if self.write_repos:
            return "fineGrained"
        return "write" if self.can_write else "read"


# --- HTTP plumbing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileSlice:
    path: Path
    start: int
    length: int


@dataclass(frozen=True)
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes | _FileSlice = b""

    @property
    def length(self) -> int:
        return self.body.length if isinstance(self.body, _FileSlice) else len(self.body)


def _json(
    payload: Any,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> _Response:
    return _Response(
        status, {"Content-Type": content_type, **(headers or {})}, json.dumps(payload).encode()
    )


def _iter_chunked(rfile: IO[bytes]) -> Iterator[bytes]:
    while size := int(rfile.readline().split(b";")[0].strip() or b"0", 16):
        yield rfile.read(size)
        rfile.readline()
    while rfile.readline() not in (b"\r\n", b"\n", b""):
        pass  # trailer fields


def _iter_body(rfile: IO[bytes], headers: Message) -> Iterator[bytes]:
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        yield from _iter_chunked(rfile)
        return
    remaining = int(headers.get("Content-Length") or 0)
    while remaining > 0:
        chunk = rfile.read(min(_CHUNK, remaining))
        if not chunk:
            raise ConnectionError("the client closed the connection in the middle of a body")
        remaining -= len(chunk)
        yield chunk


class _Body:
    """A request body, read from the socket on demand so that uploads stream to disk."""

    def __init__(self, rfile: IO[bytes], headers: Message) -> None:
        self._chunks = _iter_body(rfile, headers)

    def chunks(self) -> Iterator[bytes]:
        return self._chunks

    def read(self) -> bytes:
        return b"".join(self._chunks)

    def drain(self) -> None:
        """Consume what is left, so the next request on a kept-alive connection parses."""
        for _ in self._chunks:
            pass


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: _Body
    params: dict[str, str] = field(default_factory=dict)
    token: _Token | None = None

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    def json(self) -> Any:
        try:
            return json.loads(self.body.read() or b"{}")
        except ValueError as error:
            raise _HubError(400, f"Invalid JSON body: {error}") from None


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte span a Range header asks for, or None to send the whole file."""
    match = _RANGE.fullmatch(header or "")
    if match is None or match.groups() == ("", ""):
        return None  # absent, malformed or several ranges: RFC 9110 lets a server ignore it
    first, last = match.groups()
    if first and last and int(last) < int(first):
        return None  # invalid, so ignored
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    else:  # bytes=-n: the last n bytes
        start, end = max(size - int(last), 0) if int(last) else size, size - 1
    if start >= size:
        raise _HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _lfs_json(blob: _Blob, *, oid_key: str) -> dict[str, Any]:
    return {oid_key: blob.sha256, "size": blob.size, "pointerSize": len(_lfs_pointer(blob))}


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class _Change:
    """One operation of a commit: put an entry at a path, or delete a file or folder."""

    path: str
    entry: _Entry | None = None
    folder: bool = False


def _apply(
    files: Mapping[str, _Entry], changes: Iterable[_Change], commit: _Commit
) -> dict[str, _Entry]:
    result = dict(files)
    for change in changes:
        if change.entry is not None:
            result[change.path] = change.entry
            continue
        doomed = [p for p in result if p.startswith(change.path + "/")] if change.folder else []
        doomed += [change.path] if not change.folder and change.path in result else []
        if not doomed:
            raise _entry_not_found(f"A file with this name doesn't exist: {change.path}", commit)
        for path in doomed:
            del result[path]
    return result


Handler = Callable[[_Request], _Response]
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = r"/api/(?P<kind>models|datasets|spaces)"  # the repo type, plural, in API paths
_WEB = r"/(?:(?P<prefix>datasets|spaces)/)?"  # its prefix in web paths: none for models
_REPO_TYPES = ("model", "dataset", "space")


def _web_path(kind: str, repo_id: str) -> str:
    """The repo's path on the website: org/name, datasets/org/name or spaces/org/name."""
    return repo_id if kind == "model" else f"{kind}s/{repo_id}"


class _HubApp:
    """The Hub's state and its HTTP endpoints, independent of the socket server."""

    def __init__(self, store: _BlobStore, base_url: str) -> None:
        self.store = store
        self.base_url = base_url
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}  # (repo type, repo id)
        self.tokens: dict[str, _Token] = {}
        self.paid: set[str] = set()  # users and orgs with a paid plan (PRO, Team, Enterprise)
        self.records: list[RequestRecord] = []
        # Responses still being written: a client may return once it has the last byte, before
        # the server thread records the request, so readers of `records` wait for these.
        self.in_flight = 0
        self.settled = threading.Condition(self.lock)
        self.stalls: list[Stall] = []
        self._pending_uploads: dict[str, int] = {}
        routes: list[tuple[tuple[str, ...], str, Handler]] = [
            (("GET",), rf"{_API}/{_REPO}", self._model_info),
            (("GET",), rf"{_API}/{_REPO}/revision/(?P<rev>.+)", self._model_info),
            (("GET",), rf"{_API}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._tree),
            (("POST",), rf"{_API}/{_REPO}/paths-info/(?P<rev>.+)", self._paths_info),
            (("GET",), rf"{_API}/{_REPO}/refs", self._refs),
            (("GET",), rf"{_API}/{_REPO}/commits/(?P<rev>.+)", self._commits),
            (("GET",), rf"{_API}/{_REPO}/discussions", self._discussions),
            (("POST",), rf"{_API}/{_REPO}/branch/(?P<branch>.+)", self._create_branch),
            (("POST",), rf"{_API}/{_REPO}/tag/(?P<rev>.+)", self._create_tag),
            (("POST",), rf"{_API}/{_REPO}/preupload/(?P<rev>.+)", self._preupload),
            (("POST",), rf"{_API}/{_REPO}/commit/(?P<rev>.+)", self._commit),
            (("PUT",), rf"{_API}/{_REPO}/settings", self._settings),
            (("POST",), rf"/api/(?P<kind>spaces)/{_REPO}/hardware", self._space_hardware),
            (("POST",), r"/api/repos/create", self._create_repo),
            (("GET",), r"/api/whoami-v2", self._whoami),
            (("POST",), r"/api/validate-yaml", self._validate_yaml),
            (("GET",), r"/api/agent-harnesses", self._agent_harnesses),
            (("POST",), rf"{_WEB}{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            (("PUT",), r"/_lfs/(?P<oid>[0-9a-f]{64})", self._lfs_upload),
            (("POST",), r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", self._lfs_verify),
            (("GET", "HEAD"), rf"{_WEB}{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
        ]
        self._routes = [
            (methods, re.compile(pattern), handler) for methods, pattern, handler in routes
        ]

    # --- dispatch --------------------------------------------------------------------------------

    def handle(self, request: _Request) -> _Response:
        try:
            request.token = self._authenticate(request.headers)
            handler, request.params = self._route(request.method, request.path)
            return handler(request)
        except _HubError as error:
            return error.response()
        except Exception as error:  # a bug here must reach the test as an answer, not a hang
            return _HubError(500, f"LocalHub failed: {type(error).__name__}: {error}").response()
        finally:
            request.body.drain()

    def _route(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        for methods, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match and method in methods:
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                plural = params.pop("kind", None) or params.pop("prefix", None)
                params["kind"] = plural[:-1] if plural else "model"
                return handler, params
        raise _HubError(404, f"Not found: {method} {path}")

    def _authenticate(self, headers: Message) -> _Token | None:
        authorization = headers.get("Authorization")
        if authorization is None:
            return None
        scheme, _, secret = authorization.partition(" ")
        token = self.tokens.get(secret.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return token

    def begin_response(self) -> None:
        with self.lock:
            self.in_flight += 1

    def record(self, entry: RequestRecord) -> None:
        with self.lock:
            self.records.append(entry)
            self.in_flight -= 1
            self.settled.notify_all()

    def settled_records(self, timeout: float = 10.0) -> list[RequestRecord]:
        """The records, once every response being written has been recorded."""
        with self.settled:
            self.settled.wait_for(lambda: self.in_flight == 0, timeout)
            return list(self.records)

    # --- access control --------------------------------------------------------------------------

    def _readable_repo(self, request: _Request) -> _Repo:
        token = request.token
        repo = self.repos.get((request.params["kind"], request.params["repo"]))
        if repo is None or (repo.private and not (token and token.can_read(repo))):
            raise _HubError(
                401 if token is None else 404, "Repository not found", code="RepoNotFound"
            )
        return repo

    @staticmethod
    def _check_download(repo: _Repo, token: _Token | None) -> None:
        if token is None and repo.gated:
            raise _HubError(
                401,
                f"Access to {repo.kind} {repo.repo_id} is restricted. You must have access to it"
                " and be authenticated to access it. Please log in.",
                code="GatedRepo",
            )
        if token is not None and not token.can_download(repo):
            raise _HubError(
                403,
                f"Access to {repo.kind} {repo.repo_id} is restricted and you are not in the"
                " authorized list. Ask the repo authors for access.",
                code="GatedRepo",
            )

    @staticmethod
    def _require_token(token: _Token | None, *, repo_path: bool) -> _Token:
        if token is None:
            code = "RepoNotFound" if repo_path else None
            raise _HubError(401, "Invalid username or password.", code=code)
        return token

    def _check_push(self, repo: _Repo, token: _Token | None, *, pull_request: bool) -> _Token:
        token = self._require_token(token, repo_path=True)
        if pull_request and not token.can_open_pr(repo.repo_id):
            raise _HubError(
                403, f"You don't have the rights to open a pull request on {repo.repo_id}"
            )
        if not pull_request and not token.can_push(repo.repo_id):
            raise _HubError(403, f"You don't have the rights to push to {repo.repo_id}")
        return token

    # --- read endpoints --------------------------------------------------------------------------

    def _model_info(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        with self.lock:
            commit = repo.resolve(request.params.get("rev", _DEFAULT_BRANCH))
        info = self._info(repo, commit, blobs=request.flag("blobs"))
        expand = request.query.get("expand") or request.query.get("expand[]")
        if expand:
            info = {key: value for key, value in info.items() if key in {"_id", "id", *expand}}
        return _json(info)

    def _info(self, repo: _Repo, commit: _Commit, *, blobs: bool) -> dict[str, Any]:
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [self._sibling(p, e, blobs=blobs) for p, e in sorted(commit.files.items())],
            "spaces": [],
            "usedStorage": sum(entry.blob.size for entry in commit.files.values()),
            **({"sdk": repo.sdk} if repo.kind == "space" else {}),
            **({"runtime": self._runtime(repo)} if repo.kind == "space" else {}),
        }

    @staticmethod
    def _runtime(repo: _Repo) -> dict[str, Any]:
        """A Space's runtime as space_info reads it: nothing runs here, the hardware asked for
        is recorded (cpu-basic when none was)."""
        return {
            "stage": "BUILDING",
            "hardware": {"current": None, "requested": repo.hardware or "cpu-basic"},
        }

    @staticmethod
    def _sibling(path: str, entry: _Entry, *, blobs: bool) -> dict[str, Any]:
        if not blobs:
            return {"rfilename": path}
        sibling: dict[str, Any] = {"rfilename": path, "size": entry.blob.size, "blobId": entry.oid}
        if entry.lfs:
            sibling["lfs"] = _lfs_json(entry.blob, oid_key="sha256")
        return sibling

    @staticmethod
    def _path_info(commit: _Commit, path: str) -> dict[str, Any]:
        entry = commit.files.get(path)
        if entry is None:  # a directory: its oid hashes what it holds
            inside = sorted((p, e.oid) for p, e in commit.files.items() if p.startswith(path + "/"))
            oid = hashlib.sha1(repr(inside).encode()).hexdigest()
            return {"type": "directory", "oid": oid, "size": 0, "path": path}
        info: dict[str, Any] = {
            "type": "file",
            "oid": entry.oid,
            "size": entry.blob.size,
            "path": path,
        }
        if entry.lfs:
            info["lfs"] = _lfs_json(entry.blob, oid_key="oid")
        return info

    def _tree(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        with self.lock:
            commit = repo.resolve(request.params["rev"])
        base = request.params.get("path", "").strip("/")
        directories = commit.directories()
        if base and base not in directories:
            raise _entry_not_found(f"{base} does not exist on {request.params['rev']}", commit)
        prefix = f"{base}/" if base else ""
        recursive = request.flag("recursive")
        paths = [
            path
            for path in sorted(directories | set(commit.files))
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])
        ]
        return _json([self._path_info(commit, path) for path in paths])

    def _paths_info(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        with self.lock:
            commit = repo.resolve(request.params["rev"])
        if request.headers.get("Content-Type", "").startswith("application/json"):
            paths = request.json().get("paths", [])
        else:
            paths = parse_qs(request.body.read().decode()).get("paths", [])
        known = commit.directories() | set(commit.files)
        return _json(
            [self._path_info(commit, p.strip("/")) for p in paths if p.strip("/") in known]
        )

    def _refs(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        with self.lock:
            branches, tags = dict(repo.branches), dict(repo.tags)
        return _json(
            {
                "branches": [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit.sha}
                    for name, commit in branches.items()
                    if not _PR_REF.fullmatch(name)
                ],
                "converts": [],
                "tags": [
                    {"name": name, "ref": f"refs/tags/{name}", "targetCommit": commit.sha}
                    for name, commit in tags.items()
                ],
                "pullRequests": [
                    {"name": name, "ref": name, "targetCommit": commit.sha}
                    for name, commit in branches.items()
                    if _PR_REF.fullmatch(name)
                ],
            }
        )

    def _commits(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        with self.lock:
            head = repo.resolve(request.params["rev"])
        return _json(
            [
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": commit.author}],
                    "date": _iso(commit.date),
                }
                for commit in head.history()
            ]
        )

    def _discussions(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        kind, status, author, page = (
            request.query.get(name, [default])[-1]
            for name, default in (("type", "all"), ("status", "all"), ("author", ""), ("p", "0"))
        )
        if kind not in ("all", "discussion", "pull_request"):
            raise _HubError(400, f"Invalid discussion type: {kind}")
        if status not in ("all", "open", "closed"):
            raise _HubError(400, f"Invalid discussion status: {status}")
        if not page.isdigit():
            raise _HubError(400, f"Invalid page: {page}")
        first = int(page) * DISCUSSIONS_PAGE_SIZE
        with self.lock:  # a pull request's status may change meanwhile
            listed = [
                {
                    "num": pr.num,
                    "title": pr.title,
                    "status": pr.status,
                    "isPullRequest": True,
                    "createdAt": _iso(pr.created_at),
                    "author": {"name": pr.author, "type": "user"},
                    "repo": {"name": repo.repo_id, "type": repo.kind},
                    "numComments": 0,
                    "pinned": False,
                }
                for pr in reversed(repo.pull_requests)
                if kind != "discussion"
                and status in ("all", pr.status)
                and author in ("", pr.author)
            ]
            closed = sum(pr.status == "closed" for pr in repo.pull_requests)
        return _json(
            {
                "discussions": listed[first : first + DISCUSSIONS_PAGE_SIZE],
                "count": len(listed),
                "start": first,
                "numClosedDiscussions": closed,
            }
        )

    def _resolve(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        self._check_download(repo, request.token)
        with self.lock:
            commit = repo.resolve(request.params["rev"])
        entry = commit.files.get(request.params["path"])
        if entry is None:
            raise _entry_not_found("Entry not found", commit)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{entry.blob.sha256 if entry.lfs else entry.oid}"',
            "X-Repo-Commit": commit.sha,
        }
        if entry.lfs:
            headers |= {
                "X-Linked-Etag": f'"{entry.blob.sha256}"',
                "X-Linked-Size": str(entry.blob.size),
            }
        span = _parse_range(request.headers.get("Range"), entry.blob.size)
        path = self.store.path(entry.blob.sha256)
        if span is None:
            return _Response(200, headers, _FileSlice(path, 0, entry.blob.size))
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{entry.blob.size}"
        return _Response(206, headers, _FileSlice(path, start, end - start + 1))

    def _whoami(self, request: _Request) -> _Response:
        token = self._require_token(request.token, repo_path=False)
        return _json(
            {
                "type": "user",
                "id": hashlib.sha1(token.user.encode()).hexdigest()[:24],
                "name": token.user,
                "fullname": token.user,
                "isPro": False,
                "orgs": [
                    {"type": "org", "name": org, "fullname": org} for org in sorted(token.orgs)
                ],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": token.role()},
                },
            }
        )

    @staticmethod
    def _validate_yaml(request: _Request) -> _Response:
        body = request.json()
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, str):
            raise _HubError(400, "content must be a string")
        errors = metadata_errors(content)
        if errors:
            return _json({"errors": [{"message": e} for e in errors], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    @staticmethod
    def _agent_harnesses(_request: _Request) -> _Response:
        """The (empty) registry that huggingface_hub's agent detection fetches."""
        return _json({"standardEnvVars": [], "harnesses": {}})

    # --- write endpoints -------------------------------------------------------------------------

    def _create_repo(self, request: _Request) -> _Response:
        token = self._require_token(request.token, repo_path=False)
        payload = request.json()
        kind = payload.get("type") or "model"
        if kind not in _REPO_TYPES:
            raise _HubError(400, f"Invalid repo type: {kind}")
        if kind == "space" and not payload.get("sdk"):
            raise _HubError(400, "A Space needs an sdk")
        repo_id = f"{payload.get('organization') or token.user}/{payload['name']}"
        if not (token.can_write and token.owns(repo_id)):
            raise _HubError(403, f"You don't have the rights to create a {kind} under {repo_id}")
        url = f"{self.base_url}/{_web_path(kind, repo_id)}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.lock:
            if (kind, repo_id) in self.repos:
                # create_repo(exist_ok=True) reads the url from this answer
                raise _HubError(409, f"You already created this {kind} repo", details={"url": url})
            if kind == "space":
                self._check_plan(repo_id, token, payload)
            repo = self.create_repo(repo_id, private=private, author=token.user, kind=kind)
            repo.sdk = payload.get("sdk")
            repo.hardware = payload.get("hardware")
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _check_plan(self, repo_id: str, token: _Token, payload: Mapping[str, Any]) -> None:
        """Who may create a Space that runs on compute (hub-docs spaces-overview and
        spaces-zerogpu, August 2026): Gradio and Docker Spaces need a paid plan, except up to 2
        ZeroGPU Spaces of a free personal account; free organizations none; static Spaces
        anyone. The status is 402, which huggingface_hub's create_repo names for this case
        ("payment required, e.g. if Gradio/Docker Space and free user"); the message is
        assumed, in the docs' words."""
        namespace = repo_id.split("/")[0]
        if payload.get("sdk") == "static" or namespace in self.paid:
            return
        zero = payload.get("hardware") == "zero-a10g"
        if zero and namespace == token.user:
            hosted = sum(
                1
                for (kind, other), repo in self.repos.items()
                if kind == "space"
                and other.split("/")[0] == namespace
                and repo.hardware == "zero-a10g"
            )
            if hosted < 2:
                return
            raise _HubError(
                402, "Free accounts can host up to 2 ZeroGPU Spaces. Subscribe to PRO to host more."
            )
        raise _HubError(
            402,
            "Gradio and Docker Spaces run on compute and require a paid plan to create: PRO for "
            "personal accounts, Team or Enterprise for organizations. Free personal accounts can "
            "still host up to 2 Gradio Spaces running on ZeroGPU.",
        )

    def create_repo(
        self, repo_id: str, *, private: bool, author: str, kind: str = "model"
    ) -> _Repo:
        """A repo whose main branch has the Hub's initial commit (a default .gitattributes)."""
        gitattributes = "".join(
            f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in DEFAULT_LFS_PATTERNS
        )
        entry = _Entry.create(self.store, self.store.add_bytes(gitattributes.encode()), lfs=False)
        repo = _Repo(repo_id, private=private, gated=False, kind=kind)
        repo.push(
            _DEFAULT_BRANCH,
            _make_commit(None, {".gitattributes": entry}, "initial commit", "", author),
        )
        with self.lock:
            self.repos[(kind, repo_id)] = repo
        return repo

    def _settings(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        self._check_push(repo, request.token, pull_request=False)
        payload = request.json()
        with self.lock:
            if "visibility" in payload:
                repo.private = payload["visibility"] == "private"
            elif "private" in payload:
                repo.private = bool(payload["private"])
            if "gated" in payload:
                repo.gated = payload["gated"] is not False
        return _json({})

    def _space_hardware(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        token = self._check_push(repo, request.token, pull_request=False)
        flavor = request.json().get("flavor")
        if flavor != "cpu-basic" and flavor != repo.hardware:
            self._check_plan(repo.repo_id, token, {"sdk": repo.sdk, "hardware": flavor})
        with self.lock:
            repo.hardware = flavor
        return _json(self._runtime(repo))

    def _create_branch(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        self._check_push(repo, request.token, pull_request=False)
        start = request.json().get("startingPoint") or _DEFAULT_BRANCH
        with self.lock:
            self.add_ref(repo.branches, request.params["branch"], repo.resolve(start))
        return _json({})

    def _create_tag(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        self._check_push(repo, request.token, pull_request=False)
        with self.lock:
            self.add_ref(repo.tags, request.json()["tag"], repo.resolve(request.params["rev"]))
        return _json({})

    @staticmethod
    def add_ref(refs: dict[str, _Commit], name: str, commit: _Commit) -> None:
        if name in refs:
            raise _HubError(409, f"Reference already exists: {name}")
        refs[name] = commit

    def _preupload(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        self._check_push(repo, request.token, pull_request=request.flag("create_pr"))
        with self.lock:
            head = repo.branch_head(request.params["rev"])
        gitattributes = head.files.get(".gitattributes")
        patterns = _lfs_patterns(
            self.store.read(gitattributes.blob.sha256).decode() if gitattributes else None
        )
        files = []
        for file in request.json().get("files", []):
            lfs = _is_lfs(file["path"], file["size"], base64.b64decode(file["sample"]), patterns)
            existing = head.files.get(file["path"])
            files.append(
                {
                    "path": file["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.upload_oid if existing else None,
                }
            )
        return _json({"files": files, "commitOid": head.sha})

    def _commit(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        branch = request.params["rev"]
        create_pr = request.flag("create_pr")
        pull_request = create_pr or bool(_PR_REF.fullmatch(branch))
        token = self._check_push(repo, request.token, pull_request=pull_request)
        header, changes = self._parse_commit(request.body.read())
        with self.lock:
            head = repo.branch_head(branch)
            parent_sha = header.get("parentCommit")
            if create_pr:
                base = repo.resolve(parent_sha) if parent_sha else head
            elif parent_sha and not head.sha.startswith(parent_sha):
                raise _HubError(412, _COMMIT_CONFLICT)
            else:
                base = head
            files = _apply(base.files, changes, base)
            readme = files.get("README.md")
            if readme is not None and any(c.path == "README.md" and c.entry for c in changes):
                errors = metadata_errors(
                    self.store.read(readme.blob.sha256).decode("utf-8", "replace")
                )
                if errors:
                    raise _HubError(400, f"Invalid metadata in README.md: {'; '.join(errors)}")
            summary, description = header.get("summary", ""), header.get("description", "")
            commit = _make_commit(base, files, summary, description, token.user)
            if create_pr:
                number = repo.open_pull_request(commit)
                pr_url = (
                    f"{self.base_url}/{_web_path(repo.kind, repo.repo_id)}/discussions/{number}"
                )
            else:
                repo.push(branch, commit)
                pr_url = None
        return _json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.base_url}/{_web_path(repo.kind, repo.repo_id)}/commit/"
                f"{commit.sha}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _parse_commit(self, body: bytes) -> tuple[dict[str, Any], list[_Change]]:
        """The header and the operations of an ndjson commit payload, contents already stored."""
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError as error:
            raise _HubError(400, f"Invalid ndjson commit payload: {error}") from None
        headers = [line["value"] for line in lines if line.get("key") == "header"]
        if len(headers) != 1:
            raise _HubError(400, "A commit payload needs exactly one header line")
        changes = [self._change(line) for line in lines if line.get("key") != "header"]
        return headers[0], changes

    def _change(self, line: dict[str, Any]) -> _Change:
        key, value = line.get("key"), line.get("value", {})
        if key == "file":
            blob = self.store.add_bytes(base64.b64decode(value["content"]))
            return _Change(value["path"], _Entry.create(self.store, blob, lfs=False))
        if key == "lfsFile":
            size = self.store.size(value["oid"])
            if size is None:
                raise _HubError(400, f"LFS object {value['oid']} was never uploaded")
            return _Change(
                value["path"], _Entry.create(self.store, _Blob(value["oid"], size), lfs=True)
            )
        if key in ("deletedFile", "deletedFolder"):
            return _Change(value["path"].rstrip("/"), folder=key == "deletedFolder")
        raise _HubError(400, f"Unknown commit operation: {key}")

    def _lfs_batch(self, request: _Request) -> _Response:
        repo = self._readable_repo(request)
        self._check_push(repo, request.token, pull_request=True)  # uploads to a PR use it too
        payload = request.json()
        if payload.get("operation") != "upload":
            raise _HubError(400, "LocalHub only supports the LFS upload operation")
        objects = [self._lfs_object(obj["oid"], obj["size"]) for obj in payload.get("objects", [])]
        return _json(
            {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
        )

    def _lfs_object(self, oid: str, size: int) -> dict[str, Any]:
        if self.store.size(oid) == size:
            return {"oid": oid, "size": size}  # no actions: the client skips the upload
        with self.lock:
            self._pending_uploads[oid] = size
        href = f"{self.base_url}/_lfs/{oid}"
        actions = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
        return {"oid": oid, "size": size, "authenticated": True, "actions": actions}

    def _lfs_upload(self, request: _Request) -> _Response:
        oid = request.params["oid"]
        with self.lock:
            expected_size = self._pending_uploads.get(oid)
        if expected_size is None:
            raise _HubError(403, f"No upload of {oid} was announced through the LFS batch endpoint")
        blob = self.store.add_stream(request.body.chunks())
        if blob != _Blob(oid, expected_size):
            raise _HubError(400, f"Uploaded content has sha256 {blob.sha256} and {blob.size} bytes")
        with self.lock:
            self._pending_uploads.pop(oid, None)
        return _Response(200, {})

    def _lfs_verify(self, request: _Request) -> _Response:
        payload = request.json()
        if self.store.size(request.params["oid"]) != payload.get("size"):
            raise _HubError(404, f"LFS object {request.params['oid']} is not stored")
        return _json({"message": "ok"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: _HubApp


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests read `LocalHub.requests` instead."""

    def _serve(self) -> None:
        url = urlsplit(self.path)
        request = _Request(
            self.command,
            url.path,
            parse_qs(url.query),
            self.headers,
            _Body(self.rfile, self.headers),
        )
        for stall in list(self.server.app.stalls):
            stall.hold(url.path)
        response = self.server.app.handle(request)
        self.server.app.begin_response()
        sent = 0
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(response.length))
            self.end_headers()
            sent = 0 if self.command == "HEAD" else self._write(response.body)
        finally:
            self.server.app.record(
                RequestRecord(self.command, url.path, self.headers.get("Range"), sent)
            )

    def _write(self, body: bytes | _FileSlice) -> int:
        """Send a body and return how many of its bytes went out."""
        if isinstance(body, bytes):
            self.wfile.write(body)
            return len(body)
        sent = 0
        with body.path.open("rb") as file:
            file.seek(body.start)
            while sent < body.length:
                chunk = file.read(min(_CHUNK, body.length - sent))
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    break
                sent += len(chunk)
        return sent


class Stall:
    """Requests whose URL path starts with ``prefix`` get no answer (not even headers) until the
    stall is released, or for at most ``seconds``; then they are answered as usual."""

    def __init__(self, prefix: str, seconds: float) -> None:
        self.prefix, self.seconds = prefix, seconds
        self._released = threading.Event()
        self._held = threading.Condition()
        self.held = 0
        """Requests held so far."""

    def hold(self, path: str) -> None:
        if not path.startswith(self.prefix) or self._released.is_set():
            return
        with self._held:
            self.held += 1
            self._held.notify_all()
        self._released.wait(self.seconds)

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Return once ``count`` requests are held; AssertionError after ``timeout`` seconds."""
        with self._held:
            if not self._held.wait_for(lambda: self.held >= count, timeout):
                raise AssertionError(f"{self.held} of {count} requests reached the stall")

    def release(self) -> None:
        self._released.set()


# --- public API ----------------------------------------------------------------------------------


class LocalHub:
    """A Hugging Face Hub look-alike listening on 127.0.0.1 (an OS-chosen port) in a daemon thread.

    Point the client at it with ``HF_ENDPOINT=hub.url`` *before* huggingface_hub is imported.
    Files are kept under ``storage_dir`` (a fresh temporary folder, removed by `shutdown`, when
    not given).
    """

    def __init__(self, storage_dir: str | os.PathLike[str] | None = None) -> None:
        self._owned_dir = None if storage_dir is not None else tempfile.mkdtemp(prefix="localhub-")
        root = Path(storage_dir if storage_dir is not None else self._owned_dir)  # type: ignore[arg-type]
        self._server = _Server(("127.0.0.1", 0), _RequestHandler)
        host, port = self._server.server_address[:2]
        self.url: str = f"http://{host}:{port}"
        """The endpoint, e.g. ``http://127.0.0.1:40123`` (no trailing slash)."""
        self._app = _HubApp(_BlobStore(root / "blobs"), self.url)
        self._server.app = self._app
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="LocalHub", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop serving and delete the storage folder if this hub created it."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    # --- content ---------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        folder: str | os.PathLike[str],
        *,
        private: bool | None = None,
        gated: bool | None = None,
        branch: str = _DEFAULT_BRANCH,
        message: str = "Upload folder",
        repo_type: str = "model",
    ) -> str:
        """Commit a copy of ``folder`` to ``branch`` of ``repo_id`` (made if new); return the sha.

        Files are copied, so later changes to the folder do not show. A new branch starts from
        ``main``. ``private``/``gated`` default to False for a new repo and stay as they are
        otherwise. Files are LFS files when large, binary or matched by the folder's
        ``.gitattributes`` (`DEFAULT_LFS_PATTERNS` when it has none). A new Space gets sdk gradio.
        """
        source = Path(folder)
        if not source.is_dir():
            raise NotADirectoryError(source)
        files = self._snapshot(source)
        with self._app.lock:
            repo = self._app.repos.get((repo_type, repo_id)) or self._new_repo(repo_id, repo_type)
            repo.private = repo.private if private is None else private
            repo.gated = repo.gated if gated is None else gated
            parent = repo.branches.get(branch) or repo.branches.get(_DEFAULT_BRANCH)
            commit = _make_commit(parent, files, message, "", repo_id.split("/")[0])
            repo.push(branch, commit)
        return commit.sha

    def _new_repo(self, repo_id: str, repo_type: str) -> _Repo:
        if repo_type not in _REPO_TYPES:
            raise ValueError(f"repo_type must be one of {_REPO_TYPES}, not {repo_type!r}")
        sdk = "gradio" if repo_type == "space" else None
        repo = _Repo(repo_id, private=False, gated=False, kind=repo_type, sdk=sdk)
        self._app.repos[(repo_type, repo_id)] = repo
        return repo

    def _snapshot(self, folder: Path) -> dict[str, _Entry]:
        gitattributes = folder / ".gitattributes"
        patterns = _lfs_patterns(gitattributes.read_text() if gitattributes.is_file() else None)
        files: dict[str, _Entry] = {}
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if (
                not path.is_file()
                or ".git" in relative.parts
                or relative.parts[:2] == (".cache", "huggingface")
            ):
                continue
            blob = self._app.store.add_file(path)
            sample = self._app.store.read(blob.sha256, _SAMPLE_SIZE)
            lfs = _is_lfs(relative.as_posix(), blob.size, sample, patterns)
            files[relative.as_posix()] = _Entry.create(self._app.store, blob, lfs=lfs)
        return files

    def create_branch(
        self, repo_id: str, branch: str, revision: str = _DEFAULT_BRANCH, repo_type: str = "model"
    ) -> str:
        """Create ``branch`` at ``revision``; return the commit sha."""
        with self._app.lock:
            repo = self._repo(repo_id, repo_type)
            commit = self._lookup(repo, revision)
            self._app.add_ref(repo.branches, branch, commit)
        return commit.sha

    def create_tag(
        self, repo_id: str, tag: str, revision: str = _DEFAULT_BRANCH, repo_type: str = "model"
    ) -> str:
        """Tag ``revision`` as ``tag``; return the commit sha."""
        with self._app.lock:
            repo = self._repo(repo_id, repo_type)
            commit = self._lookup(repo, revision)
            self._app.add_ref(repo.tags, tag, commit)
        return commit.sha

    def close_pull_request(self, repo_id: str, number: int, repo_type: str = "model") -> None:
        """Close pull request ``number`` of ``repo_id`` (its ``refs/pr/N`` stays readable)."""
        with self._app.lock:
            pull_requests = self._repo(repo_id, repo_type).pull_requests
            if not 1 <= number <= len(pull_requests):
                raise KeyError(f"{repo_id} has no pull request {number}")
            pull_requests[number - 1].status = "closed"

    def resolve(
        self, repo_id: str, revision: str = _DEFAULT_BRANCH, repo_type: str = "model"
    ) -> str:
        """The commit sha a revision (branch, tag, refs/pr/N, sha) points to."""
        with self._app.lock:
            return self._lookup(self._repo(repo_id, repo_type), revision).sha

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        """How many commits the main branch's history holds (the initial one included)."""
        with self._app.lock:
            return sum(
                1 for _ in self._lookup(self._repo(repo_id, repo_type), _DEFAULT_BRANCH).history()
            )

    def _repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        if (repo_type, repo_id) not in self._app.repos:
            raise KeyError(f"LocalHub has no {repo_type} repo {repo_id}")
        return self._app.repos[(repo_type, repo_id)]

    @staticmethod
    def _lookup(repo: _Repo, revision: str) -> _Commit:
        try:
            return repo.resolve(revision)
        except _HubError as error:
            raise KeyError(f"{repo.repo_id}: {error.message}") from None

    # --- access ----------------------------------------------------------------------------------

    def add_token(
        self,
        token: str,
        user: str,
        *,
        orgs: Iterable[str] = (),
        can_write: bool = False,
        write_repos: Iterable[str] = (),
    ) -> None:
        """Accept ``Authorization: Bearer <token>`` as ``user``, member of ``orgs``.

        Every token reads public repos and the private repos of its user and orgs. ``can_write``
        lets it create repos and push in those namespaces, and open pull requests anywhere;
        ``write_repos`` grants reading and pushing to those repos only (a fine-grained token).
        """
        with self._app.lock:
            self._app.tokens[token] = _Token(
                user, frozenset(orgs), can_write, frozenset(write_repos)
            )

    def set_paid(self, namespace: str, paid: bool = True) -> None:
        """Give user or org ``namespace`` a paid plan (PRO, Team, Enterprise), or take it away:
        without one, creating a Gradio or Docker Space is refused with 402, except a personal
        account's first 2 ZeroGPU Spaces (``space_hardware="zero-a10g"``)."""
        with self._app.lock:
            (self._app.paid.add if paid else self._app.paid.discard)(namespace)

    def grant_access(self, repo_id: str, user: str, repo_type: str = "model") -> None:
        """Let ``user`` download the files of gated repo ``repo_id``."""
        with self._app.lock:
            self._repo(repo_id, repo_type).granted_users.add(user)

    # --- traffic ---------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request answered since the last `reset_counters`, in order."""
        return self._app.settled_records()

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent since the last `reset_counters` (headers not counted)."""
        return sum(record.nbytes for record in self.requests)

    @property
    def bytes_by_path(self) -> dict[str, int]:
        """Body bytes sent per URL path (as requested, still percent-encoded)."""
        totals: dict[str, int] = {}
        for record in self.requests:
            totals[record.path] = totals.get(record.path, 0) + record.nbytes
        return totals

    def file_bytes_sent(self, repo_id: str, filename: str, repo_type: str = "model") -> int:
        """Bytes of ``filename`` of ``repo_id`` sent through resolve URLs, at any revision."""
        prefix = f"/{_web_path(repo_type, repo_id)}/resolve/"
        return sum(
            record.nbytes
            for record in self.requests
            if record.path.startswith(prefix)
            and unquote(record.path[len(prefix) :].partition("/")[2]) == filename
        )

    @contextmanager
    def stalled(self, prefix: str, *, seconds: float = 60.0) -> Iterator[Stall]:
        """While the block runs, hold every request whose URL path starts with ``prefix`` (say
        ``/org/name/resolve/``) before answering it, as a Hub that stops sending bytes would;
        leaving the block answers them. Each is held at most ``seconds``."""
        stall = Stall(prefix, seconds)
        self._app.stalls.append(stall)
        try:
            yield stall
        finally:
            self._app.stalls.remove(stall)
            stall.release()

    def reset_counters(self) -> None:
        """Forget the recorded requests, those of responses still being written included (a
        client may have the last byte before the server thread records the request)."""
        self._app.settled_records()
        with self._app.lock:
            self._app.records.clear()
