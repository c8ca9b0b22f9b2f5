"""Secrets given by reference (``{secret: NAME}`` in a release config), resolved at run time.

A release config never holds a secret's value: ``serve.envs`` may say
``HF_TOKEN: {secret: HF_TOKEN}``, and the value is looked up only when a process needs it,
first in this process's environment (``$HF_TOKEN``), then by each resolver registered
with :func:`register_resolver` (``tasks/`` registers one that reads a Prefect Secret block
named :attr:`~flagrelease.config.SecretRef.block_name`; this package never imports
Prefect).  A resolved value is registered for redaction, so no log line, artifact or
card shows it, and it is handed to processes through their environment only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from flagrelease import constants
from flagrelease._redact import register_secret
from flagrelease.errors import ConfigError

__all__ = ["SecretResolver", "register_resolver", "resolve_secret"]

#: Looks a secret up by its name (``HF_TOKEN``) and Prefect block name (``hf-token``); None if it has none.
SecretResolver = Callable[[str, str], "str | None"]

_resolvers: list[SecretResolver] = []
_lock = threading.Lock()


def register_resolver(resolver: SecretResolver) -> None:
    """Add a place secrets are looked up after the environment (once per resolver)."""
    with _lock:
        if resolver not in _resolvers:
            _resolvers.append(resolver)


def resolve_secret(name: str) -> str:
    """The value of the secret ``name``: ``$name``, else the first registered resolver that has it.

    Raises:
        ConfigError: no source has it; the message says how to provide it.
    """
    block = name.lower().replace("_", "-")
    value = constants.secret_from_env(name)
    if value is None:
        with _lock:
            resolvers = list(_resolvers)
        for resolver in resolvers:
            value = resolver(name, block)
            if value:
                break
    if not value:
        raise ConfigError(
            f"the secret {name} is not set: export {name}=... in the environment of the run, or (under Prefect) "
            f"create a Secret block named {block!r}; the release config names it by reference ({{secret: {name}}})",
            errors=[("serve.envs", f"secret {name} is not set")],
        )
    register_secret(value)
    return value
