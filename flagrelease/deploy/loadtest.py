"""A short, bounded load test of a served model: a smoke request and a concurrency sweep.

For each concurrency level, ``requests_per_level`` streaming completions are sent with
at most that many in flight; each request's time to first token (TTFT) is the time until
the first streamed chunk that carries text, and its output tokens come from the stream's
final usage chunk.  ``ignore_eos`` makes every request generate ``max_tokens`` tokens, so
levels are comparable.  Every request has a timeout, and a level stops issuing requests
once its time budget (``load_test.timeout_s``) is spent.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from flagrelease.config import LoadTestSettings
from flagrelease.errors import DeployError

__all__ = ["RequestResult", "percentile", "run_load_test", "smoke_test"]

log = logging.getLogger("flagrelease.deploy")


@dataclass
class RequestResult:
    """One streamed completion."""

    ok: bool
    ttft_s: float | None = None
    latency_s: float = 0.0
    output_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def smoke_test(
    base_url: str, *, model_name: str, prompt: str, max_tokens: int = 8, timeout_s: float = 120
) -> dict[str, Any]:
    """One greedy completion; the server must answer with at least one token.

    Returns:
        ``text``, ``completion_tokens`` and ``latency_s``.

    Raises:
        DeployError: the request failed or produced no tokens.
    """
    body = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    start = time.monotonic()
    try:
        resp = httpx.post(f"{base_url}/v1/completions", json=body, timeout=timeout_s, trust_env=False)
        resp.raise_for_status()
        data = resp.json()
    except (httpx.HTTPError, ValueError) as err:
        raise DeployError(f"the smoke request to {base_url}/v1/completions failed: {err}") from err
    tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    if tokens < 1:
        raise DeployError(f"the smoke request to {base_url} produced no tokens: {json.dumps(data)[:500]}")
    return {
        "text": data["choices"][0].get("text", ""),
        "completion_tokens": tokens,
        "latency_s": round(time.monotonic() - start, 3),
    }


def _one(client: httpx.Client, url: str, body: dict[str, Any]) -> RequestResult:
    start = time.monotonic()
    ttft: float | None = None
    tokens = 0
    chunks = 0
    try:
        with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                return RequestResult(
                    ok=False, latency_s=time.monotonic() - start, error=f"HTTP {resp.status_code}: {resp.text[:200]}"
                )
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.monotonic() - start
                usage = event.get("usage")
                if usage:
                    tokens = int(usage.get("completion_tokens") or 0)
    except (httpx.HTTPError, ValueError) as err:
        return RequestResult(ok=False, latency_s=time.monotonic() - start, error=f"{type(err).__name__}: {err}")
    return RequestResult(ok=True, ttft_s=ttft, latency_s=time.monotonic() - start, output_tokens=tokens or chunks)


def _level(base_url: str, model_name: str, settings: LoadTestSettings, concurrency: int) -> dict[str, Any]:
    url = f"{base_url}/v1/completions"
    body = {
        "model": model_name,
        "prompt": settings.prompt,
        "max_tokens": settings.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    budget_end = time.monotonic() + settings.timeout_s
    lock = threading.Lock()
    stop = threading.Event()  # set when the caller is interrupted: the workers issue nothing more
    issued = 0

    def worker(client: httpx.Client) -> list[RequestResult]:
        nonlocal issued
        out: list[RequestResult] = []
        while True:
            with lock:
                if stop.is_set() or issued >= settings.requests_per_level or time.monotonic() >= budget_end:
                    return out
                issued += 1
            out.append(_one(client, url, body))

    timeout = httpx.Timeout(settings.timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.monotonic()
    with (
        httpx.Client(timeout=timeout, limits=limits, trust_env=False) as client,
        ThreadPoolExecutor(concurrency) as pool,
    ):
        try:
            results = [r for rs in pool.map(lambda _: worker(client), range(concurrency)) for r in rs]
        except BaseException:
            # Interrupted (SIGTERM, Ctrl-C, Prefect's TerminationSignal): leaving the pool waits
            # only for the requests in flight, not for the rest of the level.
            stop.set()
            raise
    wall = max(time.monotonic() - start, 1e-9)
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    lat = [r.latency_s * 1000 for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)

    def _r(v: float | None, nd: int = 1) -> float | None:
        return None if v is None else round(v, nd)

    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / wall, 2),
        "ttft_p50_ms": _r(percentile(ttfts, 50)),
        "ttft_p99_ms": _r(percentile(ttfts, 99)),
        "latency_p50_ms": _r(percentile(lat, 50)),
        "errors": sorted({r.error for r in results if r.error})[:3],
    }


def run_load_test(base_url: str, *, model_name: str, settings: LoadTestSettings) -> list[dict[str, Any]]:
    """Run the concurrency sweep of ``settings`` against ``base_url``.

    Args:
        base_url: ``http://host:port`` of the server.
        model_name: the served model name.
        settings: ``serve.load_test``.

    Returns:
        One row per concurrency level: requests, ok, failed, duration_s, requests_per_s,
        output_tokens, output_tokens_per_s, ttft_p50_ms, ttft_p99_ms, latency_p50_ms, errors.

    Raises:
        DeployError: every request of a level failed.
    """
    rows = []
    for level in settings.concurrency:
        row = _level(base_url, model_name, settings, level)
        log.info(
            "load test: concurrency %d: %d/%d ok, %.2f req/s, %.1f tok/s, TTFT p50 %s ms",
            level,
            row["ok"],
            row["requests"],
            row["requests_per_s"],
            row["output_tokens_per_s"],
            row["ttft_p50_ms"],
        )
        if row["ok"] == 0:
            raise DeployError(
                f"load test: every request at concurrency {level} failed against {base_url}: {row['errors']}"
            )
        rows.append(row)
    return rows
