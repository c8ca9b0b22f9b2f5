"""The variants of a release, and serving and evaluating one of them.

Variants (see docs/ARCHITECTURE.md):

* ``target``: the converted weights on the release's chip, FlagGems as configured;
* ``reference``: ``eval.reference`` -- served live on this machine (its chip must be
  ``cpu`` or the release's own chip), read from a stored lm-eval run (``mode: stored``),
  or published scores without samples (``mode: scores``);
* ``target_gems_off``: the converted weights with FlagGems off, when
  ``gates.flaggems_compare`` is set.

Serving goes through the deploy stage's ``serving``, which the pipeline lends
(:meth:`flagrelease.pipeline.ReleaseContext.hook`): this package never imports the
deploy stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flagrelease._supervise import StopScope
from flagrelease.config import EvalTask
from flagrelease.convert.outputs import ConvertOutputs
from flagrelease.errors import ConfigError, EvalError
from flagrelease.evaluate._run import Endpoint, EvalRun, evaluate_endpoint
from flagrelease.evaluate._throughput import measure_throughput
from flagrelease.evaluate.reference import reference_ready
from flagrelease.fetch.outputs import FetchOutputs
from flagrelease.pipeline import ReleaseContext
from flagrelease.roles import REFERENCE_ROLE, reference_deployment_name

__all__ = [
    "FINDING_KINDS",
    "VariantPlan",
    "evaluate_live",
    "flaggems_trial",
    "plan_variants",
    "serve_variant",
]

log = logging.getLogger("flagrelease.evaluate")

#: Restarts of the server allowed within one variant's eval when it stops answering.
_SERVER_RESTARTS = 1

#: Failures of a FlagGems-on variant that are findings for the gate (which compares with
#: FlagGems off and bisects the operators), not reasons to stop the eval stage.
FINDING_KINDS = frozenset({"nonfinite", "truncated", "unstable"})


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
        scores: the published scores file, for ``mode: scores``.
    """

    name: str
    chip: str
    weights: str
    flaggems: bool
    excluded_ops: tuple[str, ...] = ()
    model_dir: Path | None = None
    stored: Path | None = None
    same_as: str | None = None
    scores: Path | None = None

    def serving_key(self) -> tuple[Any, ...]:
        """What makes two variants serve the same thing."""
        return (self.chip, str(self.model_dir), self.flaggems, tuple(sorted(self.excluded_ops)))

    @property
    def served(self) -> bool:
        """Whether this variant is served here (not read from files, not shared)."""
        return self.stored is None and self.scores is None and self.same_as is None


def _upstream_dir(ctx: ReleaseContext, stage: str) -> Path | None:
    kind: type[FetchOutputs] | type[ConvertOutputs] = FetchOutputs if stage == "fetch" else ConvertOutputs
    try:
        value = ctx.result(stage, kind).model_dir
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
    elif ref.mode == "scores":
        assert ref.scores is not None
        plans.append(VariantPlan("reference", ref.chip, ref.weights, ref.flaggems, scores=ref.scores))
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
        if p.stored is None and p.scores is None:
            key = p.serving_key()
            if key in seen:
                p = replace(p, same_as=seen[key])
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


def cache_file(ctx: ReleaseContext, plan: VariantPlan, extra: str = "") -> Path:
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
    """Serve one variant with the deploy stage's ``serving`` (lent by the pipeline).

    The server gets a free port: variants are served one after another (or, for the
    throughput trials, side by side), and nothing outside the eval needs to reach them.

    Args:
        ctx: the release context.
        plan: the variant.
        excluded_ops: FlagGems operators to leave out (default: the plan's).
        label: the name the server's logs are kept under (default: the variant's).
    """
    assert plan.model_dir is not None
    ops = list(plan.excluded_ops if excluded_ops is None else excluded_ops)
    cfg = ctx.config
    if plan.chip != cfg.chip:
        # A live reference on another chip is only ever this machine's CPU (plan_variants
        # refuses the rest): serve it locally, on one device.
        args = cfg.serve.engine_args.model_copy(update={"tensor_parallel_size": 1, "pipeline_parallel_size": 1})
        serve = cfg.serve.model_copy(update={"runtime": None, "nodes": [], "engine_args": args})
        cfg = cfg.model_copy(update={"chip": plan.chip, "serve": serve})
    serving: Callable[..., AbstractContextManager[Endpoint]] = ctx.hook("serving")
    return serving(
        cfg,
        model_dir=plan.model_dir,
        log_dir=ctx.layout.logs_dir,
        variant=label or plan.name,
        flaggems=plan.flaggems,
        excluded_ops=ops,
        port=0,
    )


