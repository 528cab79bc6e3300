"""Deploy the QK Audit Space to the Hub (``qkmonitor space deploy ORG/NAME``).

The Space repo gets what it needs to build with no qkmonitor release on any index:

- ``app.py`` and ``audit_service.py``, the Space in ``spaces/qk-audit`` of a qkmonitor checkout;
- ``qkmonitor/``, this package's source, vendored next to app.py (a Space runs app.py from the
  repo's root, so ``import qkmonitor`` finds it; ``requirements.txt`` is installed before the
  repo's files are present and could not point at a wheel inside it);
- ``requirements.txt``: qkmonitor's dependencies, torch from the CPU wheel index on CPU
  hardware; ``README.md`` with the Space's front matter (``sdk_version`` equal to the gradio
  pin, ``suggested_hardware`` from ``hardware``, ``hf_oauth_scopes``);
- for ZeroGPU (``hardware="zero-a10g"``): ``python_version`` 3.12, an exact CUDA torch pin from
  ZeroGPU's supported list and the ``spaces`` package (`ZEROGPU_TORCH`); for the GPU flavors,
  PyPI's (CUDA) torch instead of the CPU index;
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

__all__ = [
    "SUGGESTED_HARDWARE",
    "ZEROGPU",
    "ZEROGPU_PYTHON",
    "ZEROGPU_TORCH",
    "Deployment",
    "deploy",
    "hardware_choices",
    "space_files",
]

_PACKAGE = Path(qkmonitor.__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
APP_DIR = _CHECKOUT / "spaces" / "qk-audit"
DOCS = _CHECKOUT / "docs" / "metrics.md"
APP_FILES = ("app.py", "audit_service.py", "zerogpu.py", "requirements.txt", "README.md")

#: ``suggested_hardware`` values of the Spaces config reference (hub-docs
#: spaces-config-reference, August 2026), not every SpaceHardware value
SUGGESTED_HARDWARE = (
    "cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4",
    "l40sx8", "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large",
    "a100x4", "a100x8",
)  # fmt: skip
#: ZeroGPU: requested with create_repo(space_hardware=...); not a suggested_hardware flavor
ZEROGPU = "zero-a10g"
#: ZeroGPU's supported versions (hub-docs spaces-zerogpu, August 2026): Python 3.10.13 or
#: 3.12.12 (transformers 5 needs 3.11+: 3.12), and CUDA torch builds 2.8.0, 2.9.1, 2.10.0, 2.11.0
ZEROGPU_PYTHON = "3.12"
ZEROGPU_TORCH = ("2.8.0", "2.9.1", "2.10.0", "2.11.0")
_SPACES = "spaces>=0.50,<1"  # ZeroGPU's @spaces.GPU; a no-op elsewhere
_CPU = ("cpu-basic", "cpu-upgrade")

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
    """The hardware a deploy can ask for: the config reference's flavors, and ZeroGPU."""
    return (*SUGGESTED_HARDWARE, ZEROGPU)


def _requirements(text: str, hardware: str | None) -> str:
    """requirements.txt for the hardware: as written for CPU; PyPI's CUDA torch for a GPU
    flavor; for ZeroGPU, the newest torch of its supported list, exactly, and ``spaces``."""
    if hardware is None or hardware in _CPU:
        return text
    lines = [line for line in text.splitlines() if not line.startswith("--extra-index-url")]
    torch = [i for i, line in enumerate(lines) if re.match(r"torch\b", line)]
    if len(torch) != 1:
        raise QKMonitorError("spaces/qk-audit/requirements.txt must list torch exactly once")
    if hardware == ZEROGPU:
        lines[torch[0]] = (
            f"torch=={ZEROGPU_TORCH[-1]}  # ZeroGPU: one of its supported CUDA builds, exactly"
        )
        lines.append(f"{_SPACES}  # @spaces.GPU around the compute")
    return "\n".join(lines) + "\n"


def _gradio_pin(requirements: str) -> str:
    pins = re.findall(r"^gradio(?:\[[^\]]*\])?==([0-9][0-9a-z.]*)\s*$", requirements, re.M)
    if len(pins) != 1:
        raise QKMonitorError(
            "spaces/qk-audit/requirements.txt must pin gradio exactly once (gradio==X.Y.Z), "
            "the version that the Space's sdk_version names"
        )
    return pins[0]


