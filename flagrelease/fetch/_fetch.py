"""The fetch stage: download a model's weights at a pinned revision, verified and resumable.

Sources: the Hugging Face Hub (``huggingface_hub``), ModelScope (``modelscope``), or a
local folder, which is "fetched" the same way (copied, checked, recorded).  Every file is
checked against its size, the sha256 (or git blob id) the hub publishes, and, for
safetensors, its header's byte ranges; a bad file is downloaded once more, then the
fetch fails naming it.  Transfers go to partial files under ``.flagrelease-fetch/`` and
resume after an interruption; finished files are moved into place atomically.

The result is recorded in ``fetch_manifest.json`` in the destination.  When that manifest
matches the files on disk (same source, repo, revision and patterns; sizes and sha256
re-checked) a fetch does no network work at all.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flagrelease._redact import install_log_redaction, redact
from flagrelease._threads import map_in_threads
from flagrelease.config import ModelSection, ModelSource
from flagrelease.errors import FetchError
from flagrelease.fetch._names import check_tree, clean_endpoint, safe_relpath, tree_digest
from flagrelease.fetch._sources import LocalSource, RemoteFile, Source, make_source
from flagrelease.fetch._transfer import Transfers
from flagrelease.fetch._types import MANIFEST_NAME, STAGING_NAME, FetchedFile, FetchResult
from flagrelease.fetch._verify import (
    BadFile,
    FetchProgress,
    check_indexes,
    hash_files,
    plan_key,
    read_manifest,
    verify_file,
    write_manifest,
)

__all__ = ["fetch_model"]

log = logging.getLogger("flagrelease.fetch")

_LOCK_NAME = ".flagrelease-fetch.lock"


def _write_manifest(dest: Path, result: FetchResult, key: dict[str, Any], extra: dict[str, dict[str, Any]]) -> Path:
    entries = [{**f.to_json(), **extra.get(f.path, {})} for f in result.files]
    header = {
        **key,
        "source": result.source,
        "repo_id": result.repo_id,
        "revision": result.revision,
        "endpoint": result.endpoint,
        "total_bytes": result.bytes,
    }
    return write_manifest(dest / MANIFEST_NAME, header, entries)


def _reuse(
    model: ModelSection, source: Source, dest: Path, workers: int, listing: list[RemoteFile] | None
) -> FetchResult | None:
    """The result of an earlier fetch whose manifest still matches the disk, without any network work."""
    m = read_manifest(dest / MANIFEST_NAME)
    key = plan_key(model, source)
    if m is None or any(m.get(k) != v for k, v in key.items()):
        return None
    entries = m.get("files")
    if not isinstance(entries, list) or not entries:
        return None
    try:
        sized = [(safe_relpath(str(e["path"]), dest), int(e["size"]), str(e["sha256"])) for e in entries]
    except (KeyError, TypeError, ValueError, FetchError):
        return None
    if listing is not None:  # a local source: its files must be the ones recorded
        recorded = {e["path"]: (e.get("source_size"), e.get("source_mtime_ns")) for e in entries}
        if recorded != {f.path: (f.size, f.mtime_ns) for f in listing}:
            return None
    for rel, size, _ in sized:
        p = dest / rel
        if not p.is_file() or p.stat().st_size != size:
            return None
    digests = hash_files([dest / rel for rel, _, _ in sized], workers)
    if any(d != want for d, (_, _, want) in zip(digests, sized, strict=True)):
        return None
    files = [FetchedFile(rel, size, sha, "manifest", "reused") for rel, size, sha in sized]
    return FetchResult(
        model_dir=dest,
        manifest=dest / MANIFEST_NAME,
        source=model.source.value,
        repo_id=model.repo_id,
        revision=m.get("revision"),
        requested_revision=model.revision,
        endpoint=m.get("endpoint"),
        files=files,
        bytes=sum(f.size for f in files),
        downloaded_bytes=0,
        network=False,
    )


# -- the fetch ---------------------------------------------------------------------------------
def _has_model(path: Path | None) -> bool:
    return path is not None and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _select(model: ModelSection, files: list[RemoteFile], dest: Path, where: str) -> list[RemoteFile]:
    from huggingface_hub.utils import filter_repo_objects

    chosen = list(
        filter_repo_objects(
            files,
            allow_patterns=model.allow_patterns or None,
            ignore_patterns=model.ignore_patterns or None,
            key=lambda f: f.path,
        )
    )
    if not chosen:
        raise FetchError(
            f"{where}: no file matches allow_patterns={model.allow_patterns} ignore_patterns="
            f"{model.ignore_patterns} (the revision has {len(files)} files); fix the patterns",
            model=model.repo_id,
        )
    seen: set[str] = set()
    for f in chosen:
        safe_relpath(f.path, dest)
        if f.path in seen:
            raise FetchError(f"{where}: lists {f.path!r} twice; the listing is malformed", model=model.repo_id)
        seen.add(f.path)
    check_tree(seen, where=where, repo_id=model.repo_id)
    return sorted(chosen, key=lambda f: f.path)


def fetch_model(
    model: ModelSection,
    *,
    dest: Path,
    workers: int = 8,
    dry_run: bool = False,
    progress: Callable[[float, str], None] | None = None,
) -> FetchResult:
    """Fetch ``model``'s files at its pinned revision into ``dest``, verified, with a manifest.

    Args:
        model: the release's model section (source, repo id, revision, patterns, path).
        dest: the folder to fill; created if missing.  Files the previous fetch recorded
            there but this one does not select are removed.
        workers: files transferred (and hashed) in parallel.
        dry_run: list the files and sizes, transfer nothing, write nothing.
        progress: called with (fraction of bytes done, message) from the calling thread.

    Returns:
        What was fetched (or, with ``dry_run``, the plan).

    Raises:
        FetchError: the hub could not be reached or refused; a file name would escape
            ``dest``; a file is still bad after being transferred twice (the message names
            it); an index names shards that were not selected.
    """
    started = time.monotonic()
    for name in ("flagrelease", "huggingface_hub", "modelscope", "modelscope_hub"):
        install_log_redaction(logging.getLogger(name))
    workers = max(1, int(workers))
    dest = Path(dest).expanduser().resolve()
    source = make_source(model)
    notes: list[str] = []

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, redact(message))

    if model.source is ModelSource.LOCAL and model.generate == "tiny-qwen2" and not _has_model(model.path):
        assert model.path is not None
        if dry_run:
            notes.append(f"would generate the tiny-qwen2 demo model at {model.path}")
            return FetchResult(
                dest,
                None,
                model.source.value,
                model.repo_id,
                model.revision,
                model.revision,
                None,
                dry_run=True,
                network=False,
                elapsed_s=time.monotonic() - started,
                notes=notes,
            )
        from flagrelease.tinymodel import generate_tiny_model

        report(0.0, f"generating the tiny-qwen2 demo model at {model.path}")
        generate_tiny_model(Path(model.path))
        notes.append(f"generated the tiny-qwen2 demo model at {model.path}")

    if dry_run:
        return _plan(model, source, dest, started, notes)

    from filelock import FileLock

    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest / _LOCK_NAME)):
        local_listing = source.list_files().files if isinstance(source, LocalSource) else None
        if local_listing is not None:
            local_listing = _select(model, local_listing, dest, source.where())
        reused = _reuse(model, source, dest, workers, local_listing)
        if reused is not None:
            reused.elapsed_s = time.monotonic() - started
            reused.notes = notes
            log.info("%s: %d files already fetched and verified; nothing to download", model.repo_id, len(reused.files))
            report(1.0, f"{len(reused.files)} files already fetched and verified")
            return reused
        result = _fetch(model, source, dest, workers, report, local_listing)
    result.notes = notes
    result.elapsed_s = time.monotonic() - started
    return result


def _plan(model: ModelSection, source: Source, dest: Path, started: float, notes: list[str]) -> FetchResult:
    listing = source.list_files()
    files = _select(model, listing.files, dest, source.where())
    planned = []
    for rf in files:
        target = dest / rf.path
        present = target.is_file() and target.stat().st_size == rf.size
        planned.append(FetchedFile(rf.path, rf.size, rf.sha256, "plan", "present" if present else "planned"))
    return FetchResult(
        model_dir=dest,
        manifest=None,
        source=source.kind,
        repo_id=model.repo_id,
        revision=listing.revision,
        requested_revision=model.revision,
        endpoint=source.endpoint,
        files=planned,
        bytes=sum(f.size for f in planned),
        downloaded_bytes=sum(f.size for f in planned if f.action == "planned"),
        network=not isinstance(source, LocalSource),
        dry_run=True,
        elapsed_s=time.monotonic() - started,
        notes=notes,
    )


def _fetch(
    model: ModelSection,
    source: Source,
    dest: Path,
    workers: int,
    report: Callable[[float, str], None],
    local_listing: list[RemoteFile] | None,
) -> FetchResult:
    report(0.0, f"listing {source.where()}")
    if local_listing is not None:
        files, revision = local_listing, model.revision
    else:
        listing = source.list_files()
        files, revision = _select(model, listing.files, dest, source.where()), listing.revision
    old = read_manifest(dest / MANIFEST_NAME)
    same_revision = (
        old is not None
        and old.get("source") == source.kind
        and old.get("repo_id") == model.repo_id
        and old.get("revision") == revision
        and revision is not None
    )
    # Checksums an earlier verified fetch recorded for these very files (same revision, or
    # for a local source the same size and modification time).
    known: dict[str, str] = {}
    by_name = {rf.path: rf for rf in files}
    if old is not None and (same_revision or isinstance(source, LocalSource)):
        for e in old.get("files") or []:
            if not isinstance(e, dict) or not isinstance(e.get("sha256"), str):
                continue
            rf = by_name.get(str(e.get("path")))
            if rf is None or e.get("size") != rf.size:
                continue
            if rf.local is not None and (e.get("source_size"), e.get("source_mtime_ns")) != (rf.size, rf.mtime_ns):
                continue
            known[rf.path] = e["sha256"]

    # Files already in place: keep them if they verify against what we know.
    results: dict[str, FetchedFile] = {}
    candidates = [
        rf
        for rf in files
        if (dest / rf.path).is_file()
        and (dest / rf.path).stat().st_size == rf.size
        and (rf.sha256 or rf.git_sha1 or rf.path in known)
    ]

    def check(rf: RemoteFile) -> FetchedFile | None:
        want = known.get(rf.path)
        try:
            digest, how = verify_file(dest / rf.path, rf, expected_sha256=want)
        except (BadFile, OSError):
            return None
        return FetchedFile(rf.path, rf.size, digest, how, "reused")

    for got in map_in_threads(check, candidates, workers=workers, name="flagrelease-verify"):
        if got is not None:
            results[got.path] = got
    todo = [rf for rf in files if rf.path not in results]
    total = sum(rf.size for rf in files)
    log.info(
        "%s: %d files (%d bytes) at %s; %d already verified, %d to transfer",
        source.where(),
        len(files),
        total,
        revision,
        len(results),
        len(todo),
    )

    bar = FetchProgress(total, model.repo_id, report)
    bar.done = sum(f.size for f in results.values())
    try:
        fetcher = Transfers(source, dest, workers, bar)
        for got in fetcher.run(todo):
            results[got.path] = got
        bar.tick(f"fetched {len(files)} files", force=True)
    finally:
        bar.close()

    fetched = [results[rf.path] for rf in files]
    check_indexes(dest, [f.path for f in fetched])
    if isinstance(source, LocalSource) and revision is None:
        revision = "sha256:" + tree_digest([(f.path, f.sha256 or "") for f in fetched])

    # Files an earlier fetch put here that this one no longer selects.
    wanted = {f.path for f in fetched}
    for e in (old or {}).get("files") or []:
        rel = str(e.get("path", "")) if isinstance(e, dict) else ""
        if rel and rel not in wanted:
            try:
                stale = dest / safe_relpath(rel, dest)
            except FetchError:
                continue
            stale.unlink(missing_ok=True)

    extra: dict[str, dict[str, Any]] = {}
    for f in fetched:
        rf = by_name[f.path]
        extra[f.path] = {"hub_sha256": rf.sha256, "hub_git_sha1": rf.git_sha1}
        if rf.local is not None:
            extra[f.path].update(source_size=rf.size, source_mtime_ns=rf.mtime_ns)
    result = FetchResult(
        model_dir=dest,
        manifest=None,
        source=source.kind,
        repo_id=model.repo_id,
        revision=revision,
        requested_revision=model.revision,
        endpoint=clean_endpoint(source.endpoint),
        files=fetched,
        bytes=total,
        downloaded_bytes=sum(f.size for f in fetched if f.action != "reused"),
        network=not isinstance(source, LocalSource),
    )
    result.manifest = _write_manifest(dest, result, plan_key(model, source), extra)
    shutil.rmtree(dest / STAGING_NAME, ignore_errors=True)
    log.info(
        "%s: fetched %d files (%d bytes transferred), manifest %s",
        source.where(),
        len(fetched),
        result.downloaded_bytes,
        result.manifest,
    )
    return result
