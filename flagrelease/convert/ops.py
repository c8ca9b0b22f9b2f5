"""The arithmetic of every conversion, as pure torch functions.

Each function takes torch tensors on any device (``cpu`` or ``cuda``) and uses only
element-wise torch operations whose results are exactly rounded (conversions, one
multiply or divide per element, round-half-to-even, max), so the same input gives
bit-identical output on CPU and GPU.  The streaming converter calls them on chunks of
rows; tests and GPU cross-checks call them directly.

Formats:

- DeepSeek block FP8: ``float8_e4m3fn`` weight ``[rows, cols]`` and an F32 ``scale_inv``
  of shape ``[ceil(rows/128), ceil(cols/128)]``; the real weight is ``w * scale`` per block.
- compressed-tensors INT (symmetric, round to nearest): ``scale = absmax / ((2**bits - 1) / 2)``
  per output channel or per group of input columns, rounded *up* to the scale dtype (so
  the error stays within half a step, even for the largest weight);
  ``q = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1)``; the weight is ``q * scale``.
- ``pack-quantized``: ``32 // bits`` values per int32 along the input dimension, each
  stored as ``q + 2**(bits-1)`` in ``bits`` bits, lowest column in the lowest bits,
  the last word zero-padded (as compressed-tensors' ``pack_to_int32``).
"""

from __future__ import annotations

import torch

from flagrelease.convert._work import ErrorStats, Workspace, check_finite, diff_stats, error_stats, take

__all__ = [
    "ErrorStats",
    "Workspace",
    "check_finite",
    "dequant_fp8_block",
    "dequant_fp8_block_with_error",
    "dequantize_int",
    "error_stats",
    "fp8_e4m3_to_float",
    "pack_int32",
    "quantize_int",
    "quantize_int4_group",
    "quantize_int8_per_channel",
    "unpack_int32",
]

#: The bit pattern 0x87F0 (sign bit and the 7 bits of an e4m3 magnitude moved into a
#: bfloat16) as a signed 16-bit integer.
_E4M3_TO_BF16_MASK = -30736
#: bfloat16 keeps e4m3's exponent bits unbiased by 120 (127 - 7); this power of two undoes it.
_E4M3_EXP_SHIFT = 2.0**120
#: Largest finite float8_e4m3fn value; the NaN codes decode to 480 with the bit trick.
_E4M3_MAX = 448.0
#: Scales below this can absorb the 2**120 factor without overflowing float32.
_FOLD_LIMIT = 2.0**7


def fp8_e4m3_to_float(
    w: torch.Tensor, *, out: torch.Tensor | None = None, work: Workspace | None = None, unscaled: bool = False
) -> torch.Tensor:
    """Convert ``float8_e4m3fn`` (or its raw ``uint8``/``int8`` bytes) to float32, exactly.

    Moves the sign and the 7 exponent/mantissa bits into a bfloat16 bit pattern (which
    leaves the exponent biased by 7 instead of 127), widens to float32 and multiplies by
    2**120. Every finite e4m3 value, subnormals and -0 included, comes out equal to
    ``w.float()``; on CPU it is several times faster than that. NaN (0x7F/0xFF) is not
    checked here; see :func:`dequant_fp8_block`.

    Args:
        w: the FP8 tensor.
        out: float32 tensor of ``w``'s shape to write into.
        work: scratch buffers to reuse instead of allocating.
        unscaled: leave out the final multiply by 2**120 (the caller folds it into its scale).

    Returns:
        float32 tensor of ``w``'s shape.
    """
    bits = take(work, "e4m3_bits", tuple(w.shape), torch.int16, w.device)
    bits.copy_(w.view(torch.int8))  # sign-extends, so the sign lands in bit 15 after the shift
    bits.mul_(16)
    bits.bitwise_and_(_E4M3_TO_BF16_MASK)
    res = out if out is not None else torch.empty(w.shape, dtype=torch.float32, device=w.device)
    res.copy_(bits.view(torch.bfloat16))
    if not unscaled:
        res.mul_(_E4M3_EXP_SHIFT)
    return res


def dequant_fp8_block(
    w: torch.Tensor,
    scale: torch.Tensor,
    *,
    block: tuple[int, int] | int = 128,
    out: torch.Tensor | None = None,
    work: Workspace | None = None,
) -> torch.Tensor:
    """Dequantize a DeepSeek block-FP8 weight to bfloat16.

    ``bf16(float32(w) * scale[i // bm, j // bn])``: one float32 multiply per element and
    one rounding to bfloat16, so the result is exact and identical on every device. Edge
    blocks (rows or columns not a multiple of the block) use their block's scale.

    Args:
        w: ``float8_e4m3fn`` weight ``[rows, cols]``.
        scale: float32 ``[ceil(rows/bm), ceil(cols/bn)]`` (DeepSeek's ``weight_scale_inv``).
        block: block size ``(bm, bn)``, or one int for both.
        out: bfloat16 ``[rows, cols]`` to write into.
        work: scratch buffers to reuse instead of allocating.

    Returns:
        The bfloat16 weight.

    Raises:
        ValueError: shapes do not match, the dtype is wrong, or the weight holds NaN.
    """
    res, _ = dequant_fp8_block_with_error(w, scale, block=block, out=out, work=work, stats=False)
    return res


