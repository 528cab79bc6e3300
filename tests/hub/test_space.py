"""`qkmonitor space deploy` against the LocalHub: files, front matter, idempotence, access."""

from __future__ import annotations

import re
from pathlib import Path

import gradio
import pytest
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

import qkmonitor
from qkmonitor.cli import main
from qkmonitor.errors import AccessDeniedError, QKMonitorError
from qkmonitor.hub.space import APP_DIR, deploy, space_files

WRITER = "hf_space_deployer"  # user deployer, member of org qk-spaces
READER = "hf_space_reader"
PACKAGE = Path(qkmonitor.__file__).parent


@pytest.fixture(scope="module", autouse=True)
def tokens(hub) -> None:
    hub.add_token(WRITER, "deployer", orgs=["qk-spaces"], can_write=True)
    hub.add_token(READER, "space-reader")


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


def test_missing_app_files_are_named(tmp_path):
    with pytest.raises(QKMonitorError, match=r"missing app\.py.*from a qkmonitor source checkout"):
        space_files(app_dir=tmp_path)
