"""Which failures a retry can fix: the one policy every retry in flagrelease follows.

A retry helps only when the cause may be gone a little later: a connection reset, a
timeout, a server error (HTTP 5xx, 429), a refused connection to a server that restarts.
It cannot help when the input is wrong or the world says no: a bad config or argument,
a port in use, something not found (HTTP 4xx), a host name that does not resolve, a
refused gate, another run holding the release, a damaged checkpoint, a bug.

:func:`classify` walks the error and its causes (``raise ... from``) and returns the
verdict with the reason; an error that says so itself (``FlagReleaseError.transient``)
is believed.  The Prefect tasks' retry condition (``tasks/_common.py``) is this function.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Literal

from flagrelease.errors import (
    BusyError,
    ConfigError,
    ConvertError,
    FlagReleaseError,
    GateError,
    PublishBlockedError,
)

__all__ = ["Verdict", "classify", "is_transient"]

#: ``transient`` (retry) or ``final`` (do not), and why.
Verdict = tuple[Literal["transient", "final"], str]

_FINAL_TYPES: tuple[tuple[type[BaseException], str], ...] = (
    (ConfigError, "a config or argument error"),
    (PublishBlockedError, "a refused gate"),
    (GateError, "a refused gate"),
    (BusyError, "another run holds what this one needs"),
    (ConvertError, "a damaged or unsupported checkpoint"),
    (FileNotFoundError, "not found"),
    (NotADirectoryError, "not found"),
    (PermissionError, "permission denied"),
    (TypeError, "a bug"),
    (KeyError, "a bug"),
    (AttributeError, "a bug"),
    (NameError, "a bug"),
    (AssertionError, "a bug"),
    (NotImplementedError, "a bug"),
)
_TRANSIENT_TYPES: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionResetError, "a connection reset"),
    (ConnectionAbortedError, "a connection reset"),
    (BrokenPipeError, "a connection reset"),
    (ConnectionRefusedError, "a refused connection (the server may be restarting)"),
    (TimeoutError, "a timeout"),
)
#: Message patterns, tried on every error of the chain (first match wins, final first).
_FINAL_TEXT: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"Name or service not known|nodename nor servname|No address associated with hostname"),
        "an unknown host",
    ),
    (re.compile(r"address already in use|port \d+ .*already in use", re.IGNORECASE), "a port in use"),
    (re.compile(r"error: unrecognized arguments|error: argument --|invalid choice: "), "a bad engine argument"),
    (
        re.compile(r"\b(HTTP|status)[ :]*4\d\d\b|\b4\d\d (Client Error|Not Found|Forbidden|Unauthorized)"),
        "refused by the server (HTTP 4xx)",
    ),
    (re.compile(r"RepositoryNotFound|RevisionNotFound|GatedRepo|EntryNotFound"), "not found or refused"),
)
_TRANSIENT_TEXT: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"\b(HTTP|status)[ :]*(5\d\d|429)\b|\b5\d\d Server Error|\b429 Too Many"),
        "a server error (HTTP 5xx or 429)",
    ),
    (
        re.compile(r"Connection reset|Connection aborted|RemoteDisconnected|IncompleteRead", re.IGNORECASE),
        "a connection reset",
    ),
    (re.compile(r"timed out|timeout|Temporary failure in name resolution", re.IGNORECASE), "a timeout"),
)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen and len(seen) < 20:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)


def _status(err: BaseException) -> int | None:
    """An HTTP status carried by a client error (httpx, requests, huggingface_hub, botocore)."""
    response = getattr(err, "response", None)
    code = getattr(response, "status_code", None)
    if isinstance(code, int):
        return code
    if isinstance(response, dict):  # botocore ClientError
        meta = response.get("ResponseMetadata") or {}
        code = meta.get("HTTPStatusCode") if isinstance(meta, dict) else None
        return code if isinstance(code, int) else None
    return None


def classify(err: BaseException) -> Verdict:
    """Whether retrying the step that raised ``err`` can help, and why.

    Args:
        err: the exception (its ``__cause__`` chain is examined too).

    Returns:
        ``("transient", why)`` or ``("final", why)``.
    """
    chain = list(_chain(err))
    for e in chain:
        if isinstance(e, FlagReleaseError) and e.transient is not None:
            return ("transient", "the error says a retry may help") if e.transient else ("final", "the error says so")
    for e in chain:
        for kind, why in _FINAL_TYPES:
            if isinstance(e, kind):
                return "final", why
        if isinstance(e, socket.gaierror):
            if e.errno == socket.EAI_AGAIN:
                return "transient", "a temporary name resolution failure"
            return "final", "an unknown host"
        code = _status(e)
        if code is not None:
            if code >= 500 or code in (408, 429):
                return "transient", f"a server error (HTTP {code})"
            if code >= 400:
                return "final", f"refused by the server (HTTP {code})"
    for e in chain:
        for kind, why in _TRANSIENT_TYPES:
            if isinstance(e, kind):
                return "transient", why
    text = "\n".join(str(e) for e in chain)
    for pattern, why in _FINAL_TEXT:
        if pattern.search(text):
            return "final", why
    for pattern, why in _TRANSIENT_TEXT:
        if pattern.search(text):
            return "transient", why
    if isinstance(err, ValueError) and not isinstance(err, FlagReleaseError):
        return "final", "a bad value"
    return "transient", "an unclassified failure (retried, as it may be passing)"


def is_transient(err: BaseException) -> bool:
    """Whether a retry of the step that raised ``err`` can help (see :func:`classify`)."""
    return classify(err)[0] == "transient"
