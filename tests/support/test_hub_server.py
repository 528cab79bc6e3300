"""LocalHub against the real huggingface_hub and transformers clients."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    ModelCard,
    get_session,
    hf_hub_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from support import hub_server
from support.hub_server import LocalHub

ALICE = "hf_alice_write"  # user alice, member of alice-org, write token
BOB = "hf_bob_read"  # user bob, read token
CAROL = "hf_carol_fine_grained"  # user carol, may write to one of alice's repos only
SHARED_BY_ALICE = "alice/shared-with-carol"
QUERY = "encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module", autouse=True)
def tokens(hub: LocalHub) -> None:
    hub.add_token(ALICE, "alice", orgs=["alice-org"], can_write=True)
    hub.add_token(BOB, "bob")
    hub.add_token(CAROL, "carol", write_repos=[SHARED_BY_ALICE])


@pytest.fixture
def repo_id(request: pytest.FixtureRequest) -> str:
    """A repo id in alice's namespace, unique to the test."""
    return "alice/" + re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-")[:80]


def _save_tiny_bert(folder: Path, max_shard_size: str | None = None) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=99,
    )
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    BertModel(config).save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _read(repo_id: str, filename: str, **kwargs: object) -> str:
    return Path(hf_hub_download(repo_id, filename, **kwargs)).read_text()  # type: ignore[arg-type]


# --- reading -------------------------------------------------------------------------------------


def test_model_info_reports_commit_and_files(hub: LocalHub, tiny_model: Path, repo_id: str) -> None:
    sha = hub.add_repo(repo_id, tiny_model)

    info = HfApi().model_info(repo_id, files_metadata=True)

    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    assert info.id == repo_id
    assert info.sha == sha == hub.resolve(repo_id)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert {name: s.size for name, s in siblings.items()} == {
        p.name: p.stat().st_size for p in tiny_model.iterdir()
    }
    weights = (tiny_model / "model.safetensors").read_bytes()
    assert siblings["config.json"].lfs is None
    assert siblings["model.safetensors"].lfs is not None
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()


def test_download_by_branch_sha_tag_and_pr(
    hub: LocalHub, repo_id: str, tmp_path: Path, fresh_hub_cache: Path
) -> None:
    (tmp_path / "README.md").write_text("v1")
    first = hub.add_repo(repo_id, tmp_path)
    hub.create_tag(repo_id, "v1.0")
    (tmp_path / "README.md").write_text("v2")  # the first snapshot must not see this
    second = hub.add_repo(repo_id, tmp_path)
    (tmp_path / "README.md").write_text("dev")
    dev = hub.add_repo(repo_id, tmp_path, branch="dev")

    assert _read(repo_id, "README.md") == "v2"
    assert _read(repo_id, "README.md", revision=first) == "v1"
    assert _read(repo_id, "README.md", revision=first[:7]) == "v1"
    assert _read(repo_id, "README.md", revision="v1.0") == "v1"
    assert _read(repo_id, "README.md", revision="dev") == "dev"
    api = HfApi()
    assert api.model_info(repo_id, revision="v1.0").sha == first
    assert [c.commit_id for c in api.list_repo_commits(repo_id, revision="dev")] == [
        dev,
        second,
        first,
    ]
    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "dev": dev}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": first}


def test_tree_and_paths_info(hub: LocalHub, repo_id: str, tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "top.txt").write_text("top")
    (tmp_path / "sub" / "a.txt").write_text("a")
    (tmp_path / "sub" / "deeper" / "b.txt").write_text("b")
    hub.add_repo(repo_id, tmp_path)
    api = HfApi()

    top = {entry.path for entry in api.list_repo_tree(repo_id)}
    everything = {entry.path for entry in api.list_repo_tree(repo_id, recursive=True)}
    inside = {entry.path for entry in api.list_repo_tree(repo_id, path_in_repo="sub")}
    infos = api.get_paths_info(repo_id, ["top.txt", "sub/deeper", "missing.txt"])

    assert top == {"top.txt", "sub"}
    assert everything == {"top.txt", "sub", "sub/a.txt", "sub/deeper", "sub/deeper/b.txt"}
    assert inside == {"sub/a.txt", "sub/deeper"}
    assert [(type(i).__name__, i.path) for i in infos] == [
        ("RepoFile", "top.txt"),
        ("RepoFolder", "sub/deeper"),
    ]
    assert HfFileSystem(skip_instance_cache=True).ls(f"{repo_id}/sub", detail=False) == [
        f"{repo_id}/sub/a.txt",
        f"{repo_id}/sub/deeper",
    ]


