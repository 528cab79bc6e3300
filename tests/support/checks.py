"""Assertions shared by the tests."""

from __future__ import annotations

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
