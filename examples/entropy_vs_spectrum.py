"""How each head's spectrum relates to its measured attention entropy, on real text.

    .venv/bin/python examples/entropy_vs_spectrum.py                 # the bundled all-MiniLM-L6-v2
    .venv/bin/python examples/entropy_vs_spectrum.py --text "Your own sentence." --text "Another."

For every head: eig_var, eig_concentration and spectral_norm from qkmonitor.audit (weights
only), and attn_entropy_norm measured from the model's eager attention probabilities on each
text (mean over queries of H_i / log(keys), docs/metrics.md), averaged over the texts. Prints
the Spearman rank correlation of each statistic with the entropy across heads, and the most
and least focused heads. Offline; a few seconds on CPU.
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModel, AutoTokenizer

from qkmonitor import audit
from qkmonitor.cli import bundled_model_path
from qkmonitor.correlation import rank_correlation

TEXTS = (
    "The cat sat on the mat because it was tired, and then it fell asleep.",
    "Attention heads localize when the eigenspectrum of the query-key matrix concentrates, "
    "according to a paper that studied small transformers trained on language modelling.",
    "def add(a, b):\n    return a + b  # a tiny function that adds two numbers",
)
STATISTICS = ("eig_var", "eig_concentration", "spectral_norm")


def normalized_entropy(model, tokenizer, text: str) -> dict[tuple[int, int], float]:
    """(layer, head) -> mean over queries of H_i / log(n keys), no padding (one text)."""
    encoded = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        attentions = model(**encoded, output_attentions=True).attentions
    keys = encoded["input_ids"].shape[1]
    out = {}
    for layer, probabilities in enumerate(attentions):
        p = probabilities[0].double()  # (heads, queries, keys)
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(keys)
        for head, value in enumerate(entropy.mean(-1).tolist()):
            out[(layer, head)] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a local folder of a BERT-like encoder (default: the bundled all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--text",
        action="append",
        default=None,
        help="a text to measure entropy on; repeat for several (default: three built-in texts)",
    )
    args = parser.parse_args()
    path = args.model or bundled_model_path()
    texts = args.text or list(TEXTS)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    heads = {(h.layer, h.head): h for h in audit(path).heads if h.finite}
    measured = [normalized_entropy(model, tokenizer, text) for text in texts]
    entropy = {key: sum(m[key] for m in measured) / len(measured) for key in heads}
    keys = sorted(heads)
    print(f"{len(keys)} heads, {len(texts)} texts: Spearman correlation with attn_entropy_norm")
    for name in STATISTICS:
        values = [getattr(heads[key], name) for key in keys]
        rho, _ = rank_correlation(values, [entropy[key] for key in keys])
        print(f"  {name:<19} {rho:+.2f}")
    magnitude = [abs(heads[key].eig_concentration) for key in keys]
    rho, _ = rank_correlation(magnitude, [entropy[key] for key in keys])
    print(f"  {'|eig_concentration|':<19} {rho:+.2f}")
    by_entropy = sorted(keys, key=entropy.__getitem__)
    for label, chosen in (("most focused", by_entropy[:3]), ("least focused", by_entropy[-3:])):
        print(f"{label}:")
        for layer, head in chosen:
            h = heads[(layer, head)]
            print(
                f"  layer {layer} head {head}: attn_entropy_norm {entropy[(layer, head)]:.4f}, "
                f"eig_var {h.eig_var:.3g}, eig_concentration {h.eig_concentration:.3g}"
            )


if __name__ == "__main__":
    main()
