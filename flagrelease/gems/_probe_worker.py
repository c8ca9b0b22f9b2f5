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
FlagGems (:class:`FlagGemsLibrary`).  The result is one JSON file, written atomically.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from flagrelease._atomic import atomic_dir, atomic_write_json

__all__ = [
    "DEFAULT_LIBRARY",
    "FlagGemsLibrary",
    "OpLibrary",
    "kernel_stats",
    "load_library",
    "looks_like_triton_kernel",
    "main",
]

DEFAULT_LIBRARY = "flagrelease.gems._probe_worker:FlagGemsLibrary"

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


def _log(message: str) -> None:
    print(f"[probe-worker {os.getpid()}] {message}", file=sys.stderr, flush=True)


# -- operator libraries ------------------------------------------------------------------
class OpLibrary(Protocol):
    """What the worker needs from an operator library (FlagGems, or a test stand-in)."""

    name: str

    def check(self) -> dict[str, Any]:
        """``available``, ``reason``, ``device``, ``device_name``, ``version``, ``library_missing``."""

    def dispatch_key(self, device: str) -> str:
        """The dispatcher key the library registers its kernels under for ``device``."""

    def op_keys(self) -> dict[str, list[str]]:
        """Operator name -> the aten overload keys it implements (``add.Tensor``, ``mm``)."""

    def enabled(
        self, *, include: list[str] | None = None, exclude: list[str] | None = None
    ) -> AbstractContextManager[None]:
        """Register ``include`` only, or everything but ``exclude``, until the block ends."""


class FlagGemsLibrary:
    """FlagGems (``flag_gems``) through its public ``enable``/``only_enable`` API.

    Operator names are FlagGems function names, the ones ``flag_gems.enable(unused=...)``
    and ``flag_gems.only_enable(include=...)`` take, so the excluded list drops straight
    into a release config's ``serve.flaggems.excluded_ops``.
    """

    name = "flag_gems"

    def check(self) -> dict[str, Any]:
        """Probe for an accelerator first, then for FlagGems itself."""
        import torch

        info: dict[str, Any] = {
            "available": False,
            "library_missing": False,
            "device": None,
            "device_name": None,
            "version": None,
        }
        if torch.cuda.is_available():
            info["device"], info["device_name"] = "cuda", torch.cuda.get_device_name(0)
        else:
            for kind in ("npu", "musa", "mlu", "xpu"):
                mod = getattr(torch, kind, None)
                if mod is not None and getattr(mod, "is_available", lambda: False)():
                    info["device"], info["device_name"] = kind, kind
                    break
        if info["device"] is None:
            info["reason"] = (
                f"no GPU: torch {torch.__version__} sees no CUDA (or other accelerator) device on "
                "this machine; run probe-gems on the target chip"
            )
            return info
        try:
            import flag_gems
        except ImportError as err:
            info["library_missing"] = True
            info["reason"] = f"flag_gems is not importable ({err}); pip install flag-gems on the target machine"
            return info
        info["version"] = getattr(flag_gems, "__version__", None)
        info["device"] = str(getattr(flag_gems, "device", info["device"]))
        info["available"], info["reason"] = True, None
        return info

    def dispatch_key(self, device: str) -> str:
        """FlagGems' own registration key (``CUDA`` on NVIDIA)."""
        from flag_gems import runtime

        key = getattr(getattr(runtime, "device", None), "dispatch_key", None)
        return str(key) if key else _default_dispatch_key(device)

    def op_keys(self) -> dict[str, list[str]]:
        """From FlagGems' operator table, honouring each entry's torch-version condition."""
        import flag_gems

        patched = set(getattr(getattr(flag_gems, "config", None), "aten_patch_list", []) or [])
        out: dict[str, list[str]] = {}
        for item in getattr(flag_gems, "_FULL_CONFIG", ()):
            if len(item) < 2 or item[0] in patched or (len(item) > 2 and not item[2]()):
                continue
            out.setdefault(getattr(item[1], "__name__", str(item[1])), []).append(item[0])
        return out

    @contextmanager
    def enabled(self, *, include: list[str] | None = None, exclude: list[str] | None = None) -> Iterator[None]:
        """``flag_gems.only_enable(include=...)`` or ``flag_gems.enable(unused=...)`` into a private
        ``torch.library.Library`` that is destroyed when the block ends, so that the probe's own
        comparisons run on native kernels."""
        import flag_gems
        import torch

        lib = torch.library.Library("aten", "IMPL")
        try:
            if include is not None:
                flag_gems.only_enable(lib=lib, include=list(include))
            else:
                flag_gems.enable(lib=lib, unused=list(exclude or []))
            yield
        finally:
            lib._destroy()


