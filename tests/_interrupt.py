"""Interrupting the main thread in a test, as Ctrl-C or a SIGTERM handler does to a run."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def interrupted_after(seconds: float) -> Iterator[list[float]]:
    """Expect the block to end in KeyboardInterrupt: SIGINT reaches the main thread after ``seconds``.

    Yields a list that holds, after the block, the seconds from the start to the end of
    the block.  A real signal, sent to the main thread, so that a wait it is blocked in is
    interrupted as a run's would be.
    """
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()
    timer = threading.Timer(seconds, signal.pthread_kill, args=(main, signal.SIGINT))
    took: list[float] = []
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            yield took
    finally:
        timer.cancel()
        took.append(time.monotonic() - started)