def test_safetensors_metadata_reads_only_the_header(
    hub: LocalHub, tiny_model: Path, repo_id: str
) -> None:
    hub.add_repo(repo_id, tiny_model)
    size = (tiny_model / "model.safetensors").stat().st_size
    hub.reset_counters()

    metadata = HfApi().get_safetensors_metadata(repo_id)

    assert not metadata.sharded
    assert metadata.files_metadata["model.safetensors"].tensors[QUERY].shape == [32, 32]
    assert hub.file_bytes_sent(repo_id, "model.safetensors") == 100_001 < size  # client's probe


def test_safetensors_metadata_of_a_sharded_repo(
    hub: LocalHub, repo_id: str, tmp_path: Path
) -> None:
    folder = _save_tiny_bert(tmp_path, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").exists()
    hub.add_repo(repo_id, folder)

    metadata = HfApi().get_safetensors_metadata(repo_id)

    assert metadata.sharded
    assert len(metadata.files_metadata) >= 2
    shard = metadata.weight_map[QUERY]
    assert metadata.files_metadata[shard].tensors[QUERY].dtype == "F32"


def test_hffilesystem_range_read_sends_only_the_range(
    hub: LocalHub, tiny_model: Path, repo_id: str
) -> None:
    hub.add_repo(repo_id, tiny_model)
    data = (tiny_model / "model.safetensors").read_bytes()
    filesystem = HfFileSystem(skip_instance_cache=True)
    hub.reset_counters()

    with filesystem.open(f"{repo_id}/model.safetensors", "rb", cache_type="none") as file:
        file.seek(1000)
        chunk = file.read(4096)

    assert chunk == data[1000:5096]
    assert hub.file_bytes_sent(repo_id, "model.safetensors") == 4096
    ranges = [r.range for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert ranges == ["bytes=1000-5095"]


def test_transformers_from_pretrained(hub: LocalHub, tiny_model: Path, repo_id: str) -> None:
    hub.add_repo(repo_id, tiny_model)

    config = AutoConfig.from_pretrained(repo_id)
    remote = AutoModel.from_pretrained(repo_id)

    assert (config.hidden_size, config.num_attention_heads) == (32, 2)
    local = AutoModel.from_pretrained(tiny_model)
    remote_state, local_state = remote.state_dict(), local.state_dict()
    assert remote_state.keys() == local_state.keys()
    assert all(torch.equal(remote_state[k], local_state[k]) for k in local_state)


# --- HTTP details --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "status", "start", "stop", "content_range"),
    [
        (None, 200, 0, 100, None),
        ("bytes=10-19", 206, 10, 20, "bytes 10-19/100"),
        ("bytes=90-", 206, 90, 100, "bytes 90-99/100"),
        ("bytes=-5", 206, 95, 100, "bytes 95-99/100"),
        ("bytes=-500", 206, 0, 100, "bytes 0-99/100"),
        ("bytes=50-100000", 206, 50, 100, "bytes 50-99/100"),
        ("bytes=0-1,5-6", 200, 0, 100, None),  # several ranges: ignored
        ("bytes=100-", 416, 0, 0, "bytes */100"),
    ],
)
def test_range_requests_on_a_kept_alive_connection(
    hub: LocalHub,
    tmp_path: Path,
    range_header: str | None,
    status: int,
    start: int,
    stop: int,
    content_range: str | None,
) -> None:
    data = bytes(range(100))
    (tmp_path / "data.dat").write_bytes(data)
    hub.add_repo("alice/ranges", tmp_path)
    address = urlsplit(hub.url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port)
    path = "/alice/ranges/resolve/main/data.dat"
    headers = {"Range": range_header} if range_header else {}

    for method in ("HEAD", "GET", "GET"):  # one connection: lengths must be exact
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        assert response.status == status
        assert response.getheader("Content-Range") == content_range
        if status != 416:
            assert response.getheader("X-Repo-Commit") == hub.resolve("alice/ranges")
            assert body == (b"" if method == "HEAD" else data[start:stop])
            assert response.getheader("Content-Length") == str(stop - start)
    connection.close()


def test_url_encoded_pr_revision(hub: LocalHub, repo_id: str) -> None:
    api = HfApi(token=ALICE)
    api.create_repo(repo_id)
    api.create_commit(
        repo_id, [CommitOperationAdd("x.txt", b"pr")], commit_message="pr", create_pr=True
    )
    address = urlsplit(hub.url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port)

    connection.request("GET", f"/{repo_id}/resolve/{quote('refs/pr/1', safe='')}/x.txt")
    response = connection.getresponse()

    assert (response.status, response.read()) == (200, b"pr")
    connection.close()


def test_chunked_lfs_upload_on_a_kept_alive_connection(hub: LocalHub, repo_id: str) -> None:
    HfApi(token=ALICE).create_repo(repo_id)
    data = b"chunked body " * 1000
    obj = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
    address = urlsplit(hub.url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port)

    batch = json.dumps({"operation": "upload", "objects": [obj]})
    auth = {"Authorization": f"Bearer {ALICE}"}
    connection.request("POST", f"/{repo_id}.git/info/lfs/objects/batch", batch, headers=auth)
    actions = json.loads(connection.getresponse().read())["objects"][0]["actions"]
    parts = iter([data[:5000], data[5000:]])
    connection.request("PUT", urlsplit(actions["upload"]["href"]).path, parts, encode_chunked=True)
    uploaded = connection.getresponse()
    uploaded.read()
    connection.request("POST", urlsplit(actions["verify"]["href"]).path, json.dumps(obj))
    verified = connection.getresponse()
    verified.read()

    assert (uploaded.status, verified.status) == (200, 200)
    connection.close()


# --- errors --------------------------------------------------------------------------------------


def test_missing_repo(hub: LocalHub) -> None:
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi().model_info("nobody/nothing")
    with pytest.raises(RepositoryNotFoundError) as authenticated:
        HfApi(token=BOB).model_info("nobody/nothing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "config.json")

    assert anonymous.value.response.status_code == 401
    assert authenticated.value.response.status_code == 404
    assert authenticated.value.response.headers["X-Error-Code"] == "RepoNotFound"


def test_private_repo(hub: LocalHub, tiny_model: Path, repo_id: str) -> None:
    hub.add_repo(repo_id, tiny_model, private=True)

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi().model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError) as stranger:
        hf_hub_download(repo_id, "config.json", token=BOB)

    assert anonymous.value.response.status_code == 401
    assert stranger.value.response.status_code == 404
    assert HfApi(token=ALICE).model_info(repo_id).private is True
    assert Path(hf_hub_download(repo_id, "config.json", token=ALICE)).is_file()


def test_gated_repo(hub: LocalHub, tiny_model: Path) -> None:
    repo_id = "gatekeeper/gated-model"
    hub.add_repo(repo_id, tiny_model, gated=True)

    assert HfApi().model_info(repo_id).gated == "manual"  # metadata stays public
    with pytest.raises(GatedRepoError) as anonymous:
        hf_hub_download(repo_id, "config.json")
    with pytest.raises(GatedRepoError) as not_granted:
        hf_hub_download(repo_id, "config.json", token=BOB)
    hub.grant_access(repo_id, "bob")

    assert anonymous.value.response.status_code == 401
    assert not_granted.value.response.status_code == 403
    assert Path(hf_hub_download(repo_id, "config.json", token=BOB)).is_file()


def test_missing_revision(hub: LocalHub, tiny_model: Path, repo_id: str) -> None:
    hub.add_repo(repo_id, tiny_model)

    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        HfApi().list_repo_files(repo_id, revision="refs/pr/7")


def test_missing_file(hub: LocalHub, tiny_model: Path, repo_id: str) -> None:
    sha = hub.add_repo(repo_id, tiny_model)

    with pytest.raises(EntryNotFoundError) as missing:
        hf_hub_download(repo_id, "pytorch_model.bin")

    assert missing.value.response.status_code == 404  # type: ignore[attr-defined]
    assert missing.value.response.headers["X-Repo-Commit"] == sha  # type: ignore[attr-defined]
    assert not HfApi().file_exists(repo_id, "pytorch_model.bin")


def test_unknown_token(hub: LocalHub, tiny_model: Path, repo_id: str) -> None:
    hub.add_repo(repo_id, tiny_model)

    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(token="hf_not_issued").model_info(repo_id)
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        HfApi(token="hf_not_issued").whoami()

    assert not isinstance(refused.value, RepositoryNotFoundError)
    assert refused.value.response.status_code == 401
    assert HfApi(token=ALICE).whoami()["name"] == "alice"


# --- writing -------------------------------------------------------------------------------------


def test_create_repo(hub: LocalHub, repo_id: str) -> None:
    api = HfApi(token=ALICE)
    name = repo_id.split("/")[1]

    url = api.create_repo(name, private=True)  # no namespace: the token's user
    with pytest.raises(HfHubHTTPError) as again:
        api.create_repo(repo_id)
    with pytest.raises(HfHubHTTPError) as read_only:
        HfApi(token=BOB).create_repo(f"bob/{name}")

    assert url.repo_id == repo_id
    assert again.value.response.status_code == 409
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    assert read_only.value.response.status_code == 403
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(repo_id)  # private


def test_space_repo_create_commit_list_download_and_settings(
    hub: LocalHub, repo_id: str, tmp_path: Path
) -> None:
    from huggingface_hub import snapshot_download

    api = HfApi(token=ALICE)
    hub.set_paid(repo_id.split("/")[0])  # a Gradio Space on CPU needs a paid plan
    url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=True)
    assert url == f"{hub.url}/spaces/{repo_id}" and url.repo_type == "space"
    again = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", exist_ok=True)
    assert again == url
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)  # a Space of that name is no model
    files = [CommitOperationAdd("app.py", b"print(1)\n"), CommitOperationAdd("pkg/m.py", b"x=1\n")]
    commit = api.create_commit(repo_id, files, commit_message="app", repo_type="space")
    assert commit.commit_url == f"{hub.url}/spaces/{repo_id}/commit/{commit.oid}"
    info = api.space_info(repo_id)
    assert info.sha == commit.oid == hub.resolve(repo_id, repo_type="space")
    assert info.private and info.sdk == "gradio"
    tree = {f.path: f for f in api.list_repo_tree(repo_id, repo_type="space", recursive=True)}
    assert set(tree) == {".gitattributes", "app.py", "pkg", "pkg/m.py"}
    assert tree["app.py"].blob_id == hashlib.sha1(b"blob 9\0print(1)\n").hexdigest()
    folder = snapshot_download(repo_id, repo_type="space", local_dir=tmp_path / "copy", token=ALICE)
    assert (Path(folder) / "pkg" / "m.py").read_bytes() == b"x=1\n"
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=BOB).space_info(repo_id)
    api.update_repo_settings(repo_id, private=False, repo_type="space")
    assert not HfApi(token=BOB).space_info(repo_id).private
    assert hub.commit_count(repo_id, repo_type="space") == 2


