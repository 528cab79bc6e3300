"""The Hub client: every request qkmonitor makes to the Hub is made here, its URLs are built
here, and the Hub's refusals become qkmonitor's one-line errors here.

Reads (audits, the card's current text, the Space's access check) are bounded GETs through
`qkmonitor.hub._transport` (timeouts, capped retries, exact Content-Range; docs/hub-reads.md):

- `model_info` -> `RepoInfo` (the commit sha a revision points to and the repo's files at it),
  `hub_commit` (its sha alone);
- `get_file`: one file of a commit, whole, capped, or a byte range of it; `file_url` builds the
  only ``/resolve/`` URL.

Writes (model cards, the Space deploy) go through huggingface_hub's `HfApi`, inside `publishing`,
which bounds every request (``_transport.bounded``) and maps refusals: a `Publisher` reads the
head, a text file, the open pull requests, commits on top of an exact parent, and creates or
lists a Space. `write_token` finds the token a write needs.

Errors carry fields (``repo_id``, ``revision``, ``hint``; ``AccessDeniedError.refused``,
``ModelNotFoundError.missing``, ``MetadataRejectedError.reasons``), so that each front end can
word its own advice; their default hints suit the CLI and the Python API.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote

from qkmonitor.errors import (
    AccessDeniedError,
    ConflictError,
    MetadataRejectedError,
    ModelNotFoundError,
    NetworkError,
    NotAModelError,
    QKMonitorError,
)
from qkmonitor.hub._transport import (
    TIMEOUT_VARIABLE,
    bounded,
    get,
    hub_timeout,
)
from qkmonitor.untrusted_json import one_line, parse_json

__all__ = [
    "MAX_MODEL_INFO",
    "TIMEOUT_VARIABLE",
    "Publisher",
    "PullRequest",
    "RepoInfo",
    "bounded",
    "file_url",
    "get_file",
    "hub_commit",
    "hub_timeout",
    "metadata_refusal",
    "model_info",
    "publishing",
    "write_token",
]

MAX_MODEL_INFO = 64 * 2**20  # the Hub's model info, one line per file of the repo
_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class RepoInfo:
    """A Hub repo's revision, resolved: the commit it points to and the files at that commit."""

    repo_id: str
    #: the revision asked for (None: the default branch)
    revision: str | None
    sha: str
    files: tuple[str, ...]


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def file_url(repo_id: str, revision: str, path: str) -> str:
    """The ``/resolve/`` URL of a model repo's file at a revision (a commit sha, or a branch)."""
    return f"{_endpoint()}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


# ---- reads ---------------------------------------------------------------------------------


def model_info(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    timeout: float | None = None,
    deadline: float | None = None,
) -> RepoInfo:
    """The commit a Hub repo's revision points to and its files: one bounded, retried GET of
    the model info (capped at 64 MB; its sha and file list checked).

    timeout: seconds any one wait may take (default $QKMONITOR_HUB_TIMEOUT, else 15); deadline:
    a `time.monotonic` value after which it fails with TimeLimitError.
    """
    from huggingface_hub.utils import validate_repo_id

    seconds = hub_timeout(timeout)

    def call() -> bytearray:
        validate_repo_id(repo_id)
        url = f"{_endpoint()}/api/models/{repo_id}"
        if revision is not None:
            url += f"/revision/{quote(revision, safe='')}"
        what = f"model info of '{repo_id}'"
        return get(
            url, what, token=token, timeout=seconds, deadline=deadline, limit=MAX_MODEL_INFO + 1
        )[0]

    where = f"the Hub's model info of '{repo_id}'"
    with _refusals(repo_id, revision):
        raw = call()
    info = parse_json(raw, where, MAX_MODEL_INFO, NetworkError)
    sha, siblings = info.get("sha"), info.get("siblings")
    if not (
        isinstance(sha, str)
        and _SHA.fullmatch(sha)
        and isinstance(siblings, list)
        and all(isinstance(s, dict) and isinstance(s.get("rfilename"), str) for s in siblings)
    ):
        raise NetworkError(f"{where} has no commit sha or file list; is HF_ENDPOINT a Hub?")
    return RepoInfo(repo_id, revision, sha, tuple(s["rfilename"] for s in siblings))


def hub_commit(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    timeout: float | None = None,
    deadline: float | None = None,
) -> str:
    """The commit sha a Hub repo's revision points to, from one model-info request (e.g. to look
    a cached audit up before opening the source)."""
    return model_info(
        repo_id, revision=revision, token=token, timeout=timeout, deadline=deadline
    ).sha


