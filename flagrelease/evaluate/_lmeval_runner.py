"""The runner that drives lm-eval in a child process.

``python -m flagrelease.evaluate._lmeval_runner SPEC.json`` runs lm-eval's
``simple_evaluate`` once per (task, pass) against an OpenAI-compatible endpoint, with
two strict subclasses of lm-eval's ``local-completions`` and ``local-chat-completions``
models.  They check the shape of every response (a malformed one stops the run with a
clear error instead of being scored as a wrong answer) and keep every response in a
SQLite cache keyed by the exact request payload (prompt, sampling settings, seed), so
that a run cut short by a dying server resumes where it stopped.  The runner reports
its outcome in a JSON file named by the spec.  Reading the output is
:mod:`flagrelease.samples`.

A spec may ask for a truncation probe first (``probe``): the first items of each
generative task run alone, and when too many answers stop at ``max_tokens`` the runner
stops (error kind ``truncated``) before the long runs, which reuse the probe's answers.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flagrelease.samples import canonical_json as _canonical
from flagrelease.samples import sha256_text as _sha256

__all__ = [
    "MalformedResponse",
    "NonFiniteOutput",
    "RequestRejected",
    "ResponseCache",
    "TruncatedAnswers",
    "main",
    "validate_response",
]


# --------------------------------------------------------------------------------------
# The response cache and strict response checks
# --------------------------------------------------------------------------------------
class MalformedResponse(RuntimeError):
    """The server answered 200 with a body that is not a valid completion."""


class RequestRejected(RuntimeError):
    """The server refused a request (HTTP 4xx); retrying will not help."""


class NonFiniteOutput(RuntimeError):
    """The server computed NaN or infinite values (it cannot even encode them as JSON)."""


class TruncatedAnswers(RuntimeError):
    """Too many answers of the truncation probe stopped at ``max_tokens``."""


class ResponseCache:
    """Responses by request payload, in a SQLite file that survives crashes.

    Every response is committed as soon as it arrives, so a run that dies keeps what it
    got.  Keys are SHA-256 of the canonical JSON of the API path and the payload
    (prompt, sampling settings and seed), so different passes never share entries.  The
    file itself is per serving configuration (the caller names it).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT NOT NULL)")
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(url: str, payload: dict[str, Any]) -> str:
        """The cache key of a request: the API path and the payload, not host or port.

        A restarted server usually listens on another port; its answers to the same
        request are the ones already cached.
        """
        path = urlsplit(url).path.rstrip("/")
        return _sha256(_canonical({"path": path, "payload": payload}))

    def get(self, key: str) -> Any | None:
        """The cached body for ``key``, or None."""
        with self._lock:
            row = self._db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, body: Any) -> None:
        """Store ``body`` under ``key`` (committed at once)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses (key, body) VALUES (?, ?)", (key, json.dumps(body)))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


def _short(body: Any, limit: int = 300) -> str:
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_response(body: Any, *, generate: bool, chat: bool, n_prompts: int = 1) -> None:
    """Check that ``body`` is a usable completions / chat completions response.

    Raises:
        MalformedResponse: what is wrong, with the start of the body.
    """
    where = "chat completion" if chat else ("completion" if generate else "loglikelihood completion")

    def bad(why: str) -> MalformedResponse:
        return MalformedResponse(f"malformed {where} response: {why}; body: {_short(body)}")

    if not isinstance(body, dict):
        raise bad("the body is not a JSON object")
    if "error" in body and body.get("error"):
        raise bad("the server returned an error object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise bad("no 'choices' list")
    if chat:
        for ch in choices:
            msg = ch.get("message") if isinstance(ch, dict) else None
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise bad("a choice has no 'message.content' string (a reasoning parser may have moved it)")
        return
    if len(choices) != n_prompts:
        raise bad(f"{len(choices)} choices for {n_prompts} prompt(s)")
    for ch in choices:
        if not isinstance(ch, dict) or not isinstance(ch.get("index"), int):
            raise bad("a choice has no integer 'index'")
        if generate:
            if not isinstance(ch.get("text"), str):
                raise bad("a choice has no 'text' string")
            continue
        lp = ch.get("logprobs")
        if not isinstance(lp, dict):
            raise bad("a choice has no 'logprobs' object (does the server support echo with logprobs?)")
        toks, tops = lp.get("token_logprobs"), lp.get("top_logprobs")
        if not isinstance(toks, list) or not isinstance(tops, list) or len(toks) != len(tops) or len(toks) < 2:
            raise bad("'token_logprobs' and 'top_logprobs' must be lists of the same length (prompt + 1 token)")
        for value, top in zip(toks[1:], tops[1:], strict=True):
            if not isinstance(value, int | float) or not isinstance(top, dict) or not top:
                raise bad("a prompt token has no logprob or no top_logprobs")


# --------------------------------------------------------------------------------------
# The runner (child process): strict lm-eval API models
# --------------------------------------------------------------------------------------
def _strict_models() -> tuple[type, type]:
    """Define (once) and return the strict completions and chat models."""
    global _MODELS
    if _MODELS is not None:
        return _MODELS
    import requests  # lm-eval's own HTTP dependency
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    class _Strict:
        """Cache, check and count every request of an lm-eval API model."""

        _chat = False

        def _fr_setup(self, response_cache: str | None) -> None:
            self._fr_fatal: Exception | None = None
            self._fr_cache = ResponseCache(Path(response_cache)) if response_cache else None
            self._fr_fresh = 0
            self._fr_tokens = 0
            self._fr_seconds = 0.0
            self._fr_finish: Counter[str] = Counter()

        def _fr_count_finish(self, body: Any, generate: bool) -> None:
            if generate and isinstance(body, dict):
                for choice in body.get("choices") or []:
                    self._fr_finish[str(choice.get("finish_reason") or "unknown")] += 1

        def _fr_payload(self, messages: Any, generate: bool, gen_kwargs: dict | None, **kw: Any) -> dict[str, Any]:
            return self._create_payload(  # type: ignore[attr-defined]
                self.create_message(messages),  # type: ignore[attr-defined]
                generate=generate,
                gen_kwargs=copy.deepcopy(gen_kwargs),
                seed=self._seed,  # type: ignore[attr-defined]
                eos=self.eos_string,  # type: ignore[attr-defined]
                **kw,
            )

        def _fr_record(self, key: str | None, body: Any, generate: bool, n: int, started: float) -> None:
            try:
                validate_response(body, generate=generate, chat=self._chat, n_prompts=n)
            except MalformedResponse as err:
                self._fr_fatal = err
                raise
            self._fr_fresh += 1
            self._fr_seconds += time.perf_counter() - started
            usage = body.get("usage") or {}
            if generate and isinstance(usage.get("completion_tokens"), int):
                self._fr_tokens += usage["completion_tokens"]
            if self._fr_cache is not None and key is not None:
                self._fr_cache.put(key, body)

        def _fr_status(self, status: int, text: str) -> None:
            if status >= 400 and _NON_FINITE.search(text):
                self._fr_fatal = NonFiniteOutput(f"the server computed NaN or infinite values: {_short(text)}")
            elif 400 <= status < 500 and status not in (408, 429):
                self._fr_fatal = RequestRejected(f"the server rejected a request with HTTP {status}: {_short(text)}")
            if self._fr_fatal is not None:
                raise self._fr_fatal

        def _fr_check_fatal(self) -> None:
            # lm-eval retries every failed request; after a failure that retrying cannot
            # fix, fail every request at once instead of sending more.
            if self._fr_fatal is not None:
                raise self._fr_fatal

        def model_call(
            self, messages: Any, *, generate: bool = True, gen_kwargs: dict | None = None, **kwargs: Any
        ) -> dict | None:
            payload = self._fr_payload(messages, generate, gen_kwargs, **kwargs)
            key = ResponseCache.key(self.base_url, payload) if self._fr_cache is not None else None  # type: ignore[attr-defined]
            if key is not None and (cached := self._fr_cache.get(key)) is not None:  # type: ignore[union-attr]
                self._fr_count_finish(cached, generate)
                return cached
            self._fr_check_fatal()
            started = time.perf_counter()
            response = requests.post(
                self.base_url,  # type: ignore[attr-defined]
                json=payload,
                headers=self.header,  # type: ignore[attr-defined]
                verify=self.verify_certificate,  # type: ignore[attr-defined]
                timeout=self.timeout,  # type: ignore[attr-defined]
            )
            self._fr_status(response.status_code, response.text)
            response.raise_for_status()
            try:
                body = response.json()
            except ValueError as err:
                self._fr_fatal = MalformedResponse(f"the response is not JSON: {_short(response.text)}")
                raise self._fr_fatal from err
            self._fr_record(key, body, generate, len(messages) if not self._chat else 1, started)
            self._fr_count_finish(body, generate)
            return body

        async def amodel_call(
            self,
            session: Any,
            sem: asyncio.Semaphore,
            messages: Any,
            *,
            generate: bool = True,
            cache_keys: list | None = None,
            ctxlens: list[int] | None = None,
            gen_kwargs: dict | None = None,
            **kwargs: Any,
        ) -> list[Any]:
            payload = self._fr_payload(messages, generate, gen_kwargs, **kwargs)
            key = ResponseCache.key(self.base_url, payload) if self._fr_cache is not None else None  # type: ignore[attr-defined]
            body = self._fr_cache.get(key) if key is not None else None  # type: ignore[union-attr]
            if body is None:
                async with sem:
                    self._fr_check_fatal()
                    started = time.perf_counter()
                    async with session.post(self.base_url, json=payload, headers=self.header) as response:  # type: ignore[attr-defined]
                        text = await response.text()
                        self._fr_status(response.status, text)
                        response.raise_for_status()
                    try:
                        body = json.loads(text)
                    except ValueError as err:
                        self._fr_fatal = MalformedResponse(f"the response is not JSON: {_short(text)}")
                        raise self._fr_fatal from err
                    self._fr_record(key, body, generate, len(messages) if not self._chat else 1, started)
            self._fr_count_finish(body, generate)
            if generate:
                answers = list(self.parse_generations(outputs=body))  # type: ignore[attr-defined]
            else:
                answers = list(self.parse_logprobs(outputs=body, tokens=messages, ctxlens=ctxlens))  # type: ignore[attr-defined]
            if cache_keys:
                method = "generate_until" if generate else "loglikelihood"
                for answer, ck in zip(answers, cache_keys, strict=False):
                    self.cache_hook.add_partial(method, ck, answer)  # type: ignore[attr-defined]
            return answers

    class StrictCompletions(_Strict, LocalCompletionsAPI):
        """lm-eval's local-completions, with checked and cached responses."""

        def __init__(self, response_cache: str | None = None, **kwargs: Any) -> None:
            self._fr_setup(response_cache)
            super().__init__(**kwargs)

    class StrictChat(_Strict, LocalChatCompletion):
        """lm-eval's local-chat-completions, with checked and cached responses."""

        _chat = True

        def __init__(self, response_cache: str | None = None, **kwargs: Any) -> None:
            self._fr_setup(response_cache)
            super().__init__(**kwargs)

    _MODELS = (StrictCompletions, StrictChat)
    return _MODELS


