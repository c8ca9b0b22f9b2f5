"""GPU conversion: bit-identity with the CPU path, kernel GB/s, end-to-end GB/s.

Run on a CUDA machine::

    python benchmarks/bench_gpu_convert.py --out benchmarks/results --e2e-gb 6

1. Bit identity: :mod:`flagrelease.convert.ops` on ``cuda`` and the Triton kernels of
   :mod:`flagrelease.gems.gpu_kernels` against the same functions on the CPU, on fresh random
   inputs (every FP8 bit pattern, edge blocks, zero rows, exact ties, outliers).
2. Kernel throughput: bytes each conversion must move (input read once, output written
   once) per second, against a device-to-device copy of the same number of bytes.
3. End to end: a multi-GB block-FP8 checkpoint generated on this machine's disk,
   converted to BF16 safetensors by a streaming reader -> GPU -> writer pipeline, against
   the disk's cold sequential read rate.

Writes ``gpu_convert.json`` and ``gpu_convert.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
from triton.testing import do_bench

from flagrelease._safetensors import read_header
from flagrelease.convert import ops
from flagrelease.gems import gpu_kernels as gk

DEV = "cuda"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- inputs -------------------------------------------------------------------------------------
def fp8_weight(rows: int, cols: int, *, gen: torch.Generator) -> torch.Tensor:
    """Random e4m3fn bytes (every non-NaN pattern, subnormals and -0 included), on the CPU."""
    raw = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=gen)
    nan = (raw & 0x7F) == 0x7F
    raw[nan] = raw[nan] ^ 0x01  # 0x7F -> 0x7E, 0xFF -> 0xFE: the largest finite values
    flat = raw.view(-1)
    n = min(256, flat.numel())
    pats = torch.arange(256, dtype=torch.uint8)
    flat[:n] = pats[(pats & 0x7F) != 0x7F].repeat(2)[:n]
    return raw.view(torch.float8_e4m3fn)


def fp8_scales(rows: int, cols: int, *, gen: torch.Generator, block: int = 128) -> torch.Tensor:
    shape = (-(-rows // block), -(-cols // block))
    return torch.exp2(torch.rand(shape, generator=gen) * 24 - 20)  # 2**-20 .. 2**4, varied mantissas


def bf16_weight(rows: int, cols: int, *, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn((rows, cols), generator=gen) * 0.02
    w[::97] *= 50  # outlier rows
    w[1::89, ::13] *= 30  # outlier columns
    w[3] = 0  # an all-zero row
    w = w.to(torch.bfloat16)
    if cols >= 8 and rows > 5:
        # exact ties: absmax 127.5 * 2**-7 gives a scale of 2**-7, so +-2**-8 lands on q = +-0.5
        w[5, :8] = torch.tensor([127.5, 0.5, -0.5, 1.5, -1.5, 2.5, 126.5, -127.5]) * 2**-7
    return w


# -- 1. bit identity ------------------------------------------------------------------------------
def _same(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return {"identical": False, "why": f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"}
    ia = a.contiguous().view(-1).view(torch.uint8)
    ib = b.contiguous().view(-1).view(torch.uint8)
    elem = a.element_size()
    diff = (ia != ib).view(-1, elem).any(dim=1)
    n = int(diff.sum())
    out: dict[str, Any] = {"identical": n == 0, "differing": n, "elements": a.numel()}
    if n:
        # differences that are only the sign of a zero (-0.0 vs +0.0) compare equal as numbers
        out["same_values"] = bool((a.reshape(-1)[diff].double() == b.reshape(-1)[diff].double()).all())
        idx = int(diff.nonzero()[0])
        out["first"] = {"index": idx, "cpu": float(a.view(-1)[idx].float()), "gpu": float(b.view(-1)[idx].float())}
    return out


def bit_identity(gen: torch.Generator) -> dict[str, Any]:
    res: dict[str, Any] = {}
    allpat = torch.arange(256, dtype=torch.uint8)
    allpat = allpat[(allpat & 0x7F) != 0x7F].view(torch.float8_e4m3fn)
    res["fp8_e4m3_to_float/all-patterns"] = {
        "cpu_vs_float()": _same(allpat.float(), ops.fp8_e4m3_to_float(allpat)),
        "cuda_vs_cpu": _same(ops.fp8_e4m3_to_float(allpat), ops.fp8_e4m3_to_float(allpat.to(DEV))),
    }
    for rows, cols in [(4096, 7168), (1000, 1300), (7168, 2112), (129, 17)]:
        w, s = fp8_weight(rows, cols, gen=gen), fp8_scales(rows, cols, gen=gen)
        ref = ops.dequant_fp8_block(w, s)
        wd, sd = w.to(DEV), s.to(DEV)
        res[f"dequant_fp8_block/{rows}x{cols}"] = {
            "torch_cuda_vs_cpu": _same(ref, ops.dequant_fp8_block(wd, sd)),
            "triton_vs_cpu": _same(ref, gk.dequant_fp8_block_gpu(wd, sd)),
        }
    for rows, cols in [(4096, 5120), (1000, 27648), (333, 129), (64, 8192), (64, 8193)]:
        w = bf16_weight(rows, cols, gen=gen)
        wd = w.to(DEV)
        for sdt in (None, torch.float32):
            q, sc = ops.quantize_int8_per_channel(w, scale_dtype=sdt)
            qg, scg = ops.quantize_int8_per_channel(wd, scale_dtype=sdt)
            qt, sct = gk.quantize_int8_per_channel_gpu(wd, scale_dtype=sdt)
            tag = f"quantize_int8_per_channel/{rows}x{cols}/scale={str(sdt or w.dtype).replace('torch.', '')}"
            res[tag] = {
                "torch_cuda_vs_cpu": {"q": _same(q, qg), "scale": _same(sc, scg)},
                "triton_vs_cpu": {"q": _same(q, qt), "scale": _same(sc, sct)},
            }
    for rows, cols in [(1024, 5120), (100, 1000)]:
        w = bf16_weight(rows, cols, gen=gen)
        p, sc = ops.quantize_int4_group(w, 128)
        pg, scg = ops.quantize_int4_group(w.to(DEV), 128)
        res[f"quantize_int4_group/{rows}x{cols}"] = {
            "torch_cuda_vs_cpu": {"packed": _same(p, pg), "scale": _same(sc, scg)}
        }
    # Why a torch-on-CUDA scale may differ: a division by a Python number becomes a multiply
    # by its reciprocal on CUDA (ATen's div_true_kernel_cuda), an exact division on the CPU.
    x = torch.rand(1 << 22, generator=gen) * 10
    res["diagnosis/x_div_127.5"] = {
        "cuda_scalar_div_vs_cpu_div": _same(x / 127.5, x.to(DEV) / 127.5),
        "cuda_tensor_div_vs_cpu_div": _same(x / 127.5, x.to(DEV) / torch.full((1,), 127.5, device=DEV)),
        "cuda_scalar_div_vs_cpu_recip_mul": _same(x * (1 / 127.5), x.to(DEV) / 127.5),
    }
    # The proposed fix for ops.quantize_int: divide by a tensor (a true division on CUDA too)
    # and take |absmax| so that an all-zero group gets +0.0 on both devices.
    w = bf16_weight(4096, 5120, gen=gen)

    def fixed(w: torch.Tensor, sdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        wf = w.float()
        lo, hi = torch.aminmax(wf, dim=1, keepdim=True)
        absmax = torch.maximum(hi, lo.neg()).abs()
        scale = (absmax / torch.full_like(absmax, 127.5)).to(sdt)
        sf = scale.float()
        sf = torch.where(sf == 0, torch.ones_like(sf), sf)
        return (wf / sf).round_().clamp_(-128, 127).to(torch.int8), scale

    for sdt in (torch.bfloat16, torch.float32):
        qc, sc = fixed(w, sdt)
        qg, sg = fixed(w.to(DEV), sdt)
        q_ops, s_ops = ops.quantize_int8_per_channel(w, scale_dtype=sdt)
        res[f"diagnosis/proposed_fix/scale={str(sdt).replace('torch.', '')}"] = {
            "torch_cuda_vs_cpu": {"q": _same(qc, qg), "scale": _same(sc, sg)},
            "fixed_cpu_vs_ops_cpu": {"q": _same(q_ops, qc), "scale": _same(s_ops, sc)},
        }
    try:
        bad = torch.zeros(256, 256, dtype=torch.uint8)
        bad[7, 9] = 0xFF
        gk.dequant_fp8_block_gpu(bad.view(torch.float8_e4m3fn).to(DEV), torch.ones(2, 2, device=DEV))
        res["triton_rejects_nan"] = False
    except ValueError:
        res["triton_rejects_nan"] = True
    return res


# -- 2. kernel throughput ------------------------------------------------------------------------
def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_rate(nbytes: int) -> float:
    """Device-to-device copy of ``nbytes`` read + ``nbytes`` written, GB/s of both."""
    n = max(nbytes // 2, 1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return gbps(2 * n, ms)


def kernel_rates(gen: torch.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {"copy_gbps_2GiB": round(copy_rate(2 << 30), 1)}
    cases: list[tuple[str, Callable[[], Any], int]] = []
    for rows, cols in [(18432, 7168), (7168, 18432)]:
        w = fp8_weight(rows, cols, gen=gen).to(DEV)
        s = fp8_scales(rows, cols, gen=gen).to(DEV)
        dst = torch.empty((rows, cols), dtype=torch.bfloat16, device=DEV)
        nbytes = rows * cols * 3 + s.numel() * 4
        work = ops.Workspace(DEV)
        cases.append(
            (
                f"dequant_fp8_block torch-ops {rows}x{cols}",
                lambda w=w, s=s, d=dst, wk=work: ops.dequant_fp8_block(w, s, out=d, work=wk),
                nbytes,
            )
        )
        cases.append(
            (
                f"dequant_fp8_block triton {rows}x{cols} (API: + NaN flag readback)",
                lambda w=w, s=s, d=dst: gk.dequant_fp8_block_gpu(w, s, out=d),
                nbytes,
            )
        )
        nan = torch.zeros(1, dtype=torch.int32, device=DEV)
        cases.append(
            (
                f"dequant_fp8_block triton {rows}x{cols} (kernel)",
                lambda w=w, s=s, d=dst, n=nan: gk._launch_dequant(w.view(torch.uint8), s, d, n, 128, 128),
                nbytes,
            )
        )
    for rows, cols in [(27648, 5120), (5120, 27648)]:
        w = bf16_weight(rows, cols, gen=gen).to(DEV)
        nbytes = rows * cols * 3 + rows * 2
        cases.append(
            (f"quantize_int8_per_channel torch-ops {rows}x{cols}", lambda w=w: ops.quantize_int8_per_channel(w), nbytes)
        )
        cases.append(
            (
                f"quantize_int8_per_channel triton {rows}x{cols} (API)",
                lambda w=w: gk.quantize_int8_per_channel_gpu(w),
                nbytes,
            )
        )
        q = torch.empty((rows, cols), dtype=torch.int8, device=DEV)
        sc = torch.empty((rows, 1), dtype=torch.bfloat16, device=DEV)
        cases.append(
            (
                f"quantize_int8_per_channel triton {rows}x{cols} (kernel)",
                lambda w=w, q=q, sc=sc, c=cols: gk._launch_quant(w, q, sc, **gk._quant_config(c)),
                nbytes,
            )
        )
    rows_out = []
    for name, fn, nbytes in cases:
        ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
        copy = copy_rate(nbytes)
        rate = gbps(nbytes, ms)
        rows_out.append(
            {
                "case": name,
                "bytes": nbytes,
                "ms": round(ms, 4),
                "gbps": round(rate, 1),
                "copy_same_bytes_gbps": round(copy, 1),
                "ratio_to_copy": round(rate / copy, 3),
            }
        )
        log(f"{name}: {ms:.3f} ms, {rate:.0f} GB/s = {rate / copy:.2f}x copy ({copy:.0f} GB/s)")
    out["kernels"] = rows_out
    return out


def sweep(gen: torch.Generator) -> list[dict[str, Any]]:
    """Time kernel variants (tiles, warps, passes); each is first checked bit for bit on fresh data."""
    out: list[dict[str, Any]] = []
    rows, cols = 7168, 18432
    w = fp8_weight(rows, cols, gen=gen).to(DEV)
    s = fp8_scales(rows, cols, gen=gen).to(DEV)
    res = torch.empty((rows, cols), dtype=torch.bfloat16, device=DEV)
    nan = torch.zeros(1, dtype=torch.int32, device=DEV)
    nbytes = rows * cols * 3 + s.numel() * 4
    copy = copy_rate(nbytes)
    cw, cs = fp8_weight(1000, 1300, gen=gen), fp8_scales(1000, 1300, gen=gen)
    cref = ops.dequant_fp8_block(cw, cs)
    dequant_variants = [
        (64, 128, 4, True),
        (32, 128, 4, True),
        (128, 128, 8, True),
        (64, 128, 8, True),
        (16, 128, 2, True),
        (32, 256, 8, True),
        (128, 128, 4, True),
        (64, 128, 4, False),
    ]
    for tm, tn, warps, check in dequant_variants:
        kw = {"tm": tm, "tn": tn, "warps": warps, "check_nan": check}
        small = torch.empty((1000, 1300), dtype=torch.bfloat16, device=DEV)
        gk._launch_dequant(cw.to(DEV).view(torch.uint8), cs.to(DEV), small, nan, 128, 128, **kw)
        ok = torch.equal(small.cpu().view(torch.int16), cref.view(torch.int16))
        ms = do_bench(
            lambda kw=kw: gk._launch_dequant(w.view(torch.uint8), s, res, nan, 128, 128, **kw),
            warmup=10,
            rep=100,
            return_mode="median",
        )
        rate = gbps(nbytes, ms)
        out.append(
            {
                "kernel": "dequant",
                "shape": [rows, cols],
                **kw,
                "identical": ok,
                "ms": round(ms, 4),
                "gbps": round(rate, 1),
                "ratio_to_copy": round(rate / copy, 3),
            }
        )
        log(f"sweep {out[-1]}")
    for rows, cols in [(27648, 5120), (5120, 27648)]:
        w = bf16_weight(rows, cols, gen=gen).to(DEV)
        q = torch.empty((rows, cols), dtype=torch.int8, device=DEV)
        sc = torch.empty((rows, 1), dtype=torch.bfloat16, device=DEV)
        nbytes = rows * cols * 3 + rows * 2
        copy = copy_rate(nbytes)
        cw = bf16_weight(256, cols, gen=gen)
        cq, csc = ops.quantize_int8_per_channel(cw)
        nz = csc.view(-1) != 0  # the zero row's scale sign differs (-0.0 on the CPU), reported above
        pow2 = triton.next_power_of_2(cols)
        variants = [{"block": pow2, "single": True, "warps": wp} for wp in (4, 8, 16, 32) if pow2 // (32 * wp) <= 128]
        variants += [{"block": b, "single": False, "warps": wp} for b in (1024, 2048, 4096, 8192) for wp in (4, 8)]
        for kw in variants:
            sq = torch.empty((256, cols), dtype=torch.int8, device=DEV)
            ss = torch.empty((256, 1), dtype=torch.bfloat16, device=DEV)
            try:
                gk._launch_quant(cw.to(DEV), sq, ss, **kw)
                ok = torch.equal(sq.cpu(), cq) and torch.equal(ss.cpu().view(-1)[nz], csc.view(-1)[nz])
                ms = do_bench(
                    lambda kw=kw, w=w, q=q, sc=sc: gk._launch_quant(w, q, sc, **kw),
                    warmup=10,
                    rep=100,
                    return_mode="median",
                )
            except Exception as err:  # a variant that does not compile is reported, not fatal
                out.append({"kernel": "quant", "shape": [rows, cols], **kw, "error": str(err)[:200]})
                continue
            rate = gbps(nbytes, ms)
            out.append(
                {
                    "kernel": "quant",
                    "shape": [rows, cols],
                    **kw,
                    "identical": ok,
                    "ms": round(ms, 4),
                    "gbps": round(rate, 1),
                    "ratio_to_copy": round(rate / copy, 3),
                }
            )
            log(f"sweep {out[-1]}")
    return out


# -- 3. end to end -------------------------------------------------------------------------------
def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """A minimal safetensors writer (raw bytes in name order); returns the file size."""
    dtypes = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.bfloat16: "BF16"}
    header: dict[str, Any] = {}
    off = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in tensors.values():
            fh.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    return path.stat().st_size


def make_checkpoint(root: Path, gb: float, gen: torch.Generator) -> list[Path]:
    """Block-FP8 shards of [7168, 18432] weights (DeepSeek-V3 MLP size) with their scales."""
    root.mkdir(parents=True, exist_ok=True)
    rows, cols = 7168, 18432
    per_tensor = rows * cols
    n = max(1, int(gb * 1e9 // per_tensor))
    shards: list[Path] = []
    per_shard = 8
    for i in range(0, n, per_shard):
        tensors: dict[str, torch.Tensor] = {}
        for j in range(i, min(n, i + per_shard)):
            raw = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=DEV)
            raw = torch.where((raw & 0x7F) == 0x7F, raw ^ 1, raw)
            tensors[f"model.layers.{j}.mlp.up_proj.weight"] = raw.view(torch.float8_e4m3fn).cpu()
            tensors[f"model.layers.{j}.mlp.up_proj.weight_scale_inv"] = fp8_scales(rows, cols, gen=gen)
            tensors[f"model.layers.{j}.post_attention_layernorm.weight"] = torch.ones(cols, dtype=torch.bfloat16)
        path = root / f"model-{len(shards):05d}.safetensors"
        (root / "config.json").write_text(json.dumps({"architectures": ["BenchForCausalLM"], "model_type": "bench"}))
        _write_safetensors(path, tensors)
        shards.append(path)
    return shards


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_rate(files: list[Path], *, threads: int) -> float:
    """Sequential read of ``files`` with 64 MiB reads, ``threads`` files at a time; GB/s."""
    total = sum(f.stat().st_size for f in files)
    buf_size = 64 << 20

    def read_one(path: Path) -> None:
        buf = bytearray(buf_size)
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass

    t0 = time.perf_counter()
    pending = list(files)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                path = pending.pop(0)
            read_one(path)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return total / (time.perf_counter() - t0) / 1e9


def write_rate(path: Path, nbytes: int) -> float:
    """Sequential write of ``nbytes`` with 64 MiB writes, then fsync; GB/s."""
    buf = os.urandom(64 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(nbytes // len(buf)):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    rate = nbytes / (time.perf_counter() - t0) / 1e9
    path.unlink()
    return rate


class _Pool:
    """Pinned host buffers, reused."""

    def __init__(self, count: int, nbytes: int) -> None:
        self.free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(count):
            self.free.put(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))

    def take(self) -> torch.Tensor:
        return self.free.get()

    def give(self, buf: torch.Tensor) -> None:
        self.free.put(buf)


def convert_stream(src_files: list[Path], dst_dir: Path, *, kernel: str) -> dict[str, Any]:
    """Block-FP8 -> BF16, streaming: reader thread -> pinned -> GPU -> pinned -> writer thread."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dequant = gk.dequant_fp8_block_gpu if kernel == "triton" else ops.dequant_fp8_block
    max_in = max(t.nbytes for f in src_files for t in read_header(f).tensors.values())
    in_pool, out_pool = _Pool(4, max_in), _Pool(4, 2 * max_in)
    stream = torch.cuda.Stream()
    bytes_in = bytes_out = 0
    t0 = time.perf_counter()
    for src in src_files:
        head = read_header(src)
        items = sorted(head.tensors.values(), key=lambda t: t.start)
        by_name = {t.name: t for t in items}
        plan = []
        for t in items:
            if t.name.endswith("_scale_inv"):
                continue
            is_fp8 = t.dtype == "F8_E4M3" and f"{t.name}_scale_inv" in by_name
            plan.append((t, "BF16" if is_fp8 else t.dtype, t.nbytes * (2 if is_fp8 else 1)))
        header: dict[str, Any] = {}
        off = 0
        for t, dt, n in plan:
            header[t.name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + n]}
            off += n
        raw_head = json.dumps(header, separators=(",", ":")).encode()
        raw_head += b" " * (-len(raw_head) % 8)
        read_q: queue.Queue[Any] = queue.Queue(maxsize=3)
        write_q: queue.Queue[Any] = queue.Queue(maxsize=3)

        def reader(src: Path = src, plan: list = plan, head: Any = head, read_q: queue.Queue = read_q) -> None:
            with open(src, "rb", buffering=0) as fh:
                for t, _, _ in plan:
                    buf = in_pool.take()
                    fh.seek(head.data_offset + t.start)
                    view = memoryview(buf.numpy())[: t.nbytes]
                    got = 0
                    while got < t.nbytes:
                        got += fh.readinto(view[got:])
                    scale = None
                    s_info = head.tensors.get(f"{t.name}_scale_inv")
                    if s_info is not None and t.dtype == "F8_E4M3":
                        fh.seek(head.data_offset + s_info.start)
                        scale = torch.frombuffer(bytearray(fh.read(s_info.nbytes)), dtype=torch.float32).view(
                            s_info.shape
                        )
                    read_q.put((t, buf, scale))
            read_q.put(None)

        dst = dst_dir / src.name
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

        def writer(fd: int = fd, raw_head: bytes = raw_head, write_q: queue.Queue = write_q) -> None:
            os.write(fd, struct.pack("<Q", len(raw_head)) + raw_head)
            while (item := write_q.get()) is not None:
                buf, n = item
                mv = memoryview(buf.numpy())[:n]
                done = 0
                while done < n:
                    done += os.write(fd, mv[done:])
                out_pool.give(buf)

        rt = threading.Thread(target=reader)
        wt = threading.Thread(target=writer)
        rt.start()
        wt.start()
        with torch.cuda.stream(stream):
            while (item := read_q.get()) is not None:
                t, buf, scale = item
                n_in = t.nbytes
                obuf = out_pool.take()
                if scale is not None:
                    w = buf[:n_in].to(DEV, non_blocking=True).view(torch.float8_e4m3fn).view(t.shape)
                    res = dequant(w, scale.to(DEV, non_blocking=True))
                    n_out = n_in * 2
                    obuf[:n_out].copy_(res.view(-1).view(torch.uint8), non_blocking=True)
                else:
                    n_out = n_in
                    obuf[:n_out].copy_(buf[:n_in], non_blocking=False)
                stream.synchronize()
                in_pool.give(buf)
                write_q.put((obuf, n_out))
                bytes_in += n_in
                bytes_out += n_out
        write_q.put(None)
        rt.join()
        wt.join()
        os.close(fd)
    t_written = time.perf_counter() - t0
    for f in dst_dir.iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    t_synced = time.perf_counter() - t0
    return {
        "kernel": kernel,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "seconds_written": round(t_written, 2),
        "seconds_fsynced": round(t_synced, 2),
        "in_gbps_written": round(bytes_in / t_written / 1e9, 3),
        "in_gbps_fsynced": round(bytes_in / t_synced / 1e9, 3),
    }


