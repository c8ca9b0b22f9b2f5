"""flagrelease.gate on sample logs in lm-eval's exact format.

The logs are written by lm-eval's own ``EvaluationTracker`` (the code ``lm_eval
--log_samples`` uses), from sample records built the way lm-eval's evaluator builds
them; ``tests/data/gate/real`` holds a small run of real lm-eval against vLLM.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lm_eval.loggers import EvaluationTracker
from lm_eval.utils import hash_string

from flagrelease.config import EvalTask
from flagrelease.errors import GateError
from flagrelease.gate import BenchmarkSpec, gate_dirs

DATA = Path(__file__).parents[1] / "data" / "gate"


def write_run(
    root: Path,
    task: str,
    scores: Sequence[float | dict[str, float]],
    *,
    kind: str = "generate",
    metric: str = "exact_match",
    filters: Sequence[str] = ("none",),
    prompt: str = "Question {i}: what is {i} + {i}?",
    gen: dict[str, Any] | None = None,
    group: str | None = None,
    model: str = "tiny",
) -> Path:
    """Write one lm-eval run of ``task`` (one sample per doc) below ``root``, as lm-eval does.

    ``scores[i]`` is the metric value of doc ``i`` (or a dict filter -> value).
    """
    gen = gen if gen is not None else {"until": ["\n"], "max_gen_toks": 8, "do_sample": False, "temperature": 0.0}
    samples = []
    for f in filters:
        for i, score in enumerate(scores):
            value = score[f] if isinstance(score, dict) else score
            text = prompt.format(i=i)
            doc = {"question": text, "answer": str(2 * i)}
            if kind == "generate":
                chat = json.dumps([{"role": "user", "content": text}])
                arguments = [(chat, dict(gen))]
                resp = str(2 * i) if value else "?"
                resps, filtered = [[resp]], [resp]
                first_arg = chat
            else:
                arguments = [(text, f" {c}") for c in ("A", "B", "C", "D")]
                ll = [(-1.0 if (c == 0) == bool(value) else -2.0, False) for c in range(4)]
                resps, filtered = [[x] for x in ll], ll
                first_arg = text
            s = {
                "doc_id": i,
                "doc": doc,
                "target": str(2 * i),
                "arguments": arguments,
                "resps": resps,
                "filtered_resps": filtered,
                "filter": f,
                "metrics": [metric],
                "doc_hash": hash_string(json.dumps(doc, indent=2, ensure_ascii=False)),
                "prompt_hash": hash_string(first_arg),
                "target_hash": hash_string(str(2 * i)),
                metric: value,
            }
            samples.append(s)
    tracker = EvaluationTracker(output_path=str(root))
    tracker.general_config_tracker.log_experiment_args(
        model_source="local-chat-completions",
        model_args={"model": model},
        system_instruction=None,
        chat_template=None,
        fewshot_as_multiturn=False,
    )
    results: dict[str, Any] = {
        "results": {
            task: {
                "alias": task,
                f"{metric},{filters[0]}": float(np.mean([s[metric] for s in samples if s["filter"] == filters[0]])),
            }
        },
        "configs": {task: {"task": task}},
        "versions": {task: 1.0},
    }
    if group:
        results["group_subtasks"] = {group: [task]}
    tracker.save_results_aggregated(results=results, samples={task: samples})
    tracker.save_results_samples(task_name=task, samples=samples)
    return root


def _binary(n: int, p: float, seed: int) -> list[float]:
    return [float(x) for x in np.random.default_rng(seed).random(n) < p]


def _flip(scores: list[float], fraction: float, seed: int, *, down_only: bool = False) -> list[float]:
    rng = np.random.default_rng(seed)
    out = []
    for s in scores:
        if rng.random() < fraction and (not down_only or s == 1.0):
            s = 1.0 - s
        out.append(s)
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("gate")
    ref = _binary(1000, 0.8, 1)
    out: dict[str, tuple[Path, Path]] = {}
    # consistent: 2 % of items flip either way
    out["consistent"] = (
        write_run(root / "c_ref", "arith", ref),
        write_run(root / "c_tgt", "arith", _flip(ref, 0.02, 2)),
    )
    # inconsistent: the target loses about 15 points
    out["inconsistent"] = (
        write_run(root / "i_ref", "arith", ref),
        write_run(root / "i_tgt", "arith", _flip(ref, 0.19, 3, down_only=True)),
    )
    # inconclusive: 12 items, identical
    small = _binary(12, 0.7, 4)
    out["inconclusive"] = (write_run(root / "s_ref", "arith", small), write_run(root / "s_tgt", "arith", small))
    return out


def test_consistent_pair(pairs: dict[str, tuple[Path, Path]]) -> None:
    ref, tgt = pairs["consistent"]
    report = gate_dirs(ref, target=tgt)
    assert report.verdict == "consistent"
    (row,) = report.rows
    assert row.task == "arith" and row.metric == "exact_match" and row.test == "mcnemar+tost"
    assert row.n_items == 1000 and row.samples_per_item == 1
    assert row.reference is not None and 70 < row.reference < 90
    assert row.diff_ci is not None and -5 < row.diff_ci[0] <= row.diff <= row.diff_ci[1] < 5
    assert row.tost_p is not None and row.tost_p < 0.05
    text = report.to_text()
    assert "arith" in text and "CONSISTENT" in text


def test_inconsistent_pair(pairs: dict[str, tuple[Path, Path]]) -> None:
    ref, tgt = pairs["inconsistent"]
    report = gate_dirs(ref, target=tgt, margin=5.0)
    assert report.verdict == "inconsistent"
    (row,) = report.rows
    assert row.diff is not None and row.diff < -10
    assert row.diff_ci is not None and row.diff_ci[1] < -5
    assert row.p_value is not None and row.p_value < 1e-6


def test_inconclusive_small_pair(pairs: dict[str, tuple[Path, Path]]) -> None:
    ref, tgt = pairs["inconclusive"]
    report = gate_dirs(ref, target=tgt)
    assert report.verdict == "inconclusive"
    (row,) = report.rows
    assert row.diff == 0.0
    assert row.more_items_needed is not None and row.more_items_needed > 12
    assert f"about {row.more_items_needed} more items" in report.to_text()


def test_json_format(pairs: dict[str, tuple[Path, Path]]) -> None:
    ref, tgt = pairs["consistent"]
    data = gate_dirs(
        ref,
        target=tgt,
        reference_label="M-H100-CUDA",
        target_label="M-FlagOS-CPU",
        reference_chip="nvidia-h100",
        target_chip="cpu",
        tasks=[BenchmarkSpec("arith", "Arith (EM)", "exact_match"), BenchmarkSpec("gsm8k", "GSM8K (EM)")],
    ).to_json()
    assert data["reference"] == {"label": "M-H100-CUDA", "chip": "nvidia-h100"}
    assert data["target"] == {"label": "M-FlagOS-CPU", "chip": "cpu"}
    assert (data["margin"], data["alpha"], data["verdict"]) == (5.0, 0.05, "consistent")
    assert data["missing"] == ["GSM8K (EM)"]
    row = data["rows"][0]
    for key in (
        "task",
        "label",
        "metric",
        "reference",
        "target",
        "reference_ci",
        "target_ci",
        "diff",
        "diff_ci",
        "n_items",
        "samples_per_item",
        "test",
        "p_value",
        "tost_p",
        "verdict",
        "more_items_needed",
    ):
        assert key in row
    assert row["label"] == "Arith (EM)"
    assert data["rows"][1]["verdict"] == "missing" and data["rows"][1]["reference"] is None
    json.dumps(data)


def test_prompt_hash_mismatch_names_task_and_docs(tmp_path: Path) -> None:
    scores = _binary(20, 0.5, 5)
    ref = write_run(tmp_path / "ref", "arith", scores)
    tgt = write_run(tmp_path / "tgt", "arith", scores, prompt="Q{i}: what is {i} + {i}?")
    with pytest.raises(GateError, match=r"different prompts for task arith doc ids 0, 1, 2") as err:
        gate_dirs(ref, target=tgt)
    assert "+10 more" in str(err.value)


def test_generation_settings_mismatch(tmp_path: Path) -> None:
    scores = _binary(10, 0.5, 6)
    ref = write_run(tmp_path / "ref", "arith", scores)
    tgt = write_run(
        tmp_path / "tgt",
        "arith",
        scores,
        gen={"until": ["\n"], "max_gen_toks": 64, "do_sample": False, "temperature": 0.0},
    )
    with pytest.raises(GateError, match="different generation settings"):
        gate_dirs(ref, target=tgt)


def test_k_samples_per_item(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    p = rng.random(300)
    for side in ("ref", "tgt"):
        for k in range(4):
            write_run(tmp_path / side / f"pass-{k}", "arith", [float(x) for x in rng.random(300) < p])
    report = gate_dirs(tmp_path / "ref", target=tmp_path / "tgt", resamples=1000)
    (row,) = report.rows
    assert row.samples_per_item == 4 and row.n_items == 300
    assert row.test == "bootstrap+tost"
    assert row.verdict in ("consistent", "inconclusive")
    assert row.diff_ci is not None and row.diff_ci[0] < row.diff_ci[1]


def test_filters_and_metric_choice(tmp_path: Path) -> None:
    scores = [{"strict-match": 0.0, "flexible-extract": 1.0}] * 200
    ref = write_run(tmp_path / "ref", "gsm8k", scores, filters=("strict-match", "flexible-extract"))
    tgt = write_run(tmp_path / "tgt", "gsm8k", scores, filters=("strict-match", "flexible-extract"))
    flex = gate_dirs(ref, target=tgt, tasks=[EvalTask(name="gsm8k", metric="exact_match", filter="flexible-extract")])
    assert flex.rows[0].reference == 100.0 and flex.rows[0].filter == "flexible-extract"
    default = gate_dirs(ref, target=tgt)  # no "none" filter: the first one logged
    assert default.rows[0].reference == 0.0 and default.rows[0].filter == "strict-match"
    with pytest.raises(GateError, match="metric 'acc' not logged"):
        gate_dirs(ref, target=tgt, tasks=[BenchmarkSpec("gsm8k", metric="acc")])


def test_groups_are_one_benchmark(tmp_path: Path) -> None:
    for side in ("ref", "tgt"):
        for sub in ("mmlu_algebra", "mmlu_law"):
            write_run(
                tmp_path / side / sub,
                sub,
                _binary(150, 0.6, len(sub)),
                kind="loglikelihood",
                metric="acc",
                group="mmlu",
                prompt=sub + " {i}",
            )
    report = gate_dirs(tmp_path / "ref", target=tmp_path / "tgt")
    (row,) = report.rows
    assert row.task == "mmlu" and row.n_items == 300 and row.metric == "acc"
    assert row.verdict == "consistent" and row.diff == 0.0


def test_partial_overlap_is_noted(tmp_path: Path) -> None:
    ref = write_run(tmp_path / "ref", "arith", _binary(50, 0.5, 9))
    tgt = write_run(tmp_path / "tgt", "arith", _binary(50, 0.5, 9)[:30])
    (row,) = gate_dirs(ref, target=tgt).rows
    assert row.n_items == 30 and row.unmatched == {"reference_only": 20, "target_only": 0}
    assert "30 items both sides ran" in row.note


def test_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(GateError, match="does not exist"):
        gate_dirs(tmp_path / "nope", target=tmp_path / "empty")
    with pytest.raises(GateError, match="no lm-eval samples"):
        gate_dirs(tmp_path / "empty", target=tmp_path / "empty")


def test_real_lm_eval_output() -> None:
    """A small run of real lm-eval 0.4.13 against vLLM (chat + multiple choice), gated against itself."""
    real = DATA / "real"
    report = gate_dirs(real, target=real)
    assert {r.task for r in report.rows} == {"tinyarith", "tinyarith_mc"}
    for row in report.rows:
        assert row.n_items > 0 and row.diff == 0.0 and row.verdict in ("consistent", "inconclusive")


def test_cli(pairs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    ref, tgt = pairs["inconsistent"]
    out = tmp_path / "gate.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flagrelease.cli",
            "gate",
            "--reference",
            str(ref),
            "--target",
            str(tgt),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "INCONSISTENT" in proc.stdout
    assert json.loads(out.read_text())["verdict"] == "inconsistent"
    ref, tgt = pairs["consistent"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flagrelease.cli",
            "gate",
            "--reference",
            str(ref),
            "--target",
            str(tgt),
            "--margin",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


# -- the gate stage -----------------------------------------------------------------------
def _stage_ctx(tmp_path: Path, variants: dict[str, Any], **overrides: Any) -> Any:
    from flagrelease.config import load_release
    from flagrelease.pipeline import ReleaseContext, StageResult
    from tests.fixtures_demo import write_demo_config

    overrides.setdefault("eval__tasks", [{"name": "arith", "label": "Arith (EM)", "metric": "exact_match"}])
    cfg = load_release(write_demo_config(tmp_path / "cfg", tmp_path, **overrides))
    ctx = ReleaseContext.create(cfg)
    ctx.results["eval"] = StageResult("eval", "", outputs={"variants": variants})
    return ctx


def _variant(folder: Path | None, throughput: float | None = None, **extra: Any) -> dict[str, Any]:
    return {"dir": str(folder) if folder else None, "throughput": throughput, "chip": "cpu", **extra}


def test_stage_writes_results_and_gates_throughput(pairs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    from flagrelease.gate import run_stage

    ref, tgt = pairs["consistent"]
    variants = {"target": _variant(tgt, 100.0), "reference": _variant(ref), "target_gems_off": _variant(ref, 250.0)}
    result = run_stage(_stage_ctx(tmp_path, variants))
    assert result.outputs["verdict"] == "consistent"
    assert result.outputs["throughput_ok"] is False  # 100 / 250 = 0.4 < 0.5
    assert result.status == "failed"
    data = json.loads(Path(result.outputs["results"]).read_text())
    assert data["reference"]["label"] == "Tiny-Qwen2-CPU"
    assert data["target"]["label"] == "Tiny-Qwen2-FlagOS-CPU"
    assert data["throughput"] == {
        "gems_on_tok_s": 100.0,
        "gems_off_tok_s": 250.0,
        "ratio": 0.4,
        "min_ratio": 0.5,
        "ok": False,
    }
    assert data["flaggems"]["on_vs_off"]["verdict"] == "consistent"
    assert [r["comparison"] for r in result.tables["gate"]] == ["target vs reference", "FlagGems on vs off"]
    variants["target"]["throughput"] = 200.0
    ok = run_stage(_stage_ctx(tmp_path / "ok", variants))
    assert (ok.status, ok.outputs["throughput_ok"]) == ("ok", True)


def test_stage_blames_flaggems_when_on_and_off_differ(pairs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    from flagrelease.gate import run_stage

    ref, bad = pairs["inconsistent"]
    variants = {"target": _variant(bad, 100.0), "reference": _variant(ref), "target_gems_off": _variant(ref, 100.0)}
    result = run_stage(_stage_ctx(tmp_path, variants, gates__bisect_on_failure=False))
    assert (result.status, result.outputs["verdict"]) == ("failed", "inconsistent")
    data = json.loads(Path(result.outputs["results"]).read_text())
    assert data["flaggems"]["on_vs_off"]["verdict"] == "inconsistent"
    assert data["flaggems"]["to_blame"] is True
    assert result.outputs["blamed_ops"] == []  # bisection turned off


def test_stage_with_a_target_that_computed_nan(pairs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    from flagrelease.gate import run_stage

    ref, _ = pairs["consistent"]
    variants = {
        "target": _variant(None, error="the server computed NaN"),
        "reference": _variant(ref),
        "target_gems_off": _variant(ref, 100.0),
    }
    result = run_stage(_stage_ctx(tmp_path, variants, gates__bisect_on_failure=False))
    assert result.outputs["verdict"] == "inconsistent" and result.status == "failed"
    data = json.loads(Path(result.outputs["results"]).read_text())
    (row,) = data["rows"]
    assert row["target"] is None and row["reference"] is not None and "NaN" in row["note"]
    assert data["flaggems"]["target_error"] == "the server computed NaN"


def test_release_labels(tmp_path: Path) -> None:
    from flagrelease.bundle import release_labels
    from flagrelease.config import load_release
    from tests.fixtures_demo import write_demo_config

    cfg = load_release(
        write_demo_config(
            tmp_path, tmp_path, eval__reference={"chip": "nvidia-h100", "mode": "stored", "results_dir": str(tmp_path)}
        )
    )
    assert release_labels(cfg) == ("Tiny-Qwen2-H100-CUDA", "Tiny-Qwen2-FlagOS-CPU")
