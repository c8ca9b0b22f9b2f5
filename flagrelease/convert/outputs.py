"""What the convert stage hands downstream."""

from __future__ import annotations

from typing import Any

from flagrelease.pipeline import StageOutputs

__all__ = ["ConvertOutputs"]


class ConvertOutputs(StageOutputs):
    """The weights the target serves.

    Attributes:
        model_dir: the converted folder (the fetched one, linked, when the mode is ``none``).
        mode: the conversion mode (``none``, ``fp8-block-to-bf16``, ``int8-w8a8``, ...).
        report: the per-tensor error report (JSON), None when nothing was quantized.
        summary: totals of the report (tensors, bytes, SNR, format).
    """

    model_dir: str
    mode: str
    report: str | None = None
    summary: dict[str, Any] = {}