def verify_output(src: Path, dst: Path, gen: torch.Generator) -> bool:
    """Spot-check one converted tensor against the CPU path, bit for bit."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as fs, safe_open(str(dst), "pt") as fd:
        name = next(k for k in fs.keys() if k.endswith("up_proj.weight"))  # noqa: SIM118
        ref = ops.dequant_fp8_block(fs.get_tensor(name), fs.get_tensor(f"{name}_scale_inv"))
        return bool(torch.equal(ref.view(torch.int16), fd.get_tensor(name).view(torch.int16)))


def end_to_end(root: Path, gb: float, gen: torch.Generator) -> dict[str, Any]:
    t0 = time.perf_counter()
    shards = make_checkpoint(root / "src", gb, gen)
    total = sum(p.stat().st_size for p in shards)
    res: dict[str, Any] = {
        "checkpoint_bytes": total,
        "shards": len(shards),
        "generate_s": round(time.perf_counter() - t0, 1),
    }
    log(f"checkpoint: {total / 1e9:.2f} GB in {len(shards)} shards ({res['generate_s']} s)")
    res["cache_dropped"] = drop_caches()
    res["disk_read_gbps_1thread"] = round(read_rate(shards, threads=1), 3)
    drop_caches()
    res["disk_read_gbps_4threads"] = round(read_rate(shards, threads=4), 3)
    res["disk_read_roofline_gbps"] = max(res["disk_read_gbps_1thread"], res["disk_read_gbps_4threads"])
    res["page_cache_read_gbps"] = round(read_rate(shards, threads=4), 3)
    res["disk_write_gbps_fsynced"] = round(write_rate(root / "write-test.bin", 4 << 30), 3)
    # Converting FP8 to BF16 reads N bytes and writes 2N to the same disk: the I/O floor.
    floor_s = total / 1e9 / res["disk_read_roofline_gbps"] + 2 * total / 1e9 / res["disk_write_gbps_fsynced"]
    res["io_floor_s_read_plus_write"] = round(floor_s, 2)
    log(
        f"disk read: {res['disk_read_gbps_1thread']} GB/s (1 thread), {res['disk_read_gbps_4threads']} (4), "
        f"page cache {res['page_cache_read_gbps']}"
    )
    runs = []
    for kernel in ("triton", "torch-ops"):
        drop_caches()
        out = root / f"dst-{kernel}"
        run = convert_stream(shards, out, kernel=kernel)
        run["ratio_to_disk_read_written"] = round(run["in_gbps_written"] / res["disk_read_roofline_gbps"], 3)
        run["ratio_to_disk_read_fsynced"] = round(run["in_gbps_fsynced"] / res["disk_read_roofline_gbps"], 3)
        run["ratio_to_io_floor_fsynced"] = round(res["io_floor_s_read_plus_write"] / run["seconds_fsynced"], 3)
        run["bit_identical_spot_check"] = verify_output(shards[0], out / shards[0].name, gen)
        log(f"e2e {kernel}: {run}")
        runs.append(run)
        subprocess.run(["rm", "-rf", str(out)], check=False)
    res["runs"] = runs
    try:
        from flagrelease.convert import convert_checkpoint  # the convert stage's own streaming converter
    except ImportError:
        res["convert_checkpoint"] = "not available in this tree"
    else:
        drop_caches()
        t1 = time.perf_counter()
        try:
            convert_checkpoint(root / "src", dst=root / "dst-stage", to="bf16", device=DEV)
            secs = time.perf_counter() - t1
            res["convert_checkpoint"] = {
                "seconds": round(secs, 2),
                "in_gbps": round(total / secs / 1e9, 3),
                "ratio_to_disk_read": round(total / secs / 1e9 / res["disk_read_roofline_gbps"], 3),
                "ratio_to_io_floor": round(res["io_floor_s_read_plus_write"] / secs, 3),
                "bit_identical_spot_check": verify_output(shards[0], root / "dst-stage" / shards[0].name, gen),
            }
        except Exception as err:  # a benchmark reports whatever the stage raised
            res["convert_checkpoint"] = f"failed: {type(err).__name__}: {err}"[:500]
    return res


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"# GPU conversion on {res['device']} (torch {res['torch']}, triton {res['triton']})",
        "",
        "## Bit identity with the CPU path",
        "",
        "| function / shape | torch ops on CUDA | Triton kernel |",
        "|---|---|---|",
    ]

    def verdict(x: Any) -> str:
        if isinstance(x, dict) and "identical" in x:
            if x["identical"]:
                return "identical"
            zeros = " (only the sign of zero)" if x.get("same_values") else ""
            return f"**{x['differing']} of {x['elements']} differ**{zeros}"
        if isinstance(x, dict):
            return ", ".join(f"{k}: {verdict(v)}" for k, v in x.items())
        return str(x)

    for name, v in res["bit_identity"].items():
        if isinstance(v, dict) and ("torch_cuda_vs_cpu" in v or "triton_vs_cpu" in v):
            lines.append(
                f"| {name} | {verdict(v.get('torch_cuda_vs_cpu', '-'))} | {verdict(v.get('triton_vs_cpu', '-'))} |"
            )
        else:
            lines.append(f"| {name} | {verdict(v)} | |")
    k = res["kernels"]
    lines += [
        "",
        f"## Kernel throughput (device-to-device copy of 2 GiB: {k['copy_gbps_2GiB']} GB/s)",
        "",
        "| case | ms | GB/s | copy of same bytes GB/s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in k["kernels"]:
        lines.append(f"| {r['case']} | {r['ms']} | {r['gbps']} | {r['copy_same_bytes_gbps']} | {r['ratio_to_copy']} |")
    if res.get("sweep"):
        lines += [
            "",
            "## Kernel variants (bit-identical on fresh data first, then timed)",
            "",
            "| kernel | shape | variant | identical | ms | GB/s | ratio to copy |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for r in res["sweep"]:
            keys = ("tm", "tn", "warps", "check_nan", "block", "single")
            var = ", ".join(f"{k}={v}" for k, v in r.items() if k in keys)
            lines.append(
                f"| {r['kernel']} | {r['shape']} | {var} | {r.get('identical', r.get('error'))} | "
                f"{r.get('ms', '-')} | {r.get('gbps', '-')} | {r.get('ratio_to_copy', '-')} |"
            )
    if "e2e" in res:
        e = res["e2e"]
        lines += [
            "",
            f"## End to end: {e['checkpoint_bytes'] / 1e9:.2f} GB block-FP8 checkpoint -> BF16",
            "",
            f"disk cold read: {e['disk_read_gbps_1thread']} GB/s (1 thread), {e['disk_read_gbps_4threads']} "
            f"GB/s (4 threads); page cache {e['page_cache_read_gbps']} GB/s; caches dropped: {e['cache_dropped']}; "
            f"disk write (fsynced) {e.get('disk_write_gbps_fsynced')} GB/s; I/O floor (read N + write 2N) "
            f"{e.get('io_floor_s_read_plus_write')} s",
            "",
            "| kernel | s (written) | s (fsynced) | input GB/s | ratio to disk read | I/O floor / time "
            "| output bit-identical |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in e["runs"]:
            lines.append(
                f"| {r['kernel']} | {r['seconds_written']} | {r['seconds_fsynced']} | "
                f"{r['in_gbps_written']} ({r['in_gbps_fsynced']} fsynced) | {r['ratio_to_disk_read_written']} "
                f"({r['ratio_to_disk_read_fsynced']}) | {r.get('ratio_to_io_floor_fsynced')} | "
                f"{r['bit_identical_spot_check']} |"
            )
        lines.append(f"\nconvert_checkpoint (the convert stage): {e['convert_checkpoint']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--e2e-gb", type=float, default=6.0)
    p.add_argument("--e2e-dir", default="/tmp/flagrelease-bench")
    p.add_argument("--sweep", action="store_true", help="also time kernel variants")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(int(time.time()))  # fresh inputs every run
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    log("bit identity")
    res["bit_identity"] = bit_identity(gen)
    log(json.dumps(res["bit_identity"])[:3000])
    log("kernel throughput")
    res["kernels"] = kernel_rates(gen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_convert.json").write_text(json.dumps(res, indent=2))
    if args.sweep:
        log("kernel variants")
        res["sweep"] = sweep(gen)
        (out / "gpu_convert.json").write_text(json.dumps(res, indent=2))
    if args.e2e_gb > 0:
        log("end to end")
        res["e2e"] = end_to_end(Path(args.e2e_dir), args.e2e_gb, gen)
    (out / "gpu_convert.json").write_text(json.dumps(res, indent=2))
    (out / "gpu_convert.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
