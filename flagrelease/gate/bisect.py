"""Find the FlagGems operators that change a model's answers, with few re-serves.

When the gate blames FlagGems (on-vs-off inconsistent, or the target inconsistent with
the reference while FlagGems-off is consistent), the operators that ran are searched by
adaptive group testing.  A *trial* serves the target with some operators excluded and
evaluates a few items: those whose FlagGems-on answer differed from the FlagGems-off
answer in the eval stage.  A trial *fails* when at least ``threshold`` of them still
differ.  Assuming an operator set fails when it contains at least one faulty operator,
binary splitting finds each faulty operator in about ``log2(n)`` trials:

* a failing set of one operator is a culprit;
* otherwise test its first half with only that half enabled; if it fails, recurse into
  it and test the second half too; if it does not, the second half must fail (no trial
  needed) and is recursed into.

A last trial with every blamed operator excluded checks that the answers then match
FlagGems off (the proposed ``excluded_ops``).  Trials are capped; groups not narrowed
down when the cap is reached are proposed for exclusion whole.

:func:`bisect_operators` holds the search and takes the trial as a callable, so it is
tested with a deterministic oracle; :func:`bisect_release` runs real trials for the gate
stage: the eval stage's ``flaggems_trial`` (serve the target with ``excluded_ops``,
evaluate the probed items), which the pipeline lends
(:meth:`flagrelease.pipeline.ReleaseContext.hook`), so the gate never imports the eval
stage's code.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_write_json
from flagrelease.config import EvalTask
from flagrelease.deploy.outputs import DeployOutputs
from flagrelease.errors import ConfigError, GateError
from flagrelease.evaluate.outputs import VariantOutputs
from flagrelease.pipeline import ReleaseContext
from flagrelease.samples import iter_per_sample

__all__ = [
    "BisectResult",
    "Trial",
    "TrialFn",
    "answer_of",
    "bisect_operators",
    "bisect_release",
    "pick_items",
]

log = logging.getLogger("flagrelease.gate.bisect")

#: A trial: the operators to exclude -> the answer to every probed item.
TrialFn = Callable[[frozenset[str]], Mapping[Hashable, Any]]


@dataclass(frozen=True)
class Trial:
    """One re-serve and evaluation.

    Attributes:
        enabled: the searched operators left on.
        excluded: every operator excluded (the release's own list included).
        mismatches: probed items whose answer differs from FlagGems off.
        items: probed items.
        failing: whether ``mismatches`` reached the threshold.
        seconds: how long the trial took.
    """

    enabled: tuple[str, ...]
    excluded: tuple[str, ...]
    mismatches: int
    items: int
    failing: bool
    seconds: float


@dataclass
class BisectResult:
    """What the bisection found.

    Attributes:
        ops: the operators searched.
        blamed_ops: operators shown to change the answers on their own.
        proposed_excluded_ops: the ``serve.flaggems.excluded_ops`` to release with.
        unresolved: failing groups not narrowed down before the trial cap.
        untested: groups whose status is unknown when the cap was reached.
        suspects: operators the search narrowed down to without seeing them fail on
            their own, when the verification showed that operators interact.
        verified: whether excluding ``proposed_excluded_ops`` gave FlagGems-off answers
            (None when not checked).
        threshold: mismatching items that make a trial fail.
        trials: every trial run, in order.
        note: what to make of it, in a sentence.
    """

    ops: list[str]
    blamed_ops: list[str] = field(default_factory=list)
    proposed_excluded_ops: list[str] = field(default_factory=list)
    unresolved: list[list[str]] = field(default_factory=list)
    untested: list[list[str]] = field(default_factory=list)
    suspects: list[str] = field(default_factory=list)
    verified: bool | None = None
    threshold: int = 1
    trials: list[Trial] = field(default_factory=list)
    note: str = ""

    @property
    def rounds(self) -> int:
        """Trials run (re-serves)."""
        return len(self.trials)

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-able dict."""
        data = asdict(self)
        data["rounds"] = self.rounds
        return data


class _OutOfRounds(Exception):
    """The trial cap is reached."""


def _mismatches(answers: Mapping[Hashable, Any], baseline: Mapping[Hashable, Any]) -> int:
    return sum(1 for key, want in baseline.items() if answers.get(key, _MISSING) != want)


_MISSING = object()


def bisect_operators(
    ops: Sequence[str],
    *,
    run_trial: TrialFn,
    baseline: Mapping[Hashable, Any],
    failing: Mapping[Hashable, Any] | None = None,
    base_excluded: Sequence[str] = (),
    max_rounds: int = 8,
    min_mismatch_fraction: float = 0.25,
    verify: bool = True,
) -> BisectResult:
    """Find the operators whose FlagGems version changes the answers.

    Args:
        ops: the FlagGems operators that ran (and are not excluded already).
        run_trial: serves with the given operators excluded and returns the answer to
            each item of ``baseline``.
        baseline: the FlagGems-off answer of each probed item.
        failing: the answers with every operator on, if already known (saves a trial).
        base_excluded: operators the release already excludes; always excluded.
        max_rounds: the most trials to run (each is a re-serve).
        min_mismatch_fraction: a trial fails when at least this fraction of the
            mismatches seen with every operator on remain (and at least one).
        verify: spend one trial checking the proposed exclusion list.

    Returns:
        The blamed operators, the proposed exclusion list and every trial.
    """
    ops = list(dict.fromkeys(ops))
    base = frozenset(base_excluded)
    result = BisectResult(ops=ops)
    done: dict[frozenset[str], Trial] = {}

    def trial(enabled: frozenset[str]) -> Trial:
        if enabled in done:
            return done[enabled]
        if len(result.trials) >= max_rounds:
            raise _OutOfRounds
        excluded = base | (frozenset(ops) - enabled)
        started = time.monotonic()
        answers = run_trial(excluded)
        n_bad = _mismatches(answers, baseline)
        t = Trial(
            enabled=tuple(o for o in ops if o in enabled),
            excluded=tuple(sorted(excluded)),
            mismatches=n_bad,
            items=len(baseline),
            failing=n_bad >= result.threshold,
            seconds=round(time.monotonic() - started, 2),
        )
        result.trials.append(t)
        done[enabled] = t
        log.info(
            "bisect trial %d: %d op(s) on, %d/%d answers differ -> %s",
            len(result.trials),
            len(enabled),
            n_bad,
            len(baseline),
            "fails" if t.failing else "passes",
        )
        return t

    if not ops or not baseline:
        result.note = "nothing to search: " + ("no FlagGems operators were recorded" if not ops else "no items")
        result.proposed_excluded_ops = sorted(base)
        return result
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be at least 1, got {max_rounds}")
    everything = frozenset(ops)
    all_on_bad = _mismatches(failing, baseline) if failing is not None else trial(everything).mismatches
    result.threshold = max(1, math.ceil(min_mismatch_fraction * all_on_bad))
    if all_on_bad == 0:
        result.note = "with every operator on the answers already match FlagGems off: nothing to bisect"
        result.proposed_excluded_ops = sorted(base)
        return result
    done[everything] = Trial(tuple(ops), tuple(sorted(base)), all_on_bad, len(baseline), True, 0.0)

    culprits: list[str] = []
    clean: set[str] = set()  # operators seen on in a passing trial
    group: list[str] = list(ops)  # a failing group, narrowed down to one culprit
    try:
        while group:
            while len(group) > 1:
                half = len(group) // 2
                first, second = group[:half], group[half:]
                if trial(frozenset(first)).failing:
                    group = first
                else:
                    clean.update(first)
                    group = second
            culprits.append(group[0])
            group = []
            rest = [o for o in ops if o not in culprits and o not in clean]
            if not rest and not verify:
                break
            # One trial both checks the exclusion list and looks for further culprits.
            check = trial(everything - frozenset(culprits))
            if check.failing:
                group = rest
                result.verified = False
                if not rest:
                    # Every other operator passed, yet the answers still differ: the
                    # operators only fail together, so culprits inferred (never seen
                    # failing on their own) are mere suspects.
                    seen_alone = {t.enabled[0] for t in result.trials if len(t.enabled) == 1 and t.failing}
                    result.suspects = [o for o in culprits if o not in seen_alone]
                    culprits = [o for o in culprits if o in seen_alone]
            else:
                clean.update(rest)
                result.verified = True
    except _OutOfRounds:
        if group:
            result.unresolved = [group]
        known = set(culprits) | clean | set(group)
        left = [o for o in ops if o not in known]
        result.untested = [left] if left else []
        result.verified = None
    result.blamed_ops = [o for o in ops if o in set(culprits)]
    proposed = set(result.blamed_ops) | {o for g in result.unresolved for o in g}
    result.proposed_excluded_ops = sorted(base | proposed)
    result.note = _note(result)
    return result


def _note(r: BisectResult) -> str:
    if not r.blamed_ops and not r.unresolved:
        note = "no operator fails on its own: the difference needs several operators together"
        return note + (f" (suspects: {', '.join(r.suspects)})" if r.suspects else "")
    parts = []
    if r.blamed_ops:
        parts.append(f"{', '.join(r.blamed_ops)} change(s) the answers")
    if r.unresolved:
        parts.append(f"trial cap reached; groups still failing: {'; '.join(', '.join(g) for g in r.unresolved)}")
    if r.untested:
        parts.append(f"not tested: {'; '.join(', '.join(g) for g in r.untested)}")
    if r.verified is True:
        parts.append("excluding the proposed operators gives the FlagGems-off answers")
    elif r.verified is False:
        parts.append("answers still differ with the proposed operators excluded: other operators interact")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------
# Real trials for a release
# --------------------------------------------------------------------------------------
def answer_of(line: Mapping[str, Any]) -> Any:
    """The answer a per-sample line gives: the text, or the index of the chosen choice.

    A loglikelihood response is lm-eval's logged ``[[logprob, is_greedy], ...]``; its
    answer is the choice with the highest log-probability.
    """
    resp = line.get("response")
    if isinstance(resp, list) and resp and all(isinstance(r, list | tuple) and r for r in resp):
        try:
            scores = [float(r[0]) for r in resp]
        except (TypeError, ValueError):
            return repr(resp)
        return max(range(len(scores)), key=scores.__getitem__)
    return resp if isinstance(resp, str) else repr(resp)


def _answers(per_sample: Path, *, benchmark: str | None = None) -> dict[tuple[str, str, int], tuple[Any, float]]:
    out = {}
    for line in iter_per_sample(per_sample):
        if line.get("sample", 0) != 0 or (benchmark is not None and line["benchmark"] != benchmark):
            continue
        out[(line["benchmark"], line["task"], int(line["doc_id"]))] = (answer_of(line), float(line["score"]))
    return out


def pick_items(
    on_per_sample: Path | None, *, off_per_sample: Path, tasks: Sequence[EvalTask], max_items: int = 16
) -> tuple[list[EvalTask], dict[str, list[int]], dict[Hashable, Any], dict[Hashable, Any] | None]:
    """Choose the probe items: those whose FlagGems-on answer differs from FlagGems off.

    The benchmark with the most differing items is used (ties: loglikelihood first, as
    it generates nothing), and its first ``max_items`` differing items.  Without
    FlagGems-on answers (``on_per_sample`` None: that serve computed NaN/inf), the first
    ``max_items`` items of the cheapest benchmark.

    Returns:
        ``(tasks, doc_ids, baseline, failing)``: leaf tasks to run, their document ids,
        and the off and on answers of each item keyed by ``(leaf task, doc id)``
        (``failing`` None when unknown).
    """
    off = _answers(off_per_sample)
    if on_per_sample is None:
        # The FlagGems-on serve produced nothing usable (NaN/inf): probe the first items
        # of the cheapest task; a failing trial errors out again or answers differently.
        task = sorted(tasks, key=lambda t: (t.kind != "loglikelihood", tasks.index(t)))[0]
        keys = sorted(k for k in off if k[0] == task.name)[:max_items]
        doc_ids: dict[str, list[int]] = {}
        for _, leaf, doc in keys:
            doc_ids.setdefault(leaf, []).append(doc)
        leaf_tasks = [EvalTask(name=leaf, kind=task.kind, metric=task.metric, filter=task.filter) for leaf in doc_ids]
        return leaf_tasks, doc_ids, {(leaf, doc): off[(b, leaf, doc)][0] for b, leaf, doc in keys}, None
    on = _answers(on_per_sample)
    best: tuple[int, int, EvalTask] | None = None
    for order, task in enumerate(tasks):
        differ = sum(1 for k, (a, _) in on.items() if k[0] == task.name and k in off and off[k][0] != a)
        rank = (differ, 1 if task.kind == "loglikelihood" else 0, -order)
        if differ and (best is None or rank > (best[0], best[1], -tasks.index(best[2]))):
            best = (differ, rank[1], task)
    if best is None:
        return [], {}, {}, {}
    task = best[2]
    keys = sorted(k for k, (a, _) in on.items() if k[0] == task.name and k in off and off[k][0] != a)
    keys = keys[:max_items]
    doc_ids = {}
    for _, leaf, doc in keys:
        doc_ids.setdefault(leaf, []).append(doc)
    leaf_tasks = [EvalTask(name=leaf, kind=task.kind, metric=task.metric, filter=task.filter) for leaf in doc_ids]
    baseline: dict[Hashable, Any] = {(leaf, doc): off[(b, leaf, doc)][0] for b, leaf, doc in keys}
    failing: dict[Hashable, Any] = {(leaf, doc): on[(b, leaf, doc)][0] for b, leaf, doc in keys}
    return leaf_tasks, doc_ids, baseline, failing


def bisect_release(
    ctx: ReleaseContext,
    *,
    variants: Mapping[str, VariantOutputs],
    max_rounds: int | None = None,
    max_items: int = 16,
) -> BisectResult:
    """Bisect the release's FlagGems operators with real re-serves.

    Uses the deploy stage's record of the operators that ran (``gems_ops``; else the
    eval's record of the target serve), the eval stage's ``target`` and
    ``target_gems_off`` per-sample logs, and runs each trial through the eval stage's
    ``flaggems_trial`` hook (the target served with operators excluded).  Writes
    ``reports/bisect.json``.

    Args:
        ctx: the release context.
        variants: the eval stage's ``variants`` output.
        max_rounds: trial cap (default ``ctx.options['bisect_max_rounds']`` or 8).
        max_items: probe items per trial.

    Raises:
        GateError: the eval stage has no FlagGems-off variant to compare with.
    """
    cfg = ctx.config
    off = variants.get("target_gems_off")
    if off is None or not off.per_sample:
        raise GateError("bisection needs the target_gems_off variant; set gates.flaggems_compare: true")
    try:
        ops = list(ctx.result("deploy", DeployOutputs).gems_ops)
    except ConfigError:
        ops = []
    ops = ops or list(variants["target"].gems_ops)
    base = list(cfg.serve.flaggems.excluded_ops)
    ops = [o for o in ops if o not in set(base)]
    rounds = max_rounds or int(ctx.options.get("bisect_max_rounds", 8))
    on_samples = variants["target"].per_sample
    tasks, doc_ids, baseline, failing = pick_items(
        Path(on_samples) if on_samples else None,
        off_per_sample=Path(off.per_sample),
        tasks=cfg.eval.tasks,
        max_items=max_items,
    )
    trial = ctx.hook("flaggems_trial")
    counter = [0]

    def run_trial(excluded: frozenset[str]) -> dict[Hashable, Any]:
        counter[0] += 1
        per_sample = trial(
            ctx, excluded_ops=sorted(excluded), tasks=tasks, doc_ids=doc_ids, label=f"bisect-{counter[0]}"
        )
        if per_sample is None:
            return {}  # NaN/inf: no item gets its FlagGems-off answer
        return {
            (line["task"], int(line["doc_id"])): answer_of(line)
            for line in iter_per_sample(Path(per_sample))
            if line.get("sample", 0) == 0
        }

    if failing is None:
        failing = {}  # the FlagGems-on serve computed NaN/inf: no item had its answer
    result = bisect_operators(
        ops, run_trial=run_trial, baseline=baseline, failing=failing, base_excluded=base, max_rounds=rounds
    )
    if not baseline:
        result.note = "FlagGems on and off gave the same answers on every item: nothing to bisect"
    data = result.to_json()
    data["probe"] = {"tasks": [t.name for t in tasks], "doc_ids": doc_ids}
    atomic_write_json(ctx.layout.reports_dir / "bisect.json", data)
    return result
