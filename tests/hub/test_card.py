"""Model cards (qkmonitor.hub.card): rendering, surgical editing, the Hub push and the Trainer.

What a user sees: ``qkmonitor card`` adds one section and one metadata key to a card and keeps
every other byte; running it again changes nothing; Hub updates go to a pull request or to the
branch, on top of the commit audited, and a concurrent edit, a missing token or a token without
write access is a one-line error with nothing written; ``trainer.push_to_hub()`` with
``QKMonitorCallback(model_card=True)`` ends with a card holding the Trainer's text and ours.
Everything goes through the real huggingface_hub client and the LocalHub (``hub`` fixture).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from safetensors.torch import load_file, save_file
from support.checks import one_line_error
from support.fault_proxy import Fault, FaultProxy
from transformers import BertConfig, BertModel

from qkmonitor import audit
from qkmonitor.cli import main
from qkmonitor.errors import AccessDeniedError, CardFormatError, NetworkError
from qkmonitor.hub.card import (
    METADATA_KEY,
    CardConflictError,
    TrainingTrajectory,
    card_details,
    card_metadata,
    edit_card,
    push_card,
    render_section,
    update_card,
    update_local_card,
)
from qkmonitor.hub.card_edit import BEGIN_MARKER, END_MARKER, get_metadata_key

WRITER = "card-writer-token"  # writes to the "qk" org
READER = "card-reader-token"

# A hand-edited card: comments, quoting, flow lists, model-index, trailing spaces. ModelCard's
# YAML round trip would rewrite much of its header; qkmonitor must not touch any of it.
FOREIGN = """\
---
# Card metadata, edited by hand
license: "apache-2.0"
language: [en, fr]
tags:
- text-classification   # trailing comment
- 'quoted'
{key}model-index:
- name: my-model
  results:
  - task: {{type: text-classification}}
    dataset: {{name: Demo, type: demo}}
    metrics:
    - {{type: accuracy, value: 0.91}}
widget:
  - text: "Hello  world"
---

# My model

Hand-written text with trailing spaces   
and a table:

| a | b |
|---|---|

{section}
## Citation