def get_file(
    repo_id: str,
    revision: str,
    path: str,
    *,
    token: str | bool | None,
    timeout: float | None = None,
    deadline: float | None = None,
    span: tuple[int, int] | None = None,
    size: int | None = None,
    limit: int | None = None,
    sink: IO[bytes] | None = None,
    asked: str | None = None,
) -> tuple[bytearray, int | None]:
    """One bounded GET of a model repo's file at ``revision``: (body, the file's total size when
    known). span, size, limit and sink as in ``_transport.get`` (an inclusive byte range that
    must come back exactly, the size it must repeat, a cap on a whole-file body, a file to write
    the body to). asked: the revision the user named, for messages (default ``revision``).

    Raises a one-line error: ModelNotFoundError, AccessDeniedError (gated), NotAModelError (the
    file is missing), NetworkError, TimeLimitError, QKMonitorError.
    """
    what = f"'{repo_id}/{path}'"
    if span is not None:
        what = f"bytes {span[0]}-{span[1]} of {what}"
    with _refusals(repo_id, revision if asked is None else asked):
        return get(
            file_url(repo_id, revision, path),
            what,
            token=token,
            timeout=hub_timeout(timeout),
            deadline=deadline,
            span=span,
            size=size,
            limit=limit,
            sink=sink,
        )


