"""Keep secrets out of logs, artifacts and cards."""

from __future__ import annotations

import logging
import re
from typing import Any

from flagrelease.constants import secret_values

__all__ = ["RedactingFilter", "install_log_redaction", "redact", "redact_obj"]

# Token shapes worth hiding even when they are not in this process's environment.
_PATTERNS = (
    re.compile(r"hf_[A-Za-z0-9]{20,}"),
    re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
)
MASK = "***"


def redact(text: str, *, extra: list[str] | None = None) -> str:
    """Return ``text`` with every known secret value and token shape masked."""
    for value in [*(extra or []), *secret_values()]:
        if value:
            text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(MASK, text)
    return text


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
