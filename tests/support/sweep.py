"""Sweep every model_type of the installed transformers through audit() and the behavioural
reference (support/behaviour.py): a tiny model of each type is built from its shrunken default
config, saved, audited, and every head compared with what the model itself computes.

    cd tests && ../.venv/bin/python -m support.sweep [model_type ...] [--json out.json]

Prints counts of exact / refused (grouped by reason) / wrong / unverifiable / unbuildable.
"wrong" must be 0: an audited head that differs from the model, or an attention module that is
run but not audited.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import torch

from support.behaviour import shrink
from support.verify import Outcome, verify


class _Timeout(BaseException):  # not an Exception: the reference catches those
    pass


def _alarm(signum, frame):
    raise _Timeout


signal.signal(signal.SIGALRM, _alarm)


def _reason(detail: str) -> str:
    """A refusal's reason without the names that vary per model, for grouping."""
    text = re.sub(r"'[^']*'", "'X'", detail)
    text = re.sub(r"\b[A-Z][A-Za-z0-9_]*(Attention|Model|Norm)\w*", "<Class>", text)
    return re.sub(r"\d+", "N", text)[:110]


def main() -> None:
    from transformers import CONFIG_MAPPING

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*")
    parser.add_argument("--json")
    parser.add_argument("--timeout", type=int, default=90, help="seconds per model_type")
    parser.add_argument("--after", help="start after this model_type (resume a sweep)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    types = args.types or sorted(CONFIG_MAPPING.keys())
    if args.after:
        types = types[types.index(args.after) + 1 :]
    outcomes: dict[str, Outcome] = {}
    start = time.time()
    for model_type in types:
        config = shrink(model_type)
        if config is None:
            outcomes[model_type] = Outcome("unbuildable", "no config")
        else:
            with tempfile.TemporaryDirectory() as folder:
                signal.alarm(args.timeout)
                try:
                    outcomes[model_type] = verify(config, Path(folder))
                except _Timeout:
                    outcomes[model_type] = Outcome("unverifiable", f"over {args.timeout} s")
                except Exception as error:  # a bug in the reference or audit: count it
                    outcomes[model_type] = Outcome(
                        "wrong", f"raised {type(error).__name__}: {error}"
                    )
        signal.alarm(0)
        o = outcomes[model_type]
        print(f"{model_type:40s} {o.status:12s} {o.heads:4d} {o.detail[:160]}", flush=True)
    counts = Counter(o.status for o in outcomes.values())
    print(
        f"\n{len(types)} model_types in {time.time() - start:.0f} s: "
        + ", ".join(
            f"{k} {counts[k]}" for k in ("exact", "refused", "wrong", "unverifiable", "unbuildable")
        )
    )
    reasons = Counter(_reason(o.detail) for o in outcomes.values() if o.status == "refused")
    print("refused, by reason:")
    for reason, count in reasons.most_common():
        print(f"  {count:4d}  {reason}")
    for o_type, o in outcomes.items():
        if o.status == "wrong":
            print(f"WRONG {o_type}: {o.detail[:200]}")
    if args.json:
        Path(args.json).write_text(json.dumps({t: vars(o) for t, o in outcomes.items()}, indent=1))


if __name__ == "__main__":
    main()
