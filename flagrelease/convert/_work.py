"""Scratch buffers, error sums and finiteness checks shared by the conversion arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ErrorStats", "Workspace", "check_finite", "diff_stats", "error_stats", "take"]


@dataclass(frozen=True)
class ErrorStats:
    """Sums that describe how far a converted tensor is from its reference.

    Attributes:
        sum_sq_ref: sum of squares of the reference values.
        sum_sq_err: sum of squares of (reference - converted).
        max_abs_err: largest absolute difference.
        count: elements compared.
    """

    sum_sq_ref: float = 0.0
    sum_sq_err: float = 0.0
    max_abs_err: float = 0.0
    count: int = 0

    def __add__(self, other: ErrorStats) -> ErrorStats:
        return ErrorStats(
            self.sum_sq_ref + other.sum_sq_ref,
            self.sum_sq_err + other.sum_sq_err,
            max(self.max_abs_err, other.max_abs_err),
            self.count + other.count,
        )

    @property
    def rel_error(self) -> float:
        """Relative L2 error ``||err|| / ||ref||`` (0 for an all-zero reference)."""
        return (self.sum_sq_err / self.sum_sq_ref) ** 0.5 if self.sum_sq_ref > 0 else 0.0

    @property
    def snr_db(self) -> float | None:
        """Signal-to-noise ratio in dB; None when the conversion is exact."""
        import math

        if self.sum_sq_err <= 0:
            return None
        if self.sum_sq_ref <= 0:
            return -math.inf
        return 10.0 * math.log10(self.sum_sq_ref / self.sum_sq_err)


class Workspace:
    """Scratch tensors kept between calls, one set per thread.

    Fresh memory costs a page fault per 4 KiB on first touch, which on small VMs is
    slower than the arithmetic itself; reusing buffers chunk after chunk avoids that and
    bounds the memory a worker holds.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape``/``dtype`` backed by the buffer ``name`` (grown as needed)."""
        count = 1
        for d in shape:
            count *= d
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            self._bufs[name] = buf
        return buf[:nbytes].view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() for b in self._bufs.values())


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise ValueError when ``t`` holds NaN or Inf, saying how many and how to allow them.

    Raises:
        ValueError: ``t`` has non-finite values.
    """
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return
    nan = int(torch.isnan(t).sum())
    inf = t.numel() - nan - int(torch.isfinite(t).sum())
    raise ValueError(
        f"the {what} holds {nan} NaN and {inf} infinite value(s); the checkpoint is damaged: re-fetch it, or set "
        "convert.allow_non_finite: true to convert it anyway"
    )


def take(
    work: Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A scratch tensor: from ``work`` when given, else freshly allocated on ``device``."""
    if work is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return work.take(name, shape, dtype)


def _sums(ref: torch.Tensor, diff: torch.Tensor) -> ErrorStats:
    """Stats from the float32 reference and the float32 difference (approx - ref)."""
    r = ref.reshape(-1)
    d = diff.reshape(-1)
    if not r.numel():
        return ErrorStats()
    lo, hi = torch.aminmax(d)
    return ErrorStats(float(torch.dot(r, r)), float(torch.dot(d, d)), max(-float(lo), float(hi)), r.numel())


def diff_stats(ref: torch.Tensor, approx: torch.Tensor) -> ErrorStats:
    """Stats of ``approx`` (float32, overwritten with the difference) against ``ref`` (float32)."""
    approx.sub_(ref)
    return _sums(ref, approx)


def error_stats(ref: torch.Tensor, approx: torch.Tensor) -> ErrorStats:
    """Error sums of ``approx`` against ``ref`` (both any float dtype, same shape).

    Args:
        ref: the reference values.
        approx: the converted values.

    Returns:
        The :class:`ErrorStats`, accumulated in float32 and returned as Python floats.
    """
    if ref.shape != approx.shape:
        raise ValueError(f"shapes differ: {list(ref.shape)} vs {list(approx.shape)}")
    return diff_stats(ref.float().contiguous(), approx.to(torch.float32, copy=True).contiguous())
