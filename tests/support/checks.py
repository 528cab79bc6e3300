"""Assertions shared by the tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from qkmonitor.errors import QKMonitorError


def one_line_error(kind: type[QKMonitorError], call: Callable[[], Any]) -> str:
    """The message of the ``kind`` error that ``call()`` raises, checked to be one line."""
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert message and "\n" not in message, repr(message)
    return message


def same_bits(a: Any, b: Any) -> bool:
    """Equal to the last bit (NaN equal to NaN), through nested dicts and lists."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same_bits, a, b))
    return a == b
