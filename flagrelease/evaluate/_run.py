"""lm-eval against one OpenAI-compatible endpoint, and stored lm-eval runs read as variants.

lm-eval runs in a child process (:mod:`flagrelease.evaluate._lmeval_runner`) whose every
response is cached by exact request, so an eval cut short by a dying server resumes
where it stopped.  A variant's folder is written under a temporary name and renamed only
once complete: no partial result is ever final.

Each variant folder holds lm-eval's own ``results_*.json`` and ``samples_*.jsonl``
(below ``lm-eval/<task>/pass-<i>/``), ``per_sample.jsonl`` (one normalised line per
item and sample: doc id, prompt hash, response, score) and ``scores.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flagrelease._atomic import atomic_dir, atomic_write_json, atomic_write_text
from flagrelease._redact import redact
from flagrelease.config import EvalTask, GenerationSettings, ProbeSettings
from flagrelease.errors import EvalError
from flagrelease.evaluate._probes import stability_probe, truncation_advice
from flagrelease.evaluate._tasks import check_tasks, include_paths
from flagrelease.samples import (
    BenchmarkSamples,
    SamplesError,
    find_samples,
    group_parents,
    read_benchmark,
)

__all__ = ["Endpoint", "EvalRun", "evaluate_endpoint", "load_stored_run", "server_root"]

log = logging.getLogger("flagrelease.evaluate")


class Endpoint(Protocol):
    """What the eval needs of a served model (``flagrelease.deploy.Endpoint`` fits)."""

    @property
    def base_url(self) -> str: ...

    @property
    def model_name(self) -> str: ...


@dataclass
class EvalRun:
    """One variant evaluated: where its logs are and what it scored.

    Attributes:
        variant: ``target``, ``reference``, ``target_gems_off`` or a bisection trial.
        dir: the variant's folder (lm-eval outputs, ``per_sample.jsonl``, ``scores.json``).
        scores: benchmark -> score in percent.
        tasks: benchmark -> {metric, filter, n_items, samples_per_item, score}.
        runs: what the lm-eval runner reported per (task, pass): requests sent, cached ...
        throughput: output tokens/s at the eval concurrency, when measured.
        gems_ops: FlagGems operators that ran while serving this variant, if recorded.
        probes: the pre-eval probes' findings (``stability``, ``truncation``), if run.
    """

    variant: str
    dir: Path
    scores: dict[str, float]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    throughput: float | None = None
    gems_ops: list[str] = field(default_factory=list)
    probes: dict[str, Any] | None = None

    @property
    def per_sample(self) -> Path:
        """The normalised per-sample log."""
        return self.dir / "per_sample.jsonl"

    def truncated(self) -> dict[str, int]:
        """Generated answers of the whole eval, and how many stopped at ``max_tokens``."""
        answers = truncated = 0
        for run in self.runs:
            reasons = run.get("finish_reasons") or {}
            answers += sum(int(v) for v in reasons.values())
            truncated += int(reasons.get("length", 0))
        return {"answers": answers, "truncated": truncated}


def server_root(url: str) -> str:
    """``url`` without a trailing ``/v1``: the server's root."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _gen_kwargs(gen: GenerationSettings) -> dict[str, Any]:
    return {
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "max_gen_toks": gen.max_tokens,
        "do_sample": gen.temperature > 0,
    }


def _task_limit(task: EvalTask, limit: int | None) -> int | None:
    limits = [v for v in (task.limit, limit) if v is not None]
    return min(limits) if limits else None


