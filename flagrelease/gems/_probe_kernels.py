"""Speed and kernel accounting of the probe's worker.

:func:`measure_speed` measures prefill latency and decode throughput;
:func:`profile_kernels` profiles a few steps with torch.profiler and :func:`kernel_stats` splits the kernels into Triton
(FlagGems) and the rest, by the names Triton's launch hooks report or, failing that, by
:func:`looks_like_triton_kernel`.  torch is imported only inside the functions.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flagrelease.gems._probe_model import sync

__all__ = ["kernel_stats", "looks_like_triton_kernel", "measure_speed", "profile_kernels"]

#: Kernel-name prefixes of vendor libraries (cuBLAS, CUTLASS, cuDNN, NCCL): never Triton.
_VENDOR_PREFIXES = (
    "nvjet",
    "sm80_",
    "sm90_",
    "sm100_",
    "cutlass",
    "cublas",
    "cudnn",
    "ampere_",
    "hopper_",
    "volta_",
    "turing_",
    "gemv",
    "gemm",
    "nccl",
    "flash",
    "fmha",
    "xmma",
    "void ",
    "at::",
    "Memcpy",
    "Memset",
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- kernel classification ----------------------------------------------------------------
def looks_like_triton_kernel(name: str) -> bool:
    """Name heuristic, used only when Triton's launch hooks gave no names.

    Triton kernels keep their Python function's plain name; CUDA C++ kernels show up
    demangled (``void at::native::...(...)``) and vendor libraries use known prefixes.
    """
    return bool(_IDENT.match(name)) and not name.startswith(_VENDOR_PREFIXES)


def kernel_stats(trace: dict[str, Any], *, triton_names: Iterable[str] = ()) -> dict[str, Any]:
    """Kernel count and time from a torch.profiler Chrome trace, split Triton / other.

    Args:
        trace: the parsed ``export_chrome_trace`` JSON.
        triton_names: kernel names Triton reported launching; when empty the name
            heuristic :func:`looks_like_triton_kernel` decides.

    Returns:
        Totals, shares of time and launches served by Triton, launches through the
        driver API (how Triton launches), and the top kernels by time.
    """
    names = set(triton_names)
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else []
    api_by_corr: dict[Any, str] = {}
    for ev in events:
        if str(ev.get("cat", "")).lower() in ("cuda_runtime", "cuda_driver"):
            corr = (ev.get("args") or {}).get("correlation")
            if corr is not None:
                api_by_corr[corr] = str(ev.get("name", ""))
    total_us = triton_us = 0.0
    count = triton_count = driver_count = 0
    per_name: dict[str, list[float]] = {}
    for ev in events:
        if str(ev.get("cat", "")).lower() != "kernel":
            continue
        name = str(ev.get("name", ""))
        dur = float(ev.get("dur", 0.0) or 0.0)
        is_triton = name in names if names else looks_like_triton_kernel(name)
        count += 1
        total_us += dur
        if is_triton:
            triton_count += 1
            triton_us += dur
        api = api_by_corr.get((ev.get("args") or {}).get("correlation"), "")
        if api.startswith("cu") and not api.startswith("cuda"):
            driver_count += 1
        slot = per_name.setdefault(name, [0.0, 0.0, float(is_triton)])
        slot[0] += 1
        slot[1] += dur
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:15]
    return {
        "kernels": count,
        "kernel_time_us": round(total_us, 1),
        "triton_kernels": triton_count,
        "triton_time_us": round(triton_us, 1),
        "triton_time_share": round(triton_us / total_us, 4) if total_us else None,
        "triton_launch_share": round(triton_count / count, 4) if count else None,
        "driver_api_launches": driver_count,
        "classified_by": "triton-hooks" if names else "name-heuristic",
        "top": [
            {"name": n[:120], "launches": int(v[0]), "time_us": round(v[1], 1), "triton": bool(v[2])} for n, v in top
        ],
    }


@contextmanager
def _triton_names() -> Iterator[set[str]]:
    """Collect the names of Triton kernels loaded or launched while the block runs."""
    names: set[str] = set()
    try:
        from triton import knobs
    except ImportError:
        yield names
        return

    def on_launch(metadata: Any) -> None:
        try:
            data = metadata.get() if hasattr(metadata, "get") else metadata
            names.add(str(data["name"]))
        except (KeyError, TypeError, AttributeError):
            pass

    def on_load(module: Any, function: Any, name: str, *_: Any) -> None:
        names.add(str(name))

    hooks = [("launch_enter_hook", on_launch), ("kernel_load_end_hook", on_load)]
    installed: list[tuple[str, Any, Any]] = []
    for attr, fn in hooks:
        current: Any = getattr(knobs.runtime, attr, None)
        if hasattr(current, "add"):
            current.add(fn)
            installed.append((attr, current, fn))
        elif attr == "launch_enter_hook":
            setattr(knobs.runtime, attr, fn)
            installed.append((attr, current, None))
    try:
        yield names
    finally:
        for attr, chain, fn in installed:
            if fn is not None:
                chain.remove(fn)
            else:
                setattr(knobs.runtime, attr, chain)


# -- timing and profiling -----------------------------------------------------------------
def _median_time(fn: Callable[[], Any], device: str, *, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_speed(model: Any, device: str, bench: dict[str, Any], seed: int) -> dict[str, Any]:
    """Prefill latency and decode throughput (greedy, KV cache, fixed shapes).

    Args:
        model: the transformers causal LM.
        device: where it runs.
        bench: the shapes (``prefill_batch``, ``prefill_len``, ``decode_batch``,
            ``decode_ctx``, ``decode_steps``) and ``repeats``.
        seed: seeds the random inputs.

    Returns:
        Median prefill latency (ms, tokens/s) and decode step time and throughput.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    pb, pl = bench["prefill_batch"], bench["prefill_len"]
    db, dctx, steps = bench["decode_batch"], bench["decode_ctx"], bench["decode_steps"]
    pre_ids = torch.randint(0, vocab, (pb, pl), generator=gen).to(device)
    dec_ids = torch.randint(0, vocab, (db, dctx), generator=gen).to(device)

    def prefill() -> None:
        model(input_ids=pre_ids, use_cache=False, logits_to_keep=1)

    def decode() -> None:
        out = model(input_ids=dec_ids, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

    with torch.inference_mode():
        pre_s = _median_time(prefill, device, warmup=2, repeats=bench["repeats"])
        dec_s = _median_time(decode, device, warmup=1, repeats=max(3, bench["repeats"] // 2))
        ctx_s = _median_time(
            lambda: model(input_ids=dec_ids, use_cache=True, logits_to_keep=1),
            device,
            warmup=1,
            repeats=max(3, bench["repeats"] // 2),
        )
    step_s = max(dec_s - ctx_s, 1e-9) / steps
    return {
        "prefill_ms": round(pre_s * 1e3, 3),
        "prefill_tok_s": round(pb * pl / pre_s, 1),
        "decode_step_ms": round(step_s * 1e3, 3),
        "decode_tok_s": round(db / step_s, 1),
        "shapes": {"prefill": [pb, pl], "decode": [db, dctx, steps]},
    }


def profile_kernels(model: Any, device: str, bench: dict[str, Any], work: Path, tag: str) -> dict[str, Any] | None:
    """Profile one prefill and a few decode steps; classify the kernels.

    Args:
        model: the transformers causal LM.
        device: where it runs; only CUDA devices are profiled.
        bench: the shapes (``decode_batch``, ``decode_ctx``).
        work: a folder for the temporary Chrome trace.
        tag: names the trace file.

    Returns:
        :func:`kernel_stats` of the profiled steps, None on a device other than CUDA.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not device.startswith("cuda"):
        return None
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (bench["decode_batch"], bench["decode_ctx"]), generator=gen).to(
        device
    )
    with torch.inference_mode(), _triton_names() as names:

        def step() -> None:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(8):
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

        step()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync(device)
    path = work / f"trace-{tag}-{os.getpid()}.json"
    prof.export_chrome_trace(str(path))
    try:
        trace = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    return kernel_stats(trace, triton_names=names)
