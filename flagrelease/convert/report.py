"""The conversion report: what was converted, how fast, and how large the error is.

:class:`ConvertReport` is what :func:`~flagrelease.convert.convert_checkpoint` returns;
its JSON form is the bundle's ``reports/quantization.json`` and its :meth:`summary` is
the small table the model card shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SCHEMA_VERSION", "ConvertReport", "TensorReport"]

SCHEMA_VERSION = 1


def _num(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True)
class TensorReport:
    """One converted tensor and its error against the reference.

    Attributes:
        name: the source tensor name.
        shape: its shape.
        source_dtype: its dtype in the source (safetensors name, e.g. ``F8_E4M3``).
        target: what it became, e.g. ``BF16``, ``INT8 channel``, ``INT4 group 128``.
        rel_error: ``||w - w'|| / ||w||``.
        snr_db: ``10 log10(sum w^2 / sum (w - w')^2)``; None when exact.
        max_abs_error: largest ``|w - w'|``.
        reference: what ``w`` is: ``fp32 product`` (FP8 times scale) or the dense weight dtype.
    """

    name: str
    shape: tuple[int, ...]
    source_dtype: str
    target: str
    rel_error: float
    snr_db: float | None
    max_abs_error: float
    reference: str

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-able dict."""
        return {
            "tensor": self.name,
            "shape": list(self.shape),
            "source_dtype": self.source_dtype,
            "target": self.target,
            "reference": self.reference,
            "rel_error": _num(self.rel_error),
            "snr_db": _num(self.snr_db, 5),
            "max_abs_error": _num(self.max_abs_error),
        }


@dataclass
class ConvertReport:
    """The result of one conversion.

    Attributes:
        src: source checkpoint folder.
        dst: output folder.
        format: target format name (``bf16``, ``int8-w8a8``...).
        mode: the release-config mode it implements.
        tensors: one row per converted (dequantized or quantized) tensor.
        copied: tensors copied unchanged.
        ignored_modules: modules kept dense although the format quantizes.
        shards: output shard names.
        resumed_shards: shards reused from an interrupted run.
        bytes_in: source tensor bytes.
        bytes_out: output tensor bytes.
        seconds: wall time of the whole conversion.
        workers: worker threads.
        device: where the arithmetic ran.
        group_size: group size of group formats, else None.
        notes: things people should know (kept-dense tensors, nothing to convert...).
    """

    src: str
    dst: str
    format: str
    mode: str
    tensors: list[TensorReport] = field(default_factory=list)
    copied: int = 0
    ignored_modules: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    resumed_shards: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    workers: int = 1
    device: str = "cpu"
    group_size: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        """Source gigabytes (1e9 bytes) converted per second."""
        return self.bytes_in / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def worst(self, n: int = 10) -> list[TensorReport]:
        """The ``n`` tensors with the largest relative error."""
        return sorted(self.tensors, key=lambda t: t.rel_error, reverse=True)[:n]

    def summary(self) -> dict[str, Any]:
        """Scalars for the model card and the bundle manifest."""
        rel = [t.rel_error for t in self.tensors]
        snr = [t.snr_db for t in self.tensors if t.snr_db is not None]
        worst = self.worst(1)
        out: dict[str, Any] = {
            "format": self.format,
            "tensors_converted": len(self.tensors),
            "tensors_copied": self.copied,
            "modules_kept_dense": len(self.ignored_modules),
            "rel_error_mean": _num(sum(rel) / len(rel)) if rel else None,
            "rel_error_max": _num(max(rel)) if rel else None,
            "snr_db_min": _num(min(snr), 5) if snr else None,
            "snr_db_mean": _num(sum(snr) / len(snr), 5) if snr else None,
            "worst_tensor": worst[0].name if worst else None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "gb_per_s": _num(self.gb_per_s, 4),
        }
        if self.group_size is not None:
            out["group_size"] = self.group_size
        return out

    def table_rows(self, *, limit: int = 5000) -> list[dict[str, Any]]:
        """Per-tensor rows for a table artifact; the ``limit`` worst when there are more."""
        rows = self.tensors if len(self.tensors) <= limit else self.worst(limit)
        return [
            {k: v for k, v in r.to_json().items() if k != "shape"} | {"shape": "x".join(map(str, r.shape))}
            for r in rows
        ]

    def to_json(self) -> dict[str, Any]:
        """The whole report as a JSON-able dict (``reports/quantization.json``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "src": self.src,
            "dst": self.dst,
            "format": self.format,
            "mode": self.mode,
            "device": self.device,
            "workers": self.workers,
            "group_size": self.group_size,
            "summary": self.summary(),
            "shards": self.shards,
            "resumed_shards": self.resumed_shards,
            "ignored_modules": self.ignored_modules,
            "notes": self.notes,
            "tensors": [t.to_json() for t in self.tensors],
        }

    def to_text(self) -> str:
        """A short human summary with the worst tensors."""
        s = self.summary()
        lines = [
            f"converted {self.src} -> {self.dst} ({self.format})",
            f"  {s['tensors_converted']} tensors converted, {s['tensors_copied']} copied, "
            f"{len(self.shards)} shards ({len(self.resumed_shards)} resumed)",
            f"  {self.bytes_in / 1e9:.3f} GB in, {self.bytes_out / 1e9:.3f} GB out, {self.seconds:.1f} s "
            f"({self.gb_per_s:.3f} GB/s, {self.workers} workers on {self.device})",
        ]
        if self.tensors:
            lines.append(
                f"  relative error mean {s['rel_error_mean']}, max {s['rel_error_max']}; "
                f"SNR min {s['snr_db_min']} dB, mean {s['snr_db_mean']} dB"
            )
            lines.append("  worst tensors:")
            width = max(len(t.name) for t in self.worst(5))
            for t in self.worst(5):
                snr = "exact" if t.snr_db is None else f"{t.snr_db:6.2f} dB"
                lines.append(f"    {t.name:<{width}}  {t.target:<16} rel {t.rel_error:.3e}  SNR {snr}")
        if self.ignored_modules:
            shown = ", ".join(self.ignored_modules[:5]) + (" ..." if len(self.ignored_modules) > 5 else "")
            lines.append(f"  kept dense: {shown}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
