"""FlagGems operator validation on the target chip: ``flagrelease probe-gems``.

The probe loads the release's model with transformers (its weights, or random weights
of the same architecture, optionally with fewer layers), runs it natively, then once per
FlagGems operator that the forward pass reaches, with that operator alone enabled, and
compares the logits: max absolute and relative error, relative L2 error, NaN/Inf, top-1
agreement, or a crash, or a hang.  Each of those runs is its own process with a time
limit, so a faulting kernel cannot poison the rest.  A final run with every operator on
measures the speed against native and the share of GPU kernel time and launches that
Triton kernels serve.  The operators that fail become the release's ``excluded_ops``.

On a machine without an accelerator the probe says so and returns a ``skipped`` report.

Pieces: :mod:`flagrelease.gems._isolated` runs each worker process,
:mod:`flagrelease.gems._probe_worker` is the worker, :mod:`flagrelease.gems._probe_report`
holds the report, and :mod:`flagrelease.gems._probe_step` runs the probe as a pipeline step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_write_json, atomic_write_text
from flagrelease._redact import redact
from flagrelease._threads import map_in_threads
from flagrelease.config import ModelSource, ReleaseConfig
from flagrelease.constants import cache_dir, hf_endpoint, hf_token
from flagrelease.errors import ProbeError
from flagrelease.gems._isolated import IsolatedRun, run_isolated, signal_name
from flagrelease.gems._probe_library import DEFAULT_LIBRARY
from flagrelease.gems._probe_report import FAILING, OpResult, ProbeReport, Tolerances
from flagrelease.layout import BundleLayout

__all__ = ["TINY_QWEN2_CONFIG", "WORKER_MODULE", "probe_gems"]

log = logging.getLogger("flagrelease.gems.probe")

#: The module each worker process runs (``python -m``).
WORKER_MODULE = "flagrelease.gems._probe_worker"

#: The built-in tiny Qwen2 (the demo model's architecture), for releases with no config.
TINY_QWEN2_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}

_DEFAULT_BENCH = {
    "prefill_batch": 1,
    "prefill_len": 1024,
    "decode_batch": 8,
    "decode_ctx": 128,
    "decode_steps": 32,
    "repeats": 9,
}


def _find_config(cfg: ReleaseConfig, layout: BundleLayout) -> Path:
    """The release's ``config.json``: a local copy, else the hub's, else the built-in tiny Qwen2."""
    for d in (cfg.model.path, layout.converted_dir, layout.source_dir):
        if d is not None and (Path(d) / "config.json").is_file():
            return Path(d) / "config.json"
    if cfg.model.generate == "tiny-qwen2":
        path = layout.runs_dir / "probe" / "tiny-qwen2.config.json"
        atomic_write_json(path, TINY_QWEN2_CONFIG)
        return path
    if cfg.model.source is ModelSource.HF:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(
                hf_hub_download(
                    cfg.model.repo_id,
                    "config.json",
                    revision=cfg.model.revision,
                    endpoint=hf_endpoint(),
                    token=hf_token(),
                    cache_dir=str(cache_dir() / "hub"),
                )
            )
        except (OSError, EntryNotFoundError, ValueError) as err:
            raise ProbeError(
                f"could not get config.json of {cfg.model.repo_id} from the hub ({err}); "
                "pass --model-config PATH or --weights DIR",
                model=cfg.name,
                chip=cfg.chip,
            ) from err
    raise ProbeError(
        f"no config.json for {cfg.model.repo_id}: fetch the weights first, or pass "
        "--model-config PATH or --weights DIR",
        model=cfg.name,
        chip=cfg.chip,
    )


# -- the probe ------------------------------------------------------------------------------------
class _Runner:
    """Writes specs and runs worker processes below ``work``."""

    def __init__(self, work: Path, spec: dict[str, Any], *, python: str) -> None:
        self.work, self.spec, self.python = work, spec, python
        self.spec_path = work / "spec.json"
        atomic_write_json(self.spec_path, spec)

    def update(self, **values: Any) -> None:
        self.spec.update(values)
        atomic_write_json(self.spec_path, self.spec)

    def run(self, mode: str, tag: str, *, timeout_s: float, extra: Sequence[str] = ()) -> tuple[IsolatedRun, dict]:
        out = self.work / "results" / f"{tag}.json"
        out.unlink(missing_ok=True)
        argv = [
            self.python,
            "-m",
            WORKER_MODULE,
            mode,
            "--spec",
            str(self.spec_path),
            "--out",
            str(out),
            *extra,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        run = run_isolated(argv, timeout_s=timeout_s, log_path=self.work / "logs" / f"{tag}.log", env=env)
        data: dict[str, Any] = {}
        if out.is_file():
            data = json.loads(out.read_text(encoding="utf-8"))
        if run.status == "ok" and not data:
            run.status, run.tail = "crash", run.tail + "\n(the worker exited without writing its result)"
        return run, data


def _judge(op: str, run: IsolatedRun, data: dict[str, Any], tol: Tolerances) -> OpResult:
    if run.status != "ok":
        detail = data.get("error") or run.tail
        if run.status == "timeout":
            detail = f"no result within {run.seconds:.0f}s (hang or runaway compile); {run.tail[-300:]}"
        elif run.status == "crash":
            detail = f"killed by {signal_name(-(run.returncode or 0))}; last output: {run.tail[-600:]}"
        elif data.get("error"):
            detail = f"{data['error']}"
        return OpResult(op=op, status=run.status, seconds=run.seconds, detail=redact(str(detail)))
    m = data["metrics"]
    res = OpResult(
        op=op,
        status="ok",
        calls=data.get("calls"),
        max_abs_err=m["max_abs_err"],
        max_rel_err=m["max_rel_err"],
        rel_l2_err=m["rel_l2_err"],
        top1_agreement=m["top1_agreement"],
        nonfinite=m["nonfinite"],
        native_drift=data.get("native_drift"),
        seconds=run.seconds,
    )
    if m["nonfinite"]:
        res.status, res.detail = "nan", f"{m['nonfinite']} non-finite logits"
    elif m["rel_l2_err"] > tol.rel_l2 or m["top1_agreement"] < tol.top1:
        res.status = "mismatch"
        res.detail = (
            f"rel L2 {m['rel_l2_err']:.3e} (max {tol.rel_l2:.1e}), top-1 {m['top1_agreement']:.3f} (min {tol.top1:.3f})"
        )
    elif not res.calls:
        res.status, res.detail = "unused", "enabled alone, the forward pass never reached it"
    return res


def _full(runner: _Runner, exclude: list[str], tol: Tolerances, timeout_s: float) -> dict[str, Any]:
    tag = "full-all" if not exclude else "full-release"
    run, data = runner.run("full", tag, timeout_s=timeout_s, extra=["--exclude", ",".join(exclude)])
    if run.status != "ok":
        return {
            "exclude": exclude,
            "status": run.status,
            "detail": data.get("error") or run.tail,
            "seconds": run.seconds,
        }
    m = data["metrics"]
    ok = not m["nonfinite"] and m["rel_l2_err"] <= tol.rel_l2 and m["top1_agreement"] >= tol.top1
    return {**data, "status": "ok", "verdict": "consistent" if ok else "inconsistent", "seconds": run.seconds}


def probe_gems(
    cfg: ReleaseConfig,
    *,
    out_dir: Path | None = None,
    weights: Path | None = None,
    ops: list[str] | None = None,
    timeout_s: float = 120,
    model_config: Path | None = None,
    layers: int | None = None,
    jobs: int = 1,
    library: str | None = None,
    bench: dict[str, int] | None = None,
    python: str | None = None,
    setup_timeout_s: float | None = None,
) -> ProbeReport:
    """Validate each FlagGems operator the model uses, alone and all together.

    Args:
        cfg: the release.
        out_dir: where ``gems_probe.json`` and ``gems_probe.md`` go (default: the
            bundle's reports folder).
        weights: a checkpoint folder to load; default: random weights of the release's
            architecture (its ``config.json``, see ``model_config``).
        ops: probe only these operators (FlagGems function names); default: every one
            the forward pass reaches.
        timeout_s: time limit of each per-operator process.
        model_config: a ``config.json`` (file or folder) for random weights, overriding
            the one found locally or on the hub.
        layers: keep only this many decoder layers (default: 2 with random weights, all
            with real weights).
        jobs: operator processes run at once (each loads the model).
        library: the operator library as ``module:attribute`` (default FlagGems; tests
            pass a CPU stand-in).
        bench: overrides of the speed-test shapes (prefill_batch, prefill_len,
            decode_batch, decode_ctx, decode_steps, repeats).
        python: the interpreter of the worker processes (default: this one).
        setup_timeout_s: time limit of the check, setup and full runs (default: four
            times ``timeout_s``, at least five minutes).

    Returns:
        The report; ``verdict`` is ``pass``, ``warning`` (operators to exclude),
        ``failed`` (the operator set to ship is still inconsistent) or ``skipped``.

    Raises:
        ProbeError: the model could not be set up or run natively, or the machine has
            an accelerator but no FlagGems.
    """
    t0 = time.monotonic()
    layout = BundleLayout.for_release(cfg)
    out_dir = Path(out_dir) if out_dir else layout.reports_dir
    work = layout.runs_dir / "probe"
    work.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "library": library or DEFAULT_LIBRARY,
        "device": None,
        "work_dir": str(work),
        "model_dir": None,
        "model_config": None,
        "random_dir": str(work / "random-weights"),
        "layers": layers,
        "dtype": "bfloat16",
        "seed": 1234,
        "batch": 2,
        "seq_len": 128,
        "decode_steps": 4,
        "bench": {**_DEFAULT_BENCH, **(bench or {})},
    }
    report = ProbeReport(release=cfg.name, chip=cfg.chip, verdict="skipped")
    runner = _Runner(work, spec, python=python or sys.executable)
    setup_timeout = setup_timeout_s or max(4 * timeout_s, 300.0)

    run, info = runner.run("check", "check", timeout_s=setup_timeout)
    if run.status != "ok":
        raise ProbeError(
            f"the probe's check process failed ({run.status}): {info.get('error') or run.tail}; see {run.log}",
            model=cfg.name,
            chip=cfg.chip,
        )
    report.versions = info.get("versions", {})
    report.library, report.library_version = info.get("library", report.library), info.get("version")
    report.device, report.device_name = info.get("device"), info.get("device_name")
    if not info.get("available"):
        if info.get("library_missing"):
            raise ProbeError(str(info.get("reason")), model=cfg.name, chip=cfg.chip)
        report.reason = str(info.get("reason") or "no accelerator")
        log.warning("probe-gems skipped: %s", report.reason)
        return _finish(report, out_dir, t0)

    if weights is not None:
        if not (Path(weights) / "config.json").is_file():
            raise ProbeError(
                f"{weights} holds no config.json; pass a Hugging Face checkpoint folder", model=cfg.name, chip=cfg.chip
            )
        runner.update(model_dir=str(Path(weights).resolve()))
    else:
        src = Path(model_config) if model_config else _find_config(cfg, layout)
        src = src / "config.json" if src.is_dir() else src
        runner.update(model_config=str(src.resolve()), layers=layers or 2)
    runner.update(device=report.device)

    run, prep = runner.run("prepare", "prepare", timeout_s=setup_timeout)
    if run.status != "ok":
        raise ProbeError(
            f"the model did not run natively ({run.status}): {prep.get('error') or run.tail}; see {run.log}",
            model=cfg.name,
            chip=cfg.chip,
        )
    runner.update(model_dir=prep["model_dir"])
    report.model = {k: prep[k] for k in ("model_dir", "random_weights", "arch", "params", "ops_used")}
    tol = Tolerances.from_floor(prep.get("floor"))
    report.tolerances = {**asdict(tol), "floor": prep.get("floor")}
    wanted = list(ops) if ops else list(prep["ops_used"])
    log.info("probing %d operators: %s", len(wanted), ", ".join(wanted))

    def one(op: str) -> OpResult:
        r, data = runner.run("op", f"op-{op}", timeout_s=timeout_s, extra=["--op", op])
        res = _judge(op, r, data, tol)
        log.info("%-24s %s", op, res.status)
        return res

    report.ops = map_in_threads(one, wanted, workers=jobs, name="flagrelease-probe")
    report.excluded_ops = sorted(r.op for r in report.ops if r.status in FAILING)

    # All together: pointless when an operator alone already crashes or hangs the process.
    if not any(r.status in ("crash", "timeout") for r in report.ops):
        report.full.append(_full(runner, [], tol, setup_timeout))
    if report.excluded_ops:
        report.full.append(_full(runner, report.excluded_ops, tol, setup_timeout))
    shipped = report.full[-1]
    if shipped.get("status") != "ok" or shipped.get("verdict") != "consistent":
        report.verdict = "failed"
        report.reason = (
            "with the failing operators excluded, the model is still not consistent with native"
            if report.excluded_ops
            else "each operator passes alone, but not all together"
        )
    elif report.excluded_ops:
        report.verdict = "warning"
        report.reason = f"{len(report.excluded_ops)} operator(s) to exclude"
    else:
        report.verdict = "pass"
    return _finish(report, out_dir, t0)


def _finish(report: ProbeReport, out_dir: Path, t0: float) -> ProbeReport:
    report.seconds = round(time.monotonic() - t0, 1)
    atomic_write_json(out_dir / "gems_probe.json", report.to_json())
    atomic_write_text(out_dir / "gems_probe.md", report.to_text() + "\n")
    return report
