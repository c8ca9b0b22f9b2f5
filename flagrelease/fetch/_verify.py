"""Checks, manifest and progress for the fetch stage."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_write_json
from flagrelease._filehash import git_blob_sha1, sha256_file
from flagrelease._redact import redact_obj
from flagrelease._safetensors import read_header
from flagrelease._threads import map_in_threads
from flagrelease.config import ModelSection
from flagrelease.errors import FetchError
from flagrelease.fetch._sources import LocalSource, RemoteFile

__all__ = [
    "MANIFEST_SCHEMA",
    "BadFile",
    "FetchProgress",
    "check_indexes",
    "hash_files",
    "plan_key",
    "read_manifest",
    "verify_file",
    "write_manifest",
]

#: The ``schema`` value of every fetch manifest this module writes.
MANIFEST_SCHEMA = "flagrelease.fetch/1"


class BadFile(Exception):
    """A transferred file failed verification (the message says how)."""


class FetchProgress:
    """Byte progress of a fetch: a tqdm bar and the caller's callback, driven from one thread."""

    def __init__(self, total: int, label: str, callback: Callable[[float, str], None] | None) -> None:
        from tqdm.auto import tqdm

        self.total = max(total, 1)
        self.callback = callback
        self.done = 0
        self.shown = 0
        self.inflight: dict[str, Path] = {}
        self.lock = threading.Lock()
        self.bar = tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=None, leave=False
        )

    def start(self, name: str, part: Path) -> None:
        with self.lock:
            self.inflight[name] = part

    def finish(self, name: str, size: int) -> None:
        with self.lock:
            self.inflight.pop(name, None)
            self.done += size

    def tick(self, message: str, *, force: bool = False) -> None:
        with self.lock:
            now = self.done
            parts = list(self.inflight.values())
        for p in parts:
            try:
                now += p.stat().st_size
            except OSError:
                continue
        now = min(now, self.total)
        if now == self.shown and not force:
            return
        self.bar.update(now - self.shown)
        self.shown = now
        if self.callback is not None:
            self.callback(now / self.total, message)

    def close(self) -> None:
        self.bar.close()


def verify_file(path: Path, rf: RemoteFile, *, expected_sha256: str | None = None) -> tuple[str, str]:
    """Check ``path`` against what the source says of ``rf``.

    Checks the size; the sha256 against the hub's (or ``expected_sha256``, from an earlier
    verified fetch), else the git blob id; a safetensors header's byte ranges; JSON syntax.

    Returns:
        (sha256, what it was verified by: hub-sha256, manifest, git-blob-sha1, copy or size).

    Raises:
        BadFile: the file fails a check (the message says which).
    """
    size = path.stat().st_size
    if size != rf.size:
        raise BadFile(f"size {size} bytes, the source lists {rf.size}" + (" (truncated)" if size < rf.size else ""))
    digest = sha256_file(path)
    want = rf.sha256 or expected_sha256
    how = "size"
    if want:
        if digest != want:
            raise BadFile(f"sha256 {digest[:12]}… does not match the expected {want[:12]}…")
        how = "hub-sha256" if rf.sha256 else "manifest"
    elif rf.git_sha1:
        blob = git_blob_sha1(path)
        if blob != rf.git_sha1:
            raise BadFile(f"git blob id {blob[:12]}… does not match the hub's {rf.git_sha1[:12]}…")
        how = "git-blob-sha1"
    elif rf.local is not None:
        how = "copy"
    if rf.path.endswith(".safetensors"):
        try:
            read_header(path)
        except ValueError as err:
            raise BadFile(f"bad safetensors file: {err}") from err
    elif rf.path.endswith(".json"):
        try:
            json.loads(path.read_bytes())
        except (UnicodeDecodeError, ValueError) as err:
            raise BadFile(f"not valid JSON: {err}") from err
    return digest, how


def check_indexes(dest: Path, paths: list[str]) -> None:
    """Every shard a ``*.safetensors.index.json`` names must be among the fetched ``paths``.

    Raises:
        FetchError: an index is not a JSON object with a ``weight_map`` of tensor name to
            shard file name, or names a shard that is not among ``paths``.
    """
    names = set(paths)
    for path in paths:
        if not path.endswith(".safetensors.index.json"):
            continue
        try:
            index = json.loads((dest / path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise FetchError(f"{path}: cannot be read as JSON ({err}); the repository's index is damaged") from err
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise FetchError(
                f"{path}: has no weight_map object (tensor name to shard file); the repository's index is "
                "malformed: check the revision, or leave the index out with model.ignore_patterns"
            )
        bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v]
        if bad:
            name, value = bad[0]
            raise FetchError(
                f"{path}: weight_map maps {name!r} to {value!r}, not a shard file name ({len(bad)} such entries); "
                "the repository's index is malformed: check the revision"
            )
        folder = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if f"{folder}{s}" not in names]
        if missing:
            raise FetchError(
                f"{path} names shard(s) that were not fetched: {', '.join(missing[:5])}; widen "
                "model.allow_patterns / narrow model.ignore_patterns so every shard is included"
            )


def hash_files(paths: Iterable[Path], workers: int) -> list[str | None]:
    """The sha256 of each of ``paths`` (None where unreadable), ``workers`` at a time."""

    def one(p: Path) -> str | None:
        try:
            return sha256_file(p)
        except OSError:
            return None

    return map_in_threads(one, paths, workers=workers, name="flagrelease-hash")


def plan_key(model: ModelSection, source: object) -> dict[str, Any]:
    """What a manifest must agree on to describe the same fetch (source, repo, revision, patterns)."""
    return {
        "source": model.source.value,
        "repo_id": model.repo_id,
        "requested_revision": model.revision,
        "allow_patterns": list(model.allow_patterns),
        "ignore_patterns": list(model.ignore_patterns),
        "local_path": str(source.root.resolve()) if isinstance(source, LocalSource) else None,
    }


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The fetch manifest at ``path``, or None if it is missing, unreadable or of another schema."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == MANIFEST_SCHEMA else None


def write_manifest(path: Path, header: dict[str, Any], entries: list[dict[str, Any]]) -> Path:
    """Write a fetch manifest atomically (secrets redacted): ``header`` fields, a timestamp, the files."""
    manifest = {
        "schema": MANIFEST_SCHEMA,
        **header,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "file_count": len(entries),
        "files": entries,
    }
    return atomic_write_json(path, redact_obj(manifest))
