"""Surgical edits of a model card's text: one top-level key of its YAML header, and one section
of its body between two HTML-comment markers.

Nothing is parsed and re-serialized: the header is located with huggingface_hub's own pattern
(the one ``ModelCard`` uses), the key's lines are found as text and spliced, and every other byte
of the card (other metadata with its quoting, comments and order, model-index, text, line
endings) is kept as it was. After each edit the old and new headers are both parsed, and the edit
is refused unless they hold the same values for every other key and the intended value for ours.
Applying the same edit twice gives the same text.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from qkmonitor.errors import CardFormatError

__all__ = [
    "BEGIN_MARKER",
    "END_MARKER",
    "get_metadata_key",
    "set_metadata_key",
    "set_section",
]

BEGIN_MARKER = "<!-- qkmonitor:begin -->"
END_MARKER = "<!-- qkmonitor:end -->"


def _newline(text: str) -> str:
    """The card's line ending, so that inserted lines match the rest of the file."""
    return "\r\n" if "\r\n" in text else "\n"


def _parse_header(header: str, where: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(header)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise CardFormatError(
            f"{where}: the YAML header is invalid ({reason}); fix it first"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise CardFormatError(f"{where}: the YAML header is not a mapping of keys; fix it first")
    return values


def _key_lines(lines: list[str], key: str, where: str) -> tuple[int, int] | None:
    """[start, end) of the lines holding top-level ``key`` and its value, or None if absent.

    The value spans the indented lines after the key (and column-0 ``-`` items, which YAML lets
    a top-level sequence use); blank lines at its end belong to the layout, not to the key.
    """
    pattern = re.compile(rf"{re.escape(key)}[ \t]*:(?:\s|$)")
    starts = [i for i, line in enumerate(lines) if pattern.match(line)]
    if len(starts) > 1:
        raise CardFormatError(f"{where}: the YAML header has the key '{key}' twice; keep one")
    if not starts:
        return None
    end = starts[0] + 1
    while end < len(lines) and (lines[end].startswith((" ", "\t", "-")) or not lines[end].strip()):
        end += 1
    while end > starts[0] + 1 and not lines[end - 1].strip():
        end -= 1
    return starts[0], end


def get_metadata_key(text: str, key: str) -> Any:
    """Top-level YAML key ``key`` of the card's header; None if absent or unreadable."""
    match = REGEX_YAML_BLOCK.search(text)
    try:
        values = yaml.safe_load(match.group(2)) if match else None
    except yaml.YAMLError:
        return None
    return values.get(key) if isinstance(values, dict) else None


def set_metadata_key(text: str, key: str, value: Any, *, where: str = "README.md") -> str:
    """``text`` with top-level YAML key ``key`` set to ``value``, every other byte unchanged.

    The key's lines are replaced where they are, or appended at the end of the header; a card
    without a header gets one at its start.

    Raises:
        CardFormatError: the header is not valid YAML, has the key twice, or the edit would
            change another key's value.
    """
    newline = _newline(text)
    block = yaml.safe_dump(
        {key: value}, sort_keys=False, default_flow_style=None, allow_unicode=True, width=4096
    ).replace("\n", newline)
    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        edited = f"---{newline}{block}---{newline}{text}"
        before: dict[str, Any] = {}
    else:
        before = _parse_header(match.group(2), where)
        # the header's lines, each with its line ending (the last one's opens group 3)
        start = match.start(2)
        end = match.start(3) + len(re.match(r"\r\n|\r|\n", match.group(3)).group())
        lines = text[start:end].splitlines(keepends=True)
        found = _key_lines(lines, key, where)
        first, last = found if found is not None else (len(lines), len(lines))
        lines[first:last] = [block]
        edited = text[:start] + "".join(lines) + text[end:]
    after = REGEX_YAML_BLOCK.search(edited)
    values = _parse_header(after.group(2), where) if after else {}
    _key_lines(after.group(2).splitlines(keepends=True), key, where)  # exactly once now
    others_before = {k: v for k, v in before.items() if k != key}
    others_after = {k: v for k, v in values.items() if k != key}
    if others_after != others_before or values.get(key) != value:
        raise CardFormatError(
            f"{where}: setting the '{key}' key would change other metadata (unusual YAML layout "
            f"around it); remove the '{key}' key by hand and run again"
        )
    return edited


def set_section(text: str, section: str, *, where: str = "README.md") -> str:
    """``text`` with the body section between the markers replaced by ``section``.

    ``section`` must start with BEGIN_MARKER and end with END_MARKER (a final line ending is
    ignored). A card without the markers gets the section appended after a blank line.

    Raises:
        CardFormatError: the markers are not exactly one begin followed by one end.
    """
    match = REGEX_YAML_BLOCK.search(text)
    body_start = match.end() if match else 0
    body = text[body_start:]
    begins, ends = body.count(BEGIN_MARKER), body.count(END_MARKER)
    newline = _newline(text)
    section = section.rstrip("\r\n").replace("\n", newline)
    if begins == ends == 0:
        if body and not body.endswith(newline):
            body += newline
        if body.strip() and not body.endswith(newline * 2):
            body += newline
        return text[:body_start] + body + section + newline
    first, last = body.find(BEGIN_MARKER), body.find(END_MARKER)
    if begins != 1 or ends != 1 or last < first:
        raise CardFormatError(
            f"{where} has {begins} '{BEGIN_MARKER}' and {ends} '{END_MARKER}' markers (in that "
            "order they must be one pair); fix or remove them and run again"
        )
    body = body[:first] + section + body[last + len(END_MARKER) :]
    return text[:body_start] + body
