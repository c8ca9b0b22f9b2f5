"""The model side of the probe's worker: load it, feed it, compare its logits.

Random weights of the release's architecture (:func:`build_random`) or its checkpoint
(:func:`load_model`); fixed inputs (:func:`eval_ids`) run as one prefill and a few cached
decode steps (:func:`eval_logits`); :func:`logit_metrics` compares two sets of logits;
and :func:`op_tracer` counts which aten overloads reach the backend, to find the operators a
forward pass uses.  torch and transformers are imported only inside the functions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_dir

__all__ = [
    "build_random",
    "eval_ids",
    "eval_logits",
    "fits_fp32",
    "load_model",
    "logit_metrics",
    "op_tracer",
    "sync",
    "worker_log",
]


def worker_log(message: str) -> None:
    """One line on stderr, tagged with the worker's pid (the parent keeps it in the step's log)."""
    print(f"[probe-worker {os.getpid()}] {message}", file=sys.stderr, flush=True)


# -- model and inputs ---------------------------------------------------------------------
def sync(device: str) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind != "cpu":
        mod = getattr(torch, kind, None)
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize()


def _shrink(config: Any, layers: int | None) -> Any:
    """Keep the first ``layers`` decoder layers of a transformers config."""
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


def build_random(spec: dict[str, Any], device: str) -> Path:
    """Random weights of the release's architecture, saved once per config, layers, seed and dtype.

    Args:
        spec: the probe's spec (``model_config``, ``random_dir``, ``layers``, ``seed``, ``dtype``).
        device: where to build the model.

    Returns:
        The checkpoint folder (``spec["random_dir"]``).
    """
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
        worker_log(f"reusing random weights in {dest}")
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
    worker_log(f"random weights built and saved in {time.perf_counter() - t0:.1f}s")
    del model
    return dest


def load_model(model_dir: str, spec: dict[str, Any], device: str) -> Any:
    """Load a checkpoint in eval mode on ``device``, with ``spec["layers"]`` layers at most.

    Args:
        model_dir: the checkpoint folder.
        spec: the probe's spec (``layers``, ``dtype``).
        device: where the model runs.

    Returns:
        The transformers causal LM.
    """
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
    worker_log(f"model loaded from {model_dir} in {time.perf_counter() - t0:.1f}s")
    return model


def eval_ids(model: Any, spec: dict[str, Any], device: str) -> Any:
    """Seeded random token ids, ``batch`` x (``seq_len`` + ``decode_steps``), on ``device``."""
    import torch

    gen = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["batch"], spec["seq_len"] + spec["decode_steps"])
    return torch.randint(0, model.config.vocab_size, shape, generator=gen).to(device)


def eval_logits(model: Any, ids: Any, spec: dict[str, Any]) -> Any:
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


def logit_metrics(out: Any, ref: Any) -> dict[str, Any]:
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


def fits_fp32(model: Any, device: str) -> bool:
    """Whether an fp32 copy of ``model`` fits on ``device`` (for the bf16-vs-fp32 noise floor)."""
    import torch

    need = sum(p.numel() for p in model.parameters()) * 4
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return free > need * 0.6 + (4 << 30)
    return need < (4 << 30)


# -- which library operators a forward pass reaches ----------------------------------------
def op_tracer(dispatch_key: str, lib_keys: set[str]) -> Any:
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
