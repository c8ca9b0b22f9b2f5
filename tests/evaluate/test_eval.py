"""flagrelease.evaluate (with the gate and the operator bisection end to end on vLLM).

Fast tests: task-name checks, response checks, a misbehaving server, variant plans,
stored references.  Slow tests (real vLLM on the tiny model): resuming an eval after the
server dies, and the eval + gate + bisection stages with a deliberately broken operator.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flagrelease import evaluate as ev
from flagrelease import gate
from flagrelease.config import EvalTask, GenerationSettings, ProbeSettings, ReleaseConfig, load_release
from flagrelease.errors import ConfigError, EvalError
from flagrelease.evaluate._lmeval_runner import MalformedResponse, validate_response
from flagrelease.pipeline import ReleaseContext, StageResult
from flagrelease.samples import iter_per_sample
from tests.fixtures_demo import write_demo_config

DATA = Path(__file__).parents[1] / "data" / "gate"
TASKS = [
    EvalTask(name="tinyarith_mc", label="TinyArith-MC (Acc.)", metric="acc", kind="loglikelihood"),
    EvalTask(name="tinyarith", label="TinyArith (EM)", metric="exact_match"),
]


@dataclass
class _Endpoint:
    base_url: str
    model_name: str


# -- task names ---------------------------------------------------------------------------
def test_unknown_task_name_lists_close_matches() -> None:
    with pytest.raises(EvalError, match=r"'gsm8kk': did you mean: gsm8k") as err:
        ev.check_tasks(["gsm8k", "gsm8kk", "tinyarith_mcq"])
    assert "'tinyarith_mcq': did you mean: tinyarith_mc" in str(err.value)
    assert "'gsm8k'" not in str(err.value).split("\n", 1)[1]
    ev.check_tasks(
        [
            "gsm8k",
            "mmlu",
            "ceval-valid",
            "aime24",
            "gpqa_diamond_cot_zeroshot",
            "minerva_math500",
            "hendrycks_math500",
            "tinyarith",
            "tinyarith_mc",
        ]
    )


def test_include_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="not a folder of lm-eval task definitions"):
        ev.check_tasks(["tinyarith"], include_path=tmp_path / "nope")


# -- response checks ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "kw", "why"),
    [
        ([], {"generate": True, "chat": True}, "not a JSON object"),
        ({"error": {"message": "boom"}}, {"generate": True, "chat": True}, "error object"),
        ({"choices": []}, {"generate": True, "chat": True}, "no 'choices'"),
        (
            {"choices": [{"index": 0, "message": {"role": "assistant"}}]},
            {"generate": True, "chat": True},
            "message.content",
        ),
        ({"choices": [{"index": 0, "text": 3}]}, {"generate": True, "chat": False}, "'text' string"),
        ({"choices": [{"index": 0, "text": "a"}]}, {"generate": True, "chat": False, "n_prompts": 2}, "1 choices"),
        ({"choices": [{"index": 0, "text": "a"}]}, {"generate": False, "chat": False}, "no 'logprobs'"),
        (
            {"choices": [{"index": 0, "logprobs": {"token_logprobs": [None, -1.0], "top_logprobs": [None]}}]},
            {"generate": False, "chat": False},
            "same length",
        ),
        (
            {"choices": [{"index": 0, "logprobs": {"token_logprobs": [None, None], "top_logprobs": [None, {}]}}]},
            {"generate": False, "chat": False},
            "no logprob",
        ),
    ],
)
def test_validate_response_rejects(body: Any, kw: dict[str, Any], why: str) -> None:
    with pytest.raises(MalformedResponse, match=why):
        validate_response(body, **kw)


def test_validate_response_accepts() -> None:
    validate_response({"choices": [{"index": 0, "message": {"content": "7"}}]}, generate=True, chat=True)
    validate_response({"choices": [{"index": 0, "text": "7"}]}, generate=True, chat=False)
    validate_response(
        {
            "choices": [
                {
                    "index": 0,
                    "logprobs": {
                        "token_logprobs": [None, -0.5, -1.0],
                        "top_logprobs": [None, {"a": -0.5}, {"b": -0.2}],
                    },
                }
            ]
        },
        generate=False,
        chat=False,
    )


class _Misbehaving(BaseHTTPRequestHandler):
    """A misbehaving OpenAI-compatible server.

    vLLM never sends malformed bodies, so a real vLLM cannot exercise these checks; this
    small real HTTP server answers every request the way ``mode`` says.
    """

    mode = "malformed"
    #: A mode per served model name, over ``mode`` (several "servers" on one handler).
    modes: ClassVar[dict[str, str]] = {}
    requests = 0

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests += 1
        try:
            model = json.loads(raw or b"{}").get("model")
        except ValueError:
            model = None
        self.mode = self.modes.get(str(model), type(self).mode)
        if self.mode in ("fine", "rambling", "mute"):
            status, body = 200, json.dumps(self._answer())
        elif self.mode == "malformed":
            status, body = 200, json.dumps({"id": "x", "choices": [{"index": 0, "finish_reason": "stop"}]})
        elif self.mode == "nonfinite":
            status, body = (
                400,
                json.dumps(
                    {
                        "error": {
                            "message": "Out of range float values are not JSON compliant",
                            "type": "BadRequestError",
                            "code": 400,
                        }
                    }
                ),
            )
        else:
            status, body = 200, "<html>proxy error</html>"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self) -> dict[str, Any]:
        """A well-formed answer: ``fine`` stops, ``rambling`` runs to max_tokens, ``mute`` says nothing."""
        if self.path.endswith("/chat/completions"):
            reason = "length" if self.mode == "rambling" else "stop"
            choice = {"index": 0, "message": {"role": "assistant", "content": "7"}, "finish_reason": reason}
            return {"id": "x", "choices": [choice], "usage": {"completion_tokens": 8}}
        tokens = 0 if self.mode == "mute" else 1
        choice = {"index": 0, "text": " 2" if tokens else "", "finish_reason": "stop", "logprobs": None}
        return {"id": "x", "choices": [choice], "usage": {"completion_tokens": tokens}}

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def misbehaving() -> Iterator[tuple[str, type[_Misbehaving]]]:
    handler = type("Handler", (_Misbehaving,), {"requests": 0, "modes": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("mode", "kind", "words"),
    [
        ("malformed", "malformed_response", "malformed chat completion response"),
        ("nonfinite", "nonfinite", "NaN or infinite values"),
    ],
)
def test_bad_responses_stop_the_eval_clearly(
    misbehaving: tuple[str, type[_Misbehaving]], tmp_path: Path, mode: str, kind: str, words: str
) -> None:
    url, handler = misbehaving
    handler.mode = mode
    out = tmp_path / "eval" / "target"
    with pytest.raises(EvalError, match=words) as err:
        ev.evaluate_endpoint(
            _Endpoint(url, "tiny"),
            tasks=[TASKS[1]],
            out_dir=out,
            cache_path=tmp_path / "c.sqlite",
            generation=GenerationSettings(max_tokens=8),
            concurrency=2,
            limit=6,
        )
    assert err.value.kind == kind  # type: ignore[attr-defined]
    assert url in str(err.value)
    assert not out.exists()  # nothing partial is ever recorded as final
    assert not list(out.parent.glob(".target.*"))
    assert handler.requests <= 3  # after the first bad answer nothing more is sent


# -- probes before the eval ----------------------------------------------------------------
def _probed(url: str, tmp_path: Path, **probes: Any) -> ev.EvalRun:
    return ev.evaluate_endpoint(
        _Endpoint(url, "tiny"),
        tasks=[TASKS[1]],
        out_dir=tmp_path / "eval" / "target",
        cache_path=tmp_path / "c.sqlite",
        generation=GenerationSettings(max_tokens=8),
        concurrency=2,
        limit=6,
        probes=ProbeSettings(**probes),
    )


def test_probes_pass_and_their_answers_are_reused(misbehaving: tuple[str, type[_Misbehaving]], tmp_path: Path) -> None:
    url, handler = misbehaving
    handler.mode = "fine"
    run = _probed(url, tmp_path, items_per_task=3)
    assert run.probes is not None
    assert run.probes["stability"]["completion_tokens"] == 1
    truncation = run.probes["truncation"]
    assert truncation["tasks"] == {"tinyarith": {"answers": 3, "truncated": 0}} and truncation["share"] == 0.0
    # one stability request, 3 probe items, then the 6-item eval of which 3 come from the cache
    assert handler.requests == 1 + 3 + 3
    assert run.truncated() == {"answers": 6, "truncated": 0}
    assert len(list(iter_per_sample(run.per_sample))) == 6  # the probe's samples are not the eval's


def test_a_rambling_server_stops_at_the_truncation_probe(
    misbehaving: tuple[str, type[_Misbehaving]], tmp_path: Path
) -> None:
    url, handler = misbehaving
    handler.mode = "rambling"
    with pytest.raises(EvalError, match=r"truncation probe: 3 of 3 probe answers stopped at max_tokens") as err:
        _probed(url, tmp_path, items_per_task=3)
    assert err.value.kind == "truncated"  # type: ignore[attr-defined]
    assert "eval.generation.max_tokens = 8" in str(err.value)
    assert err.value.probe["share"] == 1.0  # type: ignore[attr-defined]
    assert handler.requests == 1 + 3  # nothing past the probe
    assert not (tmp_path / "eval" / "target").exists()
    # A looser limit lets the same server through, its truncation counted.
    handler.requests = 0
    run = _probed(url, tmp_path, items_per_task=3, max_truncated=1.0)
    assert run.truncated() == {"answers": 6, "truncated": 6}


def test_a_mute_server_fails_the_stability_probe(misbehaving: tuple[str, type[_Misbehaving]], tmp_path: Path) -> None:
    url, handler = misbehaving
    handler.mode = "mute"
    with pytest.raises(EvalError, match=r"failed the stability probe.*no tokens") as err:
        _probed(url, tmp_path)
    assert err.value.kind == "unstable"  # type: ignore[attr-defined]
    assert handler.requests == 1
    handler.mode, handler.requests = "malformed", 0
    with pytest.raises(EvalError, match=r"stability probe.*malformed answer"):
        _probed(url, tmp_path)
    with pytest.raises(EvalError, match=r"stability probe.*ConnectError"):
        ev.stability_probe("http://127.0.0.1:9", model_name="tiny", variant="target", timeout_s=5)


# -- variants -----------------------------------------------------------------------------
def _ctx(tmp_path: Path, **overrides: Any) -> ReleaseContext:
    cfg = load_release(write_demo_config(tmp_path / "cfg", tmp_path, **overrides))
    ctx = ReleaseContext.create(cfg)
    ctx.results["fetch"] = StageResult("fetch", "", outputs={"model_dir": str(tmp_path / "source")})
    ctx.results["convert"] = StageResult(
        "convert", "", outputs={"model_dir": str(tmp_path / "converted"), "mode": "int8-w8a8"}
    )
    return ctx


def test_demo_variants(tmp_path: Path) -> None:
    plans = {p.name: p for p in ev.plan_variants(_ctx(tmp_path))}
    assert list(plans) == ["target", "reference", "target_gems_off"]
    assert (plans["target"].model_dir, plans["target"].flaggems) == (tmp_path / "converted", True)
    assert (plans["reference"].model_dir, plans["reference"].flaggems) == (tmp_path / "source", False)
    assert plans["target_gems_off"].flaggems is False and plans["target_gems_off"].same_as is None


def test_identical_variants_are_evaluated_once(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, eval__reference={"chip": "cpu", "mode": "live", "weights": "converted"})
    plans = {p.name: p for p in ev.plan_variants(ctx)}
    assert plans["target_gems_off"].same_as == "reference"


def test_reference_on_another_chip_is_handed_over_or_stored(tmp_path: Path) -> None:
    """Live on another chip needs a hand-over folder (tests/evaluate/test_reference.py); stored is read as it is."""
    with pytest.raises(ConfigError, match=r"eval\.reference\.results_dir.*mode: stored") as err:
        _ctx(tmp_path, eval__reference={"chip": "nvidia-h100", "mode": "live"})
    assert "nvidia-h100" in str(err.value)
    stored = _ctx(tmp_path, eval__reference={"chip": "nvidia-h100", "mode": "stored", "results_dir": str(DATA)})
    ref = next(p for p in ev.plan_variants(stored) if p.name == "reference")
    assert ref.stored == DATA and ref.model_dir is None


def test_dry_run_serves_nothing(tmp_path: Path) -> None:
    cfg = load_release(write_demo_config(tmp_path / "cfg", tmp_path))
    ctx = ReleaseContext.create(cfg, dry_run=True)
    result = ev.run_stage(ctx)
    assert result.outputs["plan"] == ["target", "reference", "target_gems_off"]
    assert "FlagGems on" in result.summary
    assert not ctx.layout.eval_dir.exists()


def test_stored_reference_is_copied_and_scored(tmp_path: Path) -> None:
    run = ev.load_stored_run(DATA / "real", tasks=TASKS, out_dir=tmp_path / "reference")
    assert run.scores == {"tinyarith_mc": 100.0, "tinyarith": 100.0}
    assert run.tasks["tinyarith"]["filter"] == "strip" and run.tasks["tinyarith"]["n_items"] == 20
    lines = list(iter_per_sample(run.per_sample))
    assert len(lines) == 40
    assert {"doc_id", "prompt_hash", "response", "score", "task", "benchmark"} <= set(lines[0])
    assert all(len(line["prompt_hash"]) == 64 for line in lines)
    assert sorted(p.name.split("_2")[0] for p in (tmp_path / "reference").rglob("samples_*.jsonl")) == [
        "samples_tinyarith",
        "samples_tinyarith_mc",
    ]
    with pytest.raises(EvalError, match="--log_samples"):
        ev.load_stored_run(tmp_path / "empty", tasks=TASKS)


# -- slow: real vLLM --------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny Qwen2 model, trained (about a minute): it adds well, so accuracy means something.

    (``tiny_model`` from tests/fixtures_vllm.py is untrained on purpose; the gate needs
    real accuracy to tell a broken operator from a working one.)
    """
    from flagrelease.tinymodel import generate_tiny_model

    return generate_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-qwen2")


