"""Cards in the Trainer's and TRL's own flows (qkmonitor.hub.card_trainer), and every path where
the Hub refuses a card's metadata, through the real huggingface_hub client and the LocalHub.

What a user sees: every README.md the Trainer or TRL writes (``create_model_card``, the card of
each checkpoint push, ``push_to_hub``) carries qkmonitor's section, key and tag, and goes up in
the Trainer's own commit with ``qkmonitor_audit.json``; a card the Hub refuses is one line.
Tiny models and a few steps keep these tests to seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from support.checks import one_line_error
from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments

from qkmonitor import QKMonitorCallback, audit
from qkmonitor.cli import main
from qkmonitor.errors import MetadataRejectedError
from qkmonitor.hub.card import METADATA_KEY, card_metadata, push_card
from qkmonitor.hub.card_edit import BEGIN_MARKER

WRITER = "trainer-card-writer"  # writes to the "qk" org
DETAILS = "qkmonitor_audit.json"
BAD_CARD = "---\nlicense: my-own-license\n---\n# An old card\n"  # a license the Hub no longer takes


@pytest.fixture(scope="module")
def tokens(hub) -> None:
    hub.add_token(WRITER, "trainer", orgs=["qk"], can_write=True)


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 99, (8,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, vocab_size=99,
                        max_position_embeddings=16)  # fmt: skip
    return BertForMaskedLM(config)


def trainer_for(folder: Path, repo: str | None, **overrides) -> Trainer:
    settings = dict(max_steps=4, logging_steps=2, per_device_train_batch_size=4,
                    learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True,
                    disable_tqdm=True, hub_model_id=repo, hub_token=WRITER)  # fmt: skip
    args = TrainingArguments(str(folder), **{**settings, **overrides})
    return Trainer(
        model=bert(),
        args=args,
        train_dataset=Tokens(),
        callbacks=[QKMonitorCallback(model_card=True, entropy=False)],
    )


def at(repo: str, revision: str, path: str = "README.md") -> str:
    return Path(hf_hub_download(repo, path, revision=revision, token=WRITER)).read_text()


def test_checkpoint_and_final_pushes_carry_the_section_in_the_trainers_own_commits(
    hub, tmp_path, tokens
):
    repo = "qk/card-trained"
    trainer = trainer_for(
        tmp_path / "run", repo, push_to_hub=True, save_strategy="steps", save_steps=2,
        hub_strategy="every_save", hub_always_push=True,
    )  # fmt: skip
    trainer.train()
    trainer._finish_current_push()
    api = HfApi(token=WRITER)
    saves = [c for c in api.list_repo_commits(repo) if c.title.startswith("Training in progress")]
    assert sorted(c.title for c in saves) == [
        "Training in progress, step 2",
        "Training in progress, step 4",
    ]
    for commit in saves:  # each checkpoint's card: the section, key, tag and JSON beside it
        card = ModelCard(at(repo, commit.commit_id))
        assert BEGIN_MARKER in card.text and "qkmonitor" in card.data.tags
        details = json.loads(at(repo, commit.commit_id, DETAILS))
        assert details["eig_var"] == card.data.to_dict()[METADATA_KEY]["eig_var"]
        assert len(details["layers"]) == 2
    before = len(api.list_repo_commits(repo))

    trainer.push_to_hub()
    commits = api.list_repo_commits(repo)
    assert len(commits) == before + 1 and commits[0].title == "End of training"  # one commit
    text = at(repo, "main")
    metadata = ModelCard(text).data.to_dict()
    assert "generated_from_trainer" in metadata["tags"] and "qkmonitor" in metadata["tags"]
    assert "## Training procedure" in text and BEGIN_MARKER in text
    final = card_metadata(audit(trainer.model))
    assert metadata[METADATA_KEY]["eig_var"] == final["eig_var"]
    assert metadata[METADATA_KEY]["training"]["steps"] == [2, 4]
    assert "| `qk/eig_var/mean` |" in text and "layers" not in metadata[METADATA_KEY]
    assert (tmp_path / "run" / "README.md").read_text() == text
    assert json.loads(at(repo, "main", DETAILS))["layers"][0]["layer"] == 0

    # in the background too: the Trainer's own future completes, with the section in its commit
    pushed = trainer.push_to_hub(commit_message="Again", blocking=False).result(timeout=120)
    assert api.list_repo_commits(repo)[0].commit_id == pushed.oid
    assert BEGIN_MARKER in at(repo, pushed.oid)


def test_create_model_card_then_upload_folder_carries_the_section(hub, tmp_path, tokens):
    trainer = trainer_for(tmp_path / "out", None, max_steps=2)
    trainer.train()
    trainer.create_model_card(model_name="by-hand")
    folder = tmp_path / "out"
    card = ModelCard((folder / "README.md").read_text())
    assert BEGIN_MARKER in card.text and "qkmonitor" in card.data.tags
    assert (
        card.data.to_dict()[METADATA_KEY]["eig_var"]
        == card_metadata(audit(trainer.model))["eig_var"]
    )
    api = HfApi(token=WRITER)
    api.create_repo("qk/card-by-hand")
    api.upload_folder(
        repo_id="qk/card-by-hand", folder_path=folder, allow_patterns=["*.md", DETAILS]
    )
    assert BEGIN_MARKER in at("qk/card-by-hand", "main")
    assert json.loads(at("qk/card-by-hand", "main", DETAILS))["heads"] == 8


def test_trl_writes_the_section_into_every_checkpoints_card(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

    vocab = {f"t{i}": i for i in range(97)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
        bos_token="t0", pad_token="t1", eos_token="t2", unk_token="t3",
    )  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)  # fmt: skip
    rows = [[(7 * i + j) % 90 + 4 for j in range(10)] for i in range(8)]
    seen: list[tuple[int, bool, int]] = []

    class ReadsTheCard(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # right after _save_checkpoint
            card = (Path(args.output_dir) / "README.md").read_text()
            details = json.loads((Path(args.output_dir) / DETAILS).read_text())
            seen.append((state.global_step, BEGIN_MARKER in card, len(details["layers"])))

    args = trl.SFTConfig(
        str(tmp_path / "sft"), max_steps=2, save_steps=1, save_strategy="steps",
        per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True, bf16=False,
        gradient_checkpointing=False,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tokenizer,
        callbacks=[QKMonitorCallback(model_card=True, entropy=False), ReadsTheCard()],
    )
    trainer.train()
    assert seen == [(1, True, 2), (2, True, 2)]
    card = ModelCard((tmp_path / "sft" / "README.md").read_text())
    assert "qkmonitor" in card.data.tags and "sft" in card.data.tags  # TRL's tags kept


# ---- the Hub refuses the card's metadata -----------------------------------------------------


def test_push_to_hub_refused_metadata_is_one_line_and_background_pushes_complete(
    hub, tmp_path, tokens
):
    trainer = trainer_for(tmp_path / "refused", "qk/card-refused", max_steps=2)
    trainer.train()
    message = one_line_error(
        MetadataRejectedError, lambda: trainer.push_to_hub(license="my-own-license")
    )
    assert "refused the metadata of 'qk/card-refused/README.md'" in message
    assert '"license" must be one of' in message and "nothing was pushed" in message
    future = trainer.push_to_hub(license="my-own-license", blocking=False)
    error = future.exception(timeout=60)  # completed, not hanging
    assert isinstance(error, MetadataRejectedError) and str(error) == message
    assert trainer.push_to_hub(license="mit").oid  # a valid card goes up


@pytest.fixture
def refused_repo(hub, tmp_path, tokens) -> str:
    """A repo whose existing card has metadata the Hub no longer accepts."""
    folder = tmp_path / "model"
    bert().bert.save_pretrained(folder)
    (folder / "README.md").write_text(BAD_CARD)
    hub.add_repo("qk/card-old-license", folder)
    return "qk/card-old-license"


def test_push_card_and_cli_refusals_are_one_line(capsys, hub, refused_repo, monkeypatch):
    sha = hub.resolve(refused_repo)
    result = audit(refused_repo)
    message = one_line_error(
        MetadataRejectedError,
        lambda: push_card(refused_repo, result, parent_commit=sha, create_pr=False, token=WRITER),
    )
    assert message.startswith(f"the Hub refused the metadata of '{refused_repo}/README.md' (")
    assert "license" in message and "nothing was written" in message
    monkeypatch.setenv("HF_TOKEN", WRITER)
    assert main(["card", refused_repo, "--direct"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused the metadata" in err and "Traceback" not in err
    assert hub.resolve(refused_repo) == sha
