"""The card's example request: one the served model answered correctly during evaluation.

The request is rebuilt from lm-eval's per-sample log of the target (``--log_samples``),
exactly as lm-eval's OpenAI-compatible models sent it (chat messages or a prompt, the
token limit, temperature and stop sequences), so the card's ``curl`` asks what the
evaluation asked and can say what the model answered.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flagrelease.config import ReleaseConfig
from flagrelease.evaluate.outputs import EvalOutputs
from flagrelease.samples import find_samples

__all__ = ["eval_example"]

log = logging.getLogger("flagrelease.card")


def _request(arguments: Any) -> dict[str, Any] | None:
    """The OpenAI request body of a logged generation (model name left out), or None."""
    args = arguments.get("gen_args_0") if isinstance(arguments, dict) else None
    if not isinstance(args, dict):
        return None
    prompt, kwargs = args.get("arg_0"), args.get("arg_1")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not isinstance(kwargs, dict):
        return None
    body: dict[str, Any] = {}
    try:
        messages = json.loads(prompt)
    except ValueError:
        messages = None
    if isinstance(messages, list) and all(isinstance(m, dict) and "role" in m for m in messages):
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    gen = dict(kwargs)
    gen.pop("do_sample", None)
    body["max_tokens"] = int(gen.pop("max_gen_toks", 16))
    body["temperature"] = float(gen.pop("temperature", 0.0))
    until = gen.pop("until", None)
    if isinstance(until, str):
        until = [until]
    if until:
        body["stop"] = [str(s) for s in until][:4]
    body.update({k: v for k, v in gen.items() if isinstance(v, int | float | str) and not isinstance(v, bool)})
    return body


def _answer(row: dict[str, Any]) -> str | None:
    resps = row.get("resps")
    while isinstance(resps, list) and resps:
        resps = resps[0]
    return resps if isinstance(resps, str) else None


def eval_example(cfg: ReleaseConfig, evals: EvalOutputs | None) -> dict[str, Any] | None:
    """A request the target answered correctly during evaluation, or None when there is none.

    Args:
        cfg: the release (its tasks, in order, are searched).
        evals: the eval stage's outputs; the ``target`` variant's lm-eval folder is read.

    Returns:
        ``task``, ``label``, ``item``, ``api`` (``chat`` or ``completions``), ``body`` (the
        request, without the model name), ``answer`` (what the target answered) and
        ``expected`` (the item's reference answer).
    """
    target = evals.variants.get("target") if evals is not None else None
    if target is None or not target.dir or not Path(target.dir).is_dir():
        return None
    files = find_samples(Path(target.dir))
    for task in cfg.eval.tasks:
        metric = task.metric or "exact_match"
        for path in files.get(task.name, []):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict) or row.get(metric) not in (1, 1.0, True):
                    continue
                body = _request(row.get("arguments"))
                answer = _answer(row)
                if body is None or answer is None:
                    continue
                return {
                    "task": task.name,
                    "label": task.label or task.name,
                    "item": row.get("doc_id"),
                    "api": "chat" if "messages" in body else "completions",
                    "body": body,
                    "answer": answer,
                    "expected": str(row.get("target", "")),
                }
    log.debug("card: no correctly answered generation in the target's samples; the card's example is generic")
    return None