```bibtex
@misc{{x}}
```
"""  # noqa: W291 (trailing spaces are part of what must be preserved)

OLD_KEY = "qkmonitor:\n  version: 0.0.1\n  commit: old\n"
OLD_SECTION = f"{BEGIN_MARKER}\nold section\n{END_MARKER}\n"


def key_block(result, training=None) -> str:
    value = card_metadata(result, training)
    return yaml.safe_dump(
        {METADATA_KEY: value}, sort_keys=False, default_flow_style=None, width=4096
    )


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny BERT (2 layers x 4 heads, width 64) saved as config + safetensors."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, vocab_size=99)  # fmt: skip
    folder = tmp_path_factory.mktemp("bert")
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def result(model_folder):
    return audit(model_folder)


@pytest.fixture(scope="module")
def tokens(hub) -> None:
    hub.add_token(WRITER, "writer", orgs=["qk"], can_write=True)
    hub.add_token(READER, "reader")


@pytest.fixture
def as_writer(tokens, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", WRITER)


def make_repo(hub, name: str, folder: Path, card: str | None, tmp_path: Path) -> str:
    """A Hub repo holding the model and, unless None, a README.md; returns the head sha."""
    staged = tmp_path / name.replace("/", "_")
    staged.mkdir(parents=True)
    for file in folder.iterdir():
        (staged / file.name).write_bytes(file.read_bytes())
    if card is not None:
        (staged / "README.md").write_bytes(card.encode())
    return hub.add_repo(name, staged)


def card_at(repo: str, revision: str) -> str:
    return Path(hf_hub_download(repo, "README.md", revision=revision)).read_bytes().decode()


# ---- rendering ---------------------------------------------------------------------------
def test_section_holds_table_heads_version_sha_and_explanation(result):
    section = render_section(result)
    assert section.startswith(BEGIN_MARKER) and section.endswith(END_MARKER + "\n")
    assert f"qkmonitor {result.model.qkmonitor_version}" in section
    layers = result.layers
    assert f"| 0 | 4 | {layers[0].eig_mean:.4g} | {layers[0].eig_var:.4g} |" in section
    by_size = result.ranked("eig_concentration", magnitude=True)
    most, least, wide = by_size[-1], by_size[0], result.ranked("eig_var")[-1]
    assert f"layer {most.layer} head {most.head} ({most.eig_concentration:.4g})" in section
    assert f"layer {least.layer} head {least.head} ({least.eig_concentration:.4g})" in section
    assert f"largest `eig_var`): layer {wide.layer} head {wide.head} ({wide.eig_var:.4g})" in (
        section
    )
    assert f"| {layers[0].eig_var_max:.4g} | {layers[0].eig_concentration:.4g} |" in section
    metadata = card_metadata(result)
    assert metadata["most_concentrated"][0]["eig_concentration"] == float(
        f"{most.eig_concentration:.6g}"
    )
    assert "docs/metrics.md" in section
    info = result.model
    (head_dim,), (width,) = set(info.head_dim.values()), set(info.d_in.values())
    bound = f"at most sqrt({head_dim} / {width}) = {(head_dim / width) ** 0.5:.4g} here"
    assert bound in section
    assert "attn_entropy |" not in section  # not measured by a weights-only audit
    assert "http" not in section and "](" not in section  # link-free
    hub_result = result.__class__(
        model=result.model.__class__(**{**vars(result.model), "kind": "hub", "sha": "a" * 40}),
        heads=result.heads,
    )
    assert f"at commit `{'a' * 40}`" in render_section(hub_result)


def test_a_partial_audit_names_what_it_left_out(result):
    """A hybrid's card says, below what was read, which attention-like modules were not
    audited and why; a full audit's card has no such line."""
    from dataclasses import replace

    assert "not audited" not in render_section(result)
    left_out = [{"module": f"layers.{i}.self_attn", "class": "KimiLinearDeltaAttention",
                 "reason": "mixes neighbouring tokens into its queries or keys (conv1d)"}
                for i in (0, 2)]  # fmt: skip
    partial = result.__class__(replace(result.model, not_audited=left_out), result.heads)
    section = render_section(partial)
    line = (
        "Partial audit: 2 attention-like modules not audited (listed in not_audited): 2 "
        "KimiLinearDeltaAttention (it mixes neighbouring tokens into its queries or keys "
        "(conv1d))."
    )
    assert f"computed the QK-eigenspectrum of every attention head.\n\n{line}\n" in section


