"""Throughput: the FlagGems on/off trials the gate judges, and one level at the eval concurrency.

:func:`measure_interleaved` measures two arms (FlagGems on and off, or, in the A/A
benchmark, off and off) the way a noisy machine needs:

* the same serving set-up for both arms (the same release, engine args and runtime; only
  FlagGems differs), never while an eval runs;
* a warm-up of each arm before the first trial;
* rounds of one trial per arm, the order alternating (A B, B A, A B, ...), so that a
  slow drift of the machine's load falls on both arms alike;
* every trial the same: ``requests`` streamed completions at a fixed ``concurrency``, the
  same prompt, exactly ``max_tokens`` output tokens each (``ignore_eos``), after
  ``settle_s`` idle seconds: a vLLM worker keeps polling its queue for a second after its
  last request, and with both servers up that would slow whichever arm runs next.

When the servers run on this machine (the local runtime), their CPU scheduling groups
(and this process's, which sends the load) get the highest priority the OS grants for
the measurement (Linux autogroup nice -19, restored after; skipped without the right):
on a shared host the other tenants' bursts otherwise land on the trials, and a trial
then measures them instead of FlagGems.  Each trial also records the CPU seconds the
server's process tree spent on it (``gates.throughput.metric: cpu`` compares those).

Both arms are served at once (``servers: both``; only one is ever under load), or one at
a time (``alternate``, for chips where two servers do not fit): four servings in the
order A B B A, each running half the rounds' trials of its arm, so that a linear drift
still cancels while the model is loaded only four times.  Every trial is recorded; the
verdict (a bootstrap interval of the ratio) is the gate's (:mod:`flagrelease.gate.stats`).
The load itself is one level of the deploy stage's load test, lent by the pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from flagrelease.config import LoadTestSettings, ThroughputGate
from flagrelease.errors import DeployError, EvalError
from flagrelease.evaluate._run import Endpoint, server_root

__all__ = ["Arm", "LoadFn", "measure_interleaved", "measure_throughput", "servers_mode"]

log = logging.getLogger("flagrelease.evaluate")

#: One load-test level: ``(root_url, *, model_name, settings) -> rows`` (the deploy stage's ``run_load_test``).
LoadFn = Callable[..., list[dict[str, Any]]]

#: The autogroup nice value of the servers (and the load's sender) while trials run.
_TRIAL_NICE = -19


@dataclass(frozen=True)
class Arm:
    """One side of a throughput comparison.

    Attributes:
        name: ``target`` (FlagGems on), ``target_gems_off``, or a benchmark's label.
        serve: a fresh server of this arm, as a context manager yielding its endpoint.
    """

    name: str
    serve: Callable[[], AbstractContextManager[Endpoint]]


def _level(
    endpoint: Endpoint,
    *,
    load_test: LoadFn,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt: str,
    timeout_s: float,
) -> dict[str, Any]:
    settings = LoadTestSettings(
        concurrency=[concurrency],
        requests_per_level=requests,
        max_tokens=max_tokens,
        prompt=prompt,
        timeout_s=timeout_s,
    )
    try:
        rows = load_test(server_root(endpoint.base_url), model_name=endpoint.model_name, settings=settings)
    except DeployError as err:
        raise EvalError(f"throughput measurement against {endpoint.base_url} failed: {err.message}") from err
    return rows[0]


def measure_throughput(
    endpoint: Endpoint,
    *,
    concurrency: int,
    load_test: LoadFn,
    requests: int = 16,
    max_tokens: int = 32,
    prompt: str = "Write a short sentence about the sea.",
    timeout_s: float = 300,
) -> float:
    """Output tokens per second at ``concurrency``, over a bounded burst of requests.

    Args:
        endpoint: the served model.
        concurrency: requests in flight.
        load_test: one load-test level (the deploy stage's ``run_load_test``).
        requests: requests sent.
        max_tokens: output tokens of each (``ignore_eos``).
        prompt: the prompt of every request.
        timeout_s: the level's time budget.

    Raises:
        EvalError: every request failed.
    """
    row = _level(
        endpoint,
        load_test=load_test,
        concurrency=concurrency,
        requests=requests,
        max_tokens=max_tokens,
        prompt=prompt,
        timeout_s=timeout_s,
    )
    return float(row["output_tokens_per_s"])


def _cpu_seconds(endpoint: Endpoint) -> float | None:
    """CPU seconds (user + system) the server's process tree has used so far; None when it is not local."""
    pid = getattr(endpoint, "pid", None)
    if not isinstance(pid, int):
        return None
    try:
        root = psutil.Process(pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
    except psutil.Error:
        return None
    return total


@contextlib.contextmanager
def _priority(pids: Sequence[int | None]) -> Iterator[bool]:
    """Raise the CPU scheduling groups of ``pids`` (Linux autogroups) to nice -19; restore them after.

    Yields whether any was raised (not without ``CAP_SYS_NICE``, or without autogroups).
    """
    saved: dict[Path, str] = {}
    for pid in pids:
        if not isinstance(pid, int):
            continue
        path = Path(f"/proc/{pid}/autogroup")
        try:
            old = path.read_text(encoding="ascii").split("nice")[-1].strip()
            path.write_text(str(_TRIAL_NICE), encoding="ascii")
        except (OSError, ValueError):
            continue
        saved.setdefault(path, old)
    try:
        yield bool(saved)
    finally:
        for path, old in saved.items():
            with contextlib.suppress(OSError):
                path.write_text(old, encoding="ascii")


def _local(endpoint: Endpoint) -> list[int | None]:
    pid = getattr(endpoint, "pid", None)
    return [pid, os.getpid()] if isinstance(pid, int) else []


def servers_mode(settings: ThroughputGate, *, chip: str) -> str:
    """``both`` or ``alternate``: what ``servers: auto`` means on ``chip``."""
    if settings.servers != "auto":
        return settings.servers
    return "both" if chip == "cpu" else "alternate"


def measure_interleaved(
    arms: Sequence[Arm],
    *,
    settings: ThroughputGate,
    concurrency: int,
    prompt: str,
    load_test: LoadFn,
    servers: str = "both",
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Measure two arms' output tokens/s in interleaved trials (see the module docstring).

    Args:
        arms: the two arms, ``a`` (FlagGems on) first.
        settings: ``gates.throughput``.
        concurrency: requests in flight during a trial.
        prompt: the prompt of every request (a fixed input length).
        load_test: one load-test level (the deploy stage's ``run_load_test``).
        servers: ``both`` or ``alternate``.
        progress: called with the fraction done and a message.

    Returns:
        ``arms`` (``{"a": name, "b": name}``), ``servers``, ``settings``, ``trials`` (one
        dict per trial: round, position, arm, tok_s, requests, ok, output_tokens,
        duration_s, at_s, cpu_s) and ``seconds`` (wall time, serving included).  ``alternate``
        runs an even number of rounds (``trials`` rounded up).

    Raises:
        EvalError: an arm failed every request of a trial.
    """
    if len(arms) != 2 or arms[0].name == arms[1].name:
        raise ValueError("measure_interleaved needs two arms with different names")
    started = time.monotonic()
    level: dict[str, Any] = {
        "concurrency": concurrency,
        "max_tokens": settings.max_tokens,
        "prompt": prompt,
        "timeout_s": settings.timeout_s,
        "load_test": load_test,
    }
    trials: list[dict[str, Any]] = []
    total = settings.trials * 2
    raised: list[bool] = []

    def trial(endpoint: Endpoint, arm: Arm, rnd: int, position: int) -> None:
        time.sleep(settings.settle_s)
        at = time.monotonic() - started
        cpu_before = _cpu_seconds(endpoint)
        row = _level(endpoint, requests=settings.requests, **level)
        cpu_after = _cpu_seconds(endpoint)
        cpu = None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 3)
        trials.append(
            {
                "round": rnd,
                "position": position,
                "arm": arm.name,
                "tok_s": float(row["output_tokens_per_s"]),
                "requests": int(row["requests"]),
                "ok": int(row["ok"]),
                "output_tokens": int(row["output_tokens"]),
                "duration_s": float(row["duration_s"]),
                "at_s": round(at, 2),
                "cpu_s": cpu,
            }
        )
        if progress is not None:
            progress(len(trials) / total, f"throughput trial {len(trials)}/{total} ({arm.name})")

    def warm(endpoint: Endpoint) -> None:
        if settings.warmup_requests:
            _level(endpoint, requests=settings.warmup_requests, **level)

    def order(rnd: int) -> list[Arm]:
        return list(arms) if rnd % 2 == 0 else [arms[1], arms[0]]

    if servers == "both":
        with contextlib.ExitStack() as stack:
            endpoints = {arm.name: stack.enter_context(arm.serve()) for arm in arms}
            pids = [getattr(e, "pid", None) for e in endpoints.values()]
            raised.append(stack.enter_context(_priority([*pids, os.getpid()] if any(pids) else [])))
            for arm in arms:
                warm(endpoints[arm.name])
            for rnd in range(settings.trials):
                for position, arm in enumerate(order(rnd)):
                    trial(endpoints[arm.name], arm, rnd, position)
    elif servers == "alternate":
        half = math.ceil(settings.trials / 2)
        total = 4 * half
        for block in range(2):
            for position, arm in enumerate(order(block)):
                with arm.serve() as endpoint, _priority(_local(endpoint)) as up:
                    raised.append(up)
                    warm(endpoint)
                    for j in range(half):
                        trial(endpoint, arm, block * half + j, position)
    else:
        raise ValueError(f"servers must be 'both' or 'alternate', got {servers!r}")
    log.info(
        "throughput: %d trials of %s and %s in %.0f s",
        len(trials),
        arms[0].name,
        arms[1].name,
        time.monotonic() - started,
    )
    return {
        "arms": {"a": arms[0].name, "b": arms[1].name},
        "servers": servers,
        "settings": {
            **settings.model_dump(mode="json", exclude={"servers"}),
            "concurrency": concurrency,
            "priority_raised": bool(raised) and all(raised),
        },
        "trials": trials,
        "seconds": round(time.monotonic() - started, 2),
    }
