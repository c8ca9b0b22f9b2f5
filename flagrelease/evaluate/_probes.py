"""Checks of a served variant before its long eval (FlagRelease runs both).

* the stability probe (:func:`stability_probe`): one greedy request; the server must
  answer it with at least one token;
* the truncation probe: the first ``eval.probes.items_per_task`` items of each
  generative task, with the eval's own prompts and sampling settings; when more than
  ``eval.probes.max_truncated`` of the answers stop at ``max_tokens``, the eval stops
  (the lm-eval runner runs it, :mod:`flagrelease.evaluate._lmeval_runner`, and its
  answers are cached for the eval that follows).

A server that fails either stops the eval with an :class:`~flagrelease.errors.EvalError`
whose ``kind`` is ``unstable`` or ``truncated``, before hours of benchmarks.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import httpx

from flagrelease.errors import EvalError

__all__ = ["PROBE_PROMPT", "stability_probe", "truncation_advice"]

#: The stability probe's prompt: short, and answerable by any language model.
PROBE_PROMPT = "1 + 1 ="


def _unstable(variant: str, url: str, why: str) -> EvalError:
    err = EvalError(
        f"[{variant}] the server at {url} failed the stability probe (one greedy request before the eval): {why}. "
        "Nothing was evaluated; read the server log, fix the serving configuration and run the eval again"
    )
    err.kind = "unstable"  # type: ignore[attr-defined]
    return err


def stability_probe(root: str, *, model_name: str, variant: str, timeout_s: float = 120) -> dict[str, Any]:
    """Send one greedy completion; the server must answer it sanely.

    Args:
        root: the server's root URL (``http://host:port``).
        model_name: the served model name.
        variant: the variant's name, for the message.
        timeout_s: the request's timeout.

    Returns:
        ``latency_s``, ``completion_tokens``, ``finish_reason`` and the start of ``text``.

    Raises:
        EvalError: (``kind`` ``unstable``) the request failed, timed out, or the answer is
            malformed, empty or carries non-finite log-probabilities.
    """
    body = {"model": model_name, "prompt": PROBE_PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 1}
    started = time.monotonic()
    try:
        resp = httpx.post(f"{root}/v1/completions", json=body, timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as err:
        raise _unstable(variant, root, f"{type(err).__name__}: {err}") from err
    if resp.status_code != 200:
        raise _unstable(variant, root, f"HTTP {resp.status_code}: {resp.text[:300]}")
    try:
        data = resp.json()
        choice = data["choices"][0]
        text = choice["text"]
        tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise _unstable(variant, root, f"malformed answer {resp.text[:300]!r}") from err
    if not isinstance(text, str) or tokens < 1:
        raise _unstable(variant, root, f"no tokens in the answer {json.dumps(data)[:300]}")
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
    if any(isinstance(x, float) and not math.isfinite(x) for x in logprobs):
        raise _unstable(variant, root, f"non-finite log-probabilities {logprobs}")
    return {
        "latency_s": round(time.monotonic() - started, 3),
        "completion_tokens": tokens,
        "finish_reason": choice.get("finish_reason"),
        "text": text[:80],
    }


def truncation_advice(max_tokens: int) -> str:
    """What to do when the truncation probe stops the eval."""
    return (
        "the server at {url} failed the truncation probe: {message}. Answers cut at max_tokens "
        f"(eval.generation.max_tokens = {max_tokens}) would be scored as they are. Raise eval.generation.max_tokens "
        "(reasoning models need thousands of tokens), or, if FlagGems is on, suspect a FlagGems operator that "
        "makes the model ramble: the gate compares with FlagGems off and bisects the operators"
    )
