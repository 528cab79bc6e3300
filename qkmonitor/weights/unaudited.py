"""The one line that names the attention-like modules an audit left out (torch-free: the CLI,
the result and the card import it without loading torch)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["not_audited_line"]


def not_audited_line(not_audited: Sequence[dict[str, str]]) -> str:
    """One line naming how many attention-like modules were not audited and why (the CLI, the
    Space and the card print it), from ModelInfo.not_audited records; "" when none."""
    if not not_audited:
        return ""
    groups: dict[tuple[str, str], int] = {}
    for record in not_audited:
        key = (record["class"], record["reason"])
        groups[key] = groups.get(key, 0) + 1
    n = len(not_audited)
    parts = [f"{count} {kind} (it {reason})" for (kind, reason), count in groups.items()]
    return (
        f"{n} attention-like module{'s' * (n > 1)} not audited (listed in not_audited): "
        + "; ".join(parts)
    )