class ServerPool:
    """The eval stage's servers: started ahead, kept for the throughput trials, always stopped.

    * :meth:`serve` hands out a variant's running server: the one started ahead, a kept
      one, or a fresh one.  After the block it is kept (``keep=True``, for the trials) or
      stopped; a server whose block raised (it died, say) is stopped and forgotten, so
      that a retry starts a fresh one.
    * :meth:`ahead`: while its block runs (the previous variant's eval), the next variant's
      server starts in the background, on the pool's one long-lived thread (a server gets
      SIGTERM when the thread that started it ends).  Leaving the block waits for that
      start, so that nothing measured after it shares the CPU with a starting server.  A
      start that failed is logged, and :meth:`serve` starts it again.
    * :meth:`close` (or leaving the ``with`` block) stops every server, the newest first.
    """

    def __init__(self, ctx: ReleaseContext) -> None:
        self._ctx = ctx
        self._live: dict[str, tuple[Endpoint, AbstractContextManager[Endpoint]]] = {}
        # The starts ahead, each with its scope: an interruption stops only the servers in it.
        self._starting: dict[str, tuple[Future[tuple[Endpoint, AbstractContextManager[Endpoint]]], StopScope]] = {}
        self._thread: ThreadPoolExecutor | None = None

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every server (waiting for any start in progress first)."""
        try:
            for name in list(self._starting):
                self._settle(name)
            with contextlib.ExitStack() as stack:  # every one stopped, even when one raises
                for _, server in self._live.values():
                    stack.push(server)
                self._live.clear()
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None

    def _start(
        self, plan: VariantPlan, scope: StopScope | None = None
    ) -> tuple[Endpoint, AbstractContextManager[Endpoint]]:
        server = serve_variant(self._ctx, plan=plan)
        with scope.entered() if scope is not None else contextlib.nullcontext():
            return server.__enter__(), server

    def _settle(self, name: str, *, interrupted: bool = False) -> None:
        starting = self._starting.pop(name, None)
        if starting is None:
            return
        try:
            self._live[name] = starting[0].result()
        except Exception as err:  # serve() starts it again, and reports its own failure
            if not interrupted:
                log.warning("[%s] starting the server ahead failed; starting it again in its turn: %s", name, err)

    @contextlib.contextmanager
    def ahead(self, plan: VariantPlan) -> Iterator[None]:
        """Start ``plan``'s server in the background while the block runs; wait for it at the end.

        When the block is interrupted (SIGTERM, Ctrl-C, Prefect's ``TerminationSignal``), the
        run is ending: the start in progress is stopped rather than waited for.
        """
        if plan.name not in self._live and plan.name not in self._starting:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="flagrelease-serve-ahead")
            scope = StopScope("the eval was interrupted")
            self._starting[plan.name] = (self._thread.submit(self._start, plan, scope), scope)
        interrupted = False
        try:
            yield
        except BaseException as err:
            interrupted = not isinstance(err, Exception)
            if interrupted and plan.name in self._starting:
                self._starting[plan.name][1].stop(grace_s=3.0)  # the start ahead fails fast
            raise
        finally:
            self._settle(plan.name, interrupted=interrupted)

    @contextlib.contextmanager
    def serve(self, plan: VariantPlan, *, keep: bool = False) -> Iterator[Endpoint]:
        """The running server of ``plan`` (started now if none is); kept after the block when ``keep``."""
        self._settle(plan.name)
        if plan.name not in self._live:
            self._live[plan.name] = self._start(plan)
        endpoint, server = self._live[plan.name]
        try:
            yield endpoint
        except BaseException:
            del self._live[plan.name]
            if not server.__exit__(*sys.exc_info()):
                raise
            return
        if not keep:
            del self._live[plan.name]
            server.__exit__(None, None, None)


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
    probes: bool = True,
    serve: Callable[[], AbstractContextManager[Endpoint]] | None = None,
    alongside: Callable[[], AbstractContextManager[None]] | None = None,
) -> EvalRun:
    """Serve ``plan``, probe it, evaluate it (restarting the server once if it dies), measure tokens/s.

    Args:
        ctx: the release context.
        plan: the variant.
        out_dir: the variant's folder.
        tasks: the benchmarks (default ``eval.tasks``).
        doc_ids: task -> document indices to evaluate (a bisection trial's items).
        excluded_ops: FlagGems operators to leave out (default: the plan's).
        label: the name logs are kept under (default: the variant's).
        throughput: measure output tokens/s at the eval concurrency once the eval is done.
        samples_per_item: passes of generative tasks (default ``eval.samples_per_item``).
        probes: run the pre-eval probes (``eval.probes``) first.
        serve: how to get the server (default: a fresh :func:`serve_variant`, stopped after);
            the eval stage passes its :class:`ServerPool`'s.
        alongside: a context manager around the eval itself, not the throughput measurement
            after it (the eval stage starts the next variant's server there).

    Raises:
        EvalError: the eval failed; ``kind`` says how (``nonfinite``, ``truncated`` ...).
    """
    cfg = ctx.config
    ev = cfg.eval
    name = label or plan.name
    cache = cache_file(ctx, plan, extra=",".join(sorted(excluded_ops or [])) if excluded_ops is not None else "")
    last: EvalError | None = None
    for attempt in range(_SERVER_RESTARTS + 1):
        server = serve() if serve is not None else serve_variant(ctx, plan=plan, excluded_ops=excluded_ops, label=name)
        try:
            # A failure leaves the ``with`` by its exception, so that a kept server is stopped too.
            with server as endpoint:
                record = getattr(endpoint, "gems_ops", None)
                try:
                    with alongside() if alongside is not None else contextlib.nullcontext():
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
                            probes=ev.probes if probes else None,
                        )
                except EvalError as err:
                    if plan.flaggems and callable(record):
                        err.gems_ops = sorted(record())  # type: ignore[attr-defined]
                    raise
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
                        load_test=ctx.hook("load_test"),
                    )
                return run
        except EvalError as err:
            if getattr(err, "kind", None) != "request_failed" or attempt == _SERVER_RESTARTS:
                raise
            log.warning("[%s] the server stopped answering; restarting it and resuming from the cache", name)
            last = err
    assert last is not None
    raise last


def flaggems_trial(
    ctx: ReleaseContext,
    *,
    excluded_ops: Sequence[str],
    tasks: Sequence[EvalTask],
    doc_ids: Mapping[str, Sequence[int]],
    label: str,
) -> Path | None:
    """Serve the target with ``excluded_ops`` left out and evaluate a few items (one bisection trial).

    The gate's bisection runs this through :meth:`ReleaseContext.hook` (``flaggems_trial``).

    Args:
        ctx: the release context.
        excluded_ops: every FlagGems operator to leave out.
        tasks: the leaf tasks of the probed items.
        doc_ids: task -> the probed document indices.
        label: the trial's name (its folder and logs).

    Returns:
        The trial's per-sample log, or None when the server computed NaN or infinite values.

    Raises:
        EvalError: the trial failed otherwise.
    """
    plan = next(p for p in plan_variants(ctx) if p.name == "target")
    try:
        run = evaluate_live(
            ctx,
            plan,
            out_dir=ctx.layout.runs_dir / "bisect" / label,
            tasks=tasks,
            doc_ids=doc_ids,
            excluded_ops=sorted(excluded_ops),
            label=label,
            throughput=False,
            samples_per_item=1,
            probes=False,
        )
    except EvalError as err:
        if getattr(err, "kind", None) != "nonfinite":
            raise
        return None
    return run.per_sample
