"""The streaming engine: chunks of rows through a thread pool, straight into output shards.

Every output shard's header is known from the plan, so the shard file is created at its
final size with the header in place and each chunk is written at its offset with
``pwrite`` as soon as it is converted.  Memory is bounded by the number of workers times
one chunk's buffers (kept per thread and reused), whatever the checkpoint's size.
A shard is written under a temporary name, fsynced, renamed, and then recorded in the
work folder, so an interrupted run resumes after its last finished shard.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flagrelease._atomic import atomic_write_json
from flagrelease.convert._io import BufferPool, ShardWriter, SourceFile
from flagrelease.convert._plan import CheckpointPlan, Job, ShardPlan
from flagrelease.convert.ops import (
    ErrorStats,
    Workspace,
    check_finite,
    dequant_fp8_block_with_error,
    pack_int32,
    quantize_int,
)
from flagrelease.errors import ConvertError

__all__ = ["CHUNK_ELEMENTS", "COPY_CHUNK_BYTES", "ExecResult", "ProgressCallback", "load_done", "run_plan"]

#: Elements per converted chunk (a worker's buffers are about 20 bytes per element).
CHUNK_ELEMENTS = 4 << 20
#: BF16 dequantization error is measured on one 128-row block-row in this many.
DEQUANT_STATS_EVERY = 8
#: Bytes per chunk of a plain copy.
COPY_CHUNK_BYTES = 16 << 20

#: ``progress(fraction, message)``; an exception raised by it aborts the conversion.
ProgressCallback = Callable[[float, str], None]

#: Float dtypes whose copied tensors are checked for NaN and Inf, and their element sizes.
_FLOAT_SIZES = {"BF16": 2, "F16": 2, "F32": 4}

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
}


@dataclass
class ExecResult:
    """What the engine did."""

    stats: dict[str, ErrorStats] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Task:
    shard: int
    job: int
    lo: int  # rows (convert) or bytes (copy)
    hi: int

    @property
    def key(self) -> tuple[int, int]:
        return self.shard, self.job


@dataclass
class _Open:
    plan: ShardPlan
    tmp: Path
    writer: ShardWriter
    pending: int = 0
    submitted: bool = False
    stats: dict[str, ErrorStats] = field(default_factory=dict)


class _Engine:
    """One conversion run: the source files, the device and per-thread buffers."""

    def __init__(self, plan: CheckpointPlan, *, device: torch.device, direct: bool, allow_non_finite: bool) -> None:
        self.plan = plan
        self.device = device
        self.direct = direct
        self.allow_non_finite = allow_non_finite
        self.local = threading.local()
        self.sources: dict[Path, SourceFile] = {}

    def open_sources(self) -> None:
        for f in self.plan.weight_files:
            self.sources[f] = SourceFile(f, direct=self.direct)

    def close(self) -> None:
        for src in self.sources.values():
            src.close()
        self.sources.clear()

    def _ws(self) -> tuple[Workspace, Workspace]:
        ws = getattr(self.local, "ws", None)
        if ws is None:
            host = Workspace("cpu")
            dev = host if self.device.type == "cpu" else Workspace(self.device)
            ws = self.local.ws = (dev, host)
        return ws

    def _read(self, path: Path, offset: int, nbytes: int, align: int, slot: str = "main") -> torch.Tensor:
        try:
            return self.sources[path].read(offset, nbytes, self.local, align=align, slot=slot)
        except EOFError as err:
            raise ConvertError(f"{err}; the shard is truncated: re-fetch it") from err

    @staticmethod
    def _write(writer: ShardWriter, t: torch.Tensor, offset: int, host: Workspace, name: str) -> None:
        if t.device.type != "cpu":
            h = host.take(name, tuple(t.shape), t.dtype)
            h.copy_(t)
            t = h
        writer.write(offset, t.contiguous())

    # -- one task -----------------------------------------------------------------------
    def run(self, task: _Task, shard: ShardPlan, writer: ShardWriter) -> ErrorStats | None:
        job = shard.jobs[task.job]
        try:
            return self._run(task, job, shard, writer)
        except ValueError as err:
            if isinstance(err, ConvertError):
                raise
            raise ConvertError(f"tensor {job.src.name!r} ({job.src.file.name}): {err}") from err
        except OSError as err:
            raise ConvertError(
                f"converting {job.src.name!r} into {shard.name} failed: {err}; fix the cause (disk space?) and "
                "run again: finished shards are kept"
            ) from err

    def _run(self, task: _Task, job: Job, shard: ShardPlan, writer: ShardWriter) -> ErrorStats | None:
        dev, host = self._ws()
        base = shard.data_offset
        src = job.src
        if job.kind == "copy":
            out = shard.tensors[job.outputs["weight"]]
            esize = _FLOAT_SIZES.get(src.dtype, 1)
            data = self._read(src.file, src.offset + task.lo, task.hi - task.lo, esize)
            if esize > 1 and not self.allow_non_finite:
                check_finite(data.view(_TORCH_DTYPES[src.dtype]), "tensor")
            writer.write(base + out.start + task.lo, data)
            return None
        rows, cols = task.hi - task.lo, src.cols
        esize = src.nbytes // max(1, src.rows * src.cols)
        raw = self._read(src.file, src.offset + task.lo * cols * esize, rows * cols * esize, esize)
        w = raw.view(_TORCH_DTYPES[src.dtype]).view(rows, cols)
        if self.device.type != "cpu":
            w = w.to(self.device)
        stats: ErrorStats | None = None
        if job.scale is not None:
            bm, _bn = self.plan.block
            s = job.scale
            s_lo, s_hi = task.lo // bm, -(-task.hi // bm)
            s_cols = s.shape[1]
            s_row = s.nbytes // s.shape[0]
            s_esize = s_row // s_cols
            sraw = self._read(s.file, s.offset + s_lo * s_row, (s_hi - s_lo) * s_row, s_esize, "scale")
            sc = sraw.view(_TORCH_DTYPES[s.dtype]).view(s_hi - s_lo, s_cols).to(self.device, torch.float32)
            dense = dev.take("dense", (rows, cols), torch.bfloat16)
            dense, stats = dequant_fp8_block_with_error(
                w,
                sc,
                block=self.plan.block,
                out=dense,
                work=dev,
                stats=job.kind == "dequant",
                stats_every=DEQUANT_STATS_EVERY,
                row0=task.lo,
                allow_non_finite=self.allow_non_finite,
            )
            if job.kind == "dequant":
                out = shard.tensors[job.outputs["weight"]]
                self._write(writer, dense, base + out.start + task.lo * cols * 2, host, "host_out")
                return stats
            w = dense
        fmt = self.plan.fmt
        assert fmt.num_bits is not None
        q_buf = dev.take("q", (rows, cols), torch.int8)
        q, scale, stats = quantize_int(
            w,
            num_bits=fmt.num_bits,
            group_size=fmt.group_size(self.plan.group_size),
            scale_dtype=_TORCH_DTYPES[job.dense_dtype],
            out=q_buf,
            work=dev,
            stats=True,
            allow_non_finite=self.allow_non_finite,
        )
        s_out = shard.tensors[job.outputs["weight_scale"]]
        self._write(writer, scale, base + s_out.start + task.lo * (s_out.nbytes // src.rows), host, "host_scale")
        if fmt.packed:
            per = 32 // fmt.num_bits
            words = -(-cols // per)
            packed = pack_int32(q, num_bits=fmt.num_bits, out=dev.take("packed", (rows, words), torch.int32), work=dev)
            p_out = shard.tensors[job.outputs["weight_packed"]]
            self._write(writer, packed, base + p_out.start + task.lo * words * 4, host, "host_out")
            if task.lo == 0:
                shape_out = shard.tensors[job.outputs["weight_shape"]]
                shape = torch.tensor([src.rows, src.cols], dtype=torch.int64)
                self._write(writer, shape, base + shape_out.start, host, "host_shape")
        else:
            q_out = shard.tensors[job.outputs["weight"]]
            self._write(writer, q, base + q_out.start + task.lo * cols, host, "host_out")
        return stats


def _tasks(plan: CheckpointPlan, index: int, shard: ShardPlan) -> Iterator[_Task]:
    for j, job in enumerate(shard.jobs):
        if job.kind == "copy":
            n = job.src.nbytes
            for lo in range(0, n, COPY_CHUNK_BYTES):
                yield _Task(index, j, lo, min(n, lo + COPY_CHUNK_BYTES))
            continue
        rows, cols = job.src.shape
        step = max(1, CHUNK_ELEMENTS // max(1, cols))
        if job.scale is not None:
            bm = plan.block[0]
            step = max(bm, step // bm * bm)  # whole scale blocks per chunk
        for lo in range(0, rows, step):
            yield _Task(index, j, lo, min(rows, lo + step))


def _task_bytes(shard: ShardPlan, task: _Task) -> int:
    job = shard.jobs[task.job]
    if job.kind == "copy":
        return task.hi - task.lo
    return job.src.nbytes * (task.hi - task.lo) // max(1, job.src.rows)


def _record_path(records: Path, shard: ShardPlan) -> Path:
    return records / f"{shard.name}.json"


def _stats_to_json(stats: dict[str, ErrorStats]) -> dict[str, list[float]]:
    return {k: [v.sum_sq_ref, v.sum_sq_err, v.max_abs_err, v.count] for k, v in stats.items()}


def _stats_from_json(data: dict[str, list[float]]) -> dict[str, ErrorStats]:
    return {k: ErrorStats(float(v[0]), float(v[1]), float(v[2]), int(v[3])) for k, v in data.items()}


def load_done(shard: ShardPlan, *, out_dir: Path, records: Path, digest: str) -> dict[str, ErrorStats] | None:
    """The stats of ``shard`` if a previous run finished it (record, size and header agree)."""
    rec_path = _record_path(records, shard)
    out = out_dir / shard.name
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
        if (
            rec.get("plan") != digest
            or rec.get("size") != shard.size
            or rec.get("header_sha256") != hashlib.sha256(shard.header).hexdigest()
            or out.stat().st_size != shard.size
        ):
            return None
        with open(out, "rb") as fh:
            if fh.read(len(shard.header)) != shard.header:
                return None
        return _stats_from_json(rec.get("stats") or {})
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None


def run_plan(
    plan: CheckpointPlan,
    *,
    out_dir: Path,
    records: Path,
    digest: str,
    workers: int,
    device: torch.device,
    progress: ProgressCallback | None = None,
    direct_io: bool = True,
    allow_non_finite: bool = False,
) -> ExecResult:
    """Write every shard of ``plan`` into ``out_dir``, skipping shards finished before.

    Args:
        plan: the checked plan.
        out_dir: where finished shards go.
        records: where per-shard completion records go.
        digest: the plan digest the records must carry.
        workers: worker threads (at least 1).
        device: where the arithmetic runs.
        progress: called from this thread with (fraction done, message) after each chunk.
        direct_io: use ``O_DIRECT`` where the file system allows it.
        allow_non_finite: convert NaN and Inf values instead of refusing the tensor.

    Returns:
        Per-tensor error stats and which shards were resumed or written.

    Raises:
        ConvertError: a tensor could not be converted or written.
    """
    t0 = time.perf_counter()
    res = ExecResult()
    total = max(1, plan.src_bytes)
    done_bytes = 0
    todo: list[tuple[int, ShardPlan]] = []
    for i, shard in enumerate(plan.shards):
        prev = load_done(shard, out_dir=out_dir, records=records, digest=digest)
        if prev is None:
            todo.append((i, shard))
            continue
        res.stats.update(prev)
        res.resumed.append(shard.name)
        done_bytes += shard.src_bytes
    if res.resumed and progress:
        progress(done_bytes / total, f"resumed {len(res.resumed)} finished shard(s)")

    engine = _Engine(plan, device=device, direct=direct_io, allow_non_finite=allow_non_finite)
    pool = BufferPool()
    opened: dict[int, _Open] = {}
    inflight: dict[Future[ErrorStats | None], _Task] = {}
    max_inflight = 2 * workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallelism comes from the worker threads
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flagrelease-convert")
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the loop makes many short-lived objects and no cycles; collections cost ~5%

    def finish(idx: int) -> None:
        st = opened.pop(idx)
        st.writer.close()
        os.replace(st.tmp, out_dir / st.plan.name)
        atomic_write_json(
            _record_path(records, st.plan),
            {
                "plan": digest,
                "shard": st.plan.name,
                "size": st.plan.size,
                "header_sha256": hashlib.sha256(st.plan.header).hexdigest(),
                "stats": _stats_to_json(st.stats),
            },
        )
        res.stats.update(st.stats)
        res.written.append(st.plan.name)

    def drain(mode: str) -> None:
        nonlocal done_bytes
        if not inflight:
            return
        finished, _ = wait(list(inflight), return_when=mode)
        for fut in finished:
            task = inflight.pop(fut)
            stats = fut.result()
            st = opened[task.shard]
            job = st.plan.jobs[task.job]
            if stats is not None:
                st.stats[job.src.name] = st.stats.get(job.src.name, ErrorStats()) + stats
            st.pending -= 1
            done_bytes += _task_bytes(st.plan, task)
            res.bytes_read += _task_bytes(st.plan, task)
            if st.pending == 0 and st.submitted:
                finish(task.shard)
            if progress:
                progress(min(1.0, done_bytes / total), f"{st.plan.name}: {job.src.name}")

    try:
        engine.open_sources()
        for idx, shard in todo:
            tmp = out_dir / f".{shard.name}.incomplete"
            writer = ShardWriter(tmp, size=shard.size, pool=pool, direct=direct_io)
            opened[idx] = st = _Open(plan=shard, tmp=tmp, writer=writer)
            writer.write(0, torch.frombuffer(bytearray(shard.header), dtype=torch.uint8))
            for task in _tasks(plan, idx, shard):
                while len(inflight) >= max_inflight:
                    drain(FIRST_COMPLETED)
                inflight[executor.submit(engine.run, task, shard, writer)] = task
                st.pending += 1
            st.submitted = True
            if st.pending == 0:
                finish(idx)
        while inflight:
            drain(FIRST_COMPLETED)
    except BaseException:
        for fut in inflight:
            fut.cancel()
        wait(list(inflight))
        for st in opened.values():
            st.writer.abort()
            with contextlib.suppress(OSError):
                st.tmp.unlink()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        engine.close()
        pool.close()
        torch.set_num_threads(threads)
        if gc_was_enabled:
            gc.enable()
    res.seconds = time.perf_counter() - t0
    return res
