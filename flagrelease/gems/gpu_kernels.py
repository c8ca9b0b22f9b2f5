"""Triton kernels for the conversions that are worth doing on a GPU.

They compute exactly what :mod:`flagrelease.convert.ops` computes on the CPU, bit for
bit, in one pass over memory (the torch versions make many passes, see
``benchmarks/bench_gpu_convert.py``):

- :func:`dequant_fp8_block_gpu`: ``bf16(float32(w) * scale[i // bm, j // bn])``, one
  float32 multiply and one round-to-nearest-even per element, NaN weights rejected.
- :func:`quantize_int8_per_channel_gpu`: ``scale = absmax / 127.5`` (IEEE division,
  rounded once to the scale dtype), ``q = clamp(rint(w / scale), -128, 127)`` with IEEE
  division and round-half-to-even, as the CPU path does. (torch on CUDA turns a division
  by a Python number into a multiply by its reciprocal, which is why the torch version of
  this function is not bit-identical on CUDA with float32 scales.) An all-zero row gets
  the scale +0.0 on both paths.

Triton is imported only when a kernel is first used, so this module imports anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["available", "dequant_fp8_block_gpu", "quantize_int8_per_channel_gpu"]

_SINGLE_PASS_MAX = 8192


def available() -> bool:
    """Whether Triton and a CUDA device are both present."""
    return triton is not None and torch.cuda.is_available()


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the module still imports, the kernels are absent
    triton = None

if triton is not None:

    @triton.jit
    def _rint(y):
        # Round half to even for |y| < 2**22, as torch.round does: adding 1.5 * 2**23 leaves no
        # fraction bits, so the float32 add itself rounds (to nearest, ties to even; the
        # constant is even), and the subtraction is exact.
        return (y + 12582912.0) - 12582912.0

    @triton.jit
    def dequant_fp8_kernel(
        w_ptr, s_ptr, out_ptr, nan_ptr, rows, cols, s_cols, bm, bn,
        TM: tl.constexpr, TN: tl.constexpr, ONE_SCALE: tl.constexpr, CHECK_NAN: tl.constexpr,
    ):  # fmt: skip
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        r = pid_r * TM + tl.arange(0, TM)[:, None]
        c = pid_c * TN + tl.arange(0, TN)[None, :]
        mask = (r < rows) & (c < cols)
        offs = r.to(tl.int64) * cols + c
        raw = tl.load(w_ptr + offs, mask=mask, other=0, eviction_policy="evict_first")
        if CHECK_NAN:
            nan_count = tl.sum((((raw & 0x7F) == 0x7F) & mask).to(tl.int32))
            if nan_count > 0:
                tl.atomic_add(nan_ptr, nan_count)
        x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        if ONE_SCALE:  # the tile lies inside one scale block
            s = tl.load(s_ptr + ((pid_r * TM) // bm) * s_cols + (pid_c * TN) // bn)
        else:
            s = tl.load(s_ptr + (r // bm) * s_cols + (c // bn), mask=mask, other=1.0)
        tl.store(out_ptr + offs, (x * s).to(tl.bfloat16), mask=mask, cache_modifier=".cs")

    @triton.jit
    def quant_int8_row_kernel(
        w_ptr, q_ptr, scale_ptr, cols,
        BLOCK: tl.constexpr, SINGLE: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = row * cols
        idx = tl.arange(0, BLOCK)
        if SINGLE:
            m = idx < cols
            x = tl.load(w_ptr + base + idx, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
            amax = tl.max(tl.abs(x), axis=0)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, cols, BLOCK):
                m = start + idx < cols
                x = tl.load(w_ptr + base + start + idx, mask=m, other=0.0, eviction_policy="evict_last")
                acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
            amax = tl.max(acc, axis=0)
        scale = tl.math.div_rn(amax, 127.5)
        scale = scale.to(scale_ptr.dtype.element_ty)
        tl.store(scale_ptr + row, scale)
        sf = scale.to(tl.float32)
        sf = tl.where(sf == 0.0, 1.0, sf)
        if SINGLE:
            q = _rint(tl.math.div_rn(x, sf))
            q = tl.minimum(tl.maximum(q, -128.0), 127.0)
            tl.store(q_ptr + base + idx, q.to(tl.int8), mask=m, cache_modifier=".cs")
        else:
            for start in range(0, cols, BLOCK):
                m = start + idx < cols
                x = tl.load(w_ptr + base + start + idx, mask=m, other=0.0, eviction_policy="evict_first")
                q = _rint(tl.math.div_rn(x.to(tl.float32), sf))
                q = tl.minimum(tl.maximum(q, -128.0), 127.0)
                tl.store(q_ptr + base + start + idx, q.to(tl.int8), mask=m, cache_modifier=".cs")


def _launch_dequant(
    raw: torch.Tensor, sc: torch.Tensor, res: torch.Tensor, nan: torch.Tensor, bm: int, bn: int,
    *, tm: int = 64, tn: int = 128, warps: int = 4, check_nan: bool = True,
) -> None:  # fmt: skip
    rows, cols = raw.shape
    one = bm % tm == 0 and bn % tn == 0
    grid = (-(-rows // tm), -(-cols // tn))
    _kernels()["dequant"][grid](
        raw, sc, res, nan, rows, cols, sc.shape[1], bm, bn, TM=tm, TN=tn, ONE_SCALE=one, CHECK_NAN=check_nan,
        num_warps=warps,
    )  # fmt: skip


def _quant_config(cols: int) -> dict[str, Any]:
    # Measured on an H100 (benchmarks/results/gpu_convert.md, kernel variants): two passes
    # over the row (the second from L2) beat holding the row in registers; short rows like
    # small chunks and few warps, long rows larger chunks.
    if cols <= _SINGLE_PASS_MAX:
        return {"block": 1024, "single": False, "warps": 4}
    return {"block": 4096, "single": False, "warps": 8}


def _launch_quant(
    w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, block: int, single: bool, warps: int
) -> None:
    rows, cols = w.shape
    if rows:
        _kernels()["quant"][(rows,)](w, q, scale, cols, BLOCK=block, SINGLE=single, num_warps=warps)


def _kernels() -> dict[str, Any]:
    if triton is None:
        raise RuntimeError("the GPU conversion kernels need Triton; pip install triton (it comes with CUDA torch)")
    return {"dequant": dequant_fp8_kernel, "quant": quant_int8_row_kernel}


def dequant_fp8_block_gpu(
    w: torch.Tensor, scale: torch.Tensor, *, block: tuple[int, int] | int = 128, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize a DeepSeek block-FP8 weight to bfloat16 in one pass (Triton).

    Bit-identical to :func:`flagrelease.convert.ops.dequant_fp8_block`.

    Args:
        w: ``float8_e4m3fn`` (or its raw ``uint8``) weight ``[rows, cols]`` on the GPU.
        scale: float32 ``[ceil(rows/bm), ceil(cols/bn)]``.
        block: block size ``(bm, bn)``, or one int for both.
        out: bfloat16 ``[rows, cols]`` to write into.

    Returns:
        The bfloat16 weight.

    Raises:
        ValueError: shapes do not match, or the weight holds NaN.
    """
    bm, bn = (block, block) if isinstance(block, int) else block
    if w.dim() != 2 or scale.dim() != 2:
        raise ValueError(f"block FP8 needs a 2-D weight and scale, got {list(w.shape)} and {list(scale.shape)}")
    rows, cols = w.shape
    want = (-(-rows // bm), -(-cols // bn))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale shape {list(scale.shape)} does not match weight {list(w.shape)} (expected {want})")
    raw = w.contiguous().view(torch.uint8)
    sc = scale.to(device=w.device, dtype=torch.float32).contiguous()
    res = out if out is not None else torch.empty((rows, cols), dtype=torch.bfloat16, device=w.device)
    nan = torch.zeros(1, dtype=torch.int32, device=w.device)
    _launch_dequant(raw, sc, res, nan, bm, bn)
    if int(nan.item()):
        raise ValueError("the FP8 weight holds NaN values")
    return res


def quantize_int8_per_channel_gpu(
    w: torch.Tensor, *, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 symmetric per-output-channel quantization in one kernel (Triton).

    Bit-identical to :func:`flagrelease.convert.ops.quantize_int8_per_channel` on the CPU.

    Args:
        w: bf16/fp16/fp32 weight ``[rows, cols]`` on the GPU.
        scale_dtype: dtype of the stored scales (default: ``w``'s dtype).

    Returns:
        ``(q, scale)``: int8 ``[rows, cols]`` and ``[rows, 1]`` scales.
    """
    if w.dim() != 2 or not w.is_floating_point() or w.element_size() < 2:
        raise ValueError(f"expected a 2-D bf16/fp16/fp32 weight, got {w.dtype}{list(w.shape)}")
    _kernels()
    w = w.contiguous()
    rows, cols = w.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    scale = torch.empty((rows, 1), dtype=scale_dtype or w.dtype, device=w.device)
    _launch_quant(w, q, scale, **_quant_config(cols))
    return q, scale
