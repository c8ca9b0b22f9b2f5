"""Publishing artifacts beside the work: a stage task hands them over and goes on.

Each artifact is one call to the Prefect API.  A task queues its artifacts here, where a
few threads create them in the task run's context (so each is linked to its task run),
and the flow waits for all of them before it ends (:func:`flush`).  A failure to create
one is raised there, as it would have been in the task.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["flush", "later"]

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="flagrelease-artifacts")
_pending: list[Future[Any]] = []
_lock = threading.Lock()


def later(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call ``fn(*args, **kwargs)`` in the background, in the caller's context (its run)."""
    future = _POOL.submit(contextvars.copy_context().run, fn, *args, **kwargs)
    with _lock:
        _pending.append(future)


def flush() -> None:
    """Wait for everything handed over so far; raise the first failure."""
    with _lock:
        pending = list(_pending)
        _pending.clear()
    for future in pending:
        future.result()
