"""The eval stage: lm-eval against each served variant, with per-sample logs kept.

Variants (see docs/ARCHITECTURE.md):

* ``target``: the converted weights on the release's chip, FlagGems as configured;
* ``reference``: ``eval.reference`` -- served live on this machine (its chip must be
  ``cpu`` or the release's own chip), or read from a stored lm-eval run (``mode: stored``);
* ``target_gems_off``: the converted weights with FlagGems off, when
  ``gates.flaggems_compare`` is set.

Loglikelihood tasks (MMLU, CEVAL) go to the completions endpoint (lm-eval
``local-completions``); generative tasks (GSM8K, AIME, GPQA, MATH-500) to the chat
endpoint (``local-chat-completions`` with the chat template), ``samples_per_item``
passes with seeds ``seed, seed+1, ...``.  lm-eval runs in a child process
(:mod:`flagrelease.evaluate._lmeval_runner`) whose every response is cached by exact request, so an eval
cut short by a dying server resumes where it stopped.  A variant's folder is written
under a temporary name and renamed only once complete: no partial result is ever final.

Each variant folder holds lm-eval's own ``results_*.json`` and ``samples_*.jsonl``
(below ``lm-eval/<task>/pass-<i>/``), ``per_sample.jsonl`` (one normalised line per
item and sample: doc id, prompt hash, response, score) and ``scores.json``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from flagrelease._atomic import atomic_dir, atomic_write_json, atomic_write_text
from flagrelease._redact import redact
from flagrelease.config import EvalTask, GenerationSettings
from flagrelease.errors import ConfigError, EvalError
from flagrelease.evaluate.reference import publish_reference_run, reference_ready
from flagrelease.pipeline import ReleaseContext, StageResult
from flagrelease.roles import REFERENCE_ROLE, reference_deployment_name
from flagrelease.samples import (
    BenchmarkSamples,
    SamplesError,
    find_samples,
    group_parents,
    read_benchmark,
)

__all__ = [
    "Endpoint",
    "EvalRun",
    "VariantPlan",
    "check_tasks",
    "evaluate_endpoint",
    "evaluate_live",
    "load_stored_run",
    "measure_throughput",
    "plan_variants",
    "run_stage",
    "serve_variant",
]

log = logging.getLogger("flagrelease.evaluate")

#: Restarts of the server allowed within one variant's eval when it stops answering.
_SERVER_RESTARTS = 1


class Endpoint(Protocol):
    """What the eval needs of a served model (``flagrelease.deploy.Endpoint`` fits)."""

    @property
    def base_url(self) -> str: ...

    @property
    def model_name(self) -> str: ...


# --------------------------------------------------------------------------------------
# Task names
# --------------------------------------------------------------------------------------
def _include_paths(include_path: Path | None) -> list[str]:
    """Task folders lm-eval scans: flagrelease's bundled tasks, then the release's own."""
    from flagrelease.tinymodel import task_include_path

    paths = [str(task_include_path())]
    if include_path is not None:
        paths.append(str(include_path))
    return paths


@lru_cache(maxsize=8)
def _known_tasks(include_paths: tuple[str, ...]) -> frozenset[str]:
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_path=list(include_paths)).all_tasks)


def check_tasks(names: Sequence[str], *, include_path: Path | None = None) -> None:
    """Check that lm-eval knows every task name, before anything is served.

    Args:
        names: lm-eval task or group names.
        include_path: a folder of extra task definitions (flagrelease's bundled tasks,
            ``tinyarith`` and ``tinyarith_mc``, are always available).

    Raises:
        EvalError: a name is unknown; the message lists the closest known names.
    """
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"eval.include_path {include_path} is not a folder of lm-eval task definitions")
    known = _known_tasks(tuple(_include_paths(include_path)))
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    lines = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
        hint = f"did you mean: {', '.join(close)}" if close else "no similar task name"
        lines.append(f"  {name!r}: {hint}")
    where = f" or in {include_path}" if include_path else " (set eval.include_path for local task definitions)"
    raise EvalError(
        f"unknown lm-eval task name(s) in eval.tasks; they are not in lm-eval's registry{where}:\n"
        + "\n".join(lines)
        + "\nList the names with `python -m lm_eval ls tasks`."
    )


# --------------------------------------------------------------------------------------
# Running lm-eval against one endpoint
# --------------------------------------------------------------------------------------
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
    """

    variant: str
    dir: Path
    scores: dict[str, float]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    throughput: float | None = None
    gems_ops: list[str] = field(default_factory=list)

    @property
    def per_sample(self) -> Path:
        """The normalised per-sample log."""
        return self.dir / "per_sample.jsonl"


