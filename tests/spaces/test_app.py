"""The Space through gradio_client against the launched app and the LocalHub.

Numbers are checked against qkmonitor.audit of the same local folders (audit, compare) and
against entropies recomputed from the model's eager attention probabilities (text).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import gradio
import pytest
import torch
import yaml
from gradio_client import Client
from gradio_client.exceptions import AppError
from safetensors.torch import save_file
from support.checks import same_bits

from qkmonitor import audit
from qkmonitor.errors import QKMonitorError
from qkmonitor.hub.card import CardUpdate

SPACE = Path(__file__).resolve().parents[2] / "spaces" / "qk-audit"
STATISTICS = (
    "eig_mean", "eig_var", "eig_concentration", "eig_var_complex", "spectral_norm",
    "positive_fraction",
)  # fmt: skip
TEXT = "The cat sat on the mat because it was tired."


# --- the Space's files ----------------------------------------------------------------------


def test_readme_has_valid_space_front_matter():
    text = (SPACE / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__
    assert (SPACE / meta["app_file"]).is_file()
    assert meta["hf_oauth"] is True
    assert meta["hf_oauth_scopes"] == ["read-repos", "write-discussions"]  # least privilege
    assert len(meta["short_description"]) <= 60


def test_requirements_are_qkmonitors_dependencies_without_qkmonitor():
    """qkmonitor is vendored at deploy (qkmonitor.hub.space), so the Space lists the packages
    qkmonitor needs (pyproject.toml: dependencies, space and minilm extras) instead; gradio is
    pinned to the front matter's sdk_version; each admits the version installed here."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    text = (SPACE / "requirements.txt").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    listed = [Requirement(line) for line in lines if line and not line.startswith("-")]
    project = tomllib.loads((SPACE.parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    needed = [Requirement(r) for r in project["dependencies"] + extras["space"] + extras["minilm"]]
    assert sorted(r.name.lower() for r in listed) == sorted(r.name.lower() for r in needed)
    for requirement in listed:
        assert version(requirement.name) in requirement.specifier, requirement
    (gradio_pin,) = [r for r in listed if r.name == "gradio"]
    meta = yaml.safe_load((SPACE / "README.md").read_text().split("---\n")[1])
    assert str(gradio_pin.specifier) == f"=={meta['sdk_version']}" and "oauth" in gradio_pin.extras
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines  # CPU torch


def test_settings_from_environment(service, tmp_path):
    settings = service.Settings.from_env(
        {"QK_AUDIT_CONCURRENCY": "3", "QK_AUDIT_MAX_FORWARD_PARAMS": "1e8",
         "QK_AUDIT_CACHE_DIR": str(tmp_path), "QK_AUDIT_CACHE_MB": "1.5"}
    )  # fmt: skip
    assert settings.concurrency == 3 and settings.max_forward_params == 100_000_000
    assert settings.cache_dir == tmp_path and settings.cache_bytes == int(1.5 * 2**20)
    assert service.Settings.from_env({}) == service.Settings()


# --- audit ----------------------------------------------------------------------------------


def _heads(result: dict) -> list[dict]:
    return result["heads"]


def test_audit_equals_the_engine_on_the_same_weights(client, models, hub):
    summary, result = client.predict("qk/tiny-llama", "", api_name="/audit")
    expected = audit(models.llama).to_dict()
    assert _heads(result) == _heads(expected)
    model = result["model"]
    assert model["source"] == "qk/tiny-llama" and model["kind"] == "hub"
    assert model["sha"] == hub.resolve("qk/tiny-llama") and model["revision"] is None
    assert "qk/tiny-llama" in summary and "Most concentrated head" in summary

    def concentration(h: dict) -> float:  # SPEC: eig_mean / sqrt(eig_var + eig_mean^2)
        return abs(h["eig_mean"]) / math.sqrt(h["eig_var"] + h["eig_mean"] ** 2)

    heads = _heads(expected)
    best, worst = max(heads, key=concentration), min(heads, key=concentration)
    widest = max(heads, key=lambda h: h["eig_var"])
    for label, row in (
        ("**Most concentrated head** (|eig_concentration|)", best),
        ("**Least concentrated head** (|eig_concentration|)", worst),
        ("**Largest eig_var** (widest spread of content logits)", widest),
    ):
        assert f"{label}: self layer {row['layer']} head {row['head']}," in summary


def test_revision_is_pinned_and_the_cache_skips_the_tensor_reads(client, models, hub):
    _, result = client.predict("qk/tiny-llama", "finetuned", api_name="/audit")
    assert result["model"]["revision"] == "finetuned"
    assert result["model"]["sha"] == hub.resolve("qk/tiny-llama", "finetuned")
    assert _heads(result) == _heads(audit(models.llama_tuned).to_dict())
    hub.reset_counters()
    again, cached = client.predict("qk/tiny-llama", "finetuned", api_name="/audit")
    assert "from the cache" in again and _heads(cached) == _heads(result)
    weights = hub.file_bytes_sent("qk/tiny-llama", "model.safetensors")
    with (models.llama_tuned / "model.safetensors").open("rb") as handle:
        header = 8 + struct.unpack("<Q", handle.read(8))[0]
    assert weights <= header  # headers only: no Q/K bytes the second time
    assert hub.file_bytes_sent("qk/tiny-llama", "config.json") <= 1  # an access check only


def test_the_bundled_model_is_chosen_by_its_fixed_name(app, client, minilm_folder):
    summary, result = client.predict(app.BUNDLED, "", api_name="/audit")
    assert result["model"]["source"] == app.BUNDLED and result["model"]["sha"] is None
    assert str(minilm_folder) not in json.dumps(result) + summary  # no server paths
    assert _heads(result) == _heads(audit(minilm_folder).to_dict())
    _, main = client.predict(app.BUNDLED, "main", api_name="/audit")  # the placeholder
    assert _heads(main) == _heads(result)
    with pytest.raises(AppError, match="has one version only"):
        client.predict(app.BUNDLED, "v2", api_name="/audit")


def test_default_model_is_the_hub_one_when_served_else_the_bundled_one(app, models, monkeypatch):
    assert app._default_model() == app.HUB_DEFAULT  # the LocalHub serves it (models fixture)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert app._default_model() == app.BUNDLED


# --- compare --------------------------------------------------------------------------------


def test_compare_revisions_gives_exact_per_head_differences(client, models):
    summary, found = client.predict(
        "qk/tiny-llama", "", "", "finetuned", "eig_var", api_name="/compare"
    )
    base, other = audit(models.llama), audit(models.llama_tuned)
    assert found["base"]["revision"] is None and found["other"]["revision"] == "finetuned"
    for row, before, after in zip(found["heads"], base.heads, other.heads, strict=True):
        assert (row["layer"], row["head"]) == (before.layer, before.head)
        for statistic in STATISTICS:
            assert row[statistic] == getattr(after, statistic) - getattr(before, statistic)
        if row["layer"] == 0:  # only layer 1's q_proj was changed
            assert all(row[s] == 0 for s in STATISTICS)
    # q scaled by 1.5: W scales by 1.5, eig_var by 2.25
    changed = [r for r in found["heads"] if r["layer"] == 1]
    for row, before in zip(changed, [h for h in base.heads if h.layer == 1], strict=True):
        assert math.isclose(row["eig_var"], 1.25 * before.eig_var, rel_tol=1e-6)  # float32 storage
    assert "minus" in summary and "4 heads unchanged" in summary
    assert "Largest increase" in summary and "Largest decrease" not in summary  # none decreased


# --- attention on text ----------------------------------------------------------------------


def _eager(folder: Path, text: str) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Tokens and eager attention probabilities of the local model, independently of the app."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        attentions = model(**encoded, output_attentions=True).attentions
    return tokenizer.convert_ids_to_tokens(encoded["input_ids"][0]), attentions


def _tensor(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(("repo", "causal"), [("qk/tiny-bert", False), ("qk/tiny-llama", True)])
def test_attention_entropy_and_map_match_eager_probabilities(client, models, repo, causal):
    summary, found = client.predict(repo, "", TEXT, 1, 2, api_name="/attention")
    folder = models.bert if repo == "qk/tiny-bert" else models.llama
    tokens, attentions = _eager(folder, TEXT)
    assert found["tokens"] == tokens and not found["truncated"]
    assert torch.allclose(_tensor(found["attention"]), attentions[1][0, 2].double(), atol=1e-6)
    for layer, probabilities in enumerate(attentions):
        p = probabilities[0].double()  # (heads, queries, keys)
        rows = -(p * p.clamp_min(1e-300).log()).sum(-1)
        keys = p.shape[-1]
        allowed = torch.arange(1, keys + 1) if causal else torch.full((keys,), keys)
        normalized = (rows[:, allowed > 1] / allowed[allowed > 1].log()).mean(-1)
        close = {"rtol": 1e-4, "atol": 1e-5}
        assert torch.allclose(_tensor(found["attn_entropy"][layer]), rows.mean(-1), **close)
        assert torch.allclose(_tensor(found["attn_entropy_norm"][layer]), normalized, **close)
    assert f"on {len(tokens)} tokens" in summary and "Most focused head" in summary


def test_attention_defaults_to_the_most_focused_head_and_joins_the_audit(client, models):
    from scipy.stats import spearmanr

    summary, found = client.predict("qk/tiny-bert", "", TEXT, api_name="/attention")
    _, attentions = _eager(models.bert, TEXT)
    normalized = []
    for probabilities in attentions:  # bidirectional: every query sees every key
        p = probabilities[0].double()
        rows = -(p * p.clamp_min(1e-300).log()).sum(-1)
        normalized.append((rows / math.log(p.shape[-1])).mean(-1).tolist())
    focused = min((v, layer, head) for layer, row in enumerate(normalized)
                  for head, v in enumerate(row))  # fmt: skip
    assert (found["layer"], found["head"]) == focused[1:]
    assert torch.allclose(
        _tensor(found["attention"]), attentions[focused[1]][0, focused[2]].double(), atol=1e-6
    )
    heads = {(h.layer, h.head): h for h in audit(models.bert).heads}
    points = found["points"]
    assert [(p["layer"], p["head"]) for p in points] == sorted(heads)
    for point in points:
        layer, head = point["layer"], point["head"]
        assert point["attn_entropy"] == found["attn_entropy"][layer][head]
        assert point["attn_entropy_norm"] == pytest.approx(normalized[layer][head], abs=1e-5)
        assert point["eig_var"] == heads[(layer, head)].eig_var
        assert point["eig_concentration"] == heads[(layer, head)].eig_concentration
    entropy = [p["attn_entropy_norm"] for p in points]
    for statistic in ("eig_var", "eig_concentration"):
        rho = spearmanr([p[statistic] for p in points], entropy).statistic
        assert f"{statistic} ρ = {rho:.4g} over 8 heads" in summary


def test_offline_compare_explains_that_the_bundled_model_is_alone(app, client):
    with pytest.raises(AppError, match="only model this Space has without the Hub"):
        client.predict(app.BUNDLED, "", "", "main", "eig_var", api_name="/compare")


def test_long_text_is_truncated_to_the_token_limit(client, launched):
    _, found = client.predict("qk/tiny-bert", "", "word " * 500, 0, 0, api_name="/attention")
    assert found["truncated"] and len(found["tokens"]) == launched[1].max_tokens


# --- bad input: one clear line each, and the app keeps serving ------------------------------


class _Marker:
    """Unpickling this creates a folder: proof that a pickle was (not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


@pytest.fixture(scope="module")
def bad_repos(hub, models, tmp_path_factory) -> Path:
    """Repos that every bad-input case of the engine needs; returns the marker path."""
    import shutil

    from transformers import T5Config, T5Model

    root = tmp_path_factory.mktemp("bad-repos")
    marker = root / "code-ran"

    def folder(name: str, files: dict[str, str | bytes]) -> Path:
        path = root / name
        path.mkdir()
        for file, content in files.items():
            (path / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    hub.add_repo("qk/space-gated", models.llama, gated=True)
    hub.add_repo("secret-org/space-private", models.llama, private=True)
    pickled = folder("pickled", {"config.json": json.dumps({"model_type": "bert"})})
    torch.save({"w": _Marker(marker)}, pickled / "pytorch_model.bin")
    hub.add_repo("qk/space-pickled", pickled)
    hub.add_repo("qk/space-readme-only", folder("readme", {"README.md": "no model"}))
    bert_config = json.dumps({"model_type": "bert"})
    hub.add_repo("qk/space-no-weights", folder("no-weights", {"config.json": bert_config}))
    resnet = folder("resnet", {"config.json": json.dumps({"model_type": "resnet"})})
    save_file({"embedder.conv.weight": torch.zeros(8, 3, 3, 3)}, resnet / "model.safetensors")
    hub.add_repo("qk/space-resnet", resnet)
    truncated = root / "truncated"
    shutil.copytree(models.bert, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])
    hub.add_repo("qk/space-truncated", truncated)
    t5 = root / "t5"
    T5Model(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4,
                     decoder_start_token_id=0)).save_pretrained(t5)  # fmt: skip
    hub.add_repo("qk/space-t5", t5)
    # safetensors that audit fine, next to a pickle that must never be loaded
    with_pickle = root / "with-pickle"
    shutil.copytree(models.bert, with_pickle)
    torch.save({"w": _Marker(marker)}, with_pickle / "pytorch_model.bin")
    hub.add_repo("qk/space-with-pickle", with_pickle)
    # remote code: a config that asks for it, code that would leave the marker if imported
    remote = root / "remote"
    shutil.copytree(models.llama, remote)
    config = json.loads((remote / "config.json").read_text())
    classes = {"AutoConfig": "EvilConfig", "AutoModel": "EvilModel"}
    config["model_type"] = "qkevil"
    config["architectures"] = ["EvilForCausalLM"]  # names no transformers class either
    config["auto_map"] = {auto: f"modeling_qkevil.{name}" for auto, name in classes.items()}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_qkevil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    hub.add_repo("qk/space-remote-code", remote)
    return marker


BAD_AUDITS = [
    ("", "", "type a Hub model id"),
    ("   ", "", "type a Hub model id"),
    ("/etc", "", "looks like a local path"),
    ("./models", "", "looks like a local path"),
    ("~/models", "", "looks like a local path"),
    ("qk/../etc", "", "looks like a local path"),
    ("..", "", "looks like a local path"),
    ("a/b/c", "", "looks like a local path"),
    ("C:\\models", "", "looks like a local path"),
    ("https://huggingface.co/qk/tiny-bert", "", "is a URL"),
    ("huggingface.co/qk/tiny-bert", "", "is a URL"),
    ("qk/bad name", "", "not a valid Hub model id"),
    ("qk/a--b", "", "not a valid Hub model id"),
    ("qk/tiny-bert", "../main", "not a valid revision"),
    ("qk/tiny-bert", "main branch", "not a valid revision"),
    ("qk/does-not-exist", "", "not found"),
    ("tests", "", "(not found|404 Not Found)"),  # a folder here, but only ever a Hub id
    ("qk/tiny-bert", "nope", "revision 'nope' not found"),
    ("qk/space-gated", "", "gated.*sign in with Hugging Face"),
    ("secret-org/space-private", "", "not found.*sign in with Hugging Face"),
    ("qk/space-pickled", "", "only pickle weights.*never loads"),
    ("qk/space-readme-only", "", "no config.json"),
    ("qk/space-no-weights", "", "no model weights"),
    ("qk/space-resnet", "", "has no attention layers"),
    ("qk/space-truncated", "", "truncated"),
]


@pytest.mark.parametrize(("model_id", "revision", "message"), BAD_AUDITS)
def test_bad_audit_input_gets_one_clear_line(client, bad_repos, model_id, revision, message):
    with pytest.raises(AppError, match=message) as error:
        client.predict(model_id, revision, api_name="/audit")
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    assert "HF_TOKEN" not in str(error.value)  # a Space user has no server environment


BAD_TEXT = [
    (("qk/tiny-bert", "", "   ", 0, 0), "type some text"),
    (("qk/tiny-bert", "", "x" * 5000, 0, 0), "at most 4000"),
    (("sentence-transformers/all-MiniLM-L6-v2", "", TEXT, 0, 0), r"23M parameters.*up to 10M"),
    (("qk/space-t5", "", TEXT, 0, 0), "encoder-decoder"),
    (("qk/tiny-bert", "", TEXT, 2, 0), "layer from 0 to 1"),
    (("qk/tiny-bert", "", TEXT, 0, 4), "head from 0 to 3"),
    (("qk/space-remote-code", "", TEXT, 0, 0), "cannot load 'qk/space-remote-code'"),
    (("qk/space-gated", "", TEXT, 0, 0), "gated"),
    (("/tmp", "", TEXT, 0, 0), "local path"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_TEXT)
def test_bad_text_input_gets_one_clear_line(client, bad_repos, arguments, message):
    with pytest.raises(AppError, match=message):
        client.predict(*arguments, api_name="/attention")


BAD_COMPARE = [
    (("qk/tiny-bert", "", "", "", "eig_var"), "name a second model"),
    (("qk/tiny-bert", "", "sentence-transformers/all-MiniLM-L6-v2", "", "eig_var"),
     "cannot compare.*self 2x4.*self 6x12"),
    (("qk/tiny-bert", "", "qk/tiny-llama", "", "nonsense"), "unknown statistic"),
    (("qk/tiny-bert", "", "qk/does-not-exist", "", "eig_var"), "not found"),
]  # fmt: skip


@pytest.mark.parametrize(("arguments", "message"), BAD_COMPARE)
def test_bad_compare_input_gets_one_clear_line(client, arguments, message):
    with pytest.raises(AppError, match=message):
        client.predict(*arguments, api_name="/compare")


def test_no_code_runs_and_no_pickle_is_loaded(client, bad_repos):
    marker = bad_repos
    _, result = client.predict("qk/space-with-pickle", "", api_name="/audit")
    _, found = client.predict("qk/space-with-pickle", "", TEXT, 0, 0, api_name="/attention")
    assert result["heads"] and found["tokens"]
    # an unknown model_type that names remote code and no transformers class: its layout cannot
    # be read off transformers' own modules without running that code, so it is refused (and
    # the code never runs)
    with pytest.raises(AppError, match="remote code"):
        client.predict("qk/space-remote-code", "", api_name="/audit")
    for repo in ("qk/space-remote-code", "qk/space-pickled"):
        with pytest.raises(AppError):
            client.predict(repo, "", TEXT, 0, 0, api_name="/attention")
    assert not marker.exists()


def test_the_app_keeps_serving_after_bad_input(client, bad_repos):
    for model_id, revision, _ in BAD_AUDITS[::3]:
        with pytest.raises(AppError):
            client.predict(model_id, revision, api_name="/audit")
    summary, result = client.predict("qk/tiny-bert", "", api_name="/audit")
    assert result["heads"] and "qk/tiny-bert" in summary


# --- tokens ---------------------------------------------------------------------------------


def test_user_token_is_used_never_the_servers_and_never_logged(
    url, hub, bad_repos, monkeypatch, capfd, caplog
):
    secret = "hf_space_reader_0123456789"
    hub.add_token(secret, "reader")
    hub.grant_access("qk/space-gated", "reader")
    monkeypatch.setenv("HF_TOKEN", secret)  # the server's own credentials: must not be used
    anonymous = Client(url, verbose=False)
    with pytest.raises(AppError, match="gated"):
        anonymous.predict("qk/space-gated", "", api_name="/audit")
    signed_in = Client(url, verbose=False, oauth_token=secret)
    _, result = signed_in.predict("qk/space-gated", "", api_name="/audit")
    assert result["heads"]
    with pytest.raises(AppError, match="gated"):  # cached now, still refused without access
        anonymous.predict("qk/space-gated", "", api_name="/audit")
    out, err = capfd.readouterr()
    assert secret not in out + err + caplog.text


# --- push to model card -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def card_repo(hub, models) -> str:
    """A repo of its own (pushes change it), owned by the org 'cards'."""
    hub.add_repo("cards/tiny-bert", models.bert)
    hub.add_token("hf_card_owner", "owner", orgs=["cards"], can_write=True)
    hub.add_token("hf_card_reader", "reader2")
    hub.add_token("hf_card_writer", "writer", can_write=True)  # PRs anywhere, pushes own repos
    return "cards/tiny-bert"


def _card(repo: str, revision: str) -> str:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, "README.md", revision=revision, token=False)).read_text()


def test_push_needs_a_signed_in_user_with_write_access(app, url, client, card_repo):
    with pytest.raises(AppError, match="sign in with Hugging Face"):
        client.predict(card_repo, "", True, api_name="/push_card")
    reader = Client(url, verbose=False, oauth_token="hf_card_reader")
    with pytest.raises(AppError, match="cannot open a pull request"):
        reader.predict(card_repo, "", True, api_name="/push_card")
    writer = Client(url, verbose=False, oauth_token="hf_card_writer")
    with pytest.raises(AppError, match=r"cannot push.*tick 'Open a pull request'"):
        writer.predict(card_repo, "", False, api_name="/push_card")
    with pytest.raises(AppError, match="no Hub repo to push to"):
        writer.predict(app.BUNDLED, "", True, api_name="/push_card")


def test_push_opens_a_pull_request_by_default_or_commits(url, hub, card_repo):
    head = hub.resolve(card_repo)
    writer = Client(url, verbose=False, oauth_token="hf_card_writer")
    summary, update = writer.predict(card_repo, "", True, api_name="/push_card")
    assert update["changed"] and update["pr_url"] and "pull request" in summary
    assert hub.resolve(card_repo) == head  # main untouched
    proposed = _card(card_repo, "refs/pr/1")
    assert "<!-- qkmonitor:begin -->" in proposed and head in proposed  # the audited commit
    owner = Client(url, verbose=False, oauth_token="hf_card_owner")
    summary, update = owner.predict(card_repo, "", False, api_name="/push_card")
    assert update["changed"] and update["pr_url"] is None and "Committed" in summary
    assert "<!-- qkmonitor:begin -->" in _card(card_repo, "main")


def test_a_card_the_hub_refuses_is_named_in_one_line(url, hub, models, card_repo, tmp_path):
    """An old card whose license the Hub no longer takes: the Space says what was refused."""
    folder = tmp_path / "old-card"
    shutil.copytree(models.bert, folder)
    (folder / "README.md").write_text("---\nlicense: my-own-license\n---\n# Old card\n")
    hub.add_repo("cards/old-license", folder)
    head = hub.resolve("cards/old-license")
    owner = Client(url, verbose=False, oauth_token="hf_card_owner")
    with pytest.raises(AppError, match=r"refused the metadata of .*license") as error:
        owner.predict("cards/old-license", "", False, api_name="/push_card")
    assert "\n" not in str(error.value) and "unexpected error" not in str(error.value)
    assert hub.resolve("cards/old-license") == head


# --- pieces without Gradio ------------------------------------------------------------------


def test_push_summary_names_a_pull_request_that_already_holds_the_audit(service):
    url = "https://huggingface.co/org/m/discussions/1"
    pending = CardUpdate(changed=False, text="", pr_url=url)
    assert service.push_summary(pending, "org/m") == (
        f"An open pull request on org/m's model card already holds this audit: {url}; nothing "
        "was pushed."
    )
    up_to_date = service.push_summary(CardUpdate(changed=False, text=""), "org/m")
    assert up_to_date == "The model card of org/m already holds this audit; nothing was pushed."


def test_result_cache_keeps_recent_entries_within_its_budget(service, models, tmp_path):
    result = audit(models.bert)
    size = len(result.to_json()) + len(result.to_csv())
    cache = service.ResultCache(tmp_path, max_bytes=int(2.5 * size))
    for sha in ("a" * 40, "b" * 40, "c" * 40):
        cache.put("qk/x", sha, result)
        time.sleep(0.01)  # distinct modification times
    assert cache.get("qk/x", "a" * 40) is None  # the oldest entry was evicted
    assert cache.get("qk/x", "b" * 40) is not None  # a hit makes b the most recent
    cache.put("qk/x", "d" * 40, result)
    assert cache.get("qk/x", "c" * 40) is None and cache.get("qk/x", "b" * 40) is not None
    assert sum(p.stat().st_size for p in cache.folder.iterdir()) <= 2.5 * size
    json_path, _ = cache.paths("qk/x", "d" * 40)
    json_path.write_text("{not json")
    assert cache.get("qk/x", "d" * 40) is None and not json_path.exists()


def test_time_limit_stops_an_audit(service, models, tmp_path):
    space = service.Space(service.Settings(time_limit=0.0, cache_dir=tmp_path))
    with pytest.raises(QKMonitorError, match="longer than this Space's limit of 0 s"):
        space.audit("qk/tiny-bert", None, False)


def test_a_cache_hit_never_waits_behind_stalled_audits(client, url, hub, models, launched):
    """Two audits stall on the Hub and hold both audit slots; a cached repo is still answered."""
    client.predict("qk/tiny-bert", "", api_name="/audit")  # cached from now on
    for name in ("qk/stall-a", "qk/stall-b"):
        hub.add_repo(name, models.bert)
    assert launched[1].concurrency == 2
    stalled_client = Client(url, verbose=False, max_workers=4)
    with hub.stalled("/qk/stall-") as stall:
        jobs = [stalled_client.submit(n, api_name="/audit") for n in ("qk/stall-a", "qk/stall-b")]
        stall.wait_for(2)  # both audits hold a slot and wait for their first file
        start = time.monotonic()
        summary, result = client.submit("qk/tiny-bert", "", api_name="/audit").result(timeout=20)
        waited = time.monotonic() - start
        assert "from the cache" in summary and result["heads"]
        assert waited < 10, f"the cache hit waited {waited:.1f} s behind stalled audits"
        print(f"cache hit answered in {waited:.2f} s while 2 audits stalled")
    expected = _heads(audit(models.bert).to_dict())
    for job in jobs:  # released: the stalled audits finish normally
        assert same_bits(job.result(timeout=60)[1]["heads"], expected)


def test_audit_slots_bound_the_audits_running_and_waiting(service):
    import threading

    slots = service._Slots(concurrency=1, waiting=1, patience=0.5)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with slots.turn():
            holding.set()
            release.wait(10)

    threading.Thread(target=hold, daemon=True).start()
    assert holding.wait(10)
    waiting = []

    def wait() -> None:
        try:
            with slots.turn():
                waiting.append("got a turn")
        except QKMonitorError as error:
            waiting.append(str(error))

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.2)  # the waiter now waits for the one slot
    with pytest.raises(QKMonitorError, match=r"busy \(1 audits are waiting\)"), slots.turn():
        pass
    waiter.join(10)
    assert waiting and "no audit slot freed within 0.5 s" in waiting[0]
    release.set()


def test_time_limit_stops_a_read_in_progress(service, hub, models, tmp_path):
    hub.add_repo("qk/stall-read", models.bert)
    space = service.Space(service.Settings(time_limit=2.0, cache_dir=tmp_path))
    with hub.stalled("/qk/stall-read/resolve/", seconds=20) as stall:
        start = time.monotonic()
        with pytest.raises(QKMonitorError, match="longer than this Space's limit of 2 s"):
            space.audit("qk/stall-read", None, False)
        assert time.monotonic() - start < 5 and stall.held == 1  # ended during that read


def test_an_audit_asks_the_hub_for_model_info_once(service, hub, models, tmp_path):
    hub.add_repo("qk/info-once", models.bert)
    space = service.Space(service.Settings(cache_dir=tmp_path))
    hub.reset_counters()
    audited = space.audit("qk/info-once", None, False)
    infos = [r for r in hub.requests if r.path.startswith("/api/models/qk/info-once")]
    assert len(infos) == 1 and audited.result.model.sha == hub.resolve("qk/info-once")


def test_an_unreachable_hub_gets_one_clear_line(app, service, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # nobody there
    space = service.Space(service.Settings(cache_dir=tmp_path))
    with pytest.raises(gradio.Error, match=r"cannot (reach|connect to) the Hub") as error:
        app._shown(lambda: space.audit("qk/tiny-bert", None, False))
    message = str(error.value)
    assert "try again later" in message and app.BUNDLED in message  # what works offline
    assert "HF_ENDPOINT" not in message and "QKMONITOR_HUB_TIMEOUT" not in message


def test_concurrent_audits_share_the_cpus(service):
    before = torch.get_num_threads()
    try:
        assert service.share_cpus(10_000) == 1 == torch.get_num_threads()
        assert service.share_cpus(1) >= 1
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_python_app_py_serves_offline_with_the_bundled_default(app, tmp_path):
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
           "QK_AUDIT_CACHE_DIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, str(SPACE / "app.py")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "the app did not start in 90 s"
                time.sleep(0.5)
        client = Client(url, verbose=False)
        config = client.config
        values = [c["props"].get("value") for c in config["components"]
                  if c["props"].get("elem_id") == "model-id"]  # fmt: skip
        assert values == [app.BUNDLED]
        _, result = client.predict(app.BUNDLED, "", api_name="/audit")
        assert len(result["heads"]) == 72
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_layer_and_head_fields_take_whole_numbers_or_nothing(app):
    assert app._field("", "layer") is None and app._field(" 3 ", "head") == 3
    with pytest.raises(QKMonitorError, match="the layer is a whole number from 0"):
        app._field("-1", "layer")


# --- ZeroGPU shape and admission ------------------------------------------------------------


def test_every_read_happens_before_the_decorated_compute(
    service, hub, models, tmp_path, monkeypatch
):
    """Only the compute runs inside @spaces.GPU (metered): it gets tensors already in memory,
    in a source that can be pickled to ZeroGPU's worker, and makes no Hub request."""
    import pickle

    hub.add_repo("qk/zerogpu-reads", models.llama)
    seen = {}
    compute = service._audit_on_device

    def watched(source, seconds):
        seen["requests before"] = len(hub.requests)
        seen["pickled"] = len(pickle.dumps(source))
        seen["seconds"] = seconds
        result = compute(source, seconds)
        seen["requests during"] = len(hub.requests) - seen["requests before"]
        return result

    monkeypatch.setattr(service, "_audit_on_device", watched)
    space = service.Space(service.Settings(time_limit=100.0, cache_dir=tmp_path))
    hub.reset_counters()
    audited = space.audit("qk/zerogpu-reads", None, False)
    assert audited.result.to_dict()["heads"] == audit(models.llama).to_dict()["heads"]
    assert seen["requests before"] > 0 and seen["requests during"] == 0
    assert seen["pickled"] > 0 and seen["seconds"] == 100.0  # no warm-up: the time limit


def test_admission_refuses_an_over_budget_audit_before_reading_weights(
    service, hub, models, tmp_path
):
    """On a (simulated) slow machine the tiny Llama is over the limit: refused in one line with
    its estimate, after the headers only: not one byte of Q/K weights is fetched."""
    hub.add_repo("qk/admission", models.llama)
    space = service.Space(service.Settings(time_limit=60.0, cache_dir=tmp_path))
    space.throughput = service.Throughput(bytes_per_second=1e6, multiply_adds_per_second=1e3)
    hub.reset_counters()
    with pytest.raises(QKMonitorError) as refused:
        space.audit("qk/admission", None, False)
    # 2 layers of 4 query heads (2 KV heads), d_head 16, d_in 64: (4+2)*64*16² for M and G_K,
    # 4 G_Q in two row blocks of 12288 each, the spectral norm's 2*4*16³, the eigensolvers'
    # 4*7*16³ multiply-adds per layer: 590 s at 1e3/s, plus 49152 bytes of q/k at 1e6/s
    assert str(refused.value) == (
        "qk/admission: about 10 min on this CPU Space (its limit is 60 s); run `qkmonitor "
        "audit qk/admission` locally or on a GPU Space"
    )
    with (models.llama / "model.safetensors").open("rb") as handle:
        header = 8 + struct.unpack("<Q", handle.read(8))[0]
    ranges = [r for r in hub.requests if r.path.endswith("/model.safetensors")]
    assert ranges and hub.file_bytes_sent("qk/admission", "model.safetensors") <= header
    space.throughput = service.Throughput(bytes_per_second=1e6, multiply_adds_per_second=1e5)
    assert space.audit("qk/admission", None, False).result.heads  # 7 s: admitted


def test_admission_uses_the_read_rate_this_space_measured(
    service, hub, models, tmp_path, monkeypatch
):
    """Assumed until measured; then the bytes over the seconds of this Space's own Hub reads
    (of at least SAMPLE_BYTES; the bundled model, read from disk, never counts)."""
    hub.add_repo("qk/read-rate", models.llama)
    space = service.Space(service.Settings(read_rate=1e3, cache_dir=tmp_path))
    space.throughput = service.Throughput(bytes_per_second=5e9, multiply_adds_per_second=1e12)
    cost = service.AuditCost(bytes=10**5, multiply_adds=0.0, layers=1, heads=1)
    assert space.admit("a model", cost) == pytest.approx(100)  # 100 kB at the assumed 1 kB/s
    space.audit(service.BUNDLED, None, False)
    assert space.read_rate.bytes_per_second() == 1e3  # a disk read is not the Hub's rate
    monkeypatch.setattr(service.ReadRate, "SAMPLE_BYTES", 1)  # the tiny Llama counts
    space.audit("qk/read-rate", None, False)
    measured = space.read_rate.bytes_per_second()
    assert measured > 1e3  # the local Hub serves a few kB in well under a second
    assert space.admit("a model", cost) == pytest.approx(1e5 / measured)


def test_the_read_rate_weighs_larger_reads_more_and_keeps_the_last_ones(service, monkeypatch):
    rate = service.ReadRate(assumed=5.0, kept=2)
    rate.record(10, 1.0)  # under SAMPLE_BYTES (32 MiB): a request's latency, not a rate
    assert rate.bytes_per_second() == 5.0
    monkeypatch.setattr(service.ReadRate, "SAMPLE_BYTES", 1)
    rate.record(100, 1.0)
    rate.record(300, 1.0)
    assert rate.bytes_per_second() == 200.0
    rate.record(1000, 2.0)  # the first read is dropped: (300 + 1000) / (1 + 2)
    assert rate.bytes_per_second() == pytest.approx(1300 / 3)


def test_warm_up_measures_this_machine_and_admits_the_bundled_model(service, tmp_path):
    space = service.Space(service.Settings(cache_dir=tmp_path))
    assert space.throughput is None
    rates = space.warm_up()
    assert space.throughput == rates and rates.bytes_per_second == 100e6
    assert rates.multiply_adds_per_second > 0 and rates.seconds_per_head >= 0
    assert 0 < space.admit(service.BUNDLED, service.AuditCost(0, 1e6, 1, 1)) < 300


def test_the_gpu_decorator_is_spaces_gpu_where_installed_else_nothing(app, monkeypatch):
    import zerogpu

    def compute(source, seconds):
        return seconds

    monkeypatch.setattr(zerogpu, "spaces", None)
    assert zerogpu.gpu(lambda source, seconds: seconds)(compute) is compute
    assert not zerogpu.on_zerogpu() and "not installed" in zerogpu.compute_mode()
    calls = []

    class FakeSpaces:  # the spaces package's surface: GPU(duration=...) -> decorator
        @staticmethod
        def GPU(duration):
            calls.append(duration)
            return lambda function: ("wrapped", function)

    monkeypatch.setattr(zerogpu, "spaces", FakeSpaces)
    assert zerogpu.gpu(len)(compute) == ("wrapped", compute) and calls == [len]
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert zerogpu.on_zerogpu() and "inside @spaces.GPU on ZeroGPU" in zerogpu.compute_mode()


def test_direct_push_is_offered_only_with_the_write_repos_scope(service, tmp_path):
    scopes = "openid profile read-repos write-discussions"
    in_space = {"SPACE_ID": "org/qk-audit", "OAUTH_SCOPES": scopes}
    assert not service.Settings.from_env(in_space).direct_push
    with_write = {**in_space, "OAUTH_SCOPES": scopes + " write-repos"}
    assert service.Settings.from_env(with_write).direct_push
    assert service.Settings.from_env({}).direct_push  # run locally: the caller's own token
    space = service.Space(service.Settings(cache_dir=tmp_path, direct_push=False))
    with pytest.raises(QKMonitorError, match="opens pull requests only"):
        space.push_card("qk/tiny-bert", None, False, "hf_card_writer")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("AccessDeniedError", "'org/m' is gated; accept its conditions on the Hub, then sign in "
         "with Hugging Face here (gradio_client: Client(..., oauth_token=...))"),
        ("ModelNotFoundError", "Hub repo 'org/m' not found (or private); if it is private, sign "
         "in with Hugging Face here (gradio_client: Client(..., oauth_token=...))"),
        ("NetworkError", "reading 'org/m': the Hub stopped answering for 15 s; try again later. "
         "bundled:all-MiniLM-L6-v2, shipped with this Space, needs no Hub: audit it meanwhile"),
        ("QKMonitorError", "this Space runs without the Hub; bundled:all-MiniLM-L6-v2, shipped "
         "with this Space, needs no Hub: audit it meanwhile"),
    ],
)  # fmt: skip
def test_error_advice_fits_a_space_user(service, error, expected):
    """The Space words its own advice from the errors' fields (qkmonitor.hub.client sets them),
    never by editing the engine's text."""
    from qkmonitor.errors import AccessDeniedError, ModelNotFoundError, NetworkError

    engine = {  # as qkmonitor.hub.client and its transport raise them
        "AccessDeniedError": AccessDeniedError(
            "'org/m' is gated", hint="accept its conditions on the Hub and set HF_TOKEN to a "
            "token of that account", refused="read", repo_id="org/m"),
        "ModelNotFoundError": ModelNotFoundError(
            "Hub repo 'org/m' not found (or private)", hint="if it is private, set HF_TOKEN to "
            "a token with access", missing="repo", repo_id="org/m"),
        "NetworkError": NetworkError("reading 'org/m': the Hub stopped answering for 15 s; check "
                                     "the connection, or raise QKMONITOR_HUB_TIMEOUT (now 15 s)"),
        "QKMonitorError": QKMonitorError("cannot fetch 'org/m': HF_HUB_OFFLINE is set",
                                         hint="unset it to reach the Hub", repo_id="org/m"),
    }[error]  # fmt: skip
    assert "HF_TOKEN" not in service.explain(engine)
    assert service.explain(engine) == expected


def test_definitions_link_to_gradio_anchors_and_name_no_file_the_space_lacks(app):
    """A deployed Space has docs/metrics.md only: files of a qkmonitor checkout are named as
    qkmonitor's; every link is an in-page anchor (Gradio ids headings "h-" + slug; the
    browser test clicks them)."""
    import re

    text = app._definitions()
    docs = (SPACE.parents[1] / "docs" / "metrics.md").read_text()
    assert text.count("\n## ") == docs.count("\n## ") > 5
    links = re.findall(r"\]\(([^)]*)\)", text)
    assert links and all(link.startswith("#h-") for link in links)
    for found in re.finditer(r"[\w./-]+\.(?:py|md)\b", text):  # every file it names
        assert text[: found.start()].endswith("qkmonitor's `"), found.group()
    assert not re.search(r"\b[Tt]he README", text)


def test_summary_names_the_modules_a_partial_audit_left_out(service, tmp_path):
    """The Space's summary shows the one line of not_audited once (not again among the
    warnings); a full audit's summary has none."""
    from dataclasses import replace

    from support.models import CASES_BY_ID, build

    result = audit(build(CASES_BY_ID["llama"]))
    full = service.Audited(result, 0.1, False, tmp_path / "a.json", tmp_path / "a.csv")
    assert "Not audited" not in service.summary(full)
    reason = "mixes neighbouring tokens into its queries or keys (conv1d)"
    left_out = [
        {"module": "layers.0.linear_attn", "class": "OlmoHybridGatedDeltaNet", "reason": reason}
    ]
    line = "1 attention-like module not audited (listed in not_audited): 1 OlmoHybridGatedDeltaNet"
    model = replace(result.model, not_audited=left_out)
    model = replace(model, warnings=[model.not_audited_line()])
    text = service.summary(replace(full, result=result.__class__(model, result.heads)))
    assert f"- **Not audited**: {line} (it mixes" in text and text.count(line) == 1
