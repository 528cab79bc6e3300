"""Bounded Hub reads (qkmonitor.hub.client and its transport) against a faulty Hub: a
FaultProxy in front of the LocalHub, reached through the real huggingface_hub client and its
httpx2 session.

Every fault ends in one line naming the request, within a few timeouts; the timeout is 0.3 s
here (QKMONITOR_HUB_TIMEOUT), so every stall test takes a second or two (the bounds asserted
leave room for a loaded machine; without the fix these calls hang or crash).
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
from safetensors.torch import save_file
from support.checks import one_line_error
from support.fault_proxy import Fault, FaultProxy

from qkmonitor import audit
from qkmonitor.audit import audit_source
from qkmonitor.cli import main
from qkmonitor.errors import (
    ModelNotFoundError,
    NetworkError,
    NotAModelError,
    QKMonitorError,
    TimeLimitError,
)
from qkmonitor.hub import client
from qkmonitor.hub.client import bounded, get_file, hub_commit, hub_timeout
from qkmonitor.weights.sources import HubSource, open_source

REPO = "qk/fault-llama"
TIMEOUT = 0.3


def model_info(method: str, path: str, range_: str | None) -> bool:
    return path.startswith("/api/models/")


def header_read(method: str, path: str, range_: str | None) -> bool:
    return path.endswith(".safetensors") and range_ in ("bytes=0-7",)


def qk_read(method: str, path: str, range_: str | None) -> bool:
    """A tensor's bytes: a range read that is not one of the two header reads (0-7, 8-n)."""
    return (
        path.endswith(".safetensors")
        and range_ is not None
        and not range_.startswith(("bytes=0-", "bytes=8-"))
    )


@pytest.fixture(scope="module")
def proxy(hub, llama_folder):
    hub.add_repo(REPO, llama_folder)
    proxy = FaultProxy(hub.url)
    yield proxy
    proxy.close()


