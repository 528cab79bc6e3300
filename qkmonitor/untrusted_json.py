"""JSON from untrusted bytes (config.json, safetensors headers and indexes, the Hub's model
info): capped in size and nesting, numbers in range, one line when refused."""

from __future__ import annotations

import json
import math

from qkmonitor.errors import NotAModelError, QKMonitorError

__all__ = ["MAX_DEPTH", "one_line", "parse_json"]

MAX_DEPTH = 64  # JSON nesting; configs nest a few levels


def one_line(error: BaseException) -> str:
    """An exception's text on one line."""
    return " ".join(str(error).split())


class _NumberOutOfRange(ValueError):
    """A JSON number no file of a model can hold (1e999, a 5000-digit integer)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: no double holds it (Infinity/NaN literals stay)
        raise _NumberOutOfRange(text)
    return value


def _depth(value: dict | list) -> int:
    """How deeply lists and dicts nest in a parsed JSON value (iteratively: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def parse_json(
    raw: bytes | bytearray, where: str, limit: int, error: type[QKMonitorError] = NotAModelError
) -> dict:
    """A JSON object from untrusted bytes, or one line (``error``) saying what is wrong with them:
    larger than ``limit`` bytes, not UTF-8, malformed, nested too deep, numbers out of range."""
    if len(raw) > limit:
        raise error(f"{where} is larger than {limit // 2**20} MB; qkmonitor refuses JSON that big")
    try:
        values = json.loads(bytes(raw).decode("utf-8-sig"), parse_float=_finite_float)
    except UnicodeDecodeError:
        raise error(f"{where} is not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise error(f"{where} is not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as problem:
        raise error(f"{where} is not valid JSON ({one_line(problem)})") from None
    except ValueError:  # 1e999, or an integer of more than 4300 digits
        raise error(f"{where} is not valid JSON (a number is out of range)") from None
    if not isinstance(values, dict):
        raise error(f"{where} is not a JSON object")
    if _depth(values) > MAX_DEPTH:
        raise error(f"{where} nests more than {MAX_DEPTH} levels deep; it is not a model file")
    return values