def test_write_permissions(hub: LocalHub) -> None:
    HfApi(token=ALICE).create_repo(SHARED_BY_ALICE)
    readme = [CommitOperationAdd("README.md", b"hi")]

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi().create_commit(SHARED_BY_ALICE, readme, commit_message="x")
    with pytest.raises(HfHubHTTPError) as read_only:
        HfApi(token=BOB).create_commit(SHARED_BY_ALICE, readme, commit_message="x")
    HfApi(token=CAROL).create_commit(SHARED_BY_ALICE, readme, commit_message="fine-grained")
    with pytest.raises(HfHubHTTPError) as elsewhere:
        HfApi(token=CAROL).create_repo("carol/own")

    assert anonymous.value.response.status_code == 401
    assert read_only.value.response.status_code == 403
    assert elsewhere.value.response.status_code == 403
    assert _read(SHARED_BY_ALICE, "README.md") == "hi"


def test_create_commit_direct_and_as_pull_request(hub: LocalHub, repo_id: str) -> None:
    api = HfApi(token=ALICE)
    api.create_repo(repo_id)

    direct = api.create_commit(
        repo_id, [CommitOperationAdd("README.md", b"# v1\n")], commit_message="Add card"
    )
    proposal = api.create_commit(
        repo_id,
        [CommitOperationAdd("README.md", b"# v2\n"), CommitOperationDelete(".gitattributes")],
        commit_message="Propose card",
        create_pr=True,
    )

    assert direct.oid == hub.resolve(repo_id)
    assert direct.pr_url is None
    assert ModelCard.load(repo_id).text == "# v1\n"
    assert (proposal.pr_revision, proposal.pr_num) == ("refs/pr/1", 1)
    assert proposal.oid == hub.resolve(repo_id, "refs/pr/1") != direct.oid
    assert _read(repo_id, "README.md", revision="refs/pr/1") == "# v2\n"
    assert api.list_repo_files(repo_id, revision="refs/pr/1") == ["README.md"]
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [(p.name, p.target_commit) for p in refs.pull_requests or []] == [
        ("refs/pr/1", proposal.oid)
    ]
    assert [c.title for c in api.list_repo_commits(repo_id)] == ["Add card", "initial commit"]


