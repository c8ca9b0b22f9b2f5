"""Everything about FlagGems: the operator probe and its worker, the CPU stand-in operator library, the vLLM plugin and the GPU kernels."""

from __future__ import annotations

__all__ = []
