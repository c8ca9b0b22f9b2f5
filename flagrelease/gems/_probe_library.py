"""The operator library the probe's worker drives: FlagGems, or a stand-in.

The worker names its library as ``module:attribute`` (:func:`load_library`); the default,
:data:`DEFAULT_LIBRARY`, wraps FlagGems (:class:`FlagGemsLibrary`).  A stand-in (tests
use a CPU one) implements :class:`OpLibrary`.  Nothing here imports torch or FlagGems
until a method runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

__all__ = ["DEFAULT_LIBRARY", "FlagGemsLibrary", "OpLibrary", "load_library"]

#: The operator library of a probe that names none.
DEFAULT_LIBRARY = "flagrelease.gems._probe_library:FlagGemsLibrary"


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