def _readme(text: str, gradio: str, hardware: str | None, direct_push: bool) -> str:
    """README.md with sdk_version set to the gradio pin, suggested_hardware to hardware (a
    config reference flavor; ZeroGPU sets python_version instead), and write-repos added to
    the OAuth scopes only when the Space offers direct pushes."""
    match = re.fullmatch(r"---\n(.*?\n)---\n(.*)", text, re.S)
    if match is None:
        raise QKMonitorError("spaces/qk-audit/README.md must start with a YAML front matter block")
    meta = yaml.safe_load(match.group(1))
    meta["sdk_version"] = gradio
    if hardware == ZEROGPU:
        meta["python_version"] = ZEROGPU_PYTHON
    elif hardware is not None:
        meta["suggested_hardware"] = hardware
    scopes = list(meta.get("hf_oauth_scopes") or [])
    if direct_push and "write-repos" not in scopes:
        meta["hf_oauth_scopes"] = [*scopes, "write-repos"]
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n{match.group(2)}"


def space_files(
    hardware: str | None = None, app_dir: Path = APP_DIR, *, direct_push: bool = False
) -> dict[str, bytes]:
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
    readme = _readme(files["README.md"].decode(), _gradio_pin(requirements), hardware, direct_push)
    files["README.md"] = readme.encode()
    files["requirements.txt"] = _requirements(requirements, hardware).encode()
    for path in sorted(_PACKAGE.rglob("*.py")):
        files[f"qkmonitor/{path.relative_to(_PACKAGE).as_posix()}"] = path.read_bytes()
    if DOCS.is_file():
        files["docs/metrics.md"] = DOCS.read_bytes()
    return files


def _plan_refusal(hub: client.Publisher, repo_id: str, hardware: str | None) -> QKMonitorError:
    """The one line for a Space the Hub refused for plan reasons (HTTP 402), naming what this
    account can host (hub-docs spaces-overview and spaces-zerogpu, August 2026)."""
    namespace = repo_id.split("/")[0]
    user = hub.user()  # the refusal is the news; who asked only refines it
    asked = "ZeroGPU" if hardware == ZEROGPU else (hardware or "cpu-basic")
    start = f"the Hub refused to host Space '{repo_id}' on {asked} (a plan limit)"
    if user is not None and namespace != user:
        return QKMonitorError(
            f"{start}: organization '{namespace}' needs a Team or Enterprise plan to host Gradio "
            f"Spaces, ZeroGPU included; deploy to {user}/NAME with --hardware {ZEROGPU} (a free "
            "personal account hosts up to 2 ZeroGPU Spaces)"
        )
    if hardware == ZEROGPU:
        return QKMonitorError(
            f"{start}: this account already hosts as many ZeroGPU Spaces as its plan allows (2 "
            "free, 10 with PRO); delete one, or subscribe to PRO"
        )
    return QKMonitorError(
        f"{start}: Gradio Spaces on CPU or GPU hardware need a paid plan (PRO, Team or "
        f"Enterprise); this account can host up to 2 ZeroGPU Spaces: run again with --hardware "
        f"{ZEROGPU}"
    )


def deploy(
    repo_id: str,
    *,
    private: bool = False,
    hardware: str | None = None,
    direct_push: bool = False,
    token: str | None = None,
) -> Deployment:
    """Create or update the Gradio Space ``repo_id`` with the app and a vendored qkmonitor.

    private makes a new Space private, and an existing public one too (a private one is never
    made public). hardware (`hardware_choices`) shapes the files for it (python_version,
    torch, ``spaces``; see the module docstring), is written as ``suggested_hardware`` where the
    config reference lists it, and is requested for the Space, new or existing (an existing
    Space on other hardware is moved to it; the Hub refuses what the account's plan does not
    cover, and the error names what it can host). direct_push adds the
    ``write-repos`` OAuth scope, which lets the Space commit to its users' repos; without it the
    Space asks for read-repos and write-discussions and opens pull requests only. token:
    HF_TOKEN or the saved login when None.

    Raises:
        qkmonitor.errors.AccessDeniedError: no token, or no write access to the namespace.
        qkmonitor.errors.NetworkError: a Hub request stalled for longer than
            QKMONITOR_HUB_TIMEOUT (each wait), or the connection failed; named in one line.
        qkmonitor.errors.QKMonitorError: bad arguments, missing app files, a plan refusal
            (naming what the account can host), other Hub errors.
    """
    from huggingface_hub.utils.sha import git_hash

    if not _REPO_ID.fullmatch(repo_id or "") or "--" in repo_id or ".." in repo_id:
        raise QKMonitorError(f"'{repo_id}' is not a Space id: use ORG/NAME")
    files = space_files(hardware, direct_push=direct_push)
    token = client.write_token(token, "deploying a Space")
    with client.publishing(
        repo_id,
        token=token,
        doing=f"deploying Space '{repo_id}'",
        if_sent=_IF_SENT,
        repo_type="space",
    ) as hub:
        url, head = hub.create_space(
            sdk="gradio",
            private=private,
            hardware=hardware,
            payment=lambda: _plan_refusal(hub, repo_id, hardware),
        )
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
