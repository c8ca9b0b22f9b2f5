"""The transfers of one fetch: files in parallel, each verified, retried once, then placed."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from flagrelease.errors import FetchError
from flagrelease.fetch._names import safe_relpath
from flagrelease.fetch._sources import Cancelled, RemoteFile, Source
from flagrelease.fetch._types import FetchedFile, partial_path
from flagrelease.fetch._verify import BadFile, FetchProgress, verify_file

__all__ = ["Transfers"]

log = logging.getLogger("flagrelease.fetch")

_TICK_S = 0.25


class Transfers:
    """The transfers of one fetch into ``dest``, ``workers`` at a time, stoppable at every chunk."""

    def __init__(self, source: Source, dest: Path, workers: int, progress: FetchProgress) -> None:
        self.source = source
        self.dest = dest
        self.workers = workers
        self.progress = progress
        self.cancel = threading.Event()

    def sink(self, _n: int) -> None:
        """Byte callback of every transfer: stops it at its next chunk once cancelled."""
        if self.cancel.is_set():
            raise Cancelled()

    def transfer(self, rf: RemoteFile) -> FetchedFile:
        """Transfer, verify and place one file; a bad copy is transferred once more, then named."""
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
        """Transfer every file of ``todo``, largest first; on any error stop the others and re-raise."""
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
