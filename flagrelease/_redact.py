"""Keep secrets out of logs, artifacts, cards and configs.

Two defences: the values of every secret this process knows (the secret environment
variables of :mod:`flagrelease.constants`, and each ``{secret: NAME}`` reference resolved
at run time, registered with :func:`register_secret`), and the *shapes* of known tokens,
masked even when their value is unknown here.  :func:`find_secret` tells the config
loader whether a literal string looks like a secret, so that one is refused before it
reaches any file.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from flagrelease.constants import secret_values

__all__ = [
    "MASK",
    "TOKEN_SHAPES",
    "RedactingFilter",
    "find_secret",
    "install_log_redaction",
    "redact",
    "redact_obj",
    "register_secret",
]

MASK = "***"

# Not preceded by a character that would make the prefix part of a longer word.
_B = r"(?<![A-Za-z0-9_-])"
# Not followed by one that would make the match a prefix of a longer word.
_E = r"(?![A-Za-z0-9_])"
#: Known token shapes, by what they are.  Each matches tokens of any length its issuer
#: uses: as a word of their own, a body must hold a digit or capital (real tokens do,
#: ``hf_transfer`` does not) unless it is long; glued to other text, a token of its
#: issuer's full length is still found.
TOKEN_SHAPES: dict[str, re.Pattern[str]] = {
    "a Hugging Face token": re.compile(
        rf"{_B}(?:hf|api_org)_(?:(?=[A-Za-z0-9]*[A-Z0-9])[A-Za-z0-9]+|[a-z]{{16,}}){_E}"
        r"|(?:hf|api_org)_(?=[A-Za-z0-9]*[A-Z])(?=[A-Za-z0-9]*[a-z])[A-Za-z0-9]{30,}"
    ),
    "an AWS access key id": re.compile(
        r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{12,}(?![A-Z0-9])"
    ),
    "an OpenAI or Anthropic API key": re.compile(
        rf"{_B}sk-(?=[A-Za-z0-9_-]*[A-Z0-9])[A-Za-z0-9_-]{{6,}}|sk-(?:proj-|ant-)?(?=[A-Za-z0-9_-]*[A-Z0-9])[A-Za-z0-9_-]{{20,}}"
    ),
    "a GitHub token": re.compile(
        rf"{_B}(?:gh[pousr]_[A-Za-z0-9]{{6,}}|github_pat_[A-Za-z0-9_]{{6,}}){_E}|gh[pousr]_[A-Za-z0-9]{{36}}|github_pat_\w{{40,}}"
    ),
    "a GitLab token": re.compile(rf"{_B}glpat-[A-Za-z0-9_-]{{6,}}"),
    "a Slack token": re.compile(rf"{_B}xox[abposr]-[A-Za-z0-9-]{{6,}}"),
    "a Google API key": re.compile(rf"{_B}AIza[0-9A-Za-z_-]{{16,}}"),
    "a ModelScope token": re.compile(rf"{_B}ms-[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}"),
    "a JSON web token": re.compile(r"eyJ[A-Za-z0-9_-]{6,}\.eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----)?"),
}
# Shapes masked in part: the credentials of a URL, a bearer token, NAME=value of a
# secret-named variable (unless the value reads another variable, ``$NAME``).
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/-]{6,}=*")
_SECRET_WORD = r"(?:TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|API_KEY|APIKEY|ACCESS_KEY|SECRET_KEY|PRIVATE_KEY)"
_ASSIGNMENT = re.compile(
    rf"(?<![A-Za-z0-9_])((?:[A-Z0-9]+_)*{_SECRET_WORD}(?:_[A-Z0-9]+)*=)(?![\"']?\$)(?![\"']?\*\*\*)([^\s\"']+|\"[^\"]*\"|'[^']*')"
)

_registered: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Mask ``value`` wherever :func:`redact` sees it from now on (a secret resolved at run time)."""
    if value and len(value) >= 4:
        with _lock:
            _registered.add(value)


def _known_values(extra: list[str] | None) -> list[str]:
    with _lock:
        values = {*(extra or []), *secret_values(), *_registered}
    return sorted((v for v in values if v), key=len, reverse=True)


def redact(text: str, *, extra: list[str] | None = None) -> str:
    """Return ``text`` with every known secret value and token shape masked."""
    for value in _known_values(extra):
        text = text.replace(value, MASK)
    for pattern in TOKEN_SHAPES.values():
        text = pattern.sub(MASK, text)
    text = _URL_CREDENTIALS.sub(MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _ASSIGNMENT.sub(lambda m: m.group(1) + MASK, text)


def find_secret(text: str) -> str | None:
    """What secret ``text`` holds, by shape (e.g. ``"a Hugging Face token"``), or None.

    Used to refuse literal secrets in configs: a URL with a password, a known token
    shape, or ``NAME=value`` for a secret-named variable.
    """
    for what, pattern in TOKEN_SHAPES.items():
        if pattern.search(text):
            return what
    if _URL_CREDENTIALS.search(text):
        return "a URL with a user name and password"
    if _BEARER.search(text):
        return "a bearer token"
    if _ASSIGNMENT.search(text):
        return "a value for a secret-named variable"
    return None


def redact_obj(obj: Any) -> Any:
    """Redact every string inside a JSON-like object."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach :class:`RedactingFilter` to ``logger`` (default: the flagrelease logger) and its handlers."""
    target = logger or logging.getLogger("flagrelease")
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.addFilter(RedactingFilter())
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