@contextmanager
def _refusals(
    repo_id: str,
    revision: str | None,
    *,
    write: str | None = None,
    repo_type: str = "model",
    payment: Callable[[], QKMonitorError] | None = None,
) -> Iterator[None]:
    """Turn huggingface_hub's exceptions inside the block into one-line qkmonitor errors.

    write: None for reads; "push" (a commit to a branch) or "pull_request" for commits; "space"
    for the Space deploy's calls; payment: the error for HTTP 402 (a plan refusal). Errors of
    qkmonitor's own (NetworkError, TimeLimitError from
    the transport) pass through.
    """
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    fields: dict[str, Any] = {"repo_id": repo_id, "revision": revision}
    space = repo_type == "space"
    try:
        yield
    except GatedRepoError:
        raise AccessDeniedError(
            f"'{repo_id}' is gated",
            hint="accept its conditions on the Hub and set HF_TOKEN to a token of that account",
            refused="read",
            **fields,
        ) from None
    except RepositoryNotFoundError:
        if space:
            raise AccessDeniedError(
                f"the Hub did not let this token create or read Space '{repo_id}'",
                hint="set HF_TOKEN to a token with write access to that namespace",
                refused="write",
                **fields,
            ) from None
        raise ModelNotFoundError(
            f"Hub repo '{repo_id}' not found (or private)",
            hint="if it is private, set HF_TOKEN to a token with access",
            missing="repo",
            **fields,
        ) from None
    except RevisionNotFoundError:
        if write is not None:  # the read before it found the revision: a commit needs a branch
            raise ModelNotFoundError(
                f"'{revision}' is not a branch of '{repo_id}'",
                hint="a commit can only go to a branch (or a pull request to one)",
                missing="branch",
                **fields,
            ) from None
        raise ModelNotFoundError(
            f"revision '{revision}' not found in '{repo_id}'",
            hint="use a branch, tag or commit sha",
            missing="revision",
            **fields,
        ) from None
    except EntryNotFoundError as error:
        raise NotAModelError(
            f"'{repo_id}': a file is missing ({error.args[0].splitlines()[0]})", **fields
        ) from None
    except HFValidationError:
        raise ModelNotFoundError(
            f"'{repo_id}' is neither a local folder nor a valid Hub repo id (org/name)",
            missing="id",
            **fields,
        ) from None
    except OfflineModeIsEnabled:
        raise QKMonitorError(
            f"cannot fetch '{repo_id}': HF_HUB_OFFLINE is set",
            hint="unset it to reach the Hub",
            **fields,
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 402 and payment is not None:
            raise payment() from None
        raise _write_refusal(error, status, repo_id, write, fields) from None
    except ValueError as error:  # huggingface_hub's README validation (create_commit)
        refused = metadata_refusal(error, repo_id, revision)
        if write is None or refused is None:
            raise
        raise refused.with_hint(
            "nothing was written: fix those fields of the card's YAML header on the Hub (they "
            "are not qkmonitor's), then run again"
        ) from None
    except OSError as error:  # no saved token for token=True, a full disk for pickles
        where = f"Space '{repo_id}'" if space else f"'{repo_id}'"
        problem = f"cannot reach {where} on the Hub: {one_line(error)}"
        raise QKMonitorError(problem, **fields) from None


def metadata_refusal(
    error: BaseException, repo_id: str | None, revision: str | None = None
) -> MetadataRejectedError | None:
    """huggingface_hub's refusal of a README's metadata (``ValueError("Invalid metadata in
    README.md ...")``, raised before a commit or an upload) as one line; None for other errors.
    Its hint is generic: callers give their own (`QKMonitorError.with_hint`)."""
    text = str(error)
    if not isinstance(error, ValueError) or not text.startswith("Invalid metadata in README.md"):
        return None
    reasons = tuple(
        line.strip()[2:].strip() for line in text.splitlines()[1:] if line.strip().startswith("- ")
    )
    where = f"'{repo_id}/README.md'" if repo_id else "README.md"
    return MetadataRejectedError(
        f"the Hub refused the metadata of {where} ({'; '.join(reasons) or one_line(error)})",
        hint="fix those fields of the card's YAML header, then try again",
        reasons=reasons,
        repo_id=repo_id,
        revision=revision,
    )


def _write_refusal(
    error: Exception, status: int | None, repo_id: str, write: str | None, fields: dict
) -> QKMonitorError:
    """The one-line error for an HTTP refusal (any status huggingface_hub has no type for)."""
    first = error.args[0].splitlines()[0] if error.args else type(error).__name__
    if write == "space":
        if status in (401, 403):
            return AccessDeniedError(
                f"the token cannot write to Space '{repo_id}' (HTTP {status})",
                hint="set HF_TOKEN to a token with write access to that namespace",
                refused="write",
                **fields,
            )
        if status == 412:
            return ConflictError(
                f"Space '{repo_id}' changed on the Hub during the deploy; nothing was written",
                hint="run again",
                **fields,
            )
        return QKMonitorError(f"the Hub refused a request for Space '{repo_id}': {first}", **fields)
    if write is not None and status == 412:
        return ConflictError(
            f"'{repo_id}' changed on the Hub while qkmonitor was writing to it; nothing was "
            "written",
            hint="run again",
            **fields,
        )
    if write is not None and status == 401:
        return AccessDeniedError(
            f"the Hub rejected the token for '{repo_id}'",
            hint="set HF_TOKEN to a valid token with write access",
            refused="write",
            **fields,
        )
    if write is not None and status == 403:
        if write == "pull_request":
            return AccessDeniedError(
                f"the token cannot open a pull request on '{repo_id}'",
                hint="use a token with write access to it",
                refused="pull_request",
                **fields,
            )
        return AccessDeniedError(
            f"the token cannot push to '{repo_id}'",
            hint="use a token with write access to it, or open a pull request instead",
            refused="push",
            **fields,
        )
    return QKMonitorError(f"the Hub refused a request for '{repo_id}': {first}", **fields)


# ---- writes --------------------------------------------------------------------------------


def write_token(token: str | bool | None, doing: str) -> str:
    """The token to write with (HF_TOKEN / the saved login when None), never printed;
    AccessDeniedError when there is none. doing: the write, for the message ("updating a model
    card on the Hub")."""
    from huggingface_hub import get_token

    if isinstance(token, str) and token:
        return token
    found = get_token() if token is not False else None
    if not found:
        raise AccessDeniedError(
            f"{doing} needs a token with write access",
            hint="set HF_TOKEN (or log in with `hf auth login`)",
            refused="write",
        )
    return found


@dataclass(frozen=True)
class PullRequest:
    """An open pull request: its title, git reference (``refs/pr/N``) and page."""

    title: str
    git_reference: str
    url: str


@dataclass(frozen=True)
class Committed:
    """A commit made: its sha and page, and the pull request it opened (if any)."""

    oid: str
    commit_url: str
    pr_url: str | None


class Publisher:
    """The calls that publish to one Hub repo (made inside `publishing`): each goes through
    huggingface_hub's HfApi with every wait bounded, and its refusals become one-line errors."""

    def __init__(
        self, repo_id: str, token: str, revision: str | None, create_pr: bool, repo_type: str
    ) -> None:
        from huggingface_hub import HfApi

        self.repo_id, self.revision, self.create_pr = repo_id, revision, create_pr
        self.repo_type, self._token = repo_type, token
        self._api = HfApi(token=token)

    def _call(
        self, call: Callable[[], Any], payment: Callable[[], QKMonitorError] | None = None
    ) -> Any:
        """Every call of a publishing session maps refusals as a write: a 401 is a rejected
        token, a 403 no right to push (or to open a pull request)."""
        if self.repo_type == "space":
            mode = "space"
        else:
            mode = "pull_request" if self.create_pr else "push"
        with _refusals(
            self.repo_id, self.revision, write=mode, repo_type=self.repo_type, payment=payment
        ):
            return call()

    def head(self) -> str:
        """The commit sha the branch (``revision``, default main) points to."""
        kind = {"repo_type": self.repo_type}
        info = self._call(lambda: self._api.repo_info(self.repo_id, revision=self.revision, **kind))
        return info.sha

    def read_file(self, path: str, revision: str, limit: int) -> bytearray | None:
        """The bytes of a file at ``revision`` (at most limit + 1 of them), None if it has none:
        one bounded GET, held in memory, never in a download cache on disk."""
        from huggingface_hub.errors import EntryNotFoundError

        def call() -> bytearray | None:
            try:
                return get(
                    file_url(self.repo_id, revision, path),
                    f"'{self.repo_id}/{path}'",
                    token=self._token,
                    timeout=hub_timeout(),
                    limit=limit + 1,
                )[0]
            except EntryNotFoundError:
                return None

        return self._call(call)

    def open_pull_requests(self) -> Iterator[PullRequest]:
        """The repo's open pull requests, newest first (pages fetched as needed)."""
        listing = self._call(
            lambda: iter(
                self._api.get_repo_discussions(
                    self.repo_id, discussion_type="pull_request", discussion_status="open"
                )
            )
        )
        while True:
            found = self._call(lambda: next(listing, None))
            if found is None:
                return
            yield PullRequest(found.title, found.git_reference, found.url)

    def commit(
        self,
        files: Mapping[str, bytes],
        *,
        message: str,
        description: str | None = None,
        parent_commit: str | None = None,
        deletions: Sequence[str] = (),
    ) -> Committed:
        """One commit adding ``files`` (path -> content) and deleting ``deletions``, on top of
        ``parent_commit`` when given (the Hub refuses it if the branch moved: ConflictError), to
        the branch or, with create_pr, as a pull request. A README.md is validated by the Hub
        first: MetadataRejectedError names what it refused."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        operations: list[Any] = [CommitOperationAdd(p, data) for p, data in files.items()]
        operations += [CommitOperationDelete(p) for p in deletions]
        kind = {"repo_type": self.repo_type} if self.repo_type != "model" else {}
        info = self._call(
            lambda: self._api.create_commit(
                self.repo_id,
                operations,
                commit_message=message,
                commit_description=description,
                revision=self.revision,
                create_pr=self.create_pr or None,
                parent_commit=parent_commit,
                **kind,
            )
        )
        return Committed(info.oid, info.commit_url, info.pr_url)

    # ---- Spaces --------------------------------------------------------------------------

    def user(self) -> str | None:
        """The name of the token's user, None if the Hub does not say."""
        try:
            return self._api.whoami()["name"]
        except Exception:  # only refines a message: any failure means "unknown"
            return None

    def create_space(
        self,
        *,
        sdk: str,
        private: bool,
        hardware: str | None = None,
        payment: Callable[[], QKMonitorError] | None = None,
    ) -> tuple[str, str]:
        """Create the Space if missing (private when asked; an existing public one is made
        private, never the reverse), on ``hardware`` when given: requested at creation, and
        for an existing Space that asks for other hardware: (its page, its head sha).
        payment: the error for a plan refusal (HTTP 402)."""
        kind = {"repo_type": "space"}
        url = self._call(
            lambda: self._api.create_repo(
                self.repo_id,
                **kind,
                space_sdk=sdk,
                space_hardware=hardware,
                private=private or None,
                exist_ok=True,
            ),
            payment,
        )
        info = self._call(lambda: self._api.space_info(self.repo_id))
        if private and not info.private:
            self._call(lambda: self._api.update_repo_settings(self.repo_id, private=True, **kind))
        requested = info.runtime.requested_hardware if info.runtime else None
        if hardware is not None and requested != hardware:
            self._call(lambda: self._api.request_space_hardware(self.repo_id, hardware), payment)
        return str(url), info.sha

    def blob_ids(self, revision: str) -> dict[str, str]:
        """Every file of the repo at ``revision``: path -> its LFS sha256, else its git blob id."""
        kind = {"repo_type": self.repo_type}
        tree = self._call(
            lambda: list(
                self._api.list_repo_tree(self.repo_id, revision=revision, recursive=True, **kind)
            )
        )
        return {
            entry.path: (entry.lfs.sha256 if entry.lfs else entry.blob_id)
            for entry in tree
            if getattr(entry, "blob_id", None) is not None
        }


@contextmanager
def publishing(
    repo_id: str,
    *,
    token: str,
    doing: str,
    if_sent: str,
    revision: str | None = None,
    create_pr: bool = False,
    repo_type: str = "model",
) -> Iterator[Publisher]:
    """A `Publisher` for ``repo_id``; every request made inside waits at most
    $QKMONITOR_HUB_TIMEOUT per wait, and a stall is one NetworkError line starting with
    ``doing`` (for a request that may have landed, followed by ``if_sent``: what a run again
    does). revision: the branch to read the head of and to commit to (default: main);
    create_pr: commits open pull requests."""
    with bounded(doing, if_sent=if_sent):
        yield Publisher(repo_id, token, revision, create_pr, repo_type)
