"""A copy of templates/ with one more chip profile, for tests of chips that are only data."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from flagrelease.constants import REPO_ROOT

__all__ = ["templates_with_chip"]


def templates_with_chip(dest: Path, name: str, *, like: str = "cpu", **fields: object) -> Path:
    """Copy templates/ to ``dest`` and add profile ``name``: ``like``'s with ``fields`` changed.

    Point ``$FLAGRELEASE_TEMPLATES`` at the returned folder to use it.
    """
    shutil.copytree(REPO_ROOT / "templates", dest)
    profile = yaml.safe_load((dest / "chips" / f"{like}.yaml").read_text())
    profile.update(name=name, **fields)
    (dest / "chips" / f"{name}.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest
