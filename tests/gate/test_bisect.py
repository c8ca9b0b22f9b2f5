"""flagrelease.gate.bisect: the search, against a deterministic model of operators and answers.

The oracle below is a real (if toy) computation, not a mock: each probe item's answer is
computed from the item and the set of operators enabled, with faulty operators that
corrupt the items they touch, a noisy one that flips a single item, and a pair that is
only faulty together.  The end-to-end bisection with a real vLLM server is in
tests/evaluate/test_eval.py (slow).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import pytest

from flagrelease.config import EvalTask
from flagrelease.gate.bisect import answer_of, bisect_operators, pick_items

OPS = [f"op{i:02d}" for i in range(16)]
ITEMS = list(range(16))


def _h(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest(), 16)


class ToyEngine:
    """Answers of a toy model for a set of excluded operators; counts its re-serves."""

    def __init__(
        self, *, faulty: Iterable[str] = (), noisy: str | None = None, pair: tuple[str, str] | None = None
    ) -> None:
        self.faulty = set(faulty)
        self.noisy = noisy
        self.pair = pair
        self.serves = 0

    def answers(self, excluded: frozenset[str]) -> dict[Hashable, Any]:
        enabled = set(OPS) - excluded
        out: dict[Hashable, Any] = {}
        for item in ITEMS:
            answer = _h("clean", item) % 1000
            for op in sorted(self.faulty & enabled):
                if _h(op, item) % 4 != 0:  # a faulty op corrupts about 3 in 4 items
                    answer = _h(op, answer) % 1000
            if self.noisy in enabled and item == 3:
                answer += 1
            if self.pair and set(self.pair) <= enabled:
                answer = -answer
            out[item] = answer
        return out

    def __call__(self, excluded: frozenset[str]) -> dict[Hashable, Any]:
        self.serves += 1
        return self.answers(excluded)


def _run(engine: ToyEngine, **kw: Any) -> Any:
    baseline = engine.answers(frozenset(OPS))  # FlagGems off
    failing = engine.answers(frozenset())  # every operator on (known from the eval)
    return bisect_operators(OPS, run_trial=engine, baseline=baseline, failing=failing, **kw)


@pytest.mark.parametrize("culprit", ["op00", "op07", "op08", "op15"])
def test_single_faulty_operator_in_log2_rounds(culprit: str) -> None:
    engine = ToyEngine(faulty=[culprit])
    result = _run(engine)
    assert result.blamed_ops == [culprit]
    assert result.proposed_excluded_ops == [culprit]
    assert result.verified is True
    # log2(16) halvings plus one verification trial
    assert engine.serves == result.rounds == int(math.log2(len(OPS))) + 1
    assert all(t.excluded for t in result.trials)


def test_two_faulty_operators() -> None:
    engine = ToyEngine(faulty=["op02", "op11"])
    result = _run(engine, max_rounds=12)
    assert result.blamed_ops == ["op02", "op11"]
    assert result.verified is True
    assert result.rounds <= 2 * (int(math.log2(len(OPS))) + 1)


def test_release_exclusions_are_kept() -> None:
    engine = ToyEngine(faulty=["op05"])
    baseline = engine.answers(frozenset(OPS))
    result = bisect_operators(
        [o for o in OPS if o != "op09"],
        run_trial=engine,
        baseline=baseline,
        failing=engine.answers(frozenset({"op09"})),
        base_excluded=["op09"],
    )
    assert result.blamed_ops == ["op05"]
    assert result.proposed_excluded_ops == ["op05", "op09"]
    assert all("op09" in t.excluded for t in result.trials)


def test_noisy_operator_below_threshold_is_not_blamed() -> None:
    engine = ToyEngine(faulty=["op13"], noisy="op04")
    result = _run(engine)
    assert result.blamed_ops == ["op13"]
    # the verification trial still sees the one noisy item, below the threshold
    assert result.verified is True
    assert result.trials[-1].mismatches == 1 < result.threshold


def test_nothing_to_bisect() -> None:
    engine = ToyEngine()
    result = _run(engine)
    assert result.blamed_ops == [] and result.rounds == 0 and engine.serves == 0
    assert "nothing to bisect" in result.note


def test_unknown_failing_run_costs_one_trial() -> None:
    engine = ToyEngine(faulty=["op03"])
    baseline = engine.answers(frozenset(OPS))
    result = bisect_operators(OPS, run_trial=engine, baseline=baseline)
    assert result.blamed_ops == ["op03"]
    assert result.rounds == int(math.log2(len(OPS))) + 2
    assert result.trials[0].excluded == ()


def test_round_cap_proposes_the_unresolved_group() -> None:
    engine = ToyEngine(faulty=["op06"])
    result = _run(engine, max_rounds=2)
    assert engine.serves == 2
    assert result.blamed_ops == []
    assert result.unresolved == [["op04", "op05", "op06", "op07"]]
    assert result.proposed_excluded_ops == ["op04", "op05", "op06", "op07"]
    assert result.verified is None
    assert "trial cap" in result.note


def test_interacting_operators_are_reported() -> None:
    engine = ToyEngine(pair=("op01", "op12"))
    result = _run(engine, max_rounds=10)
    # No operator fails alone: nothing is blamed, the verification says so, and the
    # release's exclusion list is left as it is.
    assert result.verified is False
    assert result.blamed_ops == [] and result.proposed_excluded_ops == []
    assert result.suspects
    assert "several operators together" in result.note


def test_answer_of_text_and_choices() -> None:
    assert answer_of({"response": " 12"}) == " 12"
    mc = {"response": [["-3.5", "False"], ["-1.25", "True"], ["-7.0", "False"]]}
    assert answer_of(mc) == 1


def _per_sample(path: Path, rows: list[tuple[str, str, int, Any]]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"benchmark": b, "task": t, "doc_id": d, "sample": 0, "score": 1.0, "response": r}) + "\n"
            for b, t, d, r in rows
        )
    )
    return path


def test_pick_items_prefers_the_task_with_most_differences(tmp_path: Path) -> None:
    mc = lambda best: [["-1.0", "False"], ["-0.5" if best else "-2.0", "False"]]  # noqa: E731
    on = _per_sample(
        tmp_path / "on.jsonl",
        [
            ("gen", "gen", 0, "a"),
            ("gen", "gen", 1, "x"),
            ("mmlu", "mmlu_a", 0, mc(True)),
            ("mmlu", "mmlu_b", 4, mc(True)),
            ("mmlu", "mmlu_b", 5, mc(False)),
        ],
    )
    off = _per_sample(
        tmp_path / "off.jsonl",
        [
            ("gen", "gen", 0, "a"),
            ("gen", "gen", 1, "b"),
            ("mmlu", "mmlu_a", 0, mc(False)),
            ("mmlu", "mmlu_b", 4, mc(False)),
            ("mmlu", "mmlu_b", 5, mc(False)),
        ],
    )
    tasks = [EvalTask(name="gen"), EvalTask(name="mmlu", kind="loglikelihood", metric="acc")]
    leaf_tasks, doc_ids, baseline, failing = pick_items(on, off_per_sample=off, tasks=tasks)
    assert [t.name for t in leaf_tasks] == ["mmlu_a", "mmlu_b"]
    assert all(t.kind == "loglikelihood" for t in leaf_tasks)
    assert doc_ids == {"mmlu_a": [0], "mmlu_b": [4]}
    assert baseline == {("mmlu_a", 0): 0, ("mmlu_b", 4): 0}
    assert failing == {("mmlu_a", 0): 1, ("mmlu_b", 4): 1}
    same = pick_items(off, off_per_sample=off, tasks=tasks)
    assert same == ([], {}, {}, {})