def test_training_summary_first_last_min_and_entropy_column(result):
    history = [
        {"loss": 2.0, "step": 2, "qk/eig_var/mean/layer_00": 0.5, "qk/eig_var/min/layer_00": 0.1,
         "qk/eig_var/head_01/layer_00": 0.3, "qk/attn_entropy/mean/layer_00": 2.0,
         "qk/eig_var/mean": 0.4, "qk/attn_max_logit/max/layer_00": 9.0,
         "qk/attn_max_logit/max": 9.0},
        {"eval_loss": 1.0, "step": 3},
        {"loss": 1.5, "step": 4, "qk/eig_var/mean/layer_00": 0.2,
         "qk/attn_entropy/mean/layer_00": 1.7, "qk/eig_var/mean": float("nan")},
        {"loss": 1.2, "step": 6, "qk/eig_var/mean/layer_00": 0.3,
         "qk/attn_entropy/mean/layer_00": 1.5, "qk/eig_var/mean": 0.1},
    ]  # fmt: skip
    training = TrainingTrajectory.from_log_history(history)
    keys = [m.key for m in training.metrics]
    assert keys == [
        "qk/eig_var/mean/layer_00",  # not the spread (min) nor one head's value
        "qk/attn_entropy/mean/layer_00",
        "qk/eig_var/mean",
        "qk/attn_max_logit/max/layer_00",  # the max logit's summary is its max
        "qk/attn_max_logit/max",
    ]
    var = training.metrics[0]
    assert (var.first, var.last, var.minimum, var.min_step) == (0.5, 0.3, 0.2, 4)
    mean = training.metrics[2]
    assert (mean.first, mean.last, mean.minimum) == (0.4, 0.1, 0.1)  # NaN is not a minimum
    section = render_section(result, training)
    assert "| `qk/eig_var/mean/layer_00` | 0.5 | 0.3 | 0.2 | 4 |" in section
    assert "attn_entropy |" in section and "| 1.5 |" in section  # layer 0: last value
    metadata = card_metadata(result, training)
    assert "layers" not in metadata and metadata["details"] == "qkmonitor_audit.json"
    details = card_details(result, training)
    assert (
        details["layers"][0]["attn_entropy"] == 1.5 and "attn_entropy" not in (details["layers"][1])
    )
    assert [(d["layer"], d["eig_var"]) for d in details["layers"]] == [
        (s.layer, float(f"{s.eig_var:.6g}")) for s in result.layers
    ]
    assert metadata["training"] == {
        "steps": [2, 6],
        "metrics": {
            "qk/eig_var/mean": {"first": 0.4, "last": 0.1, "min": 0.1},
            "qk/attn_max_logit/max": {"first": 9.0, "last": 9.0, "min": 9.0},
        },
    }
    assert details["training_metrics"]["qk/eig_var/mean/layer_00"]["min_step"] == 4


def test_metadata_is_bounded_whatever_the_depth(tmp_path):
    """The YAML key holds a summary; per-layer numbers go to the body and the JSON file."""
    sizes = []
    for layers in (2, 8):
        torch.manual_seed(0)
        config = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=64, vocab_size=99)  # fmt: skip
        folder = tmp_path / str(layers)
        BertModel(config).save_pretrained(folder)
        update = update_local_card(folder, audit(folder))
        assert len(json.loads((folder / "qkmonitor_audit.json").read_text())["layers"]) == layers
        assert update.text.count("\n| ") >= layers  # the body's table
        sizes.append(len(key_block(audit(folder))))
    assert abs(sizes[0] - sizes[1]) < 100 and max(sizes) < 2000


# ---- editing -----------------------------------------------------------------------------
def test_update_replaces_only_our_key_and_section_byte_for_byte(result):
    original = FOREIGN.format(key=OLD_KEY, section=OLD_SECTION)
    assert str(ModelCard(original)) != original  # what a YAML round trip would have done
    updated = edit_card(original, result)
    assert updated == FOREIGN.format(key=key_block(result), section=render_section(result))
    assert edit_card(updated, result) == updated


def test_first_update_appends_key_and_section(result):
    original = FOREIGN.format(key="", section="")
    updated = edit_card(original, result)
    header, _, body = original.partition("---\n\n# My model")
    assert updated == (
        header + key_block(result) + "---\n\n# My model" + body + "\n" + render_section(result)
    )
    assert edit_card(updated, result) == updated


def test_crlf_card_keeps_its_line_endings(result):
    original = FOREIGN.format(key=OLD_KEY, section=OLD_SECTION).replace("\n", "\r\n")
    updated = edit_card(original, result)
    expected = FOREIGN.format(key=key_block(result), section=render_section(result))
    assert updated == expected.replace("\n", "\r\n")


@pytest.mark.parametrize(
    "original",
    [
        "# No header\n\nJust text.\n",
        "",
        "---\nlicense: mit\n---\n",
        "---\nqkmonitor:\n- a\n- b\nlicense: mit\n---\nText\n",  # column-0 list items
    ],
)
def test_cards_of_any_shape_round_trip_through_model_card(result, original):
    updated = edit_card(original, result)
    card = ModelCard(updated)
    assert card.data.to_dict()[METADATA_KEY] == card_metadata(result)
    assert updated.count(BEGIN_MARKER) == 1 and edit_card(updated, result) == updated
    if "license" in original:
        assert card.data.license == "mit"
    if original.startswith("#"):
        assert updated.endswith(original + "\n" + render_section(result))


