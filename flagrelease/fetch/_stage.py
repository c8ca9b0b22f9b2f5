"""``run_stage`` of the fetch stage: the release's weights into the work folder's ``source``."""

from __future__ import annotations

from flagrelease.fetch._fetch import fetch_model
from flagrelease.fetch.outputs import FetchOutputs
from flagrelease.pipeline import ReleaseContext, StageResult

__all__ = ["run_stage"]


def run_stage(ctx: ReleaseContext) -> StageResult:
    """The fetch stage: the release's weights into ``ctx.layout.source_dir``.

    Options read from ``ctx.options``: ``fetch_workers`` (int, default 8).

    Returns:
        :class:`~flagrelease.fetch.outputs.FetchOutputs` and a ``files`` table.

    Raises:
        FetchError: the weights could not be fetched or verified (the message says why).
    """
    model = ctx.config.model
    result = fetch_model(
        model,
        dest=ctx.layout.source_dir,
        workers=int(ctx.options.get("fetch_workers", 8)),
        dry_run=ctx.dry_run,
        progress=lambda fraction, message: ctx.progress("fetch", fraction, message),
    )
    rev = (result.revision or "unpinned")[:19]
    size = _human(result.bytes)
    if result.dry_run:
        summary = (
            f"Plan: {len(result.files)} files ({size}) of `{model.repo_id}` at `{rev}` from "
            f"{result.source}; {_human(result.downloaded_bytes)} to transfer."
        )
    elif result.downloaded_bytes == 0:
        summary = f"{len(result.files)} files ({size}) of `{model.repo_id}` at `{rev}` already fetched and verified."
    else:
        summary = (
            f"Fetched {len(result.files)} files ({size}) of `{model.repo_id}` at `{rev}` from "
            f"{result.source}; {_human(result.downloaded_bytes)} transferred, every file verified."
        )
    if result.notes:
        summary += " " + " ".join(n[0].upper() + n[1:] + "." for n in result.notes)
    outputs = FetchOutputs(
        model_dir=str(result.model_dir),
        manifest=str(result.manifest) if result.manifest else None,
        files=len(result.files),
        bytes=result.bytes,
        revision=result.revision,
        source=result.source,
        endpoint=result.endpoint,
        downloaded_bytes=result.downloaded_bytes,
        network=result.network,
    )
    table = [
        {"file": f.path, "size": f.size, "sha256": f.sha256, "verified_by": f.verified_by, "action": f.action}
        for f in result.files
    ]
    return StageResult(stage="fetch", summary=summary, outputs=outputs, tables={"files": table})


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
