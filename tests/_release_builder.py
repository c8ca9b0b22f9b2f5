"""A release whose upstream stages (fetch .. gate) have "run": real files, saved stage results.

The card and publish tests start from here: the weights, serve configs (rendered by the
real ``flagrelease.render``), lm-eval folders and gate results are files on disk, and the
stage results are saved under ``state/`` exactly as the pipeline saves them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from flagrelease.config import ReleaseConfig, parse_release
from flagrelease.constants import REPO_ROOT
from flagrelease.pipeline import ReleaseContext, StageResult, save_stage_result
from flagrelease.render import render_serve_configs

__all__ = ["build_release", "gate_results"]

DEMO = REPO_ROOT / "release_configs" / "demo-tiny-cpu.yaml"


def gate_results(*, verdict: str = "consistent", throughput_ok: bool = True) -> dict[str, Any]:
    """Gate results JSON (docs/ARCHITECTURE.md) for the demo's two tasks."""
    bad = verdict == "inconsistent"
    return {
        "reference": {"label": "Tiny-Qwen2-CPU", "chip": "cpu"},
        "target": {"label": "Tiny-Qwen2-FlagOS-CPU-INT8", "chip": "cpu"},
        "margin": 5.0,
        "alpha": 0.05,
        "rows": [
            {
                "task": "tinyarith",
                "label": "TinyArith (EM)",
                "metric": "exact_match",
                "reference": 91.0,
                "target": 80.0 if bad else 90.5,
                "reference_ci": [88.0, 93.5],
                "target_ci": [87.5, 92.9],
                "diff": -11.0 if bad else -0.5,
                "diff_ci": [-14.0, -8.0] if bad else [-1.6, 0.6],
                "n_items": 200,
                "samples_per_item": 1,
                "test": "mcnemar+tost",
                "p_value": 0.61,
                "tost_p": 0.001,
                "verdict": "inconsistent" if bad else "consistent",
                "more_items_needed": None,
            },
            {
                "task": "tinyarith_mc",
                "label": "TinyArith-MC (Acc.)",
                "metric": "acc",
                "reference": 88.0,
                "target": 87.5,
                "reference_ci": [84.9, 91.1],
                "target_ci": [84.3, 90.7],
                "diff": -0.5,
                "diff_ci": [-2.1, 1.1],
                "n_items": 200,
                "samples_per_item": 1,
                "test": "mcnemar+tost",
                "p_value": 0.7,
                "tost_p": 0.002,
                "verdict": "consistent",
                "more_items_needed": None,
            },
        ],
        "verdict": verdict,
        "throughput": {
            "gems_on_tok_s": 120.0,
            "gems_off_tok_s": 110.0 if throughput_ok else 300.0,
            "ratio": 1.09 if throughput_ok else 0.4,
            "min_ratio": 0.5,
            "ok": throughput_ok,
        },
        "flaggems": {"on_vs_off": {"verdict": "consistent", "rows": []}, "blamed_ops": [], "proposed_excluded_ops": []},
        "missing": [],
    }


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def build_release(
    root: Path,
    *,
    publish: dict[str, Any] | None = None,
    verdict: str = "consistent",
    throughput_ok: bool = True,
    publish_on_fail: bool = False,
    weights_bytes: int = 300_000,
    triton_share: float | None = None,
    skip: tuple[str, ...] = (),
    image: dict[str, Any] | None = None,
    deploy: dict[str, Any] | None = None,
) -> ReleaseContext:
    """A demo release below ``root`` with fetch .. gate done and saved.

    Args:
        root: a fresh folder.
        publish: the ``publish`` section (default: a local folder below ``root``).
        verdict: the gate's accuracy verdict.
        throughput_ok: the gate's FlagGems throughput check.
        publish_on_fail: ``gates.publish_on_fail``.
        weights_bytes: size of the converted ``model.safetensors``.
        triton_share: the Triton kernel share the deploy stage measured, if any.
        skip: stages recorded as skipped.
        image: overrides of the image stage's outputs (e.g. a pushed ``image_ref`` and ``digest``).
        deploy: overrides of the deploy stage's outputs (e.g. ``gems_library``, ``executed``).
    """
    data = yaml.safe_load(DEMO.read_text())
    data["model"]["path"] = str(root / "model")
    data["work_dir"] = str(root / "work")
    data["publish"] = publish if publish is not None else {"local_dir": str(root / "published")}
    data["gates"]["publish_on_fail"] = publish_on_fail
    config_path = root / "demo.yaml"
    config_path.write_text(yaml.safe_dump(data))
    cfg: ReleaseConfig = parse_release(data, path=config_path)
    ctx = ReleaseContext.create(cfg, config_path=config_path)
    lay = ctx.layout
    rnd = hashlib.sha256(str(root).encode()).digest()

    # fetch: the source weights and a manifest of their checksums
    source = {
        "config.json": b'{"model_type": "qwen2"}',
        "model.safetensors": rnd * 4096,
        "tokenizer.json": b'{"version": "1.0"}',
    }
    for name, content in source.items():
        _write(lay.source_dir / name, content)
    fetch_manifest = {
        "files": [{"path": n, "size": len(c), "sha256": hashlib.sha256(c).hexdigest()} for n, c in source.items()]
    }
    _write(lay.state_dir / "fetch-manifest.json", json.dumps(fetch_manifest).encode())

    # convert: INT8 weights, a README of their own (the card replaces it), an error report
    weights = os.urandom(weights_bytes)
    quant_config = {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "int-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "int",
                        "strategy": "channel",
                        "symmetric": True,
                        "dynamic": False,
                    },
                    "input_activations": {
                        "num_bits": 8,
                        "type": "int",
                        "strategy": "token",
                        "symmetric": True,
                        "dynamic": True,
                    },
                }
            },
        }
    }
    for name, content in {
        "config.json": json.dumps(quant_config).encode(),
        "model.safetensors": weights,
        "tokenizer.json": source["tokenizer.json"],
        "README.md": b"the source model's own readme",
    }.items():
        _write(lay.converted_dir / name, content)
    report = {"summary": {"tensors_quantized": 98, "max_rel_error": 0.0123, "mean_rel_error": 0.0041}}
    report_path = _write(lay.runs_dir / "convert" / "quant_report.json", json.dumps(report).encode())

    # image: a rendered Dockerfile, not built (no engine in this setup)
    dockerfile = _write(lay.image_dir / "Dockerfile", b"FROM python:3.11-slim-bookworm\n")

    # deploy: the FlagScale configs in the bundle, the operators that ran, a load test
    render_serve_configs(cfg, out_dir=lay.serve_dir)
    log = _write(lay.logs_dir / "vllm-target.log", b"INFO server started\n")

    # eval: lm-eval folders per variant
    for variant in ("target", "reference"):
        _write(lay.eval_dir / variant / "samples_tinyarith.jsonl", b'{"doc_id": 0}\n')

    # gate: results outside the bundle (the card stage copies them in)
    gate_path = _write(
        lay.runs_dir / "gate" / "gate_results.json",
        json.dumps(gate_results(verdict=verdict, throughput_ok=throughput_ok)).encode(),
    )

    outputs: dict[str, dict[str, Any]] = {
        "fetch": {
            "model_dir": str(lay.source_dir),
            "manifest": str(lay.state_dir / "fetch-manifest.json"),
            "files": 3,
            "bytes": sum(len(c) for c in source.values()),
            "revision": None,
            "source": "local",
        },
        "convert": {
            "model_dir": str(lay.converted_dir),
            "mode": "int8-w8a8",
            "report": str(report_path),
            "summary": report["summary"],
        },
        "image": {
            "image_ref": "127.0.0.1:5000/flagrelease:tiny-qwen2-flagos-cpu",
            "digest": None,
            "context_dir": str(lay.image_dir),
            "dockerfile": str(dockerfile),
            "built": False,
            "pushed": False,
            "engine": None,
            **(image or {}),
        },
        "deploy": {
            "serve_dir": str(lay.serve_dir),
            "serve_files": [str(p) for p in lay.serve_dir.rglob("*")],
            "runtime": "local",
            "gems_ops": ["addmm", "silu_and_mul", "rms_norm"],
            "flag_gems_version": None,
            "load_test": {"rows": [{"concurrency": 1, "output_tokens_per_s": 50.0}]},
            "logs": [str(log)],
            **({"triton_share": triton_share} if triton_share is not None else {}),
            **(deploy or {}),
        },
        "eval": {
            "variants": {
                v: {
                    "dir": str(lay.eval_dir / v),
                    "scores": {"tinyarith": 0.9},
                    "chip": "cpu",
                    "weights": "converted" if v == "target" else "source",
                    "flaggems": v == "target",
                    "throughput": 100.0,
                }
                for v in ("target", "reference")
            }
        },
        "gate": {
            "results": str(gate_path),
            "verdict": verdict,
            "throughput_ok": throughput_ok,
            "blamed_ops": [],
            "proposed_excluded_ops": [],
        },
    }
    failed = verdict == "inconsistent" or not throughput_ok
    for stage, out in outputs.items():
        status = "skipped" if stage in skip else ("failed" if stage == "gate" and failed else "ok")
        save_stage_result(
            lay,
            StageResult(
                stage=stage,
                summary=f"{stage} done",
                outputs=out,
                status=status,
                started_at=1_700_000_000.0,
                finished_at=1_700_000_060.0,
            ),
        )
    return ctx