_MODELS: tuple[type, type] | None = None


_NON_FINITE = re.compile(r"Out of range float values|not JSON compliant|\bNaN\b|\binf\b", re.IGNORECASE)


def _error_kind(err: BaseException) -> str:
    if isinstance(err, NonFiniteOutput):
        return "nonfinite"
    if isinstance(err, TruncatedAnswers):
        return "truncated"
    if isinstance(err, MalformedResponse):
        return "malformed_response"
    if isinstance(err, RequestRejected):
        return "rejected"
    mod = type(err).__module__
    if isinstance(err, ConnectionError | TimeoutError | asyncio.TimeoutError) or mod.startswith(
        ("aiohttp", "requests", "urllib3")
    ):
        return "request_failed"
    return "internal"


def _iter_causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _classify(err: BaseException) -> tuple[str, str]:
    for cause in _iter_causes(err):
        kind = _error_kind(cause)
        if kind != "internal":
            return kind, f"{type(cause).__name__}: {cause}"
    return "internal", f"{type(err).__name__}: {err}"


def _run_one(spec: dict[str, Any], run: dict[str, Any], task_manager: Any) -> dict[str, Any]:
    """One ``simple_evaluate`` call: one task, one pass; writes lm-eval's output files."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    completions, chat = _strict_models()
    is_chat = run["kind"] == "generate"
    base = spec["base_url"].rstrip("/")
    args: dict[str, Any] = {
        "model": spec["model"],
        "base_url": f"{base}/v1/chat/completions" if is_chat else f"{base}/v1/completions",
        "num_concurrent": int(spec["concurrency"]),
        "max_retries": int(spec.get("max_retries", 3)),
        "timeout": int(spec.get("timeout_s", 600)),
        "seed": int(run["seed"]),
        "response_cache": spec["cache_db"],
    }
    if is_chat:
        args["tokenizer_backend"] = None
        lm = chat(**args)
    else:
        args.update(
            tokenizer_backend="huggingface",
            tokenizer=spec["tokenizer"],
            max_length=int(spec.get("max_length") or 2048),
            tokenized_requests=True,
        )
        lm = completions(**args)
    tracker = EvaluationTracker(output_path=run["output_dir"])
    started = time.perf_counter()
    logged_args = {k: v for k, v in args.items() if k != "response_cache"}
    results = simple_evaluate(
        model=lm,
        model_args=logged_args,
        tasks=[run["task"]],
        task_manager=task_manager,
        num_fewshot=run.get("num_fewshot"),
        limit=None if run.get("samples") else run.get("limit"),
        samples=run.get("samples"),
        log_samples=True,
        evaluation_tracker=tracker,
        apply_chat_template=is_chat,
        gen_kwargs=run.get("gen_kwargs") if is_chat else None,
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
        bootstrap_iters=0,
    )
    if results is None:
        raise RuntimeError(f"lm-eval returned no results for task {run['task']}")
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    cache = lm._fr_cache
    return {
        "task": run["task"],
        "pass": run["pass"],
        "seed": run["seed"],
        "output_dir": run["output_dir"],
        "fresh_requests": lm._fr_fresh,
        "completion_tokens": lm._fr_tokens,
        "request_seconds": round(lm._fr_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "cache_entries": len(cache) if cache is not None else 0,
        "finish_reasons": dict(lm._fr_finish),
    }


def _probe_truncation(spec: dict[str, Any], task_manager: Any) -> dict[str, Any]:
    """Run the first items of each generative task; count answers that stopped for length."""
    probe = spec["probe"]
    items = int(probe["items_per_task"])
    tasks: dict[str, dict[str, int]] = {}
    for run in spec["runs"]:
        if run["kind"] != "generate" or run["pass"] != 0:
            continue
        small = dict(run)
        if run.get("samples"):
            small["samples"] = {k: list(v)[:items] for k, v in run["samples"].items()}
        else:
            small["limit"] = min(items, run["limit"]) if run.get("limit") else items
        small["output_dir"] = str(Path(probe["output_dir"]) / run["task"])
        reasons = _run_one(spec, small, task_manager)["finish_reasons"]
        tasks[run["task"]] = {"answers": sum(reasons.values()), "truncated": int(reasons.get("length", 0))}
    answers = sum(t["answers"] for t in tasks.values())
    truncated = sum(t["truncated"] for t in tasks.values())
    return {
        "tasks": tasks,
        "answers": answers,
        "truncated": truncated,
        "share": round(truncated / answers, 4) if answers else None,
        "max_truncated": float(probe["max_truncated"]),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the runs of a spec file; write the outcome JSON it names. Exit 0 on success."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m flagrelease.evaluate._lmeval_runner SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    outcome_path = Path(spec["outcome"])
    done: list[dict[str, Any]] = []
    probe: dict[str, Any] | None = None
    try:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=spec.get("include_path"))
        if spec.get("probe"):
            probe = _probe_truncation(spec, task_manager)
            if probe["share"] is not None and probe["share"] > probe["max_truncated"]:
                cut = ", ".join(f"{t} {v['truncated']}/{v['answers']}" for t, v in probe["tasks"].items())
                raise TruncatedAnswers(
                    f"{probe['truncated']} of {probe['answers']} probe answers stopped at max_tokens ({cut}); "
                    f"at most {probe['max_truncated']:.0%} may"
                )
        for run in spec["runs"]:
            done.append(_run_one(spec, run, task_manager))
        outcome: dict[str, Any] = {"ok": True, "runs": done, "probe": probe}
        code = 0
    except Exception as err:  # the child reports every failure to its parent
        kind, message = _classify(err)
        outcome = {"ok": False, "runs": done, "probe": probe, "error": {"kind": kind, "message": message}}
        code = 1
    tmp = outcome_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome, indent=2), encoding="utf-8")
    tmp.replace(outcome_path)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
