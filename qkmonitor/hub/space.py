"""Deploy the QK Audit Space to the Hub (``qkmonitor space deploy ORG/NAME``).

The Space repo gets what it needs to build with no qkmonitor release on any index:

- ``app.py`` and ``audit_service.py``, the Space in ``spaces/qk-audit`` of a qkmonitor checkout;
- ``qkmonitor/``, this package's source, vendored next to app.py (a Space runs app.py from the
  repo's root, so ``import qkmonitor`` finds it; ``requirements.txt`` is installed before the
  repo's files are present and could not point at a wheel inside it);
- ``requirements.txt``: qkmonitor's dependencies, torch from the CPU wheel index (the app
  computes on CPU); ``README.md`` with the Space's front matter (``sdk_version`` equal to the
  gradio pin, ``suggested_hardware`` from ``hardware``);
- ``docs/metrics.md``, the definitions of every number, which the app shows in a tab.

A deploy compares these files with the Space's head by git blob id and commits only what
differs; a re-run without a change makes no commit. Stale files of the folders it owns (the
top-level ``*.py``, ``qkmonitor/``, ``docs/``) are deleted; other files are left alone.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

import qkmonitor
from qkmonitor.errors import QKMonitorError
from qkmonitor.hub import client

__all__ = ["Deployment", "deploy", "hardware_choices", "space_files"]

_PACKAGE = Path(qkmonitor.__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
APP_DIR = _CHECKOUT / "spaces" / "qk-audit"
DOCS = _CHECKOUT / "docs" / "metrics.md"
APP_FILES = ("app.py", "audit_service.py", "requirements.txt", "README.md")

_OWNED = re.compile(r"[^/]+\.py|qkmonitor/.+|docs/.+")  # paths a deploy deletes when stale
_IF_SENT = "run again, which compares the files with the Space's head and commits only what differs"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


@dataclass(frozen=True)
class Deployment:
    """What a deploy did: the Space's page, and the commit made (None when nothing changed)."""

    url: str
    changed: bool
    commit_url: str | None
    paths: list[str]  # files added, changed or deleted


def hardware_choices() -> tuple[str, ...]:
    """The hardware a Space can ask for (huggingface_hub's SpaceHardware)."""
    from huggingface_hub import SpaceHardware

    return tuple(hardware.value for hardware in SpaceHardware)


def _gradio_pin(requirements: str) -> str:
    pins = re.findall(r"^gradio(?:\[[^\]]*\])?==([0-9][0-9a-z.]*)\s*$", requirements, re.M)
    if len(pins) != 1:
        raise QKMonitorError(
            "spaces/qk-audit/requirements.txt must pin gradio exactly once (gradio==X.Y.Z), "
            "the version that the Space's sdk_version names"
        )
    return pins[0]


def _readme(text: str, gradio: str, hardware: str | None) -> str:
    """README.md with sdk_version set to the gradio pin and suggested_hardware to hardware."""
    match = re.fullmatch(r"---\n(.*?\n)---\n(.*)", text, re.S)
    if match is None:
        raise QKMonitorError("spaces/qk-audit/README.md must start with a YAML front matter block")
    meta = yaml.safe_load(match.group(1))
    meta["sdk_version"] = gradio
    if hardware is not None:
        meta["suggested_hardware"] = hardware
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n{match.group(2)}"


def space_files(hardware: str | None = None, app_dir: Path = APP_DIR) -> dict[str, bytes]:
    """The files of the Space repo, path -> content (see the module docstring)."""
    if hardware is not None and hardware not in hardware_choices():
        raise QKMonitorError(
            f"unknown Space hardware '{hardware}'; choose one of {', '.join(hardware_choices())}"
        )
    missing = [name for name in APP_FILES if not (app_dir / name).is_file()]
    if missing:
        raise QKMonitorError(
            f"the Space's files are not in '{app_dir}' (missing {', '.join(missing)}): run "
            "`qkmonitor space deploy` from a qkmonitor source checkout"
        )
    files = {name: (app_dir / name).read_bytes() for name in APP_FILES}
    requirements = files["requirements.txt"].decode()
    if re.search(r"^qkmonitor\b", requirements, re.M):
        raise QKMonitorError("requirements.txt must not install qkmonitor: the deploy vendors it")
    readme = _readme(files["README.md"].decode(), _gradio_pin(requirements), hardware)
    files["README.md"] = readme.encode()
    for path in sorted(_PACKAGE.rglob("*.py")):
        files[f"qkmonitor/{path.relative_to(_PACKAGE).as_posix()}"] = path.read_bytes()
    if DOCS.is_file():
        files["docs/metrics.md"] = DOCS.read_bytes()
    return files


def deploy(
    repo_id: str,
    *,
    private: bool = False,
    hardware: str | None = None,
    token: str | None = None,
) -> Deployment:
    """Create or update the Gradio Space ``repo_id`` with the app and a vendored qkmonitor.

    private makes a new Space private, and an existing public one too (a private one is never
    made public). hardware is written to the front matter as ``suggested_hardware``, which the
    Hub offers the owner; it does not change the running hardware. token: HF_TOKEN or the saved
    login when None.

    Raises:
        qkmonitor.errors.AccessDeniedError: no token, or no write access to the namespace.
        qkmonitor.errors.NetworkError: a Hub request stalled for longer than
            QKMONITOR_HUB_TIMEOUT (each wait), or the connection failed; named in one line.
        qkmonitor.errors.QKMonitorError: bad arguments, missing app files, other Hub errors.
    """
    from huggingface_hub.utils.sha import git_hash

    if not _REPO_ID.fullmatch(repo_id or "") or "--" in repo_id or ".." in repo_id:
        raise QKMonitorError(f"'{repo_id}' is not a Space id: use ORG/NAME")
    files = space_files(hardware)
    token = client.write_token(token, "deploying a Space")
    with client.publishing(
        repo_id,
        token=token,
        doing=f"deploying Space '{repo_id}'",
        if_sent=_IF_SENT,
        repo_type="space",
    ) as hub:
        url, head = hub.create_space(sdk="gradio", private=private)
        remote = hub.blob_ids(head)
        changed = [
            path
            for path, content in files.items()
            if remote.get(path) not in (git_hash(content), hashlib.sha256(content).hexdigest())
        ]
        stale = sorted(p for p in remote if p not in files and _OWNED.fullmatch(p))
        if not changed and not stale:
            return Deployment(url, False, None, [])
        commit = hub.commit(
            {p: files[p] for p in changed},
            deletions=stale,
            message=f"Deploy the QK Audit Space (qkmonitor {qkmonitor.__version__})",
            parent_commit=head,
        )
        return Deployment(url, True, commit.commit_url, sorted(changed + stale))