def load_library(ref: str) -> OpLibrary:
    """Import ``module:attribute`` and instantiate it."""
    module, _, attr = ref.partition(":")
    obj = getattr(importlib.import_module(module), attr or "LIBRARY")
    lib: OpLibrary = obj() if isinstance(obj, type) else obj
    return lib


def _default_dispatch_key(device: str) -> str:
    return {"cuda": "CUDA", "cpu": "CPU", "xpu": "XPU"}.get(device.split(":")[0], "PrivateUse1")


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


# -- model and inputs ---------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind != "cpu":
        mod = getattr(torch, kind, None)
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize()


def _shrink(config: Any, layers: int | None) -> Any:
    if layers and config.num_hidden_layers > layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:layers]
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(config.max_window_layers, layers)
    return config


def _has_accelerate() -> bool:
    # transformers needs accelerate to build or load straight onto a device.
    return importlib.util.find_spec("accelerate") is not None


def _build_random(spec: dict[str, Any], device: str) -> Path:
    """Random bf16 weights of the release's architecture, saved once per config+seed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dest = Path(spec["random_dir"])
    stamp = json.dumps(
        {
            "config": json.loads(Path(spec["model_config"]).read_text()),
            "layers": spec.get("layers"),
            "seed": spec["seed"],
            "dtype": spec["dtype"],
        },
        sort_keys=True,
    )
    marker = dest / "flagrelease_random.json"
    if marker.is_file() and marker.read_text() == stamp:
        _log(f"reusing random weights in {dest}")
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(Path(spec["model_config"]).read_text())
        config = _shrink(AutoConfig.from_pretrained(tmp), spec.get("layers"))
    torch.manual_seed(spec["seed"])
    t0 = time.perf_counter()
    if _has_accelerate():
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]))
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"])).to(device)
    with atomic_dir(dest) as tmp_dir:
        model.save_pretrained(tmp_dir)
        (tmp_dir / marker.name).write_text(stamp)
    _log(f"random weights built and saved in {time.perf_counter() - t0:.1f}s")
    del model
    return dest


def _load_model(model_dir: str, spec: dict[str, Any], device: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    config = _shrink(AutoConfig.from_pretrained(model_dir), spec.get("layers"))
    placement: dict[str, Any] = {"device_map": device} if _has_accelerate() else {}
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir,
        config=config,
        dtype=getattr(torch, spec["dtype"]),
        **placement,
    )
    model.to(device).eval()
    _log(f"model loaded from {model_dir} in {time.perf_counter() - t0:.1f}s")
    return model


def _eval_ids(model: Any, spec: dict[str, Any], device: str) -> Any:
    import torch

    gen = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["batch"], spec["seq_len"] + spec["decode_steps"])
    return torch.randint(0, model.config.vocab_size, shape, generator=gen).to(device)


def _eval_logits(model: Any, ids: Any, spec: dict[str, Any]) -> Any:
    """Prefill ``seq_len`` tokens, then ``decode_steps`` cached steps on fixed tokens."""
    import torch

    prefill = spec["seq_len"]
    with torch.inference_mode():
        out = model(input_ids=ids[:, :prefill], use_cache=True)
        chunks, past = [out.logits], out.past_key_values
        for i in range(spec["decode_steps"]):
            out = model(input_ids=ids[:, prefill + i : prefill + i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            chunks.append(out.logits)
        return torch.cat(chunks, dim=1)


def _metrics(out: Any, ref: Any) -> dict[str, Any]:
    """Max abs / rel error, relative L2 error, non-finite count and top-1 agreement."""
    import torch

    a, b = out.float(), ref.float().to(out.device)
    finite = torch.isfinite(a)
    nonfinite = int((~finite).sum())
    diff = torch.where(finite, a - b, torch.zeros_like(a))
    max_abs = float(diff.abs().max())
    ref_max = float(b.abs().max()) or 1.0
    ref_norm = float(b.norm()) or 1.0
    return {
        "max_abs_err": max_abs,
        "max_rel_err": max_abs / ref_max,
        "rel_l2_err": float(diff.norm()) / ref_norm,
        "nonfinite": nonfinite,
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "positions": int(a.shape[0] * a.shape[1]),
    }


# -- which library operators a forward pass reaches ----------------------------------------
def _tracer(dispatch_key: str, lib_keys: set[str]) -> Any:
    """A dispatch mode that counts the aten overloads reaching the backend kernel.

    Composite ops with no kernel of their own for the backend (and not taken over by
    the library) are decomposed, as the dispatcher would, so ``linear`` shows up as the
    ``mm``/``addmm`` that actually runs.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def key_of(func: Any) -> tuple[str, str]:
        schema = func._schema
        qual = schema.name + (f".{schema.overload_name}" if schema.overload_name else "")
        ns, _, rest = qual.partition("::")
        return qual, rest if ns == "aten" else qual

    class _Tracer(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: Counter[str] = Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            qual, key = key_of(func)
            has = torch._C._dispatch_has_kernel_for_dispatch_key
            if key not in lib_keys and not has(qual, dispatch_key) and has(qual, "CompositeImplicitAutograd"):
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            self.calls[key] += 1
            return func(*args, **kwargs)

    return _Tracer()


# -- timing and profiling -----------------------------------------------------------------
def _median_time(fn: Callable[[], Any], device: str, *, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench(model: Any, device: str, bench: dict[str, Any], seed: int) -> dict[str, Any]:
    """Prefill latency and decode throughput (greedy, KV cache, fixed shapes)."""
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


def _profile(model: Any, device: str, bench: dict[str, Any], work: Path, tag: str) -> dict[str, Any] | None:
    """Profile one prefill and a few decode steps; classify the kernels."""
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
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            _sync(device)
    path = work / f"trace-{tag}-{os.getpid()}.json"
    prof.export_chrome_trace(str(path))
    try:
        trace = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    return kernel_stats(trace, triton_names=names)


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
    model_dir = spec.get("model_dir") or str(_build_random(spec, device))
    model = _load_model(model_dir, spec, device)
    ids = _eval_ids(model, spec, device)
    op_keys = lib.op_keys()
    key_to_ops: dict[str, list[str]] = {}
    for op, keys in op_keys.items():
        for key in keys:
            key_to_ops.setdefault(key, []).append(op)
    t0 = time.perf_counter()
    ref = _eval_logits(model, ids, spec)
    _sync(device)
    native_s = time.perf_counter() - t0
    torch.save(ref.cpu(), work / "ref_logits.pt")
    tracer = _tracer(lib.dispatch_key(device), set(key_to_ops))
    with tracer:
        _eval_logits(model, ids, spec)
    ops_used: Counter[str] = Counter()
    for key, n in tracer.calls.items():
        for op in key_to_ops.get(key, []):
            ops_used[op] += n
    params = sum(p.numel() for p in model.parameters())
    floor = None
    if _fits_fp32(model, device):
        model.float()
        floor = _metrics(ref, _eval_logits(model, ids, spec))
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


def _fits_fp32(model: Any, device: str) -> bool:
    import torch

    need = sum(p.numel() for p in model.parameters()) * 4
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return free > need * 0.6 + (4 << 30)
    return need < (4 << 30)


def _mode_op(lib: OpLibrary, spec: dict[str, Any], op: str) -> dict[str, Any]:
    import torch

    device = spec["device"]
    model = _load_model(spec["model_dir"], spec, device)
    ids = _eval_ids(model, spec, device)
    ref = torch.load(Path(spec["work_dir"]) / "ref_logits.pt", map_location=device)
    native = _eval_logits(model, ids, spec)
    drift = float((native.float() - ref.float()).abs().max())
    keys = set(lib.op_keys().get(op, []))
    t0 = time.perf_counter()
    tracer = _tracer(lib.dispatch_key(device), keys)
    with lib.enabled(include=[op]):
        with tracer:
            out = _eval_logits(model, ids, spec)
        _sync(device)
    return {
        "op": op,
        "keys": sorted(keys),
        "calls": sum(n for k, n in tracer.calls.items() if k in keys),
        "metrics": _metrics(out, ref),
        "native_drift": drift,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _mode_full(lib: OpLibrary, spec: dict[str, Any], exclude: list[str]) -> dict[str, Any]:
    import torch

    device, work, bench = spec["device"], Path(spec["work_dir"]), spec["bench"]
    model = _load_model(spec["model_dir"], spec, device)
    ids = _eval_ids(model, spec, device)
    ref = torch.load(work / "ref_logits.pt", map_location=device)
    native_bench = _bench(model, device, bench, spec["seed"])
    native_prof = _profile(model, device, bench, work, "native")
    _log(f"native: {native_bench}")
    with lib.enabled(exclude=exclude):
        t0 = time.perf_counter()
        out = _eval_logits(model, ids, spec)
        _sync(device)
        first_s = time.perf_counter() - t0
        lib_bench = _bench(model, device, bench, spec["seed"])
        lib_prof = _profile(model, device, bench, work, "library")
    _log(f"library: {lib_bench}")
    return {
        "exclude": exclude,
        "metrics": _metrics(out, ref),
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
        _log(traceback.format_exc())
        return 1
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
