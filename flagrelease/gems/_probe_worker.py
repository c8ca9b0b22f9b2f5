"""The per-process worker of ``flagrelease probe-gems``.

Each run of this module is one short-lived process that touches the accelerator, so a
crashed or hung kernel takes down only its own process; :mod:`flagrelease.gems.probe` starts
one per step and per operator, with a time limit.  Usage::

    python -m flagrelease.gems._probe_worker MODE --spec SPEC.json --out RESULT.json [--op NAME] [--exclude A,B]

Modes:
    check    which accelerator and operator library this machine has (imports torch only).
    prepare  build random weights if asked, run the model natively, save the reference
             logits, find the library operators the forward pass reaches, measure the
             bf16-vs-fp32 noise floor.
    op       enable one library operator alone and compare the logits with the reference.
    full     enable every operator (minus ``--exclude``): logits, speed native vs library,
             and the share of kernel time and launches served by Triton kernels.

The spec names the operator library as ``module:attribute``; the default adapter wraps
FlagGems (:mod:`flagrelease.gems._probe_library`).  The result is one JSON file, written
atomically.  The model side lives in :mod:`flagrelease.gems._probe_model`, speed and
kernel accounting in :mod:`flagrelease.gems._probe_kernels`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_write_json
from flagrelease.gems._probe_kernels import measure_speed, profile_kernels
from flagrelease.gems._probe_library import DEFAULT_LIBRARY, OpLibrary, load_library
from flagrelease.gems._probe_model import (
    build_random,
    eval_ids,
    eval_logits,
    fits_fp32,
    load_model,
    logit_metrics,
    op_tracer,
    sync,
    worker_log,
)

__all__ = ["main"]


# -- modes --------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "triton", "transformers"):
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except ImportError:
            out[name] = None
    return out


def _mode_check(lib: OpLibrary, spec: dict[str, Any]) -> dict[str, Any]:
    info = lib.check()
    if spec.get("device") and info.get("available"):
        info["device"] = spec["device"]
    info["versions"] = _versions()
    info["library"] = lib.name
    return info


def _arch(config: Any) -> dict[str, Any]:
    keys = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "rope_theta",
        "tie_word_embeddings",
    )
    return {k: getattr(config, k, None) for k in keys}


def _mode_prepare(lib: OpLibrary, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    device = spec["device"]
    work = Path(spec["work_dir"])
    model_dir = spec.get("model_dir") or str(build_random(spec, device))
    model = load_model(model_dir, spec, device)
    ids = eval_ids(model, spec, device)
    op_keys = lib.op_keys()
    key_to_ops: dict[str, list[str]] = {}
    for op, keys in op_keys.items():
        for key in keys:
            key_to_ops.setdefault(key, []).append(op)
    t0 = time.perf_counter()
    ref = eval_logits(model, ids, spec)
    sync(device)
    native_s = time.perf_counter() - t0
    torch.save(ref.cpu(), work / "ref_logits.pt")
    tracer = op_tracer(lib.dispatch_key(device), set(key_to_ops))
    with tracer:
        eval_logits(model, ids, spec)
    ops_used: Counter[str] = Counter()
    for key, n in tracer.calls.items():
        for op in key_to_ops.get(key, []):
            ops_used[op] += n
    params = sum(p.numel() for p in model.parameters())
    floor = None
    if fits_fp32(model, device):
        model.float()
        floor = logit_metrics(ref, eval_logits(model, ids, spec))
    return {
        "model_dir": model_dir,
        "random_weights": not spec.get("model_dir"),
        "arch": _arch(model.config),
        "params": params,
        "ops_used": dict(sorted(ops_used.items())),
        "aten_calls": dict(sorted(tracer.calls.items())),
        "floor": floor,
        "native_eval_s": round(native_s, 3),
    }


def _mode_op(lib: OpLibrary, spec: dict[str, Any], op: str) -> dict[str, Any]:
    import torch

    device = spec["device"]
    model = load_model(spec["model_dir"], spec, device)
    ids = eval_ids(model, spec, device)
    ref = torch.load(Path(spec["work_dir"]) / "ref_logits.pt", map_location=device)
    native = eval_logits(model, ids, spec)
    drift = float((native.float() - ref.float()).abs().max())
    keys = set(lib.op_keys().get(op, []))
    t0 = time.perf_counter()
    tracer = op_tracer(lib.dispatch_key(device), keys)
    with lib.enabled(include=[op]):
        with tracer:
            out = eval_logits(model, ids, spec)
        sync(device)
    return {
        "op": op,
        "keys": sorted(keys),
        "calls": sum(n for k, n in tracer.calls.items() if k in keys),
        "metrics": logit_metrics(out, ref),
        "native_drift": drift,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _mode_full(lib: OpLibrary, spec: dict[str, Any], exclude: list[str]) -> dict[str, Any]:
    import torch

    device, work, bench = spec["device"], Path(spec["work_dir"]), spec["bench"]
    model = load_model(spec["model_dir"], spec, device)
    ids = eval_ids(model, spec, device)
    ref = torch.load(work / "ref_logits.pt", map_location=device)
    native_bench = measure_speed(model, device, bench, spec["seed"])
    native_prof = profile_kernels(model, device, bench, work, "native")
    worker_log(f"native: {native_bench}")
    with lib.enabled(exclude=exclude):
        t0 = time.perf_counter()
        out = eval_logits(model, ids, spec)
        sync(device)
        first_s = time.perf_counter() - t0
        lib_bench = measure_speed(model, device, bench, spec["seed"])
        lib_prof = profile_kernels(model, device, bench, work, "library")
    worker_log(f"library: {lib_bench}")
    return {
        "exclude": exclude,
        "metrics": logit_metrics(out, ref),
        "first_eval_s": round(first_s, 3),
        "native": {"bench": native_bench, "profile": native_prof},
        "library": {"bench": lib_bench, "profile": lib_prof},
        "speedup": {
            "prefill": round(native_bench["prefill_ms"] / lib_bench["prefill_ms"], 4),
            "decode": round(lib_bench["decode_tok_s"] / native_bench["decode_tok_s"], 4),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Run one worker step; write its JSON result; return the exit status."""
    p = argparse.ArgumentParser(prog="python -m flagrelease.gems._probe_worker")
    p.add_argument("mode", choices=["check", "prepare", "op", "full"])
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--op")
    p.add_argument("--exclude", default="")
    args = p.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        lib = load_library(spec.get("library") or DEFAULT_LIBRARY)
        if args.mode == "check":
            result = _mode_check(lib, spec)
        elif args.mode == "prepare":
            result = _mode_prepare(lib, spec)
        elif args.mode == "op":
            result = _mode_op(lib, spec, args.op)
        else:
            result = _mode_full(lib, spec, [x for x in args.exclude.split(",") if x])
    except Exception as err:  # the process boundary: report any failure to the parent as data
        atomic_write_json(
            out, {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        )
        worker_log(traceback.format_exc())
        return 1
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
