"""No build-machine path leaves in a bundle: folders of the machine that made it become placeholders.

Logs, lm-eval results and stage summaries name the folders a release ran in (its work
folder, the serving runtime below the home folder, the checkout) and the machine's host
name.  None of these mean anything to someone who downloads the bundle, and they tell
strangers about the build machine, so the card stage rewrites each into a placeholder
(:data:`PLACEHOLDERS`, listed in the manifest) in every text file of the bundle and in the
manifest itself.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_write_bytes
from flagrelease.config import ReleaseConfig
from flagrelease.constants import REPO_ROOT, cache_dir, home_dir, runtimes_dir, services_dir
from flagrelease.layout import BundleLayout

__all__ = ["PLACEHOLDERS", "BuildPaths", "build_paths"]

log = logging.getLogger("flagrelease.card")

#: Placeholder -> what it stands for (recorded in the manifest).
PLACEHOLDERS: dict[str, str] = {
    "<WORK_DIR>": "the release's work folder on the machine that made it",
    "<PUBLISHED_DIR>": "the local folder the release was published to (publish.local_dir)",
    "<MODEL_SOURCE>": "the local folder the source weights were read from (model.path)",
    "<CONFIG_DIR>": "the folder of the release config file",
    "<RUNTIMES>": "flagrelease's serving runtimes (virtual environments) on that machine",
    "<CACHE>": "flagrelease's download and model cache on that machine",
    "<SERVICES>": "the state of the Docker engine and registry flagrelease ran on that machine",
    "<FLAGRELEASE_HOME>": "flagrelease's state and caches on that machine",
    "<CHECKOUT>": "the flagrelease checkout that made the release",
    "<HOME>": "the home folder of the user who made the release",
    "<HOST>": "the host name of that machine",
}

#: Text files larger than this are left as they are (weights and wheels are binary anyway).
_MAX_TEXT_BYTES = 64 << 20
_TRIVIAL = {"/", "/tmp", "/usr", "/opt", "/var"}
#: A folder ends where the next character cannot continue its last name.
#: A folder is replaced wherever it starts (output glued to a path is common in logs).
_START, _END = "", r"(?![\w-])"


@dataclass(frozen=True)
class BuildPaths:
    """The build machine's folders and host name, each with its placeholder (most specific first)."""

    roots: tuple[tuple[str, str], ...]
    host: str | None

    def text(self, value: str) -> str:
        """``value`` with every build folder and the host name replaced by its placeholder."""
        for root, placeholder in self.roots:
            if root in value:
                value = re.sub(_START + re.escape(root) + _END, placeholder, value)
        if self.host and self.host in value:
            value = re.sub(rf"(?<![\w.-]){re.escape(self.host)}(?![\w.-])", "<HOST>", value)
        return value

    def obj(self, value: Any) -> Any:
        """A copy of the JSON-able ``value`` with :meth:`text` applied to every string (keys too)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.obj(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.obj(v) for v in value]
        return value

    def found(self, value: str) -> list[str]:
        """The build folders (and host name) that ``value`` still names."""
        hits = [root for root, _ in self.roots if re.search(_START + re.escape(root) + _END, value)]
        if self.host and re.search(rf"(?<![\w.-]){re.escape(self.host)}(?![\w.-])", value):
            hits.append(self.host)
        return hits

    def scrub_tree(self, folder: Path, *, skip: Iterable[str] = ()) -> list[str]:
        """Rewrite every text file below ``folder`` that names a build folder; return the ones rewritten.

        Args:
            folder: the bundle.
            skip: relative paths to leave alone.
        """
        skipped = set(skip)
        changed: list[str] = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(folder).as_posix()
            if rel in skipped or path.stat().st_size > _MAX_TEXT_BYTES:
                continue
            data = path.read_bytes()
            if b"\0" in data:
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            clean = self.text(text)
            if clean != text:
                mode = path.stat().st_mode & 0o7777
                atomic_write_bytes(path, clean.encode("utf-8"))
                path.chmod(mode)
                changed.append(rel)
        if changed:
            log.info("card: replaced build-machine paths with placeholders in %d bundle file(s)", len(changed))
        return changed


def _real(path: Path | str | None) -> list[str]:
    """``path`` as given and resolved (both spellings appear in logs), without trailing slashes."""
    if not path:
        return []
    p = Path(path).expanduser()
    if not p.is_absolute():
        return []
    out = {str(p).rstrip("/") or "/"}
    with contextlib.suppress(OSError):
        out.add(str(p.resolve()).rstrip("/") or "/")
    return sorted(x for x in out if x not in _TRIVIAL)


def build_paths(cfg: ReleaseConfig, *, layout: BundleLayout, config_path: Path | None = None) -> BuildPaths:
    """The folders of this machine a release may have written into its bundle.

    Args:
        cfg: the release config.
        layout: its work folder's layout.
        config_path: the release config file, if known.
    """
    pairs: list[tuple[str, str]] = []
    candidates: list[tuple[Path | str | None, str]] = [
        (layout.root, "<WORK_DIR>"),
        (cfg.publish.local_dir, "<PUBLISHED_DIR>"),
        (cfg.model.path, "<MODEL_SOURCE>"),
        (config_path.parent if config_path else None, "<CONFIG_DIR>"),
        (runtimes_dir(), "<RUNTIMES>"),
        (cache_dir(), "<CACHE>"),
        (services_dir(), "<SERVICES>"),
        (home_dir(), "<FLAGRELEASE_HOME>"),
        (REPO_ROOT, "<CHECKOUT>"),
        (Path.home(), "<HOME>"),
    ]
    for path, placeholder in candidates:
        pairs += [(root, placeholder) for root in _real(path)]
    # The most specific folder first: the work folder lies below the home folder, say.
    pairs.sort(key=lambda p: len(p[0]), reverse=True)
    host = socket.gethostname().strip() or None
    if host in ("localhost",):
        host = None
    return BuildPaths(roots=tuple(pairs), host=host)
