"""The vLLM general plugin that turns FlagGems on in every serving process.

vLLM calls :func:`register` (entry point ``vllm.general_plugins: flagrelease_gems``) in
each of its processes: the API server, the engine core and every worker.  When
``USE_FLAGGEMS`` is 1/true/yes:

- on a GPU chip (``GEMS_VENDOR`` names a vendor other than ``cpu``, or CUDA is present)
  it imports ``flag_gems`` and calls ``flag_gems.enable(unused=<excluded>, record=True,
  once=True, path=<record log>)`` (only the keyword arguments the installed FlagGems
  accepts).  When ``flag_gems`` cannot be imported it raises, so the server fails at
  start with a message that says what to do; there is no silent fallback to native
  kernels, which would make a "FlagGems on" evaluation a lie.
- on the ``cpu`` chip (``GEMS_VENDOR=cpu``, or no vendor and no CUDA) it enables
  :mod:`flagrelease.gems.oplib`, flagrelease's CPU reference operators, through the same hook.

Excluded operators come from ``FLAGRELEASE_GEMS_EXCLUDE`` (comma separated).  When
``FLAGRELEASE_GEMS_RECORD`` names a folder, each process writes there

- ``plugin-<pid>.json`` at once: the mode, library version, operators enabled/excluded;
- ``ops-<pid>.json``: ``{operator: calls}`` for the operators that ran, rewritten
  atomically every second while it changes and at exit (the deploy stage merges them).

``FLAGRELEASE_GEMS_INJECT="op[:mode]"`` breaks one operator on purpose (cpu only; modes
in :mod:`flagrelease.gems.oplib`), so that the gate's operator bisection can be tested.

This module must import without torch or vLLM (vLLM swallows import errors of plugins,
so everything that can fail happens inside :func:`register`, where errors propagate).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from flagrelease import constants

__all__ = ["PluginState", "register", "state"]

_FLUSH_S = 1.0
_GEMS_LOG_LINE = re.compile(r"^\[\w+\]\s+flag_gems\.(?:[\w.]*\.)?(\w+):")


class PluginState:
    """What the plugin did in this process.

    Attributes:
        mode: ``off``, ``oplib`` or ``flag_gems``.
        library: the enabled library object (an :class:`flagrelease.gems.oplib.OpLib`, or the
            ``flag_gems`` module).
        excluded: operators left off.
        record_dir: where the record is written, if anywhere.
    """

    def __init__(self) -> None:
        self.mode = "off"
        self.library: Any = None
        self.version: str | None = None
        self.enabled: list[str] = []
        self.excluded: list[str] = []
        self.inject: str | None = None
        self.record_dir: Path | None = None
        self.gems_log: Path | None = None
        self._last: dict[str, int] | None = None
        self._lock = threading.Lock()

    def counts(self) -> dict[str, int]:
        """Calls per operator so far (FlagGems: one per call site, from its record log)."""
        if self.mode == "oplib" and self.library is not None:
            return dict(self.library.counts())
        if self.mode == "flag_gems" and self.gems_log is not None and self.gems_log.is_file():
            found: Counter[str] = Counter()
            with open(self.gems_log, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    m = _GEMS_LOG_LINE.match(line)
                    if m:
                        found[m.group(1)] += 1
            return dict(found)
        return {}

    def flush(self) -> None:
        """Write ``ops-<pid>.json`` if the counts changed since the last write."""
        if self.record_dir is None:
            return
        from flagrelease._atomic import atomic_write_json

        with self._lock:
            now = self.counts()
            if now == self._last:
                return
            atomic_write_json(self.record_dir / f"ops-{os.getpid()}.json", now)
            self._last = now


#: This process's plugin state.
state = PluginState()
_registered = False


def _say(message: str) -> None:
    # vLLM's logging does not carry our logger's records; stderr lands in the server log.
    print(f"[flagrelease plugin pid={os.getpid()}] {message}", file=sys.stderr, flush=True)


def _use_oplib() -> bool:
    vendor = constants.gems_vendor()
    if vendor is not None:
        return vendor == "cpu"
    try:
        import torch
    except ImportError:  # pragma: no cover - vLLM always has torch
        return True
    return not torch.cuda.is_available()


def _enable_flag_gems(excluded: list[str]) -> None:
    try:
        import flag_gems
    except ImportError as err:
        from flagrelease.errors import DeployError

        vendor = constants.gems_vendor() or "cuda"
        raise DeployError(
            f"USE_FLAGGEMS is on (GEMS_VENDOR={vendor}) but flag_gems cannot be imported in {sys.executable}: "
            f"{err}. Install FlagGems into the serving environment (pip install flag-gems, or the vendor's "
            "build), or serve with FlagGems off (serve.flaggems.enabled: false, USE_FLAGGEMS=0)."
        ) from err
    import inspect

    params = inspect.signature(flag_gems.enable).parameters
    kwargs: dict[str, Any] = {}
    if "unused" in params:
        kwargs["unused"] = excluded
    elif excluded:
        from flagrelease.errors import DeployError

        raise DeployError(
            f"this flag_gems ({getattr(flag_gems, '__version__', '?')}) has no enable(unused=...); "
            f"cannot exclude {', '.join(excluded)}: upgrade FlagGems or clear serve.flaggems.excluded_ops"
        )
    if state.record_dir is not None and {"record", "path"} <= set(params):
        state.gems_log = state.record_dir / f"flag_gems-{os.getpid()}.log"
        kwargs.update(record=True, path=str(state.gems_log))
        if "once" in params:
            kwargs["once"] = True
    flag_gems.enable(**kwargs)
    state.mode, state.library = "flag_gems", flag_gems
    state.version = getattr(flag_gems, "__version__", None)
    if state.version is None:
        from importlib import metadata

        try:
            state.version = metadata.version("flag_gems")
        except metadata.PackageNotFoundError:
            state.version = None
    all_ops = getattr(flag_gems, "all_ops", None)
    state.enabled = sorted(all_ops()) if callable(all_ops) else []


def _enable_oplib(excluded: list[str], inject: str | None) -> None:
    from flagrelease import __version__
    from flagrelease.gems import oplib

    lib = oplib.enable(exclude=excluded, inject=inject)
    state.mode, state.library, state.version = "oplib", lib, __version__
    state.enabled = list(lib.enabled)


def _start_recording() -> None:
    from flagrelease._atomic import atomic_write_json

    assert state.record_dir is not None
    atomic_write_json(
        state.record_dir / f"plugin-{os.getpid()}.json",
        {
            "pid": os.getpid(),
            "mode": state.mode,
            "version": state.version,
            "enabled": state.enabled,
            "excluded": state.excluded,
            "inject": state.inject,
            "argv0": sys.argv[0] if sys.argv else "",
        },
    )
    state.flush()
    atexit.register(state.flush)

    def loop() -> None:
        while True:
            threading.Event().wait(_FLUSH_S)
            try:
                state.flush()
            except OSError:  # the record folder went away: the server is being torn down
                return

    threading.Thread(target=loop, name="flagrelease-gems-record", daemon=True).start()


def register() -> None:
    """Enable FlagGems (or the CPU reference operators) in this process, once.

    Raises:
        DeployError: FlagGems is on for a GPU vendor and ``flag_gems`` is not importable.
        ValueError: ``FLAGRELEASE_GEMS_INJECT`` names an unknown operator or mode.
    """
    global _registered
    if _registered:
        return
    _registered = True
    if not constants.use_flaggems():
        return
    state.excluded = constants.gems_exclude()
    state.inject = constants.gems_inject()
    state.record_dir = constants.gems_record_dir()
    if state.record_dir is not None:
        state.record_dir.mkdir(parents=True, exist_ok=True)
    if _use_oplib():
        _enable_oplib(state.excluded, state.inject)
    else:
        if state.inject:
            raise ValueError(
                "FLAGRELEASE_GEMS_INJECT works with the CPU reference operators only (GEMS_VENDOR=cpu); unset it"
            )
        _enable_flag_gems(state.excluded)
    if state.record_dir is not None:
        _start_recording()
    _say(
        f"{state.mode} {state.version or ''} enabled: {len(state.enabled)} operators"
        + (f", excluded: {','.join(state.excluded)}" if state.excluded else "")
        + (f", injected fault: {state.inject}" if state.inject else "")
    )
