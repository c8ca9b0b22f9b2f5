"""``convert_checkpoint``: plan, stream the shards, then finish the folder and swap it in."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flagrelease import __version__
from flagrelease._atomic import atomic_write_json, replace_dir
from flagrelease.config import ConvertMode
from flagrelease.convert._plan import DEFAULT_IGNORE, INDEX_NAME, CheckpointPlan, build_plan, source_files
from flagrelease.convert._stream import ProgressCallback, run_plan
from flagrelease.convert.registry import TargetFormat, get_format
from flagrelease.convert.report import ConvertReport, TensorReport
from flagrelease.errors import ConvertError

__all__ = ["convert_checkpoint", "plan_conversion", "work_dir_for"]

#: Files never carried over: other weight formats, which would disagree with the new weights.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".incomplete")
_MARKER = "converted_by"


def work_dir_for(dst: Path) -> Path:
    """The hidden work folder beside ``dst`` where a conversion is built and resumed."""
    dst = Path(dst)
    return dst.parent / f".{dst.name}.partial"


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConvertError(f"device {device!r} is not a torch device; use cpu or cuda") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConvertError("device 'cuda' was asked for but torch sees no CUDA GPU here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConvertError(f"device {device!r} is not supported; use cpu or cuda")
    return dev


def _workers(workers: int) -> int:
    """Threads to run: two per core (at least 4) by default, since a worker waits on the disk half the time."""
    if workers < 0:
        raise ConvertError(f"workers must be 0 (every core) or positive, got {workers}")
    if workers:
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(32, max(4, 2 * cores))


def _replaceable(dst: Path) -> bool:
    """Whether ``dst`` may be replaced: absent, empty, or an earlier flagrelease conversion."""
    if not dst.exists():
        return True
    if not dst.is_dir():
        return False
    if not any(dst.iterdir()):
        return True
    try:
        meta = json.loads((dst / INDEX_NAME).read_text(encoding="utf-8")).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return str(meta.get(_MARKER, "")).startswith("flagrelease")


def plan_conversion(
    src: Path,
    *,
    to: str | ConvertMode,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    group_size: int = 128,
) -> CheckpointPlan:
    """Check ``src`` and plan its conversion without writing anything.

    Raises:
        ConvertError: the format is unknown or the checkpoint is bad.
    """
    return build_plan(Path(src), fmt=get_format(to), ignore=list(ignore), group_size=group_size)


def convert_checkpoint(
    src: Path,
    *,
    dst: Path,
    to: str | ConvertMode,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    group_size: int = 128,
    workers: int = 0,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    direct_io: bool = True,
    allow_non_finite: bool = False,
) -> ConvertReport:
    """Convert the safetensors checkpoint in ``src`` into ``dst``, tensor by tensor.

    The output is built in a hidden ``.<dst>.partial`` folder beside ``dst`` and renamed
    to ``dst`` only when complete. Finished shards are recorded there, so a run that was
    interrupted resumes where it stopped. Memory stays bounded by the workers' chunk
    buffers whatever the checkpoint's size.

    Args:
        src: checkpoint folder (``config.json``, ``*.safetensors``, optional index, tokenizer).
        dst: output folder. An existing one is replaced only when it is empty, was made by
            this converter, or ``overwrite`` is set.
        to: target format: ``bf16``, ``int8-w8a8``, ``int8-w8a16``, ``int4-w4a16`` (or a
            :class:`ConvertMode`).
        ignore: module name patterns never quantized (see :func:`ignore_matches`).
        group_size: input columns per scale for ``int4-w4a16``.
        workers: worker threads; 0 keeps every core busy: two threads per core (at least 4,
            at most 32), since direct I/O makes each thread wait on the disk part of the time.
            Memory grows by about 60 MB per thread.
        device: ``cpu`` or ``cuda`` for the arithmetic (I/O stays on the host).
        progress: ``progress(fraction, message)``, called after each chunk; an exception it
            raises stops the conversion (finished shards are kept for the next run).
        overwrite: replace ``dst`` even if it is not an earlier conversion.
        direct_io: read and write shards with ``O_DIRECT`` where the file system allows it
            (it falls back by itself); False forces the page cache.
        allow_non_finite: convert tensors holding NaN or Inf (``convert.allow_non_finite``);
            by default such a tensor stops the conversion with an error naming it.

    Returns:
        The :class:`ConvertReport`, with per-tensor error.

    Raises:
        ConvertError: bad format, device or checkpoint (damaged headers, NaN or Inf values,
            symbolic links leaving ``src``), or ``dst`` is in the way.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    fmt = get_format(to)
    dev = _device(device)
    n_workers = _workers(workers)
    if src == dst or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise ConvertError(f"destination {dst} overlaps the source {src}; choose a folder outside it")
    plan = build_plan(src, fmt=fmt, ignore=list(ignore), group_size=group_size)
    if not overwrite and not _replaceable(dst):
        raise ConvertError(
            f"{dst} exists and is not an earlier flagrelease conversion; remove it or choose another destination"
        )
    work = work_dir_for(dst)
    out_dir, records = work / "out", work / "records"
    digest = plan.digest()
    plan_file = work / "plan.json"
    try:
        same = json.loads(plan_file.read_text(encoding="utf-8")).get("digest") == digest
    except (OSError, ValueError, AttributeError):
        same = False
    if not same and work.exists():
        shutil.rmtree(work)
    out_dir.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_file, {"digest": digest, "src": str(src), "format": fmt.name})

    result = run_plan(
        plan,
        out_dir=out_dir,
        records=records,
        digest=digest,
        workers=n_workers,
        device=dev,
        progress=progress,
        direct_io=direct_io,
        allow_non_finite=allow_non_finite,
    )
    _write_index(plan, out_dir)
    _write_config(plan, out_dir)
    _copy_other_files(src, out_dir, plan)
    replace_dir(out_dir, dst)
    shutil.rmtree(work, ignore_errors=True)

    rows: list[TensorReport] = []
    copied = 0
    for shard in plan.shards:
        for job in shard.jobs:
            if job.kind == "copy":
                copied += 1
                continue
            st = result.stats.get(job.src.name)
            if st is None:
                continue
            rows.append(
                TensorReport(
                    name=job.src.name,
                    shape=job.src.shape,
                    source_dtype=job.src.dtype,
                    target=_target_label(fmt, job.kind, plan.group_size),
                    rel_error=st.rel_error,
                    snr_db=st.snr_db,
                    max_abs_error=st.max_abs_err,
                    reference="fp32 product" if job.kind == "dequant" else job.dense_dtype,
                )
            )
    if progress:
        progress(1.0, f"wrote {dst}")
    return ConvertReport(
        src=str(src),
        dst=str(dst),
        format=fmt.name,
        mode=fmt.mode.value,
        tensors=rows,
        copied=copied,
        ignored_modules=plan.ignored_modules,
        shards=[s.name for s in plan.shards],
        resumed_shards=result.resumed,
        bytes_in=plan.src_bytes,
        bytes_out=plan.total_size,
        seconds=result.seconds,
        workers=n_workers,
        device=str(dev),
        group_size=fmt.group_size(plan.group_size),
        notes=list(plan.notes),
    )


