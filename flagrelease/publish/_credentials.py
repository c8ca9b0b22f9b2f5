"""Publish credentials: tokens from the environment or Prefect Secret blocks, never shown.

Tokens come from the environment (:mod:`flagrelease.constants`) or, under Prefect, from
Secret blocks that the task layer resolves and passes in as :class:`PublishCredentials`.
They never reach a log line, an artifact, the card or a returned object: while
publishing, :func:`masked_logs` masks them in every log handler.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flagrelease._redact import redact
from flagrelease.constants import aws_credentials, hf_token, modelscope_token
from flagrelease.errors import ConfigError

__all__ = ["SECRET_BLOCKS", "PublishCredentials", "credentials_from_secrets", "masked_logs"]


@dataclass(frozen=True)
class PublishCredentials:
    """Tokens for the destinations; each None falls back to the environment.

    The repr never shows a value.
    """

    hf_token: str | None = field(default=None, repr=False)
    modelscope_token: str | None = field(default=None, repr=False)
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | PublishCredentials | None) -> PublishCredentials:
        """Credentials from a mapping of the field names (unknown keys are refused)."""
        if isinstance(data, PublishCredentials):
            return data
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"unknown publish credential(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**{k: (str(v) if v else None) for k, v in data.items()})

    def resolved(self) -> PublishCredentials:
        """These credentials with the environment filling what is missing."""
        aws = aws_credentials()
        return PublishCredentials(
            hf_token=self.hf_token or hf_token(),
            modelscope_token=self.modelscope_token or modelscope_token(),
            aws_access_key_id=self.aws_access_key_id or aws.get("aws_access_key_id"),
            aws_secret_access_key=self.aws_secret_access_key or aws.get("aws_secret_access_key"),
            aws_session_token=self.aws_session_token or aws.get("aws_session_token"),
        )

    def boto3(self) -> dict[str, str]:
        """boto3 client keyword arguments (empty: boto3's own credential chain)."""
        out = {
            "aws_access_key_id": self.aws_access_key_id,
            "aws_secret_access_key": self.aws_secret_access_key,
            "aws_session_token": self.aws_session_token,
        }
        return {k: v for k, v in out.items() if v}

    def secrets(self) -> list[str]:
        """Every value, for masking."""
        values = [
            self.hf_token,
            self.modelscope_token,
            self.aws_access_key_id,
            self.aws_secret_access_key,
            self.aws_session_token,
        ]
        return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)


#: Prefect Secret block names the task layer resolves into :class:`PublishCredentials` fields.
SECRET_BLOCKS: dict[str, str] = {
    "hf_token": "flagrelease-hf-token",
    "modelscope_token": "flagrelease-modelscope-token",
    "aws_access_key_id": "flagrelease-aws-access-key-id",
    "aws_secret_access_key": "flagrelease-aws-secret-access-key",
    "aws_session_token": "flagrelease-aws-session-token",
}


def credentials_from_secrets(get: Callable[[str], str | None]) -> PublishCredentials:
    """Credentials from secret storage, without this library knowing the store.

    Args:
        get: returns the value of the named secret, or None when there is none; under
            Prefect, the task passes a function that loads the ``Secret`` block of that name
            (:data:`SECRET_BLOCKS`).

    Returns:
        Credentials with a field for each secret found (the rest fall back to the environment).
    """
    return PublishCredentials(**{field_name: get(block) or None for field_name, block in SECRET_BLOCKS.items()})


class _MaskFilter(logging.Filter):
    """Masks given secret values (and every known token shape) in log records."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, extra=self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


@contextlib.contextmanager
def masked_logs(secrets: list[str]) -> Iterator[None]:
    """While publishing, mask the tokens in every handler's records (ours and the clients')."""
    filt = _MaskFilter(secrets)
    handlers: set[logging.Handler] = set(logging.getLogger().handlers)
    for obj in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(obj, logging.Logger):
            handlers.update(obj.handlers)
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)
