"""The gate against published reference scores (unpaired), FlagRelease's relative rule, the seeds' H100 files.

The target side is real lm-eval output (``tests/data/gate/real``: 20 items of each of
``tinyarith`` and ``tinyarith_mc``, all right) or lm-eval's own writer (test_gate.write_run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from statsmodels.stats.proportion import tost_proportions_2indep

from flagrelease.config import load_release
from flagrelease.constants import REPO_ROOT
from flagrelease.errors import GateError
from flagrelease.gate import BenchmarkSpec, Rule, gate_dirs, gate_scores
from flagrelease.gate.stats import relative_verdict, tost_power, unpaired_comparison
from flagrelease.samples import SamplesError, load_reference_scores
from tests.gate.test_gate import write_run

DATA = Path(__file__).parents[1] / "data" / "gate"
SCORES_DIR = REPO_ROOT / "release_configs" / "reference_scores"


def _scores(path: Path, scores: dict[str, Any], **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({"scores": scores, **extra}), encoding="utf-8")
    return path


# -- statistics ---------------------------------------------------------------------------
def test_unpaired_comparison_is_statsmodels_tost() -> None:
    target = [[1.0]] * 780 + [[0.0]] * 220
    c = unpaired_comparison(0.80, target=target, margin=0.05, reference_n=1000)
    want = tost_proportions_2indep(780, 1000, 800, 1000, -0.05, 0.05, method="agresti-caffo")
    assert c.tost_p == pytest.approx(float(want.pvalue))
    assert c.test == "unpaired-tost" and not c.reference_n_assumed
    assert c.diff == pytest.approx(-0.02)
    assert c.diff_ci[0] < -0.02 < c.diff_ci[1]
    assert c.verdict == "consistent"  # p = 0.0495 < 0.05
    # The power it had: the chance to show equivalence if the two were equal.
    se = float(np.sqrt(want.results_larger.variance))
    assert c.power == pytest.approx(tost_power(se=se, margin=0.05, alpha=0.05))
    assert 0.5 < c.power < 1


def test_unpaired_has_less_power_than_paired_and_says_so() -> None:
    """The same 30 items, all equal: paired they are inconclusive; unpaired, nearly powerless."""
    target = [[1.0]] * 22 + [[0.0]] * 8
    c = unpaired_comparison(22 / 30, target=target, margin=0.05, reference_n=30)
    assert c.verdict == "inconclusive"
    assert c.power < 0.05
    assumed = unpaired_comparison(22 / 30, target=target, margin=0.05)
    assert assumed.reference_n == 30 and assumed.reference_n_assumed


def test_unpaired_detects_a_large_drop() -> None:
    target = [[1.0]] * 600 + [[0.0]] * 400
    c = unpaired_comparison(0.80, target=target, margin=0.05, reference_n=1319)
    assert c.verdict == "inconsistent" and c.diff_ci[1] < -0.05


@pytest.mark.parametrize(
    ("reference", "target", "n", "verdict", "drop"),
    [
        (0.9575, 0.9553, 1319, "consistent", 0.0023),  # the Iluvatar GSM8K row: 0.2 % drop
        (0.8534, 0.8216, 14042, "consistent", 0.0373),  # MMLU: 3.7 % of the reference
        (0.89, 0.8031, 1346, "inconsistent", 0.0976),  # CEVAL: 9.8 % > 5 %
        (0.7667, 0.70, 30, "inconclusive", 0.087),  # AIME: 2 of 30 questions, from published 2-decimal scores
        (23 / 30, 21 / 30, 30, "inconclusive", 0.087),  # the same, exact: the noise zone
        (23 / 30, 20 / 30, 30, "inconsistent", 0.1304),  # 3 of 30: beyond it
        (0.50, 0.60, 50, "consistent", -0.2),  # a gain always passes
    ],
)
def test_relative_rule_matches_flagrelease(reference: float, target: float, n: int, verdict: str, drop: float) -> None:
    got, rel, note = relative_verdict(reference, target=target, n_items=n)
    assert got == verdict
    assert rel == pytest.approx(drop, abs=5e-4)
    assert ("retest" in note) == (verdict == "inconclusive")


def test_relative_rule_noise_zone_only_on_small_benchmarks() -> None:
    # 2 items on 200 is outside the zone (n > 100): a 12 % drop fails.
    assert relative_verdict(0.085, target=0.075, n_items=200)[0] == "inconsistent"
    assert relative_verdict(0.17, target=0.15, n_items=100)[0] == "inconclusive"
    assert relative_verdict(0.17, target=0.15, n_items=100, noise_items=0)[0] == "inconsistent"


# -- published scores files -------------------------------------------------------------
@pytest.mark.parametrize("name", ["deepseek-r1-iluvatar", "deepseek-r1-distill-qwen-32b-nvidia"])
def test_seed_h100_scores_load_and_match_the_release_tasks(name: str) -> None:
    scores = load_reference_scores(SCORES_DIR / f"{name}.yaml")
    cfg = load_release(REPO_ROOT / "release_configs" / f"{name}.yaml")
    assert scores.chip == cfg.eval.reference.chip == "nvidia-h100"
    assert sorted(scores.scores) == sorted(t.name for t in cfg.eval.tasks)
    for task, published in scores.scores.items():
        assert published.n is not None and 0 < published.score < 100, task
        # every published percentage is a whole number of the task's items
        count = round(published.score * published.n / 100)
        assert abs(100 * count / published.n - published.score) < 0.006, task
    assert scores.label is not None and scores.label.endswith("-H100-CUDA")


def test_seed_h100_numbers_are_the_cards(tmp_path: Path) -> None:
    iluvatar = load_reference_scores(SCORES_DIR / "deepseek-r1-iluvatar.yaml").scores
    assert (iluvatar["gsm8k"].score, iluvatar["ceval-valid"].score, iluvatar["aime24"].score) == (95.75, 89.0, 76.67)
    nvidia = load_reference_scores(SCORES_DIR / "deepseek-r1-distill-qwen-32b-nvidia.yaml").scores
    assert (nvidia["mmlu"].score, nvidia["minerva_math500"].score) == (79.33, 92.8)


def test_a_release_config_can_point_at_published_scores(tmp_path: Path) -> None:
    from tests.fixtures_demo import write_demo_config

    path = write_demo_config(
        tmp_path,
        tmp_path,
        eval__reference={
            "chip": "nvidia-h100",
            "mode": "scores",
            "scores": str(SCORES_DIR / "deepseek-r1-iluvatar.yaml"),
        },
    )
    cfg = load_release(path)
    assert cfg.eval.reference.mode == "scores" and cfg.eval.reference.scores is not None
    assert not cfg.remote_reference
    from flagrelease.errors import ConfigError

    with pytest.raises(ConfigError, match="scores"):
        load_release(write_demo_config(tmp_path / "bad", tmp_path, eval__reference={"chip": "cpu", "mode": "scores"}))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ({"scores": {"gsm8k": 0.9575}, "bogus": 1}, "unknown key"),
        ({"scores": {"gsm8k": 195.0}}, "not a percentage"),
        ({"scores": {"gsm8k": {"score": 90, "n": 0}}}, "positive integer"),
        ({"scores": {"gsm8k": "high"}}, "must be a number"),
        ({"scores": {}}, "expected a mapping"),
    ],
)
def test_bad_scores_files_say_what_is_wrong(tmp_path: Path, content: dict[str, Any], why: str) -> None:
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    with pytest.raises(SamplesError, match=why) as err:
        load_reference_scores(path)
    assert str(path) in str(err.value)


# -- the gate -----------------------------------------------------------------------------
def test_gate_scores_on_real_lm_eval_output(tmp_path: Path) -> None:
    ref = load_reference_scores(
        _scores(tmp_path / "ref.yaml", {"tinyarith": {"score": 95.0, "n": 20}, "tinyarith_mc": 100.0}, label="Ref")
    )
    report = gate_scores(ref, target=DATA / "real")
    assert report.unpaired and report.reference_label == "Ref"
    rows = {r.task: r for r in report.rows}
    assert set(rows) == {"tinyarith", "tinyarith_mc"}
    for row in rows.values():
        assert row.unpaired and row.test == "unpaired-tost" and row.target == 100.0 and row.n_items == 20
        assert row.power is not None and row.power < 0.5  # 20 items unpaired decide little
        assert row.verdict == "inconclusive" and "unpaired" in row.note
    assert rows["tinyarith"].reference_n == 20 and "unknown" not in rows["tinyarith"].note
    assert rows["tinyarith_mc"].reference_n == 20 and "unknown" in rows["tinyarith_mc"].note
    data = report.to_json()
    assert data["unpaired"] is True and all(r["unpaired"] for r in data["rows"])
    assert "(unpaired)" in report.to_text() and "power to show equivalence" in report.to_text()
    json.dumps(data)
    # The relative rule gives FlagRelease's verdict: no drop, so consistent.
    relative = gate_scores(ref, target=DATA / "real", rule=Rule("relative"))
    assert relative.verdict == "consistent" and {r.rule for r in relative.rows} == {"relative"}
    assert relative.to_json()["rule"] == "relative" and relative.to_json()["relative_margin"] == 5.0


def test_gate_scores_missing_task_is_missing(tmp_path: Path) -> None:
    ref = load_reference_scores(_scores(tmp_path / "ref.yaml", {"tinyarith": 100.0}))
    report = gate_scores(
        ref, target=DATA / "real", tasks=[BenchmarkSpec("tinyarith"), BenchmarkSpec("tinyarith_mc", "MC")]
    )
    assert [r.verdict for r in report.rows] == ["inconclusive", "missing"]
    assert report.missing == ["MC"] and report.rows[1].target == 100.0
    with pytest.raises(GateError, match="no lm-eval samples"):
        gate_scores(ref, target=tmp_path)


def test_relative_rule_on_paired_logs(tmp_path: Path) -> None:
    """60 items, the target 2 items lower (a 4.3 % relative drop at 77 %): relative passes, TOST cannot decide."""
    ref_scores = [1.0] * 46 + [0.0] * 14
    tgt_scores = [1.0] * 44 + [0.0] * 16
    ref = write_run(tmp_path / "ref", "arith", ref_scores)
    tgt = write_run(tmp_path / "tgt", "arith", tgt_scores)
    (absolute,) = gate_dirs(ref, target=tgt).rows
    assert absolute.verdict == "inconclusive" and absolute.rule == "absolute"
    (relative,) = gate_dirs(ref, target=tgt, rule=Rule("relative")).rows
    assert relative.verdict == "consistent" and relative.relative_drop == pytest.approx(4.35, abs=0.01)
    assert relative.p_value == absolute.p_value and relative.diff_ci == absolute.diff_ci  # statistics kept
    # Four items lower on 60 (8.7 %): beyond 5 % and beyond the noise zone's 2 items.
    worse = write_run(tmp_path / "worse", "arith", [1.0] * 42 + [0.0] * 18)
    (row,) = gate_dirs(ref, target=worse, rule=Rule("relative")).rows
    assert row.verdict == "inconsistent"
    with pytest.raises(GateError, match="unknown gate rule"):
        Rule("fuzzy")


def test_cli_with_a_scores_only_reference(tmp_path: Path) -> None:
    scores = _scores(tmp_path / "ref.yaml", {"tinyarith": {"score": 100.0, "n": 20}, "tinyarith_mc": 30.0})
    out = tmp_path / "gate.json"
    cmd = [sys.executable, "-m", "flagrelease.cli", "gate", "--reference-scores", str(scores), "--target"]
    proc = subprocess.run(
        [*cmd, str(DATA / "real"), "--json", str(out)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 1, proc.stderr  # tinyarith_mc: 100 % against a published 30 %
    assert "INCONSISTENT" in proc.stdout and "(unpaired)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["unpaired"] is True
    assert {r["task"]: r["verdict"] for r in data["rows"]} == {
        "tinyarith": "inconclusive",
        "tinyarith_mc": "inconsistent",
    }
    relative = subprocess.run(
        [*cmd, str(DATA / "real"), "--rule", "relative"], capture_output=True, text=True, timeout=120, check=False
    )
    assert relative.returncode == 0, relative.stderr  # no drop anywhere
    assert "relative rule" in relative.stdout
    bad = _scores(tmp_path / "bad.yaml", {"tinyarith": 140})
    bad_cmd = [sys.executable, "-m", "flagrelease.cli", "gate", "--reference-scores", str(bad), "--target"]
    proc = subprocess.run([*bad_cmd, str(DATA / "real")], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "not a percentage" in proc.stderr


def test_the_card_says_unpaired_with_its_power(tmp_path: Path) -> None:
    from flagrelease.card import render_card_cli
    from tests.fixtures_demo import write_demo_config

    ref = load_reference_scores(
        _scores(tmp_path / "ref.yaml", {"tinyarith": {"score": 95.0, "n": 20}, "tinyarith_mc": 100.0})
    )
    results = tmp_path / "gate_results.json"
    results.write_text(json.dumps(gate_scores(ref, target=DATA / "real").to_json()), encoding="utf-8")
    config = write_demo_config(tmp_path / "cfg", tmp_path)
    text = render_card_cli(config, results=results, out_dir=tmp_path / "card").read_text()
    assert "*unpaired*" in text and "power to show equivalence: tinyarith" in text, text