def test_pull_requests_are_listed_filtered_and_paged_as_discussions(
    hub: LocalHub, repo_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_token("hf_dave_write", "dave", can_write=True)
    api = HfApi(token=ALICE)
    api.create_repo(repo_id)
    for token, title in ((ALICE, "First"), ("hf_dave_write", "Second"), (ALICE, "Third")):
        HfApi(token=token).create_commit(
            repo_id,
            [CommitOperationAdd("README.md", title.encode())],
            commit_message=title,
            create_pr=True,
        )
    hub.close_pull_request(repo_id, 1)

    def numbers(**filters: str) -> list[int]:
        return [d.num for d in api.get_repo_discussions(repo_id, **filters)]  # type: ignore[arg-type]

    everything = list(api.get_repo_discussions(repo_id))
    monkeypatch.setattr(hub_server, "DISCUSSIONS_PAGE_SIZE", 2)
    hub.reset_counters()
    paged = [(d.num, d.title, d.status, d.author) for d in api.get_repo_discussions(repo_id)]
    pages = [r for r in hub.requests if r.path == f"/api/models/{repo_id}/discussions"]

    assert paged == [
        (3, "Third", "open", "alice"),
        (2, "Second", "open", "dave"),
        (1, "First", "closed", "alice"),
    ]
    assert len(pages) == 2
    newest = everything[0]
    assert newest.is_pull_request and (newest.repo_id, newest.repo_type) == (repo_id, "model")
    assert newest.url == f"{hub.url}/{repo_id}/discussions/3"
    assert _read(repo_id, "README.md", revision=newest.git_reference) == "Third"
    assert newest.created_at.tzinfo is not None
    assert numbers(discussion_type="pull_request", discussion_status="open") == [3, 2]
    assert numbers(discussion_status="closed") == [1]
    assert numbers(author="dave") == [2]
    assert numbers(discussion_type="discussion") == []
    private = api.create_repo(f"{repo_id}-private", private=True).repo_id
    api.create_commit(private, [CommitOperationAdd("a", b"a")], commit_message="a", create_pr=True)
    assert [d.num for d in api.get_repo_discussions(private)] == [1]
    with pytest.raises(RepositoryNotFoundError):  # the access rules of the other repo routes
        list(HfApi().get_repo_discussions(private))
    with pytest.raises(RepositoryNotFoundError):
        list(HfApi(token=BOB).get_repo_discussions(private))


def test_parent_commit_conflict(hub: LocalHub, repo_id: str) -> None:
    api = HfApi(token=ALICE)
    api.create_repo(repo_id)
    parent = api.model_info(repo_id).sha
    assert parent is not None
    api.upload_file(path_or_fileobj=b"meanwhile", path_in_repo="other.txt", repo_id=repo_id)

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_commit(
            repo_id,
            [CommitOperationAdd("README.md", b"late")],
            commit_message="late",
            parent_commit=parent,
        )
    head = hub.resolve(repo_id)
    api.create_commit(
        repo_id,
        [CommitOperationAdd("README.md", b"on time")],
        commit_message="on time",
        parent_commit=head[:7],
    )

    assert conflict.value.response.status_code == 412
    assert "A commit has happened since. Please refresh and try again." in str(conflict.value)
    assert _read(repo_id, "README.md") == "on time"


def test_large_binary_upload_goes_through_lfs(hub: LocalHub, repo_id: str, tmp_path: Path) -> None:
    data = os.urandom(12 * 2**20)
    (tmp_path / "weights.dat").write_bytes(data)
    api = HfApi(token=ALICE)
    api.create_repo(repo_id)
    hub.reset_counters()

    api.upload_folder(folder_path=tmp_path, repo_id=repo_id)

    calls = [(r.method, r.path) for r in hub.requests]
    sha256 = hashlib.sha256(data).hexdigest()
    assert ("POST", f"/{repo_id}.git/info/lfs/objects/batch") in calls
    assert ("PUT", f"/_lfs/{sha256}") in calls
    assert ("POST", f"/_lfs/{sha256}/verify") in calls
    (sibling,) = [s for s in api.model_info(repo_id, files_metadata=True).siblings or [] if s.lfs]
    assert (sibling.rfilename, sibling.lfs.sha256, sibling.size) == (
        "weights.dat",
        sha256,
        len(data),
    )
    assert Path(hf_hub_download(repo_id, "weights.dat")).read_bytes() == data

    hub.reset_counters()
    api.upload_file(path_or_fileobj=data, path_in_repo="copy.dat", repo_id=repo_id)
    assert not [r for r in hub.requests if r.method == "PUT"]  # the object is already stored


def test_branch_and_tag_endpoints_and_snapshots(
    hub: LocalHub, tiny_model: Path, repo_id: str, tmp_path: Path
) -> None:
    api = HfApi(token=ALICE)
    first = hub.add_repo(repo_id, tiny_model)
    api.create_branch(repo_id, branch="audits/v1")
    api.create_tag(repo_id, tag="reviewed", revision=first)
    api.upload_file(path_or_fileobj=b"later", path_in_repo="NOTES.md", repo_id=repo_id)

    with pytest.raises(HfHubHTTPError) as again:
        api.create_branch(repo_id, branch="audits/v1")
    api.create_branch(repo_id, branch="audits/v1", exist_ok=True)
    api.create_tag(repo_id, tag="reviewed", exist_ok=True)
    snapshot = Path(api.snapshot_download(repo_id, revision="reviewed"))
    local = Path(api.snapshot_download(repo_id, revision="audits/v1", local_dir=tmp_path / "v1"))

    assert again.value.response.status_code == 409
    assert hub.resolve(repo_id, "audits/v1") == hub.resolve(repo_id, "reviewed") == first
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    weights = (tiny_model / "model.safetensors").read_bytes()
    assert (local / "model.safetensors").read_bytes() == weights
    assert (snapshot / "model.safetensors").read_bytes() == weights


def test_model_card_round_trip(hub: LocalHub, repo_id: str) -> None:
    HfApi(token=ALICE).create_repo(repo_id)
    card = ModelCard("---\nlicense: mit\ntags:\n- qk-audit\n---\n# Tiny model\n")

    card.push_to_hub(repo_id, token=ALICE)
    loaded = ModelCard.load(repo_id)
    card.data.tags = ["qk-audit", "proposed"]
    card.push_to_hub(repo_id, token=ALICE, create_pr=True)

    assert loaded.data.license == "mit"
    assert loaded.data.tags == ["qk-audit"]
    assert loaded.text.strip() == "# Tiny model"
    assert ModelCard.load(repo_id).data.tags == ["qk-audit"]
    proposed = ModelCard(_read(repo_id, "README.md", revision="refs/pr/1"))
    assert proposed.data.tags == ["qk-audit", "proposed"]


def test_transformers_push_to_hub(hub: LocalHub, tiny_model: Path, repo_id: str) -> None:
    model = AutoModel.from_pretrained(tiny_model)

    model.push_to_hub(repo_id, token=ALICE, commit_message="Upload tiny model")

    files = set(HfApi().list_repo_files(repo_id))
    assert {"config.json", "model.safetensors", "README.md"} <= files
    reloaded = AutoModel.from_pretrained(repo_id)
    assert torch.equal(reloaded.state_dict()[QUERY], model.state_dict()[QUERY])


def test_trainer_push_to_hub(hub: LocalHub, tiny_model: Path, tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        push_to_hub=True,
        hub_model_id="alice-org/trainer-run",
        hub_token=ALICE,
        use_cpu=True,
        report_to=[],
    )
    trainer = Trainer(model=AutoModel.from_pretrained(tiny_model), args=args)

    trainer.push_to_hub(commit_message="End of training")

    files = set(HfApi(token=ALICE).list_repo_files("alice-org/trainer-run"))
    assert {"config.json", "model.safetensors", "README.md", "training_args.bin"} <= files
    titles = [c.title for c in HfApi().list_repo_commits("alice-org/trainer-run")]
    assert titles[0] == "End of training"


@pytest.mark.parametrize(
    ("card", "refused"),
    [
        ("---\nlicense: my-own-license\n---\n# Old card\n", '"license" must be one of'),
        ("---\ntags: qk-audit\n---\n# Card\n", '"tags" must be an array of strings'),
    ],
    ids=["license", "tags"],
)
def test_metadata_that_fails_the_schema_is_refused_like_the_hub(
    hub: LocalHub, tiny_model: Path, repo_id: str, card: str, refused: str
) -> None:
    """huggingface_hub validates a README before committing it (ValueError), and a commit that
    writes one anyway is refused; valid metadata passes."""
    hub.add_repo(repo_id, tiny_model)
    api = HfApi(token=ALICE)
    with pytest.raises(ValueError, match=r"Invalid metadata in README\.md") as caught:
        api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id)
    assert refused in str(caught.value)
    fine = "---\nlicense: mit\ntags:\n- qk-audit\n---\n# Fine\n"
    api.upload_file(path_or_fileobj=fine.encode(), path_in_repo="README.md", repo_id=repo_id)
    commit = json.dumps({"key": "header", "value": {"summary": "bypass"}}) + "\n"
    line = {"path": "README.md", "content": base64.b64encode(card.encode()).decode(),
            "encoding": "base64"}  # fmt: skip
    commit += json.dumps({"key": "file", "value": line}) + "\n"
    answer = get_session().post(
        f"{hub.url}/api/models/{repo_id}/commit/main",
        content=commit.encode(),
        headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/x-ndjson"},
    )
    assert answer.status_code == 400 and refused in answer.json()["error"]
    assert hub.commit_count(repo_id) == 2  # the repo's first commit, then the fine card