def _target_label(fmt: TargetFormat, kind: str, group_size: int) -> str:
    if kind == "dequant":
        return "BF16"
    label = f"INT{fmt.num_bits} {fmt.strategy}"
    if fmt.strategy == "group":
        label += f" {group_size}"
    return label


def _write_index(plan: CheckpointPlan, out_dir: Path) -> None:
    weight_map = {name: shard.name for shard in plan.shards for name in shard.tensors}
    index = {
        "metadata": {
            "total_size": plan.total_size,
            _MARKER: f"flagrelease {__version__}",
            "convert_format": plan.fmt.name,
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    os.chmod(atomic_write_json(out_dir / INDEX_NAME, index), 0o644)


def _write_config(plan: CheckpointPlan, out_dir: Path) -> None:
    if plan.config is None:
        plan.notes.append("the source has no config.json; none was written")
        return
    cfg: dict[str, Any] = json.loads(json.dumps(plan.config))
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "fp8":
        cfg.pop("quantization_config")  # the FP8 weights are gone
    if plan.fp8_tensors:
        cfg["torch_dtype"] = "bfloat16"
        if "dtype" in cfg:
            cfg["dtype"] = "bfloat16"
    new_qc = plan.fmt.quantization_config(ignore=plan.ignored_modules, group_size=plan.group_size)
    if new_qc is not None:
        cfg["quantization_config"] = new_qc
    os.chmod(atomic_write_json(out_dir / "config.json", cfg), 0o644)


def _copy_other_files(src: Path, out_dir: Path, plan: CheckpointPlan) -> None:
    """Tokenizer, generation config, code...: every other file, links (inside ``src``) resolved."""
    for path in source_files(src):
        rel = path.relative_to(src)
        if rel.name in (INDEX_NAME, "config.json") and len(rel.parts) == 1:
            continue
        if rel.name.endswith(_SKIP_SUFFIXES):
            continue
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path.resolve(), target)
