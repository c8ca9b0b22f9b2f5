"""``run_stage`` of the card stage: the card and the manifest, written into the bundle."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_copy, atomic_dir, atomic_write_text
from flagrelease._filehash import HashCache
from flagrelease.bundle import MANIFEST_NAME
from flagrelease.card import _text as text
from flagrelease.card._card import load_gate_results, render_card, render_serve_configs
from flagrelease.card._scrub import build_paths
from flagrelease.card.manifest import Upstream, build_manifest, tool_versions, upstream_results, write_manifest
from flagrelease.card.outputs import CardOutputs
from flagrelease.pipeline import ReleaseContext, StageResult

__all__ = ["run_stage"]

log = logging.getLogger("flagrelease.card")


def _copy_into(src: str | None, dst: Path, *, dry_run: bool) -> Path | None:
    """Copy ``src`` to ``dst`` unless it is already there; return where it lies in the bundle."""
    if not src:
        return None
    path = Path(src)
    if not path.is_file():
        return None
    if path.resolve() == dst.resolve():
        return dst
    if not dry_run:
        atomic_copy(path, dst)
    return dst


def _copy_context(up: Upstream, dst: Path) -> None:
    """Put the image's whole build context in the bundle, so ``docker build`` works from a download."""
    image = up.image
    if image is not None and image.bundle_context and (dst.parent / image.bundle_context / "Dockerfile").is_file():
        return  # the image stage put it there
    context = Path(image.context_dir) if image is not None and image.context_dir else None
    if context is None or not context.is_dir():
        if image is not None and image.dockerfile and Path(image.dockerfile).is_file():
            _copy_into(image.dockerfile, dst / "Dockerfile", dry_run=False)
        return
    if context.resolve() == dst.resolve():
        return
    with atomic_dir(dst) as tmp:
        shutil.copytree(context, tmp, symlinks=False, dirs_exist_ok=True)


def _published_weights(ctx: ReleaseContext, up: Upstream) -> Path | None:
    """The converted weights folder when the bundle publishes it, else None (source weights stay as fetched)."""
    pub = ctx.config.publish
    if up.convert is None or up.convert.mode == "none":
        return None
    if not (pub.hf_repo or pub.modelscope_repo or pub.s3 or pub.local_dir):
        return None
    folder = Path(up.convert.model_dir)
    return folder if folder.is_dir() and not folder.is_symlink() else None


def run_stage(ctx: ReleaseContext) -> StageResult:
    """The card stage: write the card to ``bundle/README.md`` and the manifest to ``bundle/flagrelease.json``.

    Gate results, the quantization error report and the Dockerfile are copied into the
    bundle when they lie outside it.  Upstream stages that did not run are recorded as such.

    Returns:
        A result whose outputs are :class:`CardOutputs`.
    """
    cfg, layout = ctx.config, ctx.layout
    up = upstream_results(ctx)
    ctx.progress("card", 0.05, "collecting stage results")

    gate_file: Path | None = None
    gate: dict[str, Any] | None = None
    if up.gate is not None and up.gate.results:
        gate_file = _copy_into(up.gate.results, layout.reports_dir / "gate_results.json", dry_run=ctx.dry_run)
        if gate_file is not None:
            gate = load_gate_results(Path(up.gate.results) if ctx.dry_run else gate_file)
    if up.convert is not None and up.convert.report:
        src = Path(up.convert.report)
        copied = _copy_into(up.convert.report, layout.reports_dir / src.name, dry_run=ctx.dry_run)
        if copied is not None and not ctx.dry_run:
            up = dataclasses.replace(up, convert=up.convert.model_copy(update={"report": str(copied)}))
    if not ctx.dry_run:
        _copy_context(up, layout.bundle_dir / "image")
        # The deploy stage's configs name the weights folder it served; the bundle's name the container's.
        render_serve_configs(cfg, layout.serve_dir, replace=True)
    paths = build_paths(cfg, layout=layout, config_path=ctx.config_path)
    if not ctx.dry_run:
        paths.scrub_tree(layout.bundle_dir, skip={"README.md", MANIFEST_NAME})
        weights = _published_weights(ctx, up)
        if weights is not None:  # published with the bundle: their text files (a fetch manifest, say) too
            paths.scrub_tree(weights, skip={"README.md", MANIFEST_NAME})

    ctx.progress("card", 0.3, "hashing files")
    cache = HashCache(layout.state_dir / "hashes.json")
    manifest = build_manifest(
        cfg,
        bundle_dir=layout.bundle_dir,
        upstream=up,
        gate=gate,
        gate_file=gate_file,
        config_path=ctx.config_path,
        tools=tool_versions(deploy=up.deploy, image=up.image),
        cache=cache,
        paths=paths,
    )
    card_text = render_card(cfg, manifest=manifest, bundle_dir=layout.bundle_dir, paths=paths)
    headers, rows = text.eval_table_rows(manifest)
    table = [dict(zip(headers, r, strict=True)) for r in rows]
    status = "warning" if manifest["gate"]["failed"] or manifest["missing"] else "ok"
    if ctx.dry_run:
        return StageResult(
            stage="card",
            summary=f"dry run: would write the card {layout.card_path} and the manifest {layout.manifest_path}",
            outputs=CardOutputs(card=str(layout.card_path), manifest=str(layout.manifest_path)),
            tables={"evaluation": table},
            status="skipped",
        )
    atomic_write_text(layout.card_path, card_text)
    ctx.progress("card", 0.8, "writing the manifest")
    write_manifest(manifest, path=layout.manifest_path, bundle_dir=layout.bundle_dir, cache=cache)
    cache.save()
    missing = f"; missing: {', '.join(manifest['missing'])}" if manifest["missing"] else ""
    failed = " GATE FAILED (published only with publish_on_fail)." if manifest["gate"]["failed"] else ""
    summary = (
        f"card for {manifest['release']['bundle_name']} with {len(rows)} evaluation row(s) and a manifest of "
        f"{len(manifest['files'])} bundle file(s){missing}.{failed}"
    )
    log.debug("card: wrote %s and %s", layout.card_path, layout.manifest_path)
    return StageResult(
        stage="card",
        summary=summary,
        outputs=CardOutputs(
            card=str(layout.card_path),
            manifest=str(layout.manifest_path),
            missing=list(manifest["missing"]),
            gate_failed=manifest["gate"]["failed"],
        ),
        tables={"evaluation": table},
        status=status,
    )