def _child_env(dataset_cache: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if dataset_cache is not None:
        env["HF_DATASETS_CACHE"] = str(dataset_cache)
        env["HF_DATASETS_OFFLINE"] = "1"
        env["HF_HUB_OFFLINE"] = "1"
    return env


_ERROR_ADVICE = {
    "malformed_response": (
        "the server at {url} returned a malformed response, so the eval stopped rather than score it as a wrong "
        "answer: {message}. Check that the endpoint is vLLM's OpenAI server (completions with echo+logprobs, "
        "chat completions with message.content)"
    ),
    "rejected": (
        "the server at {url} rejected a request: {message}. Check max_model_len against the task's prompts and "
        "eval.generation.max_tokens"
    ),
    "request_failed": (
        "the server at {url} stopped answering during the eval ({message}). Responses received so far are "
        "cached in {cache}; restart the server and run the eval again to resume where it stopped"
    ),
    "nonfinite": (
        "the server at {url} computed NaN or infinite values ({message}): the model's numerics are broken in "
        "this serving configuration. If FlagGems is on, a FlagGems operator is the likely cause: the gate "
        "stage compares with FlagGems off and bisects the operators"
    ),
    "internal": "lm-eval failed: {message}. The full log is {log}",
}


def _raise_runner_error(
    error: dict[str, str],
    *,
    url: str,
    cache: Path,
    log_path: Path,
    variant: str,
    max_tokens: int,
    probe: dict[str, Any] | None = None,
) -> None:
    kind = error.get("kind", "internal")
    message = error.get("message", "").removeprefix("TruncatedAnswers: ")
    if kind == "internal" and "Loglikelihood is not supported for chat completions" in message:
        raise EvalError(
            f"[{variant}] a multiple-choice task was sent to the chat endpoint; give it `kind: loglikelihood` "
            "in eval.tasks"
        )
    advice = (
        truncation_advice(max_tokens) if kind == "truncated" else _ERROR_ADVICE.get(kind, _ERROR_ADVICE["internal"])
    )
    err = EvalError(f"[{variant}] " + advice.format(url=url, message=message, cache=cache, log=log_path))
    err.kind = kind  # type: ignore[attr-defined]
    err.probe = probe  # type: ignore[attr-defined]
    raise err


def _spec_runs(
    tasks: Sequence[EvalTask],
    *,
    out: Path,
    generation: GenerationSettings,
    samples_per_item: int,
    limit: int | None,
    doc_ids: Mapping[str, Sequence[int]] | None,
) -> list[dict[str, Any]]:
    runs = []
    for task in tasks:
        passes = samples_per_item if task.kind == "generate" else 1
        for i in range(passes):
            run: dict[str, Any] = {
                "task": task.name,
                "kind": task.kind,
                "pass": i,
                "seed": generation.seed + i,
                "num_fewshot": task.num_fewshot,
                "limit": _task_limit(task, limit),
                "output_dir": str(out / "lm-eval" / task.name / f"pass-{i}"),
            }
            if task.kind == "generate":
                run["gen_kwargs"] = _gen_kwargs(generation)
            if doc_ids and task.name in doc_ids:
                run["samples"] = {task.name: [int(d) for d in doc_ids[task.name]]}
                run["limit"] = None
            runs.append(run)
    return runs


def _normalise(
    out: Path, *, variant: str, tasks: Sequence[EvalTask], required: bool = True
) -> tuple[dict[str, BenchmarkSamples], list[dict[str, Any]]]:
    """Read lm-eval's logs below ``out``; the per-sample lines of every benchmark."""
    samples = find_samples(out)
    parents = group_parents(out)
    benches: dict[str, BenchmarkSamples] = {}
    lines: list[dict[str, Any]] = []
    for task in tasks:
        try:
            bench = read_benchmark(
                out, name=task.name, metric=task.metric, filter=task.filter, samples=samples, parents=parents
            )
        except SamplesError as err:
            raise EvalError(f"[{variant}] {err}") from err
        if bench is None:
            if required:
                raise EvalError(f"[{variant}] lm-eval wrote no samples for task {task.name!r} below {out}")
            continue
        benches[task.name] = bench
        for (leaf, doc_id), item in sorted(bench.items.items()):
            for j, (score, resp, src) in enumerate(zip(item.scores, item.responses, item.sources, strict=True)):
                m = re.search(r"pass-(\d+)", src)
                lines.append(
                    {
                        "variant": variant,
                        "benchmark": task.name,
                        "task": leaf,
                        "doc_id": doc_id,
                        "sample": int(m.group(1)) if m else j,
                        "prompt_hash": item.prompt_hash,
                        "gen_hash": item.gen_hash,
                        "metric": bench.metric,
                        "filter": bench.filter,
                        "score": score,
                        "response": resp,
                        "target": item.target,
                        "source": str(Path(src).relative_to(out)) if Path(src).is_relative_to(out) else src,
                    }
                )
    return benches, lines


def _summary(benches: Mapping[str, BenchmarkSamples]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, bench in benches.items():
        means = [sum(i.scores) / len(i.scores) for i in bench.items.values() if i.scores]
        out[name] = {
            "metric": bench.metric,
            "filter": bench.filter,
            "n_items": len(means),
            "samples_per_item": bench.passes,
            "score": round(100 * sum(means) / len(means), 4) if means else None,
        }
    return out


def evaluate_endpoint(
    endpoint: Endpoint,
    *,
    tasks: Sequence[EvalTask],
    out_dir: Path,
    cache_path: Path,
    variant: str = "target",
    generation: GenerationSettings | None = None,
    samples_per_item: int = 1,
    concurrency: int = 8,
    include_path: Path | None = None,
    dataset_cache: Path | None = None,
    limit: int | None = None,
    doc_ids: Mapping[str, Sequence[int]] | None = None,
    tokenizer: Path | None = None,
    max_length: int | None = None,
    timeout_s: float | None = None,
    request_timeout_s: int = 600,
    max_retries: int = 3,
    probes: ProbeSettings | None = None,
) -> EvalRun:
    """Run lm-eval on ``tasks`` against ``endpoint`` and keep every sample.

    Args:
        endpoint: the served model (its ``base_url``, with or without ``/v1``).
        tasks: the benchmarks; ``kind`` picks the completions or chat endpoint.
        out_dir: the variant's folder; replaced atomically once the eval is complete.
        cache_path: the SQLite response cache of this variant's serving configuration;
            kept across calls, so a re-run resumes.
        variant: the variant's name, for messages and logs.
        generation: sampling settings of generative tasks.
        samples_per_item: passes of each generative task (seeds ``seed + i``).
        concurrency: concurrent requests (lm-eval ``num_concurrent``).
        include_path: folder of local task definitions.
        dataset_cache: an offline Hugging Face datasets cache.
        limit: items per task (all tasks), on top of each task's own ``limit``.
        doc_ids: task -> document indices to evaluate instead of the first ``limit``.
        tokenizer: tokenizer folder (the served weights) for loglikelihood tasks.
        max_length: the server's context length.
        timeout_s: wall-clock limit of the whole lm-eval run.
        request_timeout_s: per-request timeout.
        max_retries: attempts per request before the eval stops.
        probes: run the stability and truncation probes first
            (:mod:`flagrelease.evaluate._probes`), when given and enabled.

    Returns:
        The evaluated run.

    Raises:
        EvalError: unknown task, malformed or refused responses, a server that stops
            answering (the message says how to resume), a failed probe (``kind``
            ``unstable`` or ``truncated``), or lm-eval failing.
    """
    generation = generation or GenerationSettings()
    check_tasks([t.name for t in tasks], include_path=include_path)
    if any(t.kind == "loglikelihood" for t in tasks) and tokenizer is None:
        raise EvalError(f"[{variant}] loglikelihood tasks need the served model's tokenizer folder")
    out_dir = Path(out_dir)
    url = server_root(endpoint.base_url)
    probing = probes is not None and probes.enabled
    stability = (
        stability_probe(url, model_name=endpoint.model_name, variant=variant, timeout_s=request_timeout_s)
        if probing
        else None
    )
    with atomic_dir(out_dir) as tmp:
        runner_dir = tmp / ".runner"
        runner_dir.mkdir()
        runs = _spec_runs(
            tasks, out=tmp, generation=generation, samples_per_item=samples_per_item, limit=limit, doc_ids=doc_ids
        )
        spec: dict[str, Any] = {
            "base_url": url,
            "model": endpoint.model_name,
            "tokenizer": str(tokenizer) if tokenizer else None,
            "include_path": include_paths(include_path),
            "cache_db": str(cache_path),
            "concurrency": concurrency,
            "max_length": max_length,
            "timeout_s": request_timeout_s,
            "max_retries": max_retries,
            "outcome": str(runner_dir / "outcome.json"),
            "runs": runs,
        }
        if probing:
            assert probes is not None
            spec["probe"] = {
                "items_per_task": probes.items_per_task,
                "max_truncated": probes.max_truncated,
                "output_dir": str(runner_dir / "probe"),
            }
        spec_path = runner_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
        # The running log stays beside the cache (working state), not in the bundle.
        log_path = Path(cache_path).with_suffix(".lm-eval.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("[%s] lm-eval: %d run(s) against %s", variant, len(runs), url)
        started = time.monotonic()
        with log_path.open("w", encoding="utf-8") as log_fh:
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "flagrelease.evaluate._lmeval_runner", str(spec_path)],
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    env=_child_env(dataset_cache),
                    timeout=timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired as err:
                raise EvalError(
                    f"[{variant}] lm-eval did not finish within {timeout_s:.0f} s; responses so far are cached in "
                    f"{cache_path}, so a re-run resumes. Log: {log_path}"
                ) from err
        outcome_file = runner_dir / "outcome.json"
        if not outcome_file.is_file():
            tail = redact(log_path.read_text(encoding="utf-8", errors="replace")[-3000:])
            raise EvalError(f"[{variant}] the lm-eval runner died (exit {proc.returncode}); log {log_path}:\n{tail}")
        outcome = json.loads(outcome_file.read_text(encoding="utf-8"))
        shutil.rmtree(runner_dir / "probe", ignore_errors=True)  # probe logs are not the eval's samples
        if not outcome.get("ok"):
            _raise_runner_error(
                outcome.get("error", {}),
                url=url,
                cache=cache_path,
                log_path=log_path,
                variant=variant,
                max_tokens=generation.max_tokens,
                probe=outcome.get("probe"),
            )
        benches, lines = _normalise(tmp, variant=variant, tasks=tasks)
        shutil.rmtree(runner_dir)
        for r in outcome.get("runs", []):
            r["output_dir"] = str(Path(r["output_dir"]).relative_to(tmp))
        summary = _summary(benches)
        atomic_write_text(
            tmp / "per_sample.jsonl",
            "".join(json.dumps(line, ensure_ascii=False, default=str) + "\n" for line in lines),
        )
        atomic_write_json(
            tmp / "scores.json",
            {
                "variant": variant,
                "endpoint": url,
                "model": endpoint.model_name,
                "tasks": summary,
                "generation": generation.model_dump(mode="json"),
                "samples_per_item": samples_per_item,
                "concurrency": concurrency,
                "runs": outcome.get("runs", []),
                "seconds": round(time.monotonic() - started, 2),
            },
        )
        atomic_write_text(tmp / "lm-eval.log", redact(log_path.read_text(encoding="utf-8", errors="replace")))
    scores = {k: v["score"] for k, v in summary.items() if v["score"] is not None}
    found = {"stability": stability, "truncation": outcome.get("probe")} if probing else None
    return EvalRun(
        variant=variant, dir=out_dir, scores=scores, tasks=summary, runs=outcome.get("runs", []), probes=found
    )


def load_stored_run(
    results_dir: Path, *, tasks: Sequence[EvalTask], out_dir: Path | None = None, variant: str = "reference"
) -> EvalRun:
    """Use a stored lm-eval ``--log_samples`` run (e.g. the H100 reference) as a variant.

    Args:
        results_dir: the stored output folder (searched recursively for samples files).
        tasks: the benchmarks to read; those the folder lacks are left out of ``scores``.
        out_dir: when given, the samples and results files are copied here (keeping
            their relative paths) so that the bundle carries the evidence.
        variant: the variant's name.

    Raises:
        EvalError: the folder does not exist or holds no samples files.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir() or not find_samples(results_dir):
        raise EvalError(
            f"[{variant}] {results_dir} holds no lm-eval samples_*.jsonl files; point eval.reference.results_dir "
            "at the output folder of an lm-eval run made with --log_samples"
        )
    src = results_dir
    if out_dir is not None:
        with atomic_dir(Path(out_dir)) as tmp:
            for path in sorted(results_dir.rglob("*")):
                if path.is_file() and (path.name.startswith(("samples_", "results_")) or path.suffix == ".log"):
                    dest = tmp / "lm-eval" / path.relative_to(results_dir)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, dest)
            benches, lines = _normalise(tmp, variant=variant, tasks=tasks, required=False)
            atomic_write_text(
                tmp / "per_sample.jsonl",
                "".join(json.dumps(line, ensure_ascii=False, default=str) + "\n" for line in lines),
            )
            atomic_write_json(
                tmp / "scores.json", {"variant": variant, "stored_from": str(results_dir), "tasks": _summary(benches)}
            )
        src = Path(out_dir)
    else:
        benches, _ = _normalise(src, variant=variant, tasks=tasks, required=False)
    summary = _summary(benches)
    scores = {k: v["score"] for k, v in summary.items() if v["score"] is not None}
    return EvalRun(variant=variant, dir=src, scores=scores, tasks=summary)
