"""A CPU stand-in for FlagGems, for the probe's tests.

FlagGems needs a GPU and no machine here has one, so this is a fake at that boundary:
it overrides a few aten kernels on the CPU through the same ``torch.library`` mechanism
FlagGems uses on CUDA, each with a known behaviour, so the probe's worker processes,
comparisons, crash isolation and verdicts run for real:

- ``silu`` and ``rsqrt``: correct re-implementations (tiny rounding differences) -> ok.
- ``mean``: 30% too large -> mismatch.
- ``neg``: returns NaN -> nan.
- ``embedding``: aborts the process, as a faulting kernel would -> crash.
- ``cos``: never returns -> timeout (only when ``FLAGRELEASE_TEST_HANG_OP`` is ``cos``,
  so that tests which do not want to wait for a timeout do not have to).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["StandInOps"]


def _silu(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / (1.0 + torch.exp(-x.float()))).to(x.dtype)


def _rsqrt(x: torch.Tensor) -> torch.Tensor:
    return (1.0 / torch.sqrt(x.double())).to(x.dtype)


def _mean_dim(x: torch.Tensor, dim: Any, keepdim: bool = False, *, dtype: Any = None) -> torch.Tensor:
    dims = [dim] if isinstance(dim, int) else list(dim)
    n = 1
    for d in dims:
        n *= x.shape[d]
    return x.sum(dim=dims, keepdim=keepdim) / n * 1.3


def _neg(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def _embedding(*args: Any, **kwargs: Any) -> torch.Tensor:
    os.abort()


def _cos(x: torch.Tensor) -> torch.Tensor:
    while True:
        time.sleep(1)


_OPS: dict[str, tuple[str, Any]] = {
    "silu": ("silu", _silu),
    "rsqrt": ("rsqrt", _rsqrt),
    "mean_dim": ("mean.dim", _mean_dim),
    "neg": ("neg", _neg),
    "embedding": ("embedding", _embedding),
    "cos": ("cos", _cos),
}


class StandInOps:
    """The stand-in operator library (see the module docstring)."""

    name = "standin"

    def check(self) -> dict[str, Any]:
        """Always available, on the CPU."""
        return {
            "available": True,
            "library_missing": False,
            "device": "cpu",
            "device_name": "cpu",
            "version": "0-standin",
            "reason": None,
        }

    def dispatch_key(self, device: str) -> str:
        """Registers on the CPU key."""
        return "CPU"

    def op_keys(self) -> dict[str, list[str]]:
        """Each stand-in operator and the aten key it overrides."""
        ops = dict(_OPS)
        if os.environ.get("FLAGRELEASE_TEST_HANG_OP") != "cos":
            ops.pop("cos")
        return {name: [key] for name, (key, _) in ops.items()}

    @contextmanager
    def enabled(self, *, include: list[str] | None = None, exclude: list[str] | None = None) -> Iterator[None]:
        """Override the chosen aten CPU kernels until the block ends."""
        names = set(self.op_keys())
        chosen = (
            [n for n in names if n in include]
            if include is not None
            else [n for n in names if n not in set(exclude or [])]
        )
        lib = torch.library.Library("aten", "IMPL")
        try:
            for name in chosen:
                key, fn = _OPS[name]
                lib.impl(key, fn, "CPU")
            yield
        finally:
            lib._destroy()
