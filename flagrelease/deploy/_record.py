"""The record of what a deploy runtime ran, in a form safe to publish.

Each runtime describes the commands it started as :class:`~flagrelease.deploy.outputs.ExecutedCommand`
records; the card renders its "How to Run" from them.  Two things never reach a record:
secret values (a secret is ``{"secret": NAME}``, to be read from the reader's environment)
and paths of this machine (the served weights become ``weights/``, the serving interpreter
``python``, other paths below the home folder ``~/...``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from flagrelease import constants
from flagrelease._redact import redact
from flagrelease.deploy.outputs import ExecutedCommand

__all__ = ["PYTHON", "WEIGHTS", "argv_record", "env_record", "local_record", "path_record"]

#: What the served weights folder is called in a record.
WEIGHTS = "weights/"
#: What the serving interpreter is called in a record.
PYTHON = "python"

#: Names whose values are treated as secrets even when they are not known ones.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW(OR)?D|CREDENTIAL|PRIVATE|(^|_)(API_?)?KEY($|_)", re.IGNORECASE)
#: flagrelease's own bookkeeping, not part of how to run the model.
_INTERNAL = frozenset({"FLAGRELEASE_GEMS_RECORD"})


def env_record(env: Mapping[str, str], *, secrets: Mapping[str, str] | None = None) -> dict[str, str | dict[str, str]]:
    """``env`` as a record: plain values kept, secrets as ``{"secret": NAME}``.

    Args:
        env: the literal variables.
        secrets: variables given by reference, variable -> secret name (added as references).
    """
    known = set(constants.secret_values())
    out: dict[str, str | dict[str, str]] = {}
    for key, value in env.items():
        if key in _INTERNAL:
            continue
        text = str(value)
        secret = (
            key in constants.SECRET_ENV_VARS or bool(_SECRET_NAME.search(key)) or text in known or redact(text) != text
        )
        out[key] = {"secret": key} if secret else text
    for key, name in (secrets or {}).items():
        out[key] = {"secret": name}
    return out


def path_record(value: str, *, model_dir: Path | None) -> str:
    """``value`` with this machine's paths replaced: the weights by ``weights/``, the home folder by ``~``."""
    if model_dir is not None:
        root = str(model_dir).rstrip("/")
        if value == root:
            return WEIGHTS
        if value.startswith(root + "/"):
            return WEIGHTS + value[len(root) + 1 :]
    for prefix in (str(constants.home_dir()), str(Path.home())):
        if prefix not in ("", "/") and (value == prefix or value.startswith(prefix + "/")):
            return "~" + value[len(prefix) :]
    return value


def argv_record(argv: Iterable[str], *, model_dir: Path | None, python: str | None = None) -> list[str]:
    """``argv`` as a record: the interpreter ``python`` is named :data:`PYTHON`, paths as :func:`path_record`."""
    out = []
    for i, word in enumerate(argv):
        if i == 0 and python is not None and word == python:
            out.append(PYTHON)
        elif "=" in word and word.startswith("-"):
            flag, _, value = word.partition("=")
            out.append(f"{flag}={path_record(value, model_dir=model_dir)}")
        else:
            out.append(path_record(word, model_dir=model_dir))
    return out


def local_record(
    argv: list[str],
    env: Mapping[str, str],
    *,
    model_dir: Path,
    python: str,
    ran: bool,
    reason: str | None = None,
    secrets: Mapping[str, str] | None = None,
) -> ExecutedCommand:
    """The record of a local serve (``argv`` run by the serving interpreter ``python``)."""
    return ExecutedCommand(
        node="localhost",
        argv=argv_record(argv, model_dir=model_dir, python=python),
        env=env_record(env, secrets=secrets),
        ran=ran,
        reason=reason,
        runtime="local",
    )
