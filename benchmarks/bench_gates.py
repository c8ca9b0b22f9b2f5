"""Does the throughput gate hold under noise?  A/A false fails, planted-slowdown detection, cost.

On this machine, with real vLLM servers of a tiny Qwen2 model (CPU, eager mode), the
measurement the eval stage makes for the gate (:func:`flagrelease.evaluate.measure_interleaved`:
interleaved rounds, fixed concurrency and lengths, a warm-up) is repeated ``--reps`` times
in two scenarios, and every repetition is judged as the gate judges it
(:func:`flagrelease.gate.stats.ratio_comparison`):

- **A/A**: FlagGems off against FlagGems off (two identical servers).  Every ``fail`` is a
  false fail.  Judged at the demo's minimum (0.5), the GPU configs' (0.8), and 1.0, the
  hardest threshold, where the expected false-fail rate is alpha itself.
- **planted slowdown**: FlagGems on with one operator of the CPU stand-in library made 2x
  slower (``FLAGRELEASE_GEMS_INJECT=<op>:slow``, a knob only tests and benchmarks set)
  against the same build without it (each call of the operator followed by as long again
  on the CPU).  Judged at ``--detect-min-ratio`` (default 1.0: "significantly slower",
  the threshold where A/A fails at most alpha of the time) and at 0.9 and 0.95: each
  ``fail`` is a detection.  One operator of the tiny model is a small part of a step, so
  2x slower costs the server about a tenth of its tokens/s: only a precise measurement
  sees it.

Each scenario starts its two servers once (side by side, as ``servers: both`` does) and
reuses them for every repetition.  It prints the false-fail and detection counts, the
ratios and interval widths, and the wall time: server starts, and seconds per
measurement (what the gate adds to an eval).  ``/proc/loadavg`` is printed: other work
on the machine is the noise being measured.  It stops by itself (``--budget-s``).

Usage::

    python benchmarks/bench_gates.py [--reps 10] [--rounds 8] [--op mul] [--markdown benchmarks/results/gates_cpu.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flagrelease.config import ReleaseConfig, ThroughputGate  # noqa: E402
from flagrelease.deploy import serving  # noqa: E402
from flagrelease.deploy.loadtest import run_load_test  # noqa: E402
from flagrelease.evaluate import Arm, measure_interleaved  # noqa: E402
from flagrelease.gate.stats import ratio_comparison  # noqa: E402
from flagrelease.tinymodel import generate_tiny_model  # noqa: E402

__all__ = ["main"]

AA_THRESHOLDS = (0.5, 0.8, 1.0)
#: The planted scenario is judged at these too: a single operator of the tiny model, even
#: 2x slower, costs the whole server only ~10% (its calls are a small part of a step).
PLANTED_THRESHOLDS = (0.9, 0.95, 1.0)
ALPHA = 0.05
METRICS = ("wall", "cpu")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _release(model: Path, work: Path, *, envs: dict[str, str]) -> ReleaseConfig:
    return ReleaseConfig.model_validate(
        {
            "name": "bench-gates",
            "model": {"source": "local", "repo_id": "flagrelease/tiny-qwen2", "path": str(model)},
            "chip": "cpu",
            "serve": {
                "engine_args": {
                    "served_model_name": "tiny-qwen2",
                    "max_model_len": 256,
                    "max_num_seqs": 8,
                    "dtype": "bfloat16",
                    "enforce_eager": True,
                    "port": 9010,
                },
                "flaggems": {"enabled": True},
                "health_timeout_s": 600,
                "envs": envs,
            },
            "eval": {"reference": {"chip": "cpu"}},
            "work_dir": str(work),
        }
    )


@contextlib.contextmanager
def _pair(model: Path, work: Path, arms: list[tuple[str, bool, dict[str, str]]]) -> Iterator[tuple[list[Arm], float]]:
    """Serve both arms side by side; yield arms whose ``serve`` hands out the running endpoints."""
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        out = []
        for name, gems, envs in arms:
            endpoint = stack.enter_context(
                serving(
                    _release(model, work, envs=envs),
                    model_dir=model,
                    log_dir=work / "logs",
                    variant=name,
                    flaggems=gems,
                    port=0,
                )
            )
            out.append(Arm(name, lambda e=endpoint: contextlib.nullcontext(e)))
        yield out, time.monotonic() - started


def _rates(trials: list[dict[str, Any]], arm: str, metric: str) -> list[float]:
    if metric == "wall":
        return [t["tok_s"] for t in trials if t["arm"] == arm]
    return [t["output_tokens"] / t["cpu_s"] for t in trials if t["arm"] == arm]


def _scenario(
    name: str,
    arms: list[Arm],
    *,
    reps: int,
    settings: ThroughputGate,
    concurrency: int,
    thresholds: tuple[float, ...],
    deadline: float,
) -> dict[str, Any]:
    runs = []
    for rep in range(reps):
        if time.monotonic() > deadline:
            print(f"  {name}: time budget spent after {rep} measurements", flush=True)
            break
        data = measure_interleaved(
            arms,
            settings=settings,
            concurrency=concurrency,
            prompt="Write a short sentence about the sea.",
            load_test=run_load_test,
            servers="both",
        )
        run: dict[str, Any] = {"rep": rep, "seconds": data["seconds"], "trials": data["trials"]}
        for metric in METRICS:
            a, b = (_rates(data["trials"], arm.name, metric) for arm in arms)
            judged = {str(m): ratio_comparison(a, b=b, min_ratio=m, alpha=ALPHA, seed=rep) for m in thresholds}
            first = next(iter(judged.values()))
            run[metric] = {
                "ratio": round(first.ratio, 4),
                "ci": [round(x, 4) for x in first.ratio_ci],
                "width": round(first.ratio_ci[1] - first.ratio_ci[0], 4),
                "verdicts": {m: c.verdict for m, c in judged.items()},
                "means": [round(statistics.mean(a), 1), round(statistics.mean(b), 1)],
            }
        runs.append(run)
        print(
            f"  {name} #{rep + 1} ({data['seconds']:.1f} s; load {_loadavg()}): "
            + "; ".join(
                f"{metric} {run[metric]['ratio']:.3f} [{run[metric]['ci'][0]:.3f}, {run[metric]['ci'][1]:.3f}] "
                + " ".join(f"{m}:{v}" for m, v in run[metric]["verdicts"].items())
                for metric in METRICS
            ),
            flush=True,
        )
    fails = {
        metric: {str(m): sum(r[metric]["verdicts"][str(m)] == "fail" for r in runs) for m in thresholds}
        for metric in METRICS
    }
    return {"scenario": name, "runs": runs, "fails": fails, "reps": len(runs)}


def _summary(res: dict[str, Any], metric: str) -> dict[str, Any]:
    runs = [r[metric] for r in res["runs"]]
    if not runs:
        return dict.fromkeys(("ratio_median", "ratio_range", "width_median", "width_max"))
    widths = [r["width"] for r in runs]
    return {
        "ratio_median": round(statistics.median(r["ratio"] for r in runs), 3),
        "ratio_range": [round(min(r["ratio"] for r in runs), 3), round(max(r["ratio"] for r in runs), 3)],
        "width_median": round(statistics.median(widths), 3),
        "width_max": round(max(widths), 3),
    }


def _markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    aa, det = report["aa"], report["planted"]
    seconds = statistics.median(r["seconds"] for r in aa["runs"] + det["runs"]) if aa["runs"] + det["runs"] else 0
    lines = [
        "# Throughput gate under noise (CPU, real vLLM)",
        "",
        f"`python benchmarks/bench_gates.py {' '.join(report['argv'])}` on {report['machine']}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime(report['started']))}.",
        "",
        f"Each measurement: {s['trials']} interleaved rounds (A B, B A, ...), {s['requests']} requests per trial at "
        f"concurrency {s['concurrency']}, {s['max_tokens']} output tokens each (`ignore_eos`), after a "
        f"{s['warmup_requests']}-request warm-up; verdict from the geometric mean of the rounds' ratios with a "
        f"paired bootstrap interval ({100 * (1 - 2 * ALPHA):.0f}%, expanded percentile), alpha {ALPHA} per side. "
        "Every measurement is judged on both metrics: output tokens per wall-clock second (`wall`), and per second "
        "of the server's own CPU time (`cpu`, what `gates.throughput.metric: auto` uses on the cpu chip).",
        "",
        "| Scenario | Metric | Measurements | Ratio, median [min, max] | 90% CI width, median / max | Fails |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    for res in (aa, det):
        for metric in METRICS:
            sm = _summary(res, metric)
            fails = ", ".join(f"{n}/{res['reps']} at min {m}" for m, n in res["fails"][metric].items())
            lines.append(
                f"| {res['label']} | {metric} | {res['reps']} | {sm['ratio_median']} {sm['ratio_range']} | "
                f"{sm['width_median']} / {sm['width_max']} | {fails} |"
            )
    lines.append("")
    for metric in METRICS:
        aa_f, det_f = aa["fails"][metric], det["fails"][metric]
        lines.append(
            f"- **{metric}**: A/A false fails {aa_f['0.5']}/{aa['reps']} at the demo's minimum 0.5, "
            f"{aa_f['0.8']} at the GPU configs' 0.8, {aa_f['1.0']} at 1.0 (the hardest threshold, where alpha "
            f"allows {ALPHA * aa['reps']:.1f} expected); planted 2x slower `{report['op']}` detected "
            f"{det_f[str(report['detect_min_ratio'])]}/{det['reps']} times (fail at min {report['detect_min_ratio']}; "
            + ", ".join(f"{n} at {m}" for m, n in det_f.items() if m != str(report["detect_min_ratio"]))
            + ")."
        )
    lines += [
        f"- **Cost**: {aa['server_start_s']:.0f} s and {det['server_start_s']:.0f} s to start each pair of servers; "
        f"{seconds:.1f} s per measurement (median; {2 * s['trials']} trials and the warm-ups); "
        f"{report['seconds']:.0f} s in all. In a release on the CPU (`servers: both`) the trials run on the two "
        "servers the arms' evals used: the gate adds one measurement to the eval stage (elsewhere, four servings).",
        f"- Machine load (`/proc/loadavg`, 1/5/15 min) before and after: {report['load_before']} / "
        f"{report['load_after']} on {report['machine']}: other work shares the cores.",
        "",
        "Every measurement (ratios, intervals, verdicts, every trial) is in the JSON beside this file.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the results (and write them as Markdown / JSON when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10, help="measurements per scenario (default 10)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per measurement (default 8)")
    parser.add_argument("--requests", type=int, default=8, help="requests per trial (default 8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1)")
    parser.add_argument("--warmup", type=int, default=8, help="warm-up requests per arm (default 8)")
    parser.add_argument("--op", default="mul", help="the CPU stand-in operator made 2x slower (default mul)")
    parser.add_argument(
        "--detect-min-ratio",
        type=float,
        default=1.0,
        help="headline threshold of the planted scenario (default 1.0: significantly slower; also judged at 0.9, 0.95)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=900, help="stop a scenario's measurements after this many seconds"
    )
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--markdown", type=Path, help="write the summary here")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args(argv)
    started = time.time()
    settings = ThroughputGate(
        trials=args.rounds, requests=args.requests, max_tokens=args.max_tokens, warmup_requests=args.warmup
    )
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-gates-") as tmp:
        work = args.work or Path(tmp)
        model = generate_tiny_model(work / "tiny-qwen2", steps=0)
        print(f"A/A: FlagGems off against FlagGems off, {args.reps} measurements", flush=True)
        with _pair(model, work, [("off-a", False, {}), ("off-b", False, {})]) as (arms, start_s):
            aa = _scenario(
                "A/A",
                arms,
                reps=args.reps,
                settings=settings,
                concurrency=args.concurrency,
                thresholds=AA_THRESHOLDS,
                deadline=time.monotonic() + args.budget_s,
            )
        aa.update(label="A/A (FlagGems off vs off)", server_start_s=start_s)
        print(f"planted: {args.op} 2x slower against the same build, {args.reps} measurements", flush=True)
        slow = {"FLAGRELEASE_GEMS_INJECT": f"{args.op}:slow"}
        with _pair(model, work, [("on-slow", True, slow), ("on", True, {})]) as (arms, start_s):
            planted = _scenario(
                "planted",
                arms,
                reps=args.reps,
                settings=settings,
                concurrency=args.concurrency,
                thresholds=tuple(sorted({*PLANTED_THRESHOLDS, args.detect_min_ratio})),
                deadline=time.monotonic() + args.budget_s,
            )
        planted.update(label=f"planted: `{args.op}` 2x slower vs healthy", server_start_s=start_s)
    report = {
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "machine": f"{sys.platform}, {__import__('os').cpu_count()} CPUs",
        "started": started,
        "seconds": round(time.time() - started, 1),
        "settings": {**settings.model_dump(mode="json"), "concurrency": args.concurrency},
        "op": args.op,
        "detect_min_ratio": args.detect_min_ratio,
        "load_before": load_before,
        "load_after": _loadavg(),
        "aa": aa,
        "planted": planted,
    }
    text = _markdown(report)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