def dequant_fp8_block_with_error(
    w: torch.Tensor,
    scale: torch.Tensor,
    *,
    block: tuple[int, int] | int = 128,
    out: torch.Tensor | None = None,
    work: Workspace | None = None,
    stats: bool = True,
    stats_every: int = 1,
    row0: int = 0,
    allow_non_finite: bool = False,
) -> tuple[torch.Tensor, ErrorStats | None]:
    """:func:`dequant_fp8_block`, plus the error of the bfloat16 rounding.

    The reference is the float32 product ``float32(w) * scale`` (exact FP8 value times
    its scale, rounded once to float32). The rounding error is uniform across a tensor,
    so the streaming converter measures it on one block-row in ``stats_every`` (which
    more than halves the cost of the conversion).

    Args:
        w: ``float8_e4m3fn`` weight ``[rows, cols]`` (or rows of a larger weight).
        scale: float32 block scales of those rows.
        block: block size ``(bm, bn)``, or one int for both.
        out: bfloat16 ``[rows, cols]`` to write into.
        work: scratch buffers to reuse instead of allocating.
        stats: measure the error at all.
        stats_every: measure block-rows whose index in the whole weight is a multiple of this.
        row0: index of ``w``'s first row in the whole weight (a multiple of ``bm``).
        allow_non_finite: let NaN codes and non-finite scales through (they stay NaN/Inf).

    Returns:
        ``(bf16 weight, ErrorStats)``; the stats are None when ``stats`` is False or no
        sampled block-row falls in ``w``.

    Raises:
        ValueError: shapes do not match, the dtype is wrong, or (unless ``allow_non_finite``)
            the weight holds NaN codes or a scale is NaN or infinite.
    """
    bm, bn = (block, block) if isinstance(block, int) else block
    if w.dtype not in (torch.float8_e4m3fn, torch.uint8, torch.int8):
        raise ValueError(f"expected a float8_e4m3fn weight, got {w.dtype}")
    if w.dim() != 2 or scale.dim() != 2:
        raise ValueError(f"block FP8 needs a 2-D weight and scale, got {list(w.shape)} and {list(scale.shape)}")
    rows, cols = w.shape
    want = (-(-rows // bm), -(-cols // bn))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"scale shape {list(scale.shape)} does not match weight {list(w.shape)} with "
            f"{bm}x{bn} blocks (expected {list(want)})"
        )
    f32 = take(work, "f32_a", (rows, cols), torch.float32, w.device)
    sc = scale.to(device=w.device, dtype=torch.float32)
    if not allow_non_finite:
        check_finite(sc, "block scale (weight_scale_inv)")
    fold = bool(sc.numel()) and float(sc.abs().amax()) < _FOLD_LIMIT
    fp8_e4m3_to_float(w, out=f32, work=work, unscaled=fold)
    if fold:
        sc = sc * _E4M3_EXP_SHIFT  # exact (a power of two, no overflow): saves a pass over the weight
    if f32.numel() and not allow_non_finite:
        lo, hi = torch.aminmax(f32)
        limit = _E4M3_MAX / (_E4M3_EXP_SHIFT if fold else 1.0)
        if float(hi) > limit or float(lo) < -limit:  # only the NaN codes decode past e4m3's max
            raise ValueError("the FP8 weight holds NaN values (bytes 0x7F/0xFF)")
    full_r, full_c = (rows // bm) * bm, (cols // bn) * bn
    # Multiply each region by its block's scale through broadcast views: no expanded scale
    # matrix is built, and every element sees exactly one multiply.
    if full_r and full_c:
        f32[:full_r, :full_c].view(full_r // bm, bm, full_c // bn, bn).mul_(
            sc[: full_r // bm, : full_c // bn].reshape(full_r // bm, 1, full_c // bn, 1)
        )
    if full_c < cols and full_r:
        f32[:full_r, full_c:].view(full_r // bm, bm, cols - full_c).mul_(sc[: full_r // bm, -1].reshape(-1, 1, 1))
    if full_r < rows and full_c:
        f32[full_r:, :full_c].view(rows - full_r, full_c // bn, bn).mul_(sc[-1, : full_c // bn].reshape(1, -1, 1))
    if full_r < rows and full_c < cols:
        f32[full_r:, full_c:].mul_(sc[-1, -1])
    res = out if out is not None else torch.empty((rows, cols), dtype=torch.bfloat16, device=w.device)
    res.copy_(f32)
    if not stats:
        return res, None
    total: ErrorStats | None = None
    for b in range(-(-rows // bm)):
        if (row0 // bm + b) % stats_every:
            continue
        r_lo, r_hi = b * bm, min(rows, (b + 1) * bm)
        diff = take(work, "f32_b", (r_hi - r_lo, cols), torch.float32, w.device)
        diff.copy_(res[r_lo:r_hi])
        part = diff_stats(f32[r_lo:r_hi], diff)
        total = part if total is None else total + part
    return res, total


def quantize_int(
    w: torch.Tensor,
    *,
    num_bits: int,
    group_size: int | None = None,
    scale_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    work: Workspace | None = None,
    stats: bool = False,
    allow_non_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, ErrorStats | None]:
    """Symmetric round-to-nearest INT quantization per output channel or per group.

    Args:
        w: float weight ``[rows, cols]`` (bf16, fp16 or fp32).
        num_bits: 2 to 8.
        group_size: input columns per scale; None for one scale per row (channel).
        scale_dtype: dtype the scales are stored in (default: ``w``'s dtype). The scale is
            rounded up to it and the quantization divides by the stored scale, so
            ``q * scale`` is exactly the weight a loader reconstructs and its error is
            at most half a step.
        out: int8 ``[rows, cols]`` to write ``q`` into.
        work: scratch buffers to reuse instead of allocating.
        stats: also return the error of ``q * scale`` against ``w``.
        allow_non_finite: let NaN and Inf through (their rows get NaN or Inf scales).

    Returns:
        ``(q, scale, stats)``: ``q`` int8 ``[rows, cols]``; ``scale`` ``[rows, 1]`` or
        ``[rows, ceil(cols / group_size)]``; the :class:`ErrorStats` or None.

    Raises:
        ValueError: bad shape, dtype, group size or bit width, or (unless
            ``allow_non_finite``) NaN or Inf in the weight.
    """
    if not 2 <= num_bits <= 8:
        raise ValueError(f"num_bits must be in 2..8, got {num_bits}")
    if w.dim() != 2 or not w.is_floating_point() or w.element_size() < 2:
        raise ValueError(f"expected a 2-D bf16/fp16/fp32 weight, got {w.dtype}{list(w.shape)}")
    rows, cols = w.shape
    qmax = (1 << (num_bits - 1)) - 1
    qmin = -qmax - 1
    g = cols if group_size is None else int(group_size)
    if g <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    ngroups = max(1, -(-cols // g))
    width = ngroups * g
    wf = take(work, "f32_a", (rows, width), torch.float32, w.device)
    if width > cols:
        wf[:, cols:].zero_()  # padding of the last group: zeros change neither absmax nor q
    wf[:, :cols].copy_(w)
    grouped = wf.view(rows, ngroups, g)
    # amax and amin separately: aminmax along a dim is an order of magnitude slower on CPU
    # abs_: an all-zero group gives max(+0.0, -0.0), whose sign differs between CPU and CUDA.
    absmax = torch.maximum(torch.amax(grouped, dim=2), torch.amin(grouped, dim=2).neg_()).abs_()
    if not allow_non_finite:  # amax/amin carry any NaN or Inf of the group into absmax
        check_finite(absmax, "weight")
    # Divide by a tensor, not a Python number: CUDA turns division by a scalar into a
    # multiplication by its reciprocal, which rounds differently from CPU's true division.
    half_range = torch.full_like(absmax, (qmax - qmin) / 2.0)
    scale = _round_up(absmax / half_range, scale_dtype or w.dtype)
    sf = scale.float()
    sf = torch.where(sf == 0, torch.ones_like(sf), sf).unsqueeze(2)  # all-zero group: q = 0
    qf = take(work, "f32_b", (rows, width), torch.float32, w.device)
    qg = qf.view(rows, ngroups, g)
    torch.div(grouped, sf, out=qg)
    qg.round_().clamp_(qmin, qmax)
    q = out if out is not None else torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    q.copy_(qf[:, :cols])
    if not stats:
        return q, scale, None
    qg.mul_(sf)  # the weight a loader reconstructs; padding stays 0 in both buffers
    st = diff_stats(wf, qf)
    return q, scale, ErrorStats(st.sum_sq_ref, st.sum_sq_err, st.max_abs_err, rows * cols)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (positive float32) in ``dtype``, rounded up so that ``|w| / scale`` never passes the range."""
    out = x.to(dtype)
    if dtype == torch.float32:
        return out
    low = out.float() < x
    if bool(low.any()):
        bits = out.view(torch.int16)  # positive finite 16-bit floats: the next value up is bits + 1
        bits.add_(low.to(torch.int16))
    return out


def quantize_int8_per_channel(
    w: torch.Tensor, *, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 symmetric per-output-channel quantization (compressed-tensors W8A8 / W8A16).

    Args:
        w: float weight ``[rows, cols]``.
        scale_dtype: dtype of the stored scales (default: ``w``'s dtype).

    Returns:
        ``(q, scale)``: int8 ``[rows, cols]`` and ``[rows, 1]`` scales.
    """
    q, scale, _ = quantize_int(w, num_bits=8, scale_dtype=scale_dtype)
    return q, scale


def quantize_int4_group(
    w: torch.Tensor, group_size: int = 128, *, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT4 symmetric per-group quantization, packed 8 per int32 (compressed-tensors W4A16).

    Args:
        w: float weight ``[rows, cols]``.
        group_size: input columns per scale.
        scale_dtype: dtype of the stored scales (default: ``w``'s dtype).

    Returns:
        ``(packed, scale)``: int32 ``[rows, ceil(cols / 8)]`` and ``[rows, ceil(cols / group_size)]``.
    """
    q, scale, _ = quantize_int(w, num_bits=4, group_size=group_size, scale_dtype=scale_dtype)
    return pack_int32(q, num_bits=4), scale


def pack_int32(
    q: torch.Tensor, *, num_bits: int, out: torch.Tensor | None = None, work: Workspace | None = None
) -> torch.Tensor:
    """Pack signed ``num_bits`` integers (int8 ``[rows, cols]``) into int32 along columns.

    Same layout as compressed-tensors' ``pack_to_int32(q, num_bits)`` (packed_dim 1). The
    sum stays inside int32: the top field is added as a signed number (``q`` XOR the
    offset), which has the same bits as the unsigned field shifted into place.

    Args:
        q: int8 values in ``[-2**(bits-1), 2**(bits-1) - 1]``.
        num_bits: bits per value, 1 to 8.
        out: int32 ``[rows, ceil(cols / (32 // num_bits))]`` to write into.
        work: scratch buffers to reuse instead of allocating.

    Returns:
        The packed int32 tensor.
    """
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"expected a 2-D int8 tensor, got {q.dtype}{list(q.shape)}")
    if not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits must be in 1..8, got {num_bits}")
    per = 32 // num_bits
    rows, cols = q.shape
    words = -(-cols // per)
    offset = 1 << (num_bits - 1)
    res = out if out is not None else torch.empty((rows, words), dtype=torch.int32, device=q.device)
    res.zero_()
    field = take(work, "pack_field", (rows, words), torch.int32, q.device)
    for i in range(per):
        part = q[:, i::per]  # value i of each word; the last word may lack it (zero padding)
        n = part.shape[1]
        if n == 0:
            continue
        f = field[:, :n]
        f.copy_(part)
        if (i + 1) * num_bits == 32:
            f.bitwise_xor_(-offset)  # the signed reading of the top field
        else:
            f.add_(offset)
        if i:
            f.mul_(1 << (num_bits * i))
        res[:, :n].add_(f)
    return res


def unpack_int32(packed: torch.Tensor, *, num_bits: int, cols: int) -> torch.Tensor:
    """Undo :func:`pack_int32`: int32 ``[rows, words]`` to int8 ``[rows, cols]``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"expected a 2-D int32 tensor, got {packed.dtype}{list(packed.shape)}")
    per = 32 // num_bits
    mask = (1 << num_bits) - 1
    rows, words = packed.shape
    if cols > words * per:
        raise ValueError(f"{words} words of {per} values cannot hold {cols} columns")
    res = torch.empty((rows, words * per), dtype=torch.int32, device=packed.device)
    for i in range(per):
        res[:, i::per] = (packed >> (num_bits * i)) & mask
    res.sub_(1 << (num_bits - 1))
    return res[:, :cols].to(torch.int8)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q * scale`` in float32, rounded once to ``dtype``.

    Args:
        q: int8 ``[rows, cols]``.
        scale: ``[rows, 1]`` (channel) or ``[rows, groups]`` (groups of ``ceil(cols / groups)`` columns).
        dtype: output dtype.

    Returns:
        The dequantized ``[rows, cols]`` tensor.
    """
    rows, cols = q.shape
    groups = scale.shape[1]
    g = -(-cols // groups)
    wf = torch.zeros((rows, groups * g), dtype=torch.float32, device=q.device)
    wf[:, :cols] = q.float()
    wf.view(rows, groups, g).mul_(scale.float().view(rows, groups, 1))
    return wf[:, :cols].to(dtype)
