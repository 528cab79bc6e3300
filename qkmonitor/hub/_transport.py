"""The Hub client's transport (private: only `qkmonitor.hub.client` imports it): bounded HTTP GETs,
and `bounded` for huggingface_hub's own calls.

huggingface_hub 2.4's shared httpx2 client has no timeout, its ``http_backoff`` honours any
``Retry-After`` (an hour included), ``model_info`` is not retried, and httpx2's errors are not
``OSError``. `get` uses that client (its proxies, hooks and offline switch) but bounds every wait:

- each wait for the server (connecting, the response headers, every chunk of the body) ends after
  the timeout: the ``timeout`` argument, else ``QKMONITOR_HUB_TIMEOUT`` seconds, else 15 s;
- each try must also end within timeout + its size / 64 KiB/s, so a server that trickles bytes
  counts as stalled too;
- stalls, broken connections, short bodies, 429 and 5xx are tried 3 times in all, pausing
  min(2^n s, timeout) between tries, or the server's ``Retry-After`` when that is at most the
  timeout; a longer ``Retry-After`` is reported at once instead of waited for. A stalled Hub is
  thus reported within about 3 timeouts (under a minute by default);
- an optional deadline (a `time.monotonic` value) ends the request with `TimeLimitError`, also
  in the middle of a body;
- a range request must come back as 206 with exactly the ``Content-Range`` asked for; a server
  that ignores Range is refused after the headers, before its body is read, and a body longer
  than the range is cut at its first extra byte and refused.

Failures are one line naming the request: `NetworkError`, `TimeLimitError`, or (4xx) the Hub's
own typed errors from ``hf_raise_for_status``, which the caller turns into one line.

Writes (the model-card push, the Space deploy) go through ``HfApi``'s own calls; `bounded` runs
them with the same timeout per wait (see its docstring).
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, Any

from qkmonitor.errors import CorruptWeightsError, NetworkError, QKMonitorError, TimeLimitError

__all__ = ["ATTEMPTS", "DEFAULT_TIMEOUT", "TIMEOUT_VARIABLE", "bounded", "get", "hub_timeout"]

TIMEOUT_VARIABLE = "QKMONITOR_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 15.0
ATTEMPTS = 3
MIN_RATE = 64 * 1024  # bytes per second below which a body counts as stalled
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_ERROR_BODY = 64 * 1024  # bytes of an error answer kept for its message
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def hub_timeout(timeout: float | None = None) -> float:
    """Seconds any one wait for the Hub may take: ``timeout``, else $QKMONITOR_HUB_TIMEOUT,
    else 15."""
    if timeout is None:
        text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
        if not text:
            return DEFAULT_TIMEOUT
        try:
            timeout = float(text)
        except ValueError:
            raise QKMonitorError(
                f"{TIMEOUT_VARIABLE}={text!r} is not a number of seconds; set it to e.g. 30"
            ) from None
    if not (math.isfinite(timeout) and timeout > 0):
        raise QKMonitorError(f"the Hub timeout must be a positive number of seconds, not {timeout}")
    return float(timeout)


_CHECK_CONNECTION = "check the connection and retry"


class _Retry(Exception):
    """A try that failed in a way another try may not: what happened, what to do if it keeps
    happening, and the pause the server asked for."""

    def __init__(
        self, problem: str, advice: str = _CHECK_CONNECTION, pause: float | None = None
    ) -> None:
        super().__init__(problem)
        self.problem, self.advice, self.pause = problem, advice, pause


def get(
    url: str,
    what: str,
    *,
    token: str | bool | None,
    timeout: float,
    deadline: float | None = None,
    span: tuple[int, int] | None = None,
    size: int | None = None,
    limit: int | None = None,
    sink: IO[bytes] | None = None,
) -> tuple[bytearray, int | None]:
    """GET ``url`` within the bounds above; (body, the file's total size when known).

    what: the request in words, for messages ("'org/name/config.json'");
    span: inclusive byte range (first, last) to ask for; the answer must be exactly that range;
    size: the file's known length, which the Content-Range must repeat;
    limit: read at most this many bytes of a whole-file body, then stop (the caller sees the
    body is longer than it accepts when it gets limit bytes back);
    sink: write the body there instead of returning it (rewound for each try).
    """
    from huggingface_hub.utils import build_hf_headers

    headers = {**build_hf_headers(token=token), "Accept-Encoding": "identity"}
    if span is not None:
        headers["Range"] = f"bytes={span[0]}-{span[1]}"
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return _try(url, what, headers, timeout, deadline, span, size, limit, sink)
        except _Retry as failure:
            last = failure
        pause = last.pause
        if pause is None:
            pause = min(2.0 ** (attempt - 1), timeout)
        elif pause > timeout:
            raise NetworkError(
                f"{what}: {last.problem}, and the Hub asks to retry in {pause:g} s, longer than "
                f"qkmonitor waits ({timeout:g} s, {TIMEOUT_VARIABLE}); try again later"
            )
        if attempt < ATTEMPTS:
            if deadline is not None and time.monotonic() + pause > deadline:
                raise TimeLimitError(f"the time limit was reached while retrying {what}")
            time.sleep(pause)
    raise NetworkError(f"{what}: {last.problem} ({ATTEMPTS} tries); {last.advice}")


def _try(
    url: str,
    what: str,
    headers: dict[str, str],
    timeout: float,
    deadline: float | None,
    span: tuple[int, int] | None,
    size: int | None,
    limit: int | None,
    sink: IO[bytes] | None,
) -> tuple[bytearray, int | None]:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import get_session

    start = time.monotonic()
    wait = timeout if deadline is None else min(timeout, deadline - start)
    if wait <= 0:
        raise TimeLimitError(f"the time limit was reached before {what}")
    slow_link = f"check the connection, or raise {TIMEOUT_VARIABLE} (now {timeout:g} s)"
    try:
        with get_session().stream(
            "GET", url, headers=headers, timeout=httpx2.Timeout(wait), follow_redirects=True
        ) as response:
            status = response.status_code
            if status in _RETRY_STATUSES:
                busy = "the Hub is busy or down; try again later"
                raise _Retry(f"HTTP {status}", busy, _retry_after(response.headers))
            if status >= 400:
                _raise_for_status(response)
            if span is not None:
                total = _check_content_range(response, what, span, size)
                expected: int | None = span[1] - span[0] + 1
            elif status != 200:
                raise NetworkError(f"{what}: the Hub answered HTTP {status} instead of 200")
            else:
                expected = total = _content_length(response)
            budget = expected if expected is not None else limit or 0
            slow = start + wait + budget / MIN_RATE  # a try still running then is too slow
            if sink is not None:
                sink.seek(0)
                sink.truncate()
            data, received = bytearray(), 0
            for chunk in response.iter_bytes():
                if span is not None and received + len(chunk) > expected:
                    raise NetworkError(
                        f"{what}: the Hub sent more bytes than the range asked for; refusing them"
                    )
                if limit is not None and received + len(chunk) >= limit:
                    data += chunk[: limit - received]
                    return data, total
                if sink is None:
                    data += chunk
                else:
                    sink.write(chunk)
                received += len(chunk)
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    raise TimeLimitError(f"the time limit was reached during {what}")
                if now > slow:
                    raise _Retry(
                        f"the Hub stalled, sending {received} of {expected or '?'} bytes in "
                        f"{now - start:.3g} s",
                        slow_link,
                    )
            if expected is not None and received != expected:
                raise _Retry(f"the Hub sent {received} of {expected} bytes")
            return data, total
    except HfHubHTTPError:  # an httpx2.HTTPError too: the Hub's own answer, for the caller
        raise
    except httpx2.TimeoutException:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeLimitError(f"the time limit was reached during {what}") from None
        raise _Retry(f"the Hub stopped answering for {wait:g} s", slow_link) from None
    except httpx2.ConnectError as error:
        advice = "check the network, and HF_ENDPOINT if set"
        raise _Retry(f"cannot reach the Hub ({_one_line(error)})", advice) from None
    except (httpx2.NetworkError, httpx2.ProtocolError) as error:
        raise _Retry(f"the connection broke ({type(error).__name__}: {_one_line(error)})") from None
    except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError) as error:
        raise NetworkError(f"{what} failed ({type(error).__name__}: {_one_line(error)})") from None


_BOUND: ContextVar[float | None] = ContextVar("qkmonitor_hub_bound", default=None)
_HOOK_LOCK = threading.Lock()
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _bound_request(request: Any) -> None:
    """httpx2 request hook: inside `bounded`, a request that has no timeout of its own (the
    shared client's default is none) gets the bound on every wait; elsewhere, nothing."""
    seconds = _BOUND.get()
    if seconds is None:
        return
    current = request.extensions.get("timeout") or {}
    if all(value is None for value in current.values()):
        import httpx2

        request.extensions = {**request.extensions, "timeout": httpx2.Timeout(seconds).as_dict()}


@contextmanager
def bounded(what: str, timeout: float | None = None, *, if_sent: str = "") -> Iterator[float]:
    """Run huggingface_hub calls (``HfApi.model_info``, ``create_commit``, ...) with every wait
    for the Hub bounded; yields the timeout in seconds.

    Inside the block, each request made from this thread through huggingface_hub's shared client
    (`huggingface_hub.get_session`) that sets no timeout of its own waits at most ``timeout``
    (else $QKMONITOR_HUB_TIMEOUT, else 15 s) to connect, to send, and for each part of the answer.
    This is a request hook added to that client, a no-op outside the block, so the client keeps
    its proxies, hooks and any factory set with ``huggingface_hub.set_client_factory``.
    huggingface_hub's own retries are kept (its paginated listings and upload-mode queries retry
    timeouts, up to 6 tries); other requests, commits included, are tried once.

    A stall or a broken connection becomes one `NetworkError` line: ``what``, the request (method
    and path) and, for a request that may have changed something on the Hub (not GET/HEAD),
    ``if_sent``: what a run again does if it landed. The Hub's own refusals (`HfHubHTTPError`)
    pass through for the caller.
    """
    import httpx2
    from huggingface_hub import get_session
    from huggingface_hub.errors import HfHubHTTPError

    seconds = hub_timeout(timeout)
    client = get_session()
    with _HOOK_LOCK:
        hooks = client.event_hooks
        if _bound_request not in hooks.get("request", []):
            client.event_hooks = {**hooks, "request": [*hooks.get("request", []), _bound_request]}
    token = _BOUND.set(seconds)
    try:
        yield seconds
    except HfHubHTTPError:  # an httpx2.HTTPError too: the Hub's own answer, for the caller
        raise
    except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError) as error:
        method, request = _request_of(error)
        if isinstance(error, httpx2.TimeoutException):
            problem = f"the Hub stopped answering {request} for {seconds:g} s"
            advice = f"check the connection, or raise {TIMEOUT_VARIABLE} (now {seconds:g} s)"
        elif isinstance(error, httpx2.ConnectError):
            problem = f"cannot connect to the Hub for {request} ({_one_line(error)})"
            advice = "check the network, and HF_ENDPOINT if set"
        elif isinstance(error, httpx2.NetworkError | httpx2.ProtocolError):
            problem = f"the connection broke during {request} ({type(error).__name__})"
            advice = _CHECK_CONNECTION
        else:
            problem = f"{request} failed ({type(error).__name__}: {_one_line(error)})"
            advice = "check HF_ENDPOINT and any proxy settings"
        sent = f"; it was not retried, as it may have reached the Hub: {if_sent}"
        landed = sent if if_sent and method not in _SAFE_METHODS else ""
        raise NetworkError(f"{what}: {problem}{landed}; {advice}") from None
    finally:
        _BOUND.reset(token)


def _request_of(error: Any) -> tuple[str, str]:
    """(method, "METHOD /path") of the request an httpx2 error belongs to."""
    try:
        request = error.request
    except (AttributeError, RuntimeError):  # an error raised outside a request
        return "", "a request"
    return request.method, f"{request.method} {request.url.path}"


def _check_content_range(response: Any, what: str, span: tuple[int, int], size: int | None) -> int:
    """The file's total size from a range answer, which must be exactly the range asked for."""
    if response.status_code != 206:
        raise NetworkError(
            f"{what}: the Hub ignored the byte range asked for (HTTP {response.status_code}); "
            "qkmonitor reads only Q/K tensors and needs a server that honours Range"
        )
    header = response.headers.get("content-range", "")
    match = _CONTENT_RANGE.fullmatch(header.strip())
    first, last = span
    if match and int(match[1]) == first and int(match[2]) + 1 == int(match[3]) <= last:
        raise CorruptWeightsError(
            f"{what}: the file ends at byte {match[3]}, before the range asked for; it is "
            "truncated, re-upload it"
        )
    if match is None or (int(match[1]), int(match[2])) != (first, last):
        raise NetworkError(
            f"{what}: the Hub answered with Content-Range {header!r} instead of bytes "
            f"{first}-{last}; refusing bytes that may belong elsewhere in the file"
        )
    total = int(match[3])
    if last >= total or (size is not None and total != size):
        raise NetworkError(
            f"{what}: the Hub reports the file as {total} bytes"
            + (f" (it was {size} when its header was read)" if size is not None else "")
            + "; the file changed or the server is inconsistent"
        )
    return total


def _content_length(response: Any) -> int | None:
    text = response.headers.get("content-length")
    if text is None or "content-encoding" in response.headers:
        return None
    return int(text) if text.strip().isdigit() else None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a ``Retry-After: <seconds>`` header asks for (HTTP dates are ignored)."""
    text = headers.get("retry-after", "").strip()
    return float(text) if text.isdigit() else None


def _raise_for_status(response: Any) -> None:
    """Raise huggingface_hub's typed error for a 4xx answer, from a bounded part of its body."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    body = bytearray()
    for chunk in response.iter_raw():
        body += chunk
        if len(body) >= _ERROR_BODY:
            break
    encoded = "content-encoding" in response.headers or len(body) >= _ERROR_BODY
    kept = {
        name: value
        for name, value in response.headers.items()
        if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    }
    copy = httpx2.Response(
        response.status_code,
        headers=kept,
        content=b"" if encoded else bytes(body),
        request=response.request,
    )
    hf_raise_for_status(copy)
    raise NetworkError(f"unexpected HTTP {response.status_code} from {response.request.url}")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