@pytest.fixture
def faulty(proxy, monkeypatch):
    """The Hub client pointed at the proxy (as HF_ENDPOINT would), with a short timeout."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", proxy.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        proxy.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setenv("QKMONITOR_HUB_TIMEOUT", str(TIMEOUT))
    proxy.clear()
    yield proxy
    proxy.clear()


def _timed_error(kind, call, seconds: float) -> str:
    start = time.monotonic()
    message = one_line_error(kind, call)
    assert time.monotonic() - start < seconds, message
    return message


def test_passes_through_unharmed(faulty, llama_folder):
    remote, local = audit(REPO), audit(llama_folder)
    assert [h.eig_var for h in remote.heads] == [h.eig_var for h in local.heads]
    assert faulty.requests and not [r for r in faulty.requests if r.fault]


def test_stalled_model_info_is_retried_then_named(faulty):
    faulty.inject(Fault("stall", when=model_info))
    message = _timed_error(NetworkError, lambda: audit(REPO), 6)
    assert "model info of 'qk/fault-llama'" in message and "stopped answering" in message
    assert "3 tries" in message
    assert len(faulty.matching("stall")) == 3


def test_stall_before_the_qk_reads(faulty):
    faulty.inject(Fault("stall", when=header_read))
    message = _timed_error(NetworkError, lambda: open_source(REPO), 6)
    assert "bytes 0-7 of 'qk/fault-llama/model.safetensors'" in message


def test_stall_in_the_middle_of_a_tensor(faulty):
    faulty.inject(Fault("stall_body", when=qk_read, keep=100))
    message = _timed_error(NetworkError, lambda: audit(REPO), 6)
    assert "of 'qk/fault-llama/model.safetensors'" in message and "stopped answering" in message
    assert all(r.nbytes == 100 for r in faulty.matching("stall_body"))


def test_trickling_body_counts_as_stalled(faulty):
    """One byte every 50 ms never trips the per-read timeout; the per-try deadline catches it."""
    faulty.inject(Fault("drip", when=qk_read, interval=0.05))
    message = _timed_error(NetworkError, lambda: audit(REPO), 8)
    assert "stalled" in message and "QKMONITOR_HUB_TIMEOUT" in message


def test_a_stall_that_clears_is_retried(faulty, llama_folder):
    faulty.inject(Fault("stall", when=qk_read, times=1), Fault("reset", when=model_info, times=1))
    remote = audit(REPO)
    assert [h.eig_var for h in remote.heads] == [h.eig_var for h in audit(llama_folder).heads]
    assert len(faulty.matching("stall")) == len(faulty.matching("reset")) == 1


def test_reset_on_every_try(faulty):
    faulty.inject(Fault("reset"))
    message = _timed_error(NetworkError, lambda: audit(REPO), 6)
    assert "model info" in message and "connection broke" in message
    assert len(faulty.matching("reset")) == 3


def test_short_body_on_every_try(faulty):
    faulty.inject(Fault("short", when=qk_read))
    message = _timed_error(NetworkError, lambda: audit(REPO), 6)
    assert "model.safetensors" in message and "3 tries" in message


def test_content_range_must_match_the_range_asked_for(faulty):
    """A 206 of other bytes (here 4 further on) gave wrong statistics for every head, exit 0."""
    faulty.inject(Fault("shift_range", when=qk_read, offset=4))
    message = one_line_error(NetworkError, lambda: audit(REPO))
    assert "Content-Range" in message


def test_range_ignored_is_refused_without_reading_the_file(faulty, hub, llama_folder, tmp_path):
    """A 200 with the whole file is refused after its headers: not buffered (48 MB here)."""
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text((llama_folder / "config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(llama_folder / "model.safetensors")
    save_file({**tensors, "filler": torch.zeros(12 * 2**20)}, folder / "model.safetensors")
    hub.add_repo("qk/fault-big", folder)
    size = (folder / "model.safetensors").stat().st_size
    faulty.inject(Fault("ignore_range", when=header_read))
    message = one_line_error(NetworkError, lambda: open_source("qk/fault-big"))
    assert "ignored the byte range" in message
    (ignored,) = faulty.matching("ignore_range")
    assert ignored.nbytes < size / 3, (ignored.nbytes, size)


@pytest.mark.parametrize("when", [model_info, qk_read], ids=["model-info", "qk-read"])
def test_long_retry_after_is_reported_not_waited_for(faulty, when):
    faulty.inject(Fault("status", when=when, status=429, headers={"Retry-After": "3600"}))
    message = _timed_error(NetworkError, lambda: audit(REPO), 4)
    assert "HTTP 429" in message and "3600 s" in message and "try again later" in message
    refused = faulty.matching("status")  # the engine reads ahead: several tensors may start
    assert refused and len({r.range for r in refused}) == len(refused)  # none was retried


def test_model_info_503_twice_is_retried(faulty, llama_folder):
    faulty.inject(Fault("status", when=model_info, status=503, times=2))
    remote = audit(REPO)
    assert [h.eig_var for h in remote.heads] == [h.eig_var for h in audit(llama_folder).heads]
    assert len(faulty.matching("status")) == 2


def test_persistent_503_is_one_line(faulty):
    faulty.inject(Fault("status", when=qk_read, status=503))
    assert "HTTP 503" in _timed_error(NetworkError, lambda: audit(REPO), 6)


def test_no_network(monkeypatch, capsys):
    """Nothing listens at the endpoint: httpx2's ConnectError becomes one line, exit 2."""
    from huggingface_hub import constants

    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("QKMONITOR_HUB_TIMEOUT", str(TIMEOUT))
    message = _timed_error(NetworkError, lambda: audit("org/name"), 6)
    assert "cannot reach the Hub" in message
    assert main(["audit", "org/name"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkmonitor: error: model info of 'org/name'") and err.count("\n") == 1


def test_deadline_ends_a_stalled_read(faulty, monkeypatch):
    """The Space's time limit, passed as a deadline, ends a read mid-stall (timeout or not)."""
    monkeypatch.setenv("QKMONITOR_HUB_TIMEOUT", "30")
    source = HubSource(REPO)
    faulty.inject(Fault("stall", when=qk_read))
    source.deadline = time.monotonic() + 0.5
    name = next(n for n in source.shapes() if n.endswith("q_proj.weight"))
    _timed_error(TimeLimitError, lambda: source.read([name]), 4)
    _timed_error(TimeLimitError, lambda: source.read([name]), 1)  # already past: at once
    faulty.clear()
    faulty.inject(Fault("stall", when=model_info))
    _timed_error(TimeLimitError, lambda: open_source(REPO, deadline=time.monotonic() + 0.5), 4)


def test_hub_commit_resolves_without_reading_files(faulty, hub):
    assert hub_commit(REPO) == hub.resolve(REPO)
    assert [r.path for r in faulty.requests] == [f"/api/models/{REPO}"]


def test_timeout_knob(monkeypatch):
    monkeypatch.delenv("QKMONITOR_HUB_TIMEOUT", raising=False)
    assert hub_timeout() == 15.0 and hub_timeout(2) == 2.0
    monkeypatch.setenv("QKMONITOR_HUB_TIMEOUT", "45")
    assert hub_timeout() == 45.0
    monkeypatch.setenv("QKMONITOR_HUB_TIMEOUT", "soon")
    assert "QKMONITOR_HUB_TIMEOUT" in one_line_error(QKMonitorError, hub_timeout)
    one_line_error(QKMonitorError, lambda: hub_timeout(-1))


def test_bounded_names_the_huggingface_hub_request_that_broke_or_stalled(faulty):
    """`bounded` (the card push, the Space deploy): HfApi's calls get the same bound and one
    line; a GET is not said to have reached the Hub, a POST is, and the bound is per thread."""
    from huggingface_hub import HfApi

    api = HfApi()
    faulty.inject(Fault("reset", when=model_info, times=1))
    with pytest.raises(NetworkError) as caught, bounded("reading", if_sent="check"):
        api.model_info(REPO)
    message = str(caught.value)
    assert message.startswith(f"reading: the connection broke during GET /api/models/{REPO} (")
    assert message.endswith("); check the connection and retry") and "\n" not in message
    faulty.inject(Fault("stall", when=lambda method, path, range_: method == "POST"))
    start = time.monotonic()
    with pytest.raises(NetworkError) as caught, bounded("writing", 0.2, if_sent="run again"):
        api.create_branch(REPO, branch="stalled")
    assert time.monotonic() - start < 3
    assert str(caught.value) == (
        f"writing: the Hub stopped answering POST /api/models/{REPO}/branch/stalled for 0.2 s; "
        "it was not retried, as it may have reached the Hub: run again; check the connection, "
        "or raise QKMONITOR_HUB_TIMEOUT (now 0.2 s)"
    )
    faulty.clear()
    assert api.model_info(REPO).sha  # outside the block nothing changed


def test_at_commit_opens_a_resolved_revision_without_asking_again(faulty, llama_folder):
    info = client.model_info(REPO, revision="main")
    assert (info.repo_id, info.revision, len(info.sha)) == (REPO, "main", 40)
    assert "config.json" in info.files
    faulty.clear()
    source = HubSource.at_commit(info)
    assert not [r for r in faulty.requests if r.path.startswith("/api/")]  # no model info
    assert (source.sha, source.revision) == (info.sha, "main")
    assert audit(REPO).heads == audit_source(source).heads


def test_hub_refusals_carry_fields_for_front_ends(faulty):
    missing = one_line_error(ModelNotFoundError, lambda: client.model_info("qk/no-such-repo"))
    with pytest.raises(ModelNotFoundError) as caught:
        client.model_info("qk/no-such-repo")
    error = caught.value
    assert (error.repo_id, error.revision, error.missing) == ("qk/no-such-repo", None, "repo")
    assert missing == f"{error.problem}; {error.hint}" and "HF_TOKEN" in error.hint
    with pytest.raises(ModelNotFoundError) as caught:
        get_file(REPO, "nope", "config.json", token=None)
    assert (caught.value.revision, caught.value.missing) == ("nope", "revision")
    advised = caught.value.with_hint("pick another revision")
    assert type(advised) is ModelNotFoundError and advised.missing == "revision"
    assert str(advised) == f"revision 'nope' not found in '{REPO}'; pick another revision"
    with pytest.raises(NotAModelError, match="a file is missing") as caught:
        get_file(REPO, hub_commit(REPO), "no-such-file.json", token=None)
    assert caught.value.repo_id == REPO
