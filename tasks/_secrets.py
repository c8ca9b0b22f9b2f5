"""Secrets by reference under Prefect: ``{secret: NAME}`` read from the Secret block ``name`` (lowercase, ``-``).

:mod:`flagrelease.secrets` looks a secret up in the environment first, then asks each
registered resolver; importing this module registers the one that reads Prefect Secret
blocks, so a deployment's worker needs no secret in its environment.
"""

from __future__ import annotations

from flagrelease.secrets import register_resolver

__all__ = ["prefect_secret"]


def prefect_secret(name: str, block: str) -> str | None:
    """The value of the Secret block ``block`` (the secret ``name``'s block), or None when there is none."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block).get()
    except ValueError:  # no such block
        return None
    return str(value) if value else None


register_resolver(prefect_secret)
