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
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flagrelease._redact import install_log_redaction, redact, redact_obj
from flagrelease.config import ModelSection, ModelSource
from flagrelease.errors import FetchError
from flagrelease.fetch._sources import (
    Cancelled,
    HfSource,
    LocalSource,
    ModelScopeSource,
    RemoteFile,
    clean_endpoint,
    make_source,
    safe_relpath,
    tree_digest,
)
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
from flagrelease.pipeline import ReleaseContext, StageResult

__all__ = [
    "MANIFEST_NAME",
    "STAGING_NAME",
    "FetchResult",
    "FetchedFile",
    "fetch_model",
    "partial_path",
    "run_stage",
]

log = logging.getLogger("flagrelease.fetch")

#: The manifest written into the destination folder.
MANIFEST_NAME = "fetch_manifest.json"
#: Partial transfers live here (inside the destination) until they are verified.
STAGING_NAME = ".flagrelease-fetch"
_LOCK_NAME = ".flagrelease-fetch.lock"
_TICK_S = 0.25

ProgressCallback = Callable[[float, str], None]
_Src = HfSource | ModelScopeSource | LocalSource


@dataclass
class FetchedFile:
    """One file of a fetch.

    Attributes:
        path: relative path inside the model folder (``/`` separators).
        size: bytes.
        sha256: content sha256 (None only in a dry-run plan).
        verified_by: what the content was checked against: ``hub-sha256`` (the hub's LFS or
            ModelScope checksum), ``git-blob-sha1`` (the hub's git blob id), ``manifest`` (an
            earlier verified fetch), ``copy`` (a local source) or ``size`` (no checksum known).
        action: ``downloaded``, ``resumed``, ``redownloaded``, ``copied``, ``reused`` (already
            on disk and verified), ``planned`` or ``present`` (dry run).
    """

    path: str
    size: int
    sha256: str | None
    verified_by: str
    action: str

    def to_json(self) -> dict[str, Any]:
        """The manifest entry of this file."""
        return {
            "file": self.path,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "verified_by": self.verified_by,
            "action": self.action,
        }