def test_new_card_from_template(result):
    text = edit_card(None, result, title="tiny-bert")
    card = ModelCard(text)
    assert card.data.to_dict() == {METADATA_KEY: card_metadata(result)}
    assert "# tiny-bert" in card.text and render_section(result) in card.text


def test_same_numbers_at_a_later_commit_leave_the_card_unchanged(result):
    def at(sha):
        return result.__class__(
            model=result.model.__class__(**{**vars(result.model), "kind": "hub", "sha": sha}),
            heads=result.heads,
        )

    first = edit_card(None, at("a" * 40))
    assert edit_card(first, at("b" * 40)) == first  # e.g. b only committed this card
    assert "b" * 40 in edit_card(first.replace("version: 0.1.0", "version: 0.0.9"), at("b" * 40))


@pytest.mark.parametrize(
    ("original", "message"),
    [
        (f"# x\n{BEGIN_MARKER}\n", "1 '<!-- qkmonitor:begin -->' and 0"),
        (f"# x\n{END_MARKER}\n{BEGIN_MARKER}\n", "must be one pair"),
        (f"{OLD_SECTION}\n{OLD_SECTION}", "2 '<!-- qkmonitor:begin -->' and 2"),
        ("---\nlicense: [mit\n---\n", "YAML header is invalid"),
        ("---\n- a list\n---\n", "not a mapping"),
        ("---\nqkmonitor: 1\nqkmonitor: 2\n---\n", "twice"),
    ],
)
def test_cards_that_cannot_be_edited_safely_are_refused(result, original, message):
    with pytest.raises(CardFormatError, match=message) as caught:
        edit_card(original, result)
    assert "\n" not in str(caught.value)


