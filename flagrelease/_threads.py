"""Thread pools that let go when interrupted.

``with ThreadPoolExecutor() as pool: pool.map(...)`` waits, when the block is left by an
exception (SIGTERM, Ctrl-C, Prefect's ``TerminationSignal``, a failed call), for every
call still queued, not only those running: a run asked to stop would first hash or
probe everything that was left.  :func:`map_in_threads` drops the queued calls instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["map_in_threads"]

T = TypeVar("T")
R = TypeVar("R")


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], *, workers: int, name: str) -> list[R]:
    """``[fn(x) for x in items]``, ``workers`` calls at a time, in order.

    When a call raises or the caller is interrupted, the calls not yet started are
    dropped; those running finish (a pool cannot stop a thread), then the error is raised.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name)
    try:
        return list(pool.map(fn, items))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
