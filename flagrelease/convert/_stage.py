"""The convert stage of the pipeline: fetched weights in, servable weights out."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_dir, atomic_write_json
from flagrelease.config import ConvertMode
from flagrelease.convert._convert import convert_checkpoint, plan_conversion
from flagrelease.convert._plan import source_files
from flagrelease.convert.outputs import ConvertOutputs
from flagrelease.errors import ConvertError
from flagrelease.fetch.outputs import FetchOutputs
from flagrelease.pipeline import ReleaseContext, StageResult

__all__ = ["link_tree", "run_stage"]

STAGE = "convert"


def link_tree(src: Path, *, dst: Path) -> dict[str, int]:
    """Mirror ``src`` at ``dst`` with hard links (copies across file systems), atomically.

    Symbolic links that stay inside ``src`` are resolved, so ``dst`` holds real files;
    hidden files and folders are left out.

    Returns:
        ``{"files": n, "bytes": b, "linked": files hard-linked}``.

    Raises:
        ConvertError: a symbolic link in ``src`` leaves it, points to nothing or loops.
    """
    src = Path(src).resolve()
    counts = {"files": 0, "bytes": 0, "linked": 0}
    files = source_files(src)
    with atomic_dir(Path(dst)) as tmp:
        for path in files:
            real = path.resolve()
            target = tmp / path.relative_to(src)
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
    fetch = ctx.result("fetch", FetchOutputs)
    if not fetch.model_dir:
        raise ConvertError(
            "the fetch stage recorded no model_dir; run it again (flagrelease run CONFIG --stages fetch)",
            model=ctx.config.name,
        )
    return Path(fetch.model_dir)


def run_stage(ctx: ReleaseContext) -> StageResult:
    """Convert the fetched checkpoint into ``ctx.layout.converted_dir``.

    Mode ``none`` mirrors the source with hard links so the converted folder is servable;
    other modes stream the conversion and write the error report to
    ``reports/quantization.json``. Device: ``ctx.options["convert_device"]`` (default cpu).

    Returns:
        :class:`~flagrelease.convert.outputs.ConvertOutputs`; table ``quantization`` with
        one row per converted tensor.

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
            outputs=ConvertOutputs(model_dir=str(dst), mode=mode.value, report=None, summary=summary),
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
            allow_non_finite=cfg.allow_non_finite,
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
        outputs=ConvertOutputs(model_dir=str(dst), mode=mode.value, report=str(report_path), summary=s),
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
        outputs=ConvertOutputs(
            model_dir=str(dst),
            mode=mode.value,
            report=None if mode is ConvertMode.NONE else str(report_path),
            summary=summary,
        ),
    )