# ---- local folders and the CLI -----------------------------------------------------------
def test_cli_updates_a_local_folder_then_reports_up_to_date(capsys, model_folder, tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for file in model_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    assert main(["card", str(folder)]) == 0
    assert "updated the card" in capsys.readouterr().out
    text = (folder / "README.md").read_text()
    assert text.startswith("---\nqkmonitor:\n") and "# checkpoint" in text
    foreign = FOREIGN.format(key="", section="")
    (folder / "README.md").write_text(foreign)
    assert main(["card", str(folder)]) == 0
    once = (folder / "README.md").read_text()
    assert main(["card", str(folder)]) == 0
    assert "card already up to date" in capsys.readouterr().out
    assert (folder / "README.md").read_text() == once == edit_card(foreign, audit(folder))


def _copy_model(model_folder: Path, folder: Path) -> Path:
    folder.mkdir()
    for file in model_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def test_a_card_linked_outside_the_folder_is_refused_before_the_audit(
    capsys, model_folder, tmp_path, monkeypatch
):
    import sys

    def refuse(*args, **kwargs):
        raise AssertionError("the audit ran before the card was checked")

    monkeypatch.setattr(sys.modules["qkmonitor.audit"], "audit", refuse)
    folder = _copy_model(model_folder, tmp_path / "checkpoint")
    elsewhere = tmp_path / "other-project-README.md"
    elsewhere.write_text("# someone else's file\n")
    (folder / "README.md").symlink_to(elsewhere)
    assert main(["card", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a symlink to" in err and "outside the folder" in err
    assert elsewhere.read_text() == "# someone else's file\n"
    assert (folder / "README.md").is_symlink()


def test_a_card_linked_inside_the_folder_is_edited_through_the_link(model_folder, tmp_path):
    folder = _copy_model(model_folder, tmp_path / "checkpoint")
    (folder / "docs").mkdir()
    card = folder / "docs" / "card.md"
    card.write_text("# My model\n")
    (folder / "README.md").symlink_to(Path("docs") / "card.md")
    update = update_card(folder)
    assert update.changed and (folder / "README.md").is_symlink()
    assert card.read_text() == edit_card("# My model\n", audit(folder)) == update.text


# ---- the Hub -----------------------------------------------------------------------------
def test_pull_request_by_default_and_rerun_of_direct_commit_is_a_no_op(
    hub, model_folder, tmp_path, as_writer
):
    original = FOREIGN.format(key="", section="")
    sha = make_repo(hub, "qk/card-pr", model_folder, original, tmp_path)
    update = update_card("qk/card-pr")
    assert update.changed and update.pr_url.endswith("/qk/card-pr/discussions/1")
    assert hub.resolve("qk/card-pr") == sha  # main untouched
    proposed = card_at("qk/card-pr", "refs/pr/1")
    remote = audit("qk/card-pr")
    assert proposed == edit_card(original, remote)

    update = update_card("qk/card-pr", create_pr=False)
    assert update.changed and update.pr_url is None and update.commit_url
    head = hub.resolve("qk/card-pr")
    assert card_at("qk/card-pr", head) == proposed
    commits = HfApi().list_repo_commits("qk/card-pr")
    assert [c.commit_id for c in commits[:2]] == [head, sha]  # on top of the audited commit
    loaded = ModelCard.load("qk/card-pr")
    assert loaded.data.to_dict()[METADATA_KEY] == card_metadata(remote)
    assert loaded.data.to_dict()[METADATA_KEY]["commit"] == sha
    assert loaded.data.license == "apache-2.0" and loaded.data.model_name == "my-model"
    assert loaded.data.eval_results[0].metric_value == 0.91

    again = update_card("qk/card-pr", create_pr=False)  # audits the card commit: same numbers
    assert not again.changed and hub.resolve("qk/card-pr") == head


def open_pull_requests(repo: str) -> list[int]:
    found = HfApi().get_repo_discussions(
        repo, discussion_type="pull_request", discussion_status="open"
    )
    return [pr.num for pr in found]


def test_rerun_finds_its_open_pull_request_instead_of_opening_another(
    capsys, hub, model_folder, tmp_path, as_writer
):
    repo = "qk/card-pr-rerun"
    sha = make_repo(hub, repo, model_folder, "# Card\n", tmp_path)
    first = update_card(repo)
    assert main(["card", repo]) == 0
    assert capsys.readouterr().out == (
        f"an open pull request already has this card: {first.pr_url}\n"
    )
    again = update_card(repo)
    assert first.changed and first.pr_url.endswith(f"/{repo}/discussions/1")
    assert not again.changed and again.pr_url == first.pr_url and again.commit_url is None
    assert again.text == first.text == card_at(repo, "refs/pr/1")
    assert open_pull_requests(repo) == [1] and hub.resolve(repo) == sha
    # a direct commit does not look for pull requests: the card lands on the branch
    hub.reset_counters()
    direct = update_card(repo, create_pr=False)
    assert direct.changed and direct.pr_url is None and direct.commit_url
    assert card_at(repo, "main") == first.text and hub.resolve(repo) != sha
    assert not any(r.path.endswith("/discussions") for r in hub.requests)


def test_card_updates_leave_nothing_in_the_download_cache(
    hub, model_folder, tmp_path, as_writer, fresh_hub_cache
):
    """The Space pushes cards for its users: nothing of theirs may pile up on its disk."""
    repo = "qk/card-no-cache"
    make_repo(hub, repo, model_folder, "# Card\n", tmp_path)
    first = update_card(repo)
    again = update_card(repo)  # reads the card, then the open pull request's card
    assert first.changed and not again.changed and again.pr_url == first.pr_url
    files = (
        [p for p in fresh_hub_cache.rglob("*") if p.is_file()] if fresh_hub_cache.exists() else []
    )
    assert files == []


def test_new_weights_or_a_closed_pull_request_get_a_new_pull_request(
    hub, model_folder, tmp_path, as_writer
):
    repo = "qk/card-pr-stale"
    make_repo(hub, repo, model_folder, "# Card\n", tmp_path)
    stale = update_card(repo)
    weights = load_file(model_folder / "model.safetensors")
    weights["encoder.layer.0.attention.self.query.weight"] *= 2
    changed = tmp_path / "changed"
    changed.mkdir()
    for file in model_folder.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    sha = make_repo(hub, repo, changed, "# Card\n", tmp_path / "b")  # a new commit on main
    fresh = update_card(repo)
    assert fresh.changed and fresh.pr_url.endswith(f"/{repo}/discussions/2")
    assert fresh.text != stale.text and fresh.text == card_at(repo, "refs/pr/2")
    assert get_metadata_key(fresh.text, METADATA_KEY)["commit"] == sha
    assert open_pull_requests(repo) == [2, 1]
    hub.close_pull_request(repo, 2)  # closed without merging: the card is still to propose
    reopened = update_card(repo)
    assert reopened.changed and reopened.pr_url.endswith(f"/{repo}/discussions/3")
    assert reopened.text == fresh.text and open_pull_requests(repo) == [3, 1]


def test_missing_card_is_created_from_the_template(capsys, hub, model_folder, tmp_path, as_writer):
    sha = make_repo(hub, "qk/card-new", model_folder, None, tmp_path)
    assert main(["card", "qk/card-new", "--direct"]) == 0
    assert "updated the card: http" in capsys.readouterr().out
    card = ModelCard.load("qk/card-new")
    assert card.data.to_dict()[METADATA_KEY]["commit"] == sha
    assert "# card-new" in card.text and BEGIN_MARKER in card.text


def test_concurrent_edit_is_detected_and_kept(hub, model_folder, tmp_path, as_writer):
    sha = make_repo(hub, "qk/card-race", model_folder, "# Theirs\n", tmp_path)
    result = audit("qk/card-race")
    theirs = make_repo(hub, "qk/card-race", model_folder, "# Theirs, edited\n", tmp_path / "b")
    with pytest.raises(CardConflictError, match="changed on the Hub") as caught:
        push_card("qk/card-race", result, parent_commit=sha, create_pr=False)
    assert "\n" not in str(caught.value)
    assert hub.resolve("qk/card-race") == theirs
    assert card_at("qk/card-race", "main") == "# Theirs, edited\n"
    # a pull request is based on the commit audited, so it never overwrites either
    update = push_card("qk/card-race", result, parent_commit=sha)
    assert update.pr_url and hub.resolve("qk/card-race") == theirs


@pytest.fixture(scope="module")
def denied_repo(hub, model_folder, tmp_path_factory) -> str:
    make_repo(hub, "qk/card-denied", model_folder, "# Card\n", tmp_path_factory.mktemp("denied"))
    return "qk/card-denied"


@pytest.mark.parametrize(
    ("token", "argv", "message"),
    [
        (None, [], "needs a token with write access; set HF_TOKEN"),
        (READER, ["--direct"], "cannot push to 'qk/card-denied'"),
        (READER, [], "cannot open a pull request on 'qk/card-denied'"),
        ("not-a-token", [], "refused a request for 'qk/card-denied'"),
    ],
)
def test_token_problems_are_one_line_errors_and_write_nothing(
    capsys, hub, denied_repo, tokens, monkeypatch, token, argv, message
):
    sha = hub.resolve(denied_repo)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    hub.reset_counters()
    assert main(["card", denied_repo, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkmonitor: error: ") and message in err
    assert err.count("\n") == 1 and (token is None or token not in err)
    assert hub.resolve(denied_repo) == sha
    if token is None:
        assert hub.requests == []  # refused before auditing anything


def test_revision_must_be_a_branch(capsys, hub, denied_repo, as_writer):
    sha = hub.resolve(denied_repo)
    assert main(["card", denied_repo, "--revision", sha, "--direct"]) == 2
    assert f"'{sha}' is not a branch of '{denied_repo}'" in capsys.readouterr().err
    assert hub.resolve(denied_repo) == sha


def test_invalid_token_on_the_push_itself(hub, model_folder, tmp_path, tokens, result):
    make_repo(hub, "qk/card-badtoken", model_folder, None, tmp_path)
    with pytest.raises(AccessDeniedError, match="rejected the token") as caught:
        push_card("qk/card-badtoken", result, token="expired-token")
    assert "expired-token" not in str(caught.value)


# ---- a stalled Hub -----------------------------------------------------------------------

STALL_TIMEOUT = 0.3  # QKMONITOR_HUB_TIMEOUT in these tests: each stall ends in about a second


@pytest.fixture(scope="module")
def proxy(hub):
    proxy = FaultProxy(hub.url)
    yield proxy
    proxy.close()


@pytest.fixture
def faulty(proxy, monkeypatch):
    """huggingface_hub and qkmonitor pointed at a FaultProxy in front of the LocalHub (as
    HF_ENDPOINT would), with a short QKMONITOR_HUB_TIMEOUT."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", proxy.url)
    template = proxy.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("QKMONITOR_HUB_TIMEOUT", str(STALL_TIMEOUT))
    proxy.clear()
    yield proxy
    proxy.clear()


@pytest.mark.parametrize(
    ("name", "stalled", "create_pr", "pinned"),
    [
        ("info", lambda method, path: method == "GET" and path == "/api/models/qk/card-stall-info",
         True, False),
        ("prs", lambda method, path: method == "GET" and path.endswith("/discussions"), True, True),
        ("commit", lambda method, path: method == "POST" and "/commit/" in path, False, True),
    ],
    ids=["model-info", "pull-request-listing", "commit"],
)  # fmt: skip
def test_a_stalled_hub_request_ends_within_the_bound_and_writes_nothing(
    hub, model_folder, tmp_path, as_writer, result, faulty, name, stalled, create_pr, pinned
):
    """model info, the pull request listing and the commit are huggingface_hub calls, which have
    no timeout of their own: each ends after QKMONITOR_HUB_TIMEOUT with one line naming it."""
    repo = f"qk/card-stall-{name}"
    sha = make_repo(hub, repo, model_folder, "# Card\n", tmp_path)
    faulty.inject(Fault("stall", when=lambda method, path, range_: stalled(method, path)))
    start = time.monotonic()
    message = one_line_error(
        NetworkError,
        lambda: push_card(repo, result, parent_commit=sha if pinned else None, create_pr=create_pr),
    )
    assert time.monotonic() - start < 4, message
    (request,) = faulty.matching("stall")  # tried once
    assert message.startswith(f"updating the card of '{repo}': the Hub stopped answering ")
    assert f"{request.method} {request.path} for 0.3 s" in message
    assert "raise QKMONITOR_HUB_TIMEOUT (now 0.3 s)" in message
    assert ("it was not retried, as it may have reached the Hub" in message) == (name == "commit")
    faulty.clear()
    assert hub.resolve(repo) == sha and card_at(repo, "main") == "# Card\n"
    assert open_pull_requests(repo) == []


def test_cli_card_reports_a_stalled_commit_in_one_line(
    capsys, hub, model_folder, tmp_path, as_writer, faulty
):
    repo = "qk/card-stall-cli"
    sha = make_repo(hub, repo, model_folder, "# Card\n", tmp_path)
    commit = f"/api/models/{repo}/commit/main"
    faulty.inject(Fault("stall", when=lambda method, path, range_: path == commit))
    start = time.monotonic()
    assert main(["card", repo, "--direct"]) == 2
    assert time.monotonic() - start < 8
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"stopped answering POST {commit} for 0.3 s" in err
    assert "not retried" in err and len(faulty.matching("stall")) == 1
    faulty.clear()
    assert hub.resolve(repo) == sha and card_at(repo, "main") == "# Card\n"