@dataclass
class FetchResult:
    """What a fetch did (or, with ``dry_run``, would do).

    Attributes:
        model_dir: the folder holding the model.
        manifest: path of ``fetch_manifest.json`` (None in a dry run).
        source: ``hf``, ``modelscope`` or ``local``.
        repo_id: the hub repo id.
        revision: the resolved revision (a commit sha on the HF Hub; the pinned revision on
            ModelScope; ``sha256:<digest of the file list>`` for a local folder without one).
        requested_revision: the revision the config pinned.
        endpoint: the hub endpoint, without credentials (None for a local source).
        files: every file, sorted by path.
        bytes: total size of the files.
        downloaded_bytes: bytes transferred (or, in a dry run, to transfer).
        network: whether the hub was contacted.
        dry_run: whether this is only a plan.
        elapsed_s: wall time.
        notes: remarks for people (e.g. a generated demo model).
    """

    model_dir: Path
    manifest: Path | None
    source: str
    repo_id: str
    revision: str | None
    requested_revision: str | None
    endpoint: str | None
    files: list[FetchedFile] = field(default_factory=list)
    bytes: int = 0
    downloaded_bytes: int = 0
    network: bool = True
    dry_run: bool = False
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-able data, secrets redacted."""
        data = asdict(self)
        data["model_dir"] = str(self.model_dir)
        data["manifest"] = str(self.manifest) if self.manifest else None
        data["files"] = [f.to_json() for f in self.files]
        return redact_obj(data)


def partial_path(dest: Path, name: str) -> Path:
    """Where the partial transfer of file ``name`` lives while it downloads into ``dest``."""
    return Path(dest) / STAGING_NAME / f"{name}.part"


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
    model: ModelSection, source: _Src, dest: Path, workers: int, listing: list[RemoteFile] | None
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
    return sorted(chosen, key=lambda f: f.path)


class _Fetcher:
    """One fetch into ``dest``: reuse what is verified on disk, transfer the rest in parallel."""

    def __init__(self, source: _Src, dest: Path, workers: int, progress: FetchProgress) -> None:
        self.source = source
        self.dest = dest
        self.workers = workers
        self.progress = progress
        self.cancel = threading.Event()

    def sink(self, _n: int) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    def transfer(self, rf: RemoteFile) -> FetchedFile:
        part = partial_path(self.dest, rf.path)
        # Resuming is safe only when a checksum will catch a partial file of the wrong bytes.
        resumable = rf.local is None and bool(rf.sha256 or rf.git_sha1)
        resumed = resumable and part.is_file() and 0 < part.stat().st_size <= rf.size
        self.progress.start(rf.path, part)
        problem: BadFile | None = None
        for attempt in (1, 2):
            if self.cancel.is_set():
                raise Cancelled()
            got = self.source.download(rf, part, fresh=attempt > 1 or not resumable, sink=self.sink)
            try:
                digest, how = verify_file(got, rf)
            except BadFile as bad:
                problem = bad
                log.warning("%s: %s; %s", rf.path, bad, "transferring it again" if attempt == 1 else "giving up")
                got.unlink(missing_ok=True)
                continue
            target = self.dest / safe_relpath(rf.path, self.dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, target)
            self.progress.finish(rf.path, rf.size)
            if rf.local is not None:
                action = "copied"
            else:
                action = "redownloaded" if attempt > 1 else "resumed" if resumed else "downloaded"
            return FetchedFile(rf.path, rf.size, digest, how, action)
        what = "copied" if rf.local is not None else "downloaded"
        raise FetchError(
            f"{rf.path}: {problem} — {what} twice from {self.source.where()} and still bad. "
            + (
                "The source file is damaged: regenerate or replace it."
                if rf.local is not None
                else "The hub's copy (or a proxy in between) is damaged: try another endpoint or revision, "
                "or report it to the repo owner."
            ),
            model=self.source.repo_id,
        )

    def run(self, todo: list[RemoteFile]) -> list[FetchedFile]:
        done: list[FetchedFile] = []
        if not todo:
            return done
        # Largest first, so the long transfers overlap the short ones.
        order = sorted(todo, key=lambda f: -f.size)
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fetch")
        futures: list[Future[FetchedFile]] = [pool.submit(self.transfer, rf) for rf in order]
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=_TICK_S, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done.append(fut.result())
                self.progress.tick(f"{len(done)}/{len(order)} files from {self.source.where()}")
        except BaseException:
            # Stop every transfer at its next chunk; partial files stay for the next run.
            self.cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return done


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


def _plan(model: ModelSection, source: _Src, dest: Path, started: float, notes: list[str]) -> FetchResult:
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
    source: _Src,
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

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for got in pool.map(check, candidates):
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
        fetcher = _Fetcher(source, dest, workers, bar)
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


def run_stage(ctx: ReleaseContext) -> StageResult:
    """The fetch stage: the release's weights into ``ctx.layout.source_dir``.

    Options read from ``ctx.options``: ``fetch_workers`` (int, default 8).

    Returns:
        Outputs ``model_dir``, ``manifest``, ``files``, ``bytes``, ``revision``, ``source``
        (plus ``endpoint``, ``downloaded_bytes``, ``network``); a ``files`` table.
    """
    model = ctx.config.model
    result = fetch_model(
        model,
        dest=ctx.layout.source_dir,
        workers=int(ctx.options.get("fetch_workers", 8)),
        dry_run=ctx.dry_run,
        progress=lambda fraction, message: ctx.progress("fetch", fraction, message),
    )
    rev = (result.revision or "unpinned")[:19]
    size = _human(result.bytes)
    if result.dry_run:
        summary = (
            f"Plan: {len(result.files)} files ({size}) of `{model.repo_id}` at `{rev}` from "
            f"{result.source}; {_human(result.downloaded_bytes)} to transfer."
        )
    elif result.downloaded_bytes == 0:
        summary = f"{len(result.files)} files ({size}) of `{model.repo_id}` at `{rev}` already fetched and verified."
    else:
        summary = (
            f"Fetched {len(result.files)} files ({size}) of `{model.repo_id}` at `{rev}` from "
            f"{result.source}; {_human(result.downloaded_bytes)} transferred, every file verified."
        )
    if result.notes:
        summary += " " + " ".join(n[0].upper() + n[1:] + "." for n in result.notes)
    outputs: dict[str, Any] = {
        "model_dir": str(result.model_dir),
        "manifest": str(result.manifest) if result.manifest else None,
        "files": len(result.files),
        "bytes": result.bytes,
        "revision": result.revision,
        "source": result.source,
        "endpoint": result.endpoint,
        "downloaded_bytes": result.downloaded_bytes,
        "network": result.network,
    }
    table = [
        {"file": f.path, "size": f.size, "sha256": f.sha256, "verified_by": f.verified_by, "action": f.action}
        for f in result.files
    ]
    return StageResult(stage="fetch", summary=summary, outputs=outputs, tables={"files": table})


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