def _cache_size(path: Path) -> int:
    try:
        with sqlite3.connect(str(path)) as db:
            return int(db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.mark.slow
@pytest.mark.vllm
def test_eval_resumes_after_the_server_dies(trained_tiny_model: Path, tmp_path: Path) -> None:
    from flagrelease.deploy import serving

    cfg: ReleaseConfig = load_release(write_demo_config(tmp_path / "cfg", tmp_path))
    out, cache = tmp_path / "eval" / "target", tmp_path / "cache.sqlite"
    kw: dict[str, Any] = {
        "tasks": [TASKS[1]],
        "out_dir": out,
        "cache_path": cache,
        "concurrency": 1,
        "generation": GenerationSettings(max_tokens=8),
    }
    logs = tmp_path / "logs"
    with serving(cfg, model_dir=trained_tiny_model, log_dir=logs, variant="first", flaggems=False, port=0) as endpoint:
        assert endpoint.pid is not None
        killed_at: list[int] = []

        def kill_midway() -> None:
            deadline = time.monotonic() + 600
            while _cache_size(cache) < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            killed_at.append(_cache_size(cache))
            os.kill(endpoint.pid, signal.SIGTERM)  # type: ignore[arg-type]

        killer = threading.Thread(target=kill_midway, daemon=True)
        killer.start()
        with pytest.raises(EvalError, match="restart the server and run the eval again to resume") as err:
            ev.evaluate_endpoint(endpoint, **kw)
        killer.join(timeout=60)
    assert err.value.kind == "request_failed"  # type: ignore[attr-defined]
    assert not out.exists()
    cached = _cache_size(cache)
    assert killed_at and 40 <= cached < 200
    with serving(cfg, model_dir=trained_tiny_model, log_dir=logs, variant="second", flaggems=False, port=0) as endpoint:
        run = ev.evaluate_endpoint(endpoint, **kw)
    (stats,) = run.runs
    assert stats["fresh_requests"] == 200 - cached  # only the rest was asked for
    assert stats["cache_entries"] == 200
    assert run.tasks["tinyarith"]["n_items"] == 200
    # The trained tiny model adds non-trivially (chance is about 1%): 62.5 on the machine of
    # 2026-12-02, where earlier CI runs saw over 90 (training on another host or library version).
    assert run.scores["tinyarith"] > 50
    lines = list(iter_per_sample(run.per_sample))
    assert len(lines) == 200 and len({line["doc_id"] for line in lines}) == 200
    assert all(isinstance(line["response"], str) for line in lines)


INJECTED = "silu"


@pytest.mark.slow
@pytest.mark.vllm
def test_eval_gate_and_bisection_find_a_broken_operator(trained_tiny_model: Path, tmp_path: Path) -> None:
    """The eval, gate and bisection stages for real, with one FlagGems (oplib) operator broken on purpose.

    Also: the kernel caches are cleaned before every FlagGems serve, and FlagGems on and
    off are timed in interleaved trials after the evals.
    """
    caches = {"TRITON_CACHE_DIR": tmp_path / "triton", "FLAGGEMS_CACHE_DIR": tmp_path / "flaggems"}
    stale = [caches["TRITON_CACHE_DIR"] / "ab12" / "kernel.json", caches["FLAGGEMS_CACHE_DIR"] / "code_cache" / "mm.py"]
    for path in stale:
        path.parent.mkdir(parents=True)
        path.write_text("stale")
    cfg = load_release(
        write_demo_config(
            tmp_path / "cfg",
            tmp_path,
            eval__tasks=[t.model_dump(exclude_none=True) for t in TASKS],
            eval__limit=24,
            serve__envs={"FLAGRELEASE_GEMS_INJECT": f"{INJECTED}:zero", **{k: str(v) for k, v in caches.items()}},
            serve__flaggems={"enabled": True, "clean_caches": True},
            gates__throughput={"trials": 4, "requests": 4, "max_tokens": 16, "warmup_requests": 2},
        )
    )
    ctx = ReleaseContext.create(cfg)
    model = str(trained_tiny_model)
    ctx.results["fetch"] = StageResult("fetch", "", outputs={"model_dir": model})
    ctx.results["convert"] = StageResult("convert", "", outputs={"model_dir": model, "mode": "none"})
    # The deploy stage's record of the operators that ran, cut to four so that the
    # search needs only log2(4) + 1 = 3 re-serves.
    searched = ["add", "mul", INJECTED, "rsqrt"]
    ctx.results["deploy"] = StageResult("deploy", "", outputs={"serve_dir": str(tmp_path), "gems_ops": searched})

    result = ev.run_stage(ctx)
    variants = result.outputs["variants"]
    assert list(variants) == ["target", "reference", "target_gems_off"]
    assert variants["target_gems_off"]["same_as"] == "reference"
    ref, tgt = variants["reference"], variants["target"]
    # Far above chance (1% and 25%) on these 24 items; 50.0 each on the machine of 2026-12-02 (see the resume test).
    assert ref["scores"]["tinyarith"] >= 40 and ref["scores"]["tinyarith_mc"] >= 40, ref["scores"]
    assert tgt["scores"]["tinyarith"] < ref["scores"]["tinyarith"] - 30
    assert INJECTED in tgt["gems_ops"] and set(searched) <= set(tgt["gems_ops"])
    assert ref["throughput"] > 0 and tgt["throughput"] > 0
    for v in (ref, tgt):
        folder = Path(v["dir"])
        assert len(list(folder.rglob("samples_*.jsonl"))) == 2  # lm-eval's own logs are kept
        assert len(list(folder.rglob("results_*.json"))) == 2
        lines = list(iter_per_sample(Path(v["per_sample"])))
        assert len(lines) == 48 and all(len(line["prompt_hash"]) == 64 for line in lines)
    assert len(result.tables["eval"]) == 6
    assert not any(path.exists() for path in stale)  # cleaned before the FlagGems serve
    assert (caches["FLAGGEMS_CACHE_DIR"]).is_dir()  # only the code cache goes
    trials = result.outputs["throughput"]["trials"]
    assert [t["arm"] for t in trials[:4]] == ["target", "target_gems_off", "target_gems_off", "target"]
    assert len(trials) == 8 and all(t["ok"] == 4 and t["tok_s"] > 0 for t in trials)
    ctx.results["eval"] = result

    verdict = gate.run_stage(ctx)
    assert verdict.status == "failed"
    assert verdict.outputs["verdict"] == "inconsistent"
    assert verdict.outputs["blamed_ops"] == [INJECTED]
    assert verdict.outputs["proposed_excluded_ops"] == [INJECTED]
    data = json.loads(Path(verdict.outputs["results"]).read_text())
    assert data["reference"] == {"label": "Tiny-Qwen2-CPU", "chip": "cpu"}
    assert data["target"] == {"label": "Tiny-Qwen2-FlagOS-CPU", "chip": "cpu"}
    assert [r["label"] for r in data["rows"]] == ["TinyArith-MC (Acc.)", "TinyArith (EM)"]
    assert all(r["n_items"] == 24 and r["test"] == "mcnemar+tost" for r in data["rows"])
    assert data["throughput"]["gems_off_tok_s"] > 0 and data["throughput"]["min_ratio"] == 0.5
    assert data["throughput"]["rounds"] == 4 and len(data["throughput"]["trials"]) == 8
    lo, hi = data["throughput"]["ratio_ci"]
    assert lo <= data["throughput"]["ratio"] <= hi
    found = data["flaggems"]
    assert found["on_vs_off"]["verdict"] == "inconsistent"
    assert found["bisection"]["verified"] is True
    assert found["bisection"]["rounds"] <= math.ceil(math.log2(len(searched))) + 1
    last = found["bisection"]["trials"][-1]  # the verification: everything on but the culprit
    assert INJECTED in last["excluded"] and last["mismatches"] == 0
    assert sorted(last["enabled"]) == sorted(set(searched) - {INJECTED})
    assert (ctx.layout.reports_dir / "bisect.json").is_file()
    assert any(row["comparison"] == "FlagGems on vs off" for row in verdict.tables["gate"])


def test_response_cache_survives_a_new_port(tmp_path: Path) -> None:
    from flagrelease.evaluate._lmeval_runner import ResponseCache

    payload = {"model": "m", "messages": [{"role": "user", "content": "1+1"}], "seed": 1234}
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put(ResponseCache.key("http://127.0.0.1:4000/v1/chat/completions", payload), {"choices": []})
    cache.close()
    again = ResponseCache(tmp_path / "c.sqlite")
    assert again.get(ResponseCache.key("http://127.0.0.1:5111/v1/chat/completions", payload)) == {"choices": []}
    assert again.get(ResponseCache.key("http://127.0.0.1:5111/v1/chat/completions", {**payload, "seed": 1235})) is None
    assert len(again) == 1