def _base_url(url: str) -> str:
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


def _raise_runner_error(error: dict[str, str], *, url: str, cache: Path, log_path: Path, variant: str) -> None:
    kind = error.get("kind", "internal")
    message = error.get("message", "")
    if kind == "internal" and "Loglikelihood is not supported for chat completions" in message:
        raise EvalError(
            f"[{variant}] a multiple-choice task was sent to the chat endpoint; give it `kind: loglikelihood` "
            "in eval.tasks"
        )
    advice = _ERROR_ADVICE.get(kind, _ERROR_ADVICE["internal"])
    err = EvalError(f"[{variant}] " + advice.format(url=url, message=message, cache=cache, log=log_path))
    err.kind = kind  # type: ignore[attr-defined]
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

    Returns:
        The evaluated run.

    Raises:
        EvalError: unknown task, malformed or refused responses, a server that stops
            answering (the message says how to resume), or lm-eval failing.
    """
    generation = generation or GenerationSettings()
    check_tasks([t.name for t in tasks], include_path=include_path)
    if any(t.kind == "loglikelihood" for t in tasks) and tokenizer is None:
        raise EvalError(f"[{variant}] loglikelihood tasks need the served model's tokenizer folder")
    out_dir = Path(out_dir)
    url = _base_url(endpoint.base_url)
    with atomic_dir(out_dir) as tmp:
        runner_dir = tmp / ".runner"
        runner_dir.mkdir()
        runs = _spec_runs(
            tasks, out=tmp, generation=generation, samples_per_item=samples_per_item, limit=limit, doc_ids=doc_ids
        )
        spec = {
            "base_url": url,
            "model": endpoint.model_name,
            "tokenizer": str(tokenizer) if tokenizer else None,
            "include_path": _include_paths(include_path),
            "cache_db": str(cache_path),
            "concurrency": concurrency,
            "max_length": max_length,
            "timeout_s": request_timeout_s,
            "max_retries": max_retries,
            "outcome": str(runner_dir / "outcome.json"),
            "runs": runs,
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
        if not outcome.get("ok"):
            _raise_runner_error(outcome.get("error", {}), url=url, cache=cache_path, log_path=log_path, variant=variant)
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
    return EvalRun(variant=variant, dir=out_dir, scores=scores, tasks=summary, runs=outcome.get("runs", []))


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


# --------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------
def measure_throughput(
    endpoint: Endpoint,
    *,
    concurrency: int,
    requests: int = 16,
    max_tokens: int = 32,
    prompt: str = "Write a short sentence about the sea.",
    timeout_s: float = 300,
) -> float:
    """Output tokens per second at ``concurrency``, over a bounded burst of requests.

    Runs one level of the deploy stage's load test (:mod:`flagrelease.deploy.loadtest`:
    streamed completions with ``ignore_eos``, so each request generates ``max_tokens``).

    Raises:
        EvalError: every request failed.
    """
    from flagrelease.config import LoadTestSettings
    from flagrelease.deploy.loadtest import run_load_test
    from flagrelease.errors import DeployError

    settings = LoadTestSettings(
        concurrency=[concurrency],
        requests_per_level=requests,
        max_tokens=max_tokens,
        prompt=prompt,
        timeout_s=timeout_s,
    )
    try:
        rows = run_load_test(_base_url(endpoint.base_url), model_name=endpoint.model_name, settings=settings)
    except DeployError as err:
        raise EvalError(f"throughput measurement against {endpoint.base_url} failed: {err.message}") from err
    return float(rows[0]["output_tokens_per_s"])


# --------------------------------------------------------------------------------------
# Variants of a release
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VariantPlan:
    """How one variant is obtained.

    Attributes:
        name: ``target``, ``reference`` or ``target_gems_off``.
        chip: the chip it runs on.
        weights: ``converted`` or ``source``.
        flaggems: whether FlagGems is on.
        excluded_ops: FlagGems operators left out.
        model_dir: the weights served (None for stored results).
        stored: the stored results folder, for ``mode: stored``.
        same_as: another variant with the same serving configuration, reused.
    """

    name: str
    chip: str
    weights: str
    flaggems: bool
    excluded_ops: tuple[str, ...] = ()
    model_dir: Path | None = None
    stored: Path | None = None
    same_as: str | None = None

    def serving_key(self) -> tuple[Any, ...]:
        """What makes two variants serve the same thing."""
        return (self.chip, str(self.model_dir), self.flaggems, tuple(sorted(self.excluded_ops)))


def _upstream_dir(ctx: ReleaseContext, stage: str) -> Path | None:
    try:
        value = ctx.result(stage).outputs.get("model_dir")
    except ConfigError:
        if ctx.dry_run:
            return None
        raise
    return Path(value) if value else None


def plan_variants(ctx: ReleaseContext) -> list[VariantPlan]:
    """The variants the eval stage evaluates, in order.

    Raises:
        EvalError: the reference must run on another chip and no stored results are given.
    """
    cfg = ctx.config
    ref = cfg.eval.reference
    gems = cfg.serve.flaggems
    reference_side = ctx.options.get("role") == REFERENCE_ROLE
    # The reference side (flagrelease.evaluate.reference) evaluates the reference alone, and runs
    # no convert stage unless it serves the converted weights.
    needs_convert = not reference_side or ref.weights == "converted"
    converted = _upstream_dir(ctx, "convert") if needs_convert else None
    target = VariantPlan("target", cfg.chip, "converted", gems.enabled, tuple(gems.excluded_ops), converted)
    plans = [] if reference_side else [target]
    if ref.mode == "stored":
        assert ref.results_dir is not None
        plans.append(VariantPlan("reference", ref.chip, ref.weights, ref.flaggems, (), None, ref.results_dir))
    elif cfg.remote_reference:
        assert ref.results_dir is not None
        if not ctx.dry_run and not reference_ready(cfg):
            raise EvalError(
                f"eval.reference: the live reference on {ref.chip} has no current run in {ref.results_dir}; "
                f"run it on a {ref.chip} worker first: `prefect deployment run "
                f"flagrelease/{reference_deployment_name(cfg)}` (work pool {_pool(ref.chip)}; the flagrelease flow "
                f"starts it before eval), or `flagrelease run CONFIG --role reference` on a {ref.chip} machine",
                model=cfg.name,
                chip=cfg.chip,
            )
        plans.append(VariantPlan("reference", ref.chip, ref.weights, ref.flaggems, (), None, ref.results_dir))
    else:
        weights_dir = _upstream_dir(ctx, "fetch") if ref.weights == "source" else converted
        plans.append(
            VariantPlan(
                "reference",
                ref.chip,
                ref.weights,
                ref.flaggems,
                tuple(gems.excluded_ops) if ref.flaggems else (),
                weights_dir,
            )
        )
    if cfg.gates.flaggems_compare and gems.enabled and not reference_side:
        plans.append(VariantPlan("target_gems_off", cfg.chip, "converted", False, (), converted))
    # Variants that would serve exactly the same thing are evaluated once.
    seen: dict[tuple[Any, ...], str] = {}
    out = []
    for p in plans:
        if p.stored is None:
            key = p.serving_key()
            if key in seen:
                p = VariantPlan(p.name, p.chip, p.weights, p.flaggems, p.excluded_ops, p.model_dir, None, seen[key])
            else:
                seen[key] = p.name
        out.append(p)
    return out


def _pool(chip: str) -> str:
    from flagrelease.chips import load_chip

    try:
        return load_chip(chip).work_pool
    except ConfigError:
        return chip


def _cache_file(ctx: ReleaseContext, plan: VariantPlan, extra: str = "") -> Path:
    """The response cache of one serving configuration: reused only when nothing changed."""
    cfg = ctx.config
    upstream = {s: ctx.results[s].fingerprint for s in ("fetch", "convert") if s in ctx.results}
    key = json.dumps(
        {
            "plan": [plan.chip, str(plan.model_dir), plan.weights, plan.flaggems, sorted(plan.excluded_ops)],
            "engine_args": cfg.serve.engine_args.as_dict(),
            "envs": cfg.serve.envs,
            "upstream": upstream,
            "extra": extra,
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return ctx.layout.runs_dir / "eval-cache" / f"{plan.name}-{digest}.sqlite"


def serve_variant(
    ctx: ReleaseContext, *, plan: VariantPlan, excluded_ops: Sequence[str] | None = None, label: str | None = None
) -> AbstractContextManager[Endpoint]:
    """Serve one variant with the deploy stage's :func:`flagrelease.deploy.serving`.

    The server gets a free port: variants are served one after another, and nothing
    outside the eval needs to reach them.

    Args:
        ctx: the release context.
        plan: the variant.
        excluded_ops: FlagGems operators to leave out (default: the plan's).
        label: the name the server's logs are kept under (default: the variant's).
    """
    from flagrelease.deploy import serving

    assert plan.model_dir is not None
    ops = list(plan.excluded_ops if excluded_ops is None else excluded_ops)
    cfg = ctx.config
    if plan.chip != cfg.chip:
        # A live reference on another chip is only ever this machine's CPU (plan_variants
        # refuses the rest): serve it locally, on one device.
        args = cfg.serve.engine_args.model_copy(update={"tensor_parallel_size": 1, "pipeline_parallel_size": 1})
        serve = cfg.serve.model_copy(update={"runtime": None, "nodes": [], "engine_args": args})
        cfg = cfg.model_copy(update={"chip": plan.chip, "serve": serve})
    cm: AbstractContextManager[Endpoint] = serving(
        cfg,
        model_dir=plan.model_dir,
        log_dir=ctx.layout.logs_dir,
        variant=label or plan.name,
        flaggems=plan.flaggems,
        excluded_ops=ops,
        port=0,
    )
    return cm


def evaluate_live(
    ctx: ReleaseContext,
    plan: VariantPlan,
    *,
    out_dir: Path,
    tasks: Sequence[EvalTask] | None = None,
    doc_ids: Mapping[str, Sequence[int]] | None = None,
    excluded_ops: Sequence[str] | None = None,
    label: str | None = None,
    throughput: bool = True,
    samples_per_item: int | None = None,
) -> EvalRun:
    """Serve ``plan``, evaluate it (restarting the server once if it dies), measure tokens/s."""
    cfg = ctx.config
    ev = cfg.eval
    name = label or plan.name
    cache = _cache_file(ctx, plan, extra=",".join(sorted(excluded_ops or [])) if excluded_ops is not None else "")
    last: EvalError | None = None
    for attempt in range(_SERVER_RESTARTS + 1):
        with serve_variant(ctx, plan=plan, excluded_ops=excluded_ops, label=name) as endpoint:
            try:
                run = evaluate_endpoint(
                    endpoint,
                    tasks=tasks or ev.tasks,
                    out_dir=out_dir,
                    cache_path=cache,
                    variant=name,
                    generation=ev.generation,
                    samples_per_item=samples_per_item or ev.samples_per_item,
                    concurrency=ev.concurrency,
                    include_path=ev.include_path,
                    dataset_cache=ev.dataset_cache,
                    limit=ev.limit,
                    doc_ids=doc_ids,
                    tokenizer=plan.model_dir,
                    max_length=cfg.serve.engine_args.max_model_len,
                )
            except EvalError as err:
                record = getattr(endpoint, "gems_ops", None)
                if plan.flaggems and callable(record):
                    err.gems_ops = sorted(record())  # type: ignore[attr-defined]
                if getattr(err, "kind", None) != "request_failed" or attempt == _SERVER_RESTARTS:
                    raise
                log.warning("[%s] the server stopped answering; restarting it and resuming from the cache", name)
                last = err
                continue
            record = getattr(endpoint, "gems_ops", None)
            if plan.flaggems and callable(record):
                run.gems_ops = sorted(record())
            if throughput:
                lt = cfg.serve.load_test
                run.throughput = measure_throughput(
                    endpoint,
                    concurrency=ev.concurrency,
                    requests=max(ev.concurrency * 2, lt.requests_per_level),
                    max_tokens=lt.max_tokens,
                    prompt=lt.prompt,
                    timeout_s=lt.timeout_s,
                )
            return run
    assert last is not None
    raise last


def _variant_output(plan: VariantPlan, run: EvalRun) -> dict[str, Any]:
    return {
        "dir": str(run.dir),
        "scores": run.scores,
        "tasks": run.tasks,
        "chip": plan.chip,
        "weights": plan.weights,
        "flaggems": plan.flaggems,
        "excluded_ops": list(plan.excluded_ops),
        "throughput": run.throughput,
        "gems_ops": run.gems_ops,
        "per_sample": str(run.per_sample),
        "stored": str(plan.stored) if plan.stored else None,
        "same_as": plan.same_as,
    }


def _failed_output(plan: VariantPlan, message: str, *, gems_ops: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "dir": None,
        "scores": {},
        "tasks": {},
        "chip": plan.chip,
        "weights": plan.weights,
        "flaggems": plan.flaggems,
        "excluded_ops": list(plan.excluded_ops),
        "throughput": None,
        "gems_ops": list(gems_ops),
        "per_sample": None,
        "stored": None,
        "same_as": plan.same_as,
        "error": message,
    }


def run_stage(ctx: ReleaseContext) -> StageResult:
    """Evaluate every variant of the release (see the module docstring).

    A FlagGems-on variant whose server computes NaN or infinite values is recorded with
    an ``error`` (and no scores) when FlagGems off is evaluated too, so that the gate can
    judge it and bisect the operators; every other failure raises.

    Returns:
        outputs ``variants``: name -> {dir, scores (percent), chip, weights, flaggems,
        throughput (output tokens/s), ...}; table ``eval``: one row per variant and task.
    """
    cfg = ctx.config
    if not cfg.eval.tasks:
        return StageResult(
            "eval", "No eval tasks configured; nothing evaluated.", outputs={"variants": {}}, status="skipped"
        )
    plans = plan_variants(ctx)
    if ctx.dry_run:
        lines = [
            f"{p.name}: "
            + (
                f"stored results {p.stored}"
                if p.stored
                else f"same as {p.same_as}"
                if p.same_as
                else f"serve {p.weights} weights on {p.chip}, FlagGems {'on' if p.flaggems else 'off'}"
            )
            for p in plans
        ]
        return StageResult(
            "eval",
            "Would evaluate " + "; ".join(lines) + ".",
            outputs={"variants": {}, "plan": [p.name for p in plans]},
        )
    check_tasks([t.name for t in cfg.eval.tasks], include_path=cfg.eval.include_path)
    ctx.layout.eval_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, EvalRun] = {}
    variants: dict[str, dict[str, Any]] = {}
    compared = any(p.name == "target_gems_off" for p in plans)
    for i, plan in enumerate(plans):
        ctx.progress("eval", i / len(plans), f"evaluating {plan.name}")
        out_dir = ctx.layout.eval_dir / plan.name
        if plan.stored is not None:
            run = load_stored_run(plan.stored, tasks=cfg.eval.tasks, out_dir=out_dir, variant=plan.name)
        elif plan.same_as is not None:
            if plan.same_as not in runs:  # that variant failed; so does this one
                variants[plan.name] = {**variants[plan.same_as], "same_as": plan.same_as}
                continue
            run = runs[plan.same_as]
        else:
            try:
                run = evaluate_live(ctx, plan, out_dir=out_dir)
            except EvalError as err:
                # NaN/inf from a FlagGems-on serve is a finding for the gate (which then
                # bisects the operators against FlagGems off), not a reason to stop here.
                if getattr(err, "kind", None) != "nonfinite" or not plan.flaggems or not compared:
                    raise
                log.warning("%s", err.message)
                variants[plan.name] = _failed_output(plan, err.message, gems_ops=getattr(err, "gems_ops", []))
                continue
        runs[plan.name] = run
        variants[plan.name] = _variant_output(plan, run)
    ctx.progress("eval", 1.0, "done")
    failed = sorted(n for n, v in variants.items() if v.get("error"))
    if ctx.options.get("role") == REFERENCE_ROLE and "reference" in runs:
        handed = publish_reference_run(cfg, runs["reference"].dir)
        variants["reference"]["handed_over_to"] = str(handed)
    rows = []
    for name, v in variants.items():
        for task in cfg.eval.tasks:
            t = v["tasks"].get(task.name, {})
            rows.append(
                {
                    "variant": name,
                    "task": task.name,
                    "label": task.label or task.name,
                    "metric": t.get("metric"),
                    "score": t.get("score"),
                    "n_items": t.get("n_items"),
                    "samples_per_item": t.get("samples_per_item"),
                    "tokens_per_s": v["throughput"],
                }
            )
    parts = [
        f"{n}: "
        + (", ".join(f"{k} {s:.2f}" for k, s in v["scores"].items()) if not v.get("error") else "computed NaN/inf")
        for n, v in variants.items()
    ]
    return StageResult(
        "eval",
        "Evaluated " + "; ".join(parts) + ".",
        outputs={"variants": variants},
        tables={"eval": rows},
        status="warning" if failed else "ok",
    )