def test_a_free_account_creates_two_zerogpu_spaces_and_nothing_else_that_computes(
    hub: LocalHub,
) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    hub.add_token("hf_free_dora", "dora", orgs=["dora-org"], can_write=True)
    api = HfApi(token="hf_free_dora")
    for name, sdk in (("dora/cpu", "gradio"), ("dora/docker", "docker"), ("dora-org/z", "gradio")):
        hardware = "zero-a10g" if name == "dora-org/z" else None
        with pytest.raises(HfHubHTTPError, match="require a paid plan") as refused:
            api.create_repo(name, repo_type="space", space_sdk=sdk, space_hardware=hardware)
        assert refused.value.response.status_code == 402
    api.create_repo("dora/site", repo_type="space", space_sdk="static")  # static: anyone
    for name in ("dora/zero-1", "dora/zero-2"):
        api.create_repo(name, repo_type="space", space_sdk="gradio", space_hardware="zero-a10g")
        assert api.space_info(name).runtime.requested_hardware == "zero-a10g"
    with pytest.raises(HfHubHTTPError, match="up to 2 ZeroGPU Spaces"):
        api.create_repo("dora/zero-3", repo_type="space", space_sdk="gradio",
                        space_hardware="zero-a10g")  # fmt: skip
    hub.set_paid("dora")
    api.create_repo("dora/cpu", repo_type="space", space_sdk="gradio", space_hardware="cpu-upgrade")
    assert api.space_info("dora/cpu").runtime.requested_hardware == "cpu-upgrade"
