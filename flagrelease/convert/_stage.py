"""The convert stage of the pipeline: fetched weights in, servable weights out."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_dir, atomic_write_json
from flagrelease.config import ConvertMode
from flagrelease.convert._convert import convert_checkpoint, plan_conversion
from flagrelease.errors import ConvertError
from flagrelease.pipeline import ReleaseContext, StageResult

__all__ = ["link_tree", "run_stage"]

STAGE = "convert"


def link_tree(src: Path, *, dst: Path) -> dict[str, int]:
    """Mirror ``src`` at ``dst`` with hard links (copies across file systems), atomically.

    Symbolic links (as in a hub cache snapshot) are resolved, so ``dst`` holds real files.
    Hidden files and folders are left out.

    Returns:
        ``{"files": n, "bytes": b, "linked": files hard-linked}``.
    """
    src = Path(src).resolve()
    counts = {"files": 0, "bytes": 0, "linked": 0}
    with atomic_dir(Path(dst)) as tmp:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if any(p.startswith(".") for p in rel.parts) or path.is_dir() or not path.exists():
                continue
            real = path.resolve()
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(real, target)
                counts["linked"] += 1
            except OSError:
                shutil.copyfile(real, target)
            counts["files"] += 1
            counts["bytes"] += real.stat().st_size
    return counts


def _source_dir(ctx: ReleaseContext) -> Path:
    fetch = ctx.result("fetch")
    model_dir = fetch.outputs.get("model_dir")
    if not model_dir:
        raise ConvertError(
            "the fetch stage recorded no model_dir; run it again (flagrelease run CONFIG --stages fetch)",
            model=ctx.config.name,
        )
    return Path(str(model_dir))


def run_stage(ctx: ReleaseContext) -> StageResult:
    """Convert the fetched checkpoint into ``ctx.layout.converted_dir``.

    Mode ``none`` mirrors the source with hard links so the converted folder is servable;
    other modes stream the conversion and write the error report to
    ``reports/quantization.json``. Device: ``ctx.options["convert_device"]`` (default cpu).

    Returns:
        Outputs ``model_dir``, ``mode``, ``report`` (path or None), ``summary``; table
        ``quantization`` with one row per converted tensor.

    Raises:
        ConvertError: the checkpoint cannot be converted (the message says why).
    """
    cfg = ctx.config.convert
    mode = cfg.mode
    src = _source_dir(ctx)
    dst = ctx.layout.converted_dir
    report_path = ctx.layout.reports_dir / "quantization.json"
    model = ctx.config.name

    if ctx.dry_run:
        return _dry_run(ctx, src, dst, report_path)

    if mode is ConvertMode.NONE:
        ctx.progress(STAGE, 0.0, f"linking {src} into {dst}")
        counts = link_tree(src, dst=dst)
        ctx.progress(STAGE, 1.0, "done")
        summary: dict[str, Any] = {"format": "none", **counts}
        return StageResult(
            stage=STAGE,
            summary=f"No conversion: mirrored {counts['files']} files ({counts['bytes'] / 1e9:.2f} GB) of the "
            f"fetched weights into `{dst}`.",
            outputs={"model_dir": str(dst), "mode": mode.value, "report": None, "summary": summary},
        )

    try:
        report = convert_checkpoint(
            src,
            dst=dst,
            to=mode,
            ignore=cfg.ignore,
            group_size=cfg.group_size,
            workers=cfg.workers,
            device=str(ctx.options.get("convert_device", "cpu")),
            progress=lambda fraction, message: ctx.progress(STAGE, fraction, message),
            overwrite=True,
        )
    except ConvertError as err:
        if err.model is None:
            err.model = model
        raise
    atomic_write_json(report_path, report.to_json())
    s = report.summary()
    text = (
        f"Converted `{src.name}` to {report.format}: {s['tensors_converted']} tensors converted, "
        f"{s['tensors_copied']} copied, {report.bytes_in / 1e9:.2f} GB in {report.seconds:.1f} s "
        f"({report.gb_per_s:.2f} GB/s)."
    )
    if s["rel_error_max"] is not None:
        text += f" Relative error mean {s['rel_error_mean']:.3g}, max {s['rel_error_max']:.3g}"
        text += f"; SNR min {s['snr_db_min']:.1f} dB." if s["snr_db_min"] is not None else " (exact)."
    status = "warning" if report.notes and not report.tensors else "ok"
    return StageResult(
        stage=STAGE,
        summary=text,
        outputs={"model_dir": str(dst), "mode": mode.value, "report": str(report_path), "summary": s},
        tables={"quantization": report.table_rows()},
        status=status,
    )


def _dry_run(ctx: ReleaseContext, src: Path, dst: Path, report_path: Path) -> StageResult:
    mode = ctx.config.convert.mode
    summary: dict[str, Any] = {"format": mode.value}
    if mode is ConvertMode.NONE:
        text = f"Would mirror `{src}` into `{dst}` with hard links (no conversion)."
    elif src.is_dir():
        cfg = ctx.config.convert
        plan = plan_conversion(src, to=mode, ignore=cfg.ignore, group_size=cfg.group_size)
        kinds: dict[str, int] = {}
        for shard in plan.shards:
            for job in shard.jobs:
                kinds[job.kind] = kinds.get(job.kind, 0) + 1
        summary.update(
            shards=len(plan.shards),
            tensors_quantized=kinds.get("quant", 0),
            tensors_dequantized=kinds.get("dequant", 0),
            tensors_copied=kinds.get("copy", 0),
            bytes_in=plan.src_bytes,
            bytes_out=plan.total_size,
        )
        text = (
            f"Would convert `{src}` to {plan.fmt.name} in `{dst}`: {len(plan.shards)} shards, "
            f"{kinds.get('quant', 0)} tensors quantized, {kinds.get('dequant', 0)} dequantized, "
            f"{kinds.get('copy', 0)} copied ({plan.src_bytes / 1e9:.2f} GB in, {plan.total_size / 1e9:.2f} GB out)."
        )
    else:
        text = f"Would convert the fetched weights (`{src}`) to {mode.value} in `{dst}`."
    return StageResult(
        stage=STAGE,
        summary=text,
        outputs={
            "model_dir": str(dst),
            "mode": mode.value,
            "report": None if mode is ConvertMode.NONE else str(report_path),
            "summary": summary,
        },
    )
