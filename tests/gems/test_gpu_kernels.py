"""Tests of the Triton conversion kernels (flagrelease/gpu_kernels.py).

Their bit-identity with the CPU path needs a GPU (the ``gpu`` tests, also run by
``benchmarks/bench_gpu_convert.py`` on the device machine); here, the module imports and
says clearly when it cannot run.
"""

from __future__ import annotations

import pytest
import torch

from flagrelease.convert import ops
from flagrelease.gems import gpu_kernels as gk

cuda = pytest.mark.skipif(not gk.available(), reason="needs a CUDA GPU and Triton")


def test_module_imports_without_a_gpu() -> None:
    assert gk.available() == (gk.triton is not None and torch.cuda.is_available())
    if not gk.available():
        with pytest.raises((RuntimeError, ValueError)):
            gk.quantize_int8_per_channel_gpu(torch.ones(2, 2, dtype=torch.bfloat16))


def test_shape_errors_are_checked_first() -> None:
    with pytest.raises(ValueError, match="scale shape"):
        gk.dequant_fp8_block_gpu(torch.zeros(256, 256, dtype=torch.uint8), torch.ones(1, 1))
    with pytest.raises(ValueError, match="2-D bf16"):
        gk.quantize_int8_per_channel_gpu(torch.zeros(4, dtype=torch.bfloat16))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("rows", "cols"), [(1000, 1300), (256, 512), (129, 17)])
def test_dequant_is_bit_identical_to_the_cpu_path(rows: int, cols: int) -> None:
    raw = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] ^= 1
    w = raw.view(torch.float8_e4m3fn)
    s = torch.exp2(torch.rand(-(-rows // 128), -(-cols // 128)) * 24 - 20)
    ref = ops.dequant_fp8_block(w, s)
    got = gk.dequant_fp8_block_gpu(w.cuda(), s.cuda()).cpu()
    assert torch.equal(ref.view(torch.int16), got.view(torch.int16))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("rows", "cols"), [(300, 520), (64, 9000)])
@pytest.mark.parametrize("scale_dtype", [None, torch.float32])
def test_int8_quant_is_bit_identical_to_the_cpu_path(rows: int, cols: int, scale_dtype: torch.dtype | None) -> None:
    w = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
    w[0] = 0
    q, sc = ops.quantize_int8_per_channel(w, scale_dtype=scale_dtype)
    qg, scg = gk.quantize_int8_per_channel_gpu(w.cuda(), scale_dtype=scale_dtype)
    assert torch.equal(q, qg.cpu()) and torch.equal(sc, scg.cpu())
