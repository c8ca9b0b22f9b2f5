"""The image stage: render the vendor build context, build it, push it, record the digest.

The context is rendered into ``layout.image_dir`` and copied whole into the bundle
(``bundle/image/``: the Dockerfile and every file it copies), so that ``docker build``
of a downloaded bundle works.  The image serves the weights mounted at
``serve.model_dir`` (default ``/models/<model>``), never a path of this machine.

The engine and, for a loopback ``image.registry``, the registry are the ones
:mod:`flagrelease.services` finds or starts.  A base image flagrelease makes
(``flagrelease/python-base``, ``flagrelease/vllm-cpu-base``) is made from this machine
when no engine or registry has it.

When the image cannot be built here (no engine answers and none can be started, the
registry cannot be started, or the base image is neither on the engine nor pullable),
``image.on_missing_engine`` decides: ``fail`` raises an
:class:`~flagrelease.errors.ImageError` saying how to get an engine, ``keep-context``
keeps the rendered build context, says so loudly in the log and returns a ``warning``
result whose outputs carry ``warning`` (the card shows it as a banner).

``ctx.options`` may hold ``image_build_args`` (a mapping of Docker build args, e.g.
``{"FLAGRELEASE_DEPS": "skip"}`` for offline builds on a base that ships vLLM) and
``image_wheels_dir`` (a folder of wheels shipped in the context for offline installs).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, ImageNotFound

from flagrelease._atomic import atomic_dir
from flagrelease._oci import ImageReference
from flagrelease._redact import redact
from flagrelease.config import ReleaseConfig
from flagrelease.errors import ImageError, ServiceError
from flagrelease.image._base import make_project_base, project_base_kind
from flagrelease.image._build import build_image, connect_engine, engine_version
from flagrelease.image._dockerfile import base_image, image_labels, render_dockerfile, render_release, source_commit
from flagrelease.image.outputs import ImageOutputs
from flagrelease.pipeline import ReleaseContext, StageResult
from flagrelease.render import image_reference, model_slug
from flagrelease.services import ensure_registry, is_loopback_registry

__all__ = ["BUNDLE_CONTEXT", "image_model_path", "run_stage"]

log = logging.getLogger("flagrelease.image")

#: Where the build context lands inside the bundle.
BUNDLE_CONTEXT = "image"
_STEP = re.compile(r"^Step (\d+)/(\d+) :")


def image_model_path(cfg: ReleaseConfig) -> str:
    """The weights folder the image's configs and CMD serve: ``serve.model_dir``, else ``/models/<model>``."""
    return cfg.serve.model_dir or f"/models/{model_slug(cfg)}"


def _readable(folder: Path) -> None:
    """World-readable files (the image runs as an unprivileged user; the bundle is published)."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o755 if path.suffix == ".sh" else 0o644)


def _copy_into_bundle(ctx: ReleaseContext, context_dir: Path) -> Path:
    """The whole build context, copied atomically to ``bundle/image/``."""
    target = ctx.layout.bundle_dir / BUNDLE_CONTEXT
    with atomic_dir(target) as tmp:
        shutil.copytree(context_dir, tmp, dirs_exist_ok=True)
    return target


def _loud(message: str) -> None:
    bar = "=" * 78
    log.warning("\n%s\nIMAGE NOT BUILT: %s\n%s", bar, message, bar)


def _cannot_build(ctx: ReleaseContext, outputs: dict[str, Any], why: str, hint: str) -> StageResult:
    cfg = ctx.config
    if cfg.image.on_missing_engine == "fail":
        raise ImageError(f"{why} {hint}".strip(), model=cfg.name, chip=cfg.chip)
    build_cmd = f"docker build -t {outputs['image_ref']} {BUNDLE_CONTEXT}/"
    warning = (
        f"The image {outputs['image_ref']} was not built: {why} The bundle's {BUNDLE_CONTEXT}/ folder holds its "
        f"whole build context; build it where a Docker engine runs with `{build_cmd}`."
    )
    _loud(f"{why} The build context is kept in {outputs['context_dir']} (image.on_missing_engine: keep-context).")
    outputs["warning"] = redact(warning)
    summary = (
        f"Image not built: {why} The build context is kept in `{outputs['context_dir']}` and in the bundle's "
        f"`{BUNDLE_CONTEXT}/`; build it where an engine is available with `docker build -t {outputs['image_ref']} "
        f"{outputs['context_dir']}` (image.on_missing_engine is keep-context)."
    )
    ctx.progress("image", 1.0, "build context kept; not built")
    return StageResult(
        stage="image", summary=redact(summary), outputs=ImageOutputs.model_validate(outputs), status="warning"
    )


def _plan_summary(cfg: ReleaseConfig, outputs: dict[str, Any]) -> str:
    push = f", push to {cfg.image.registry}" if cfg.image.push and cfg.image.registry else ""
    return (
        f"Would render `{cfg.chip_profile.dockerfile_template}` FROM `{outputs['base_image']}` into "
        f"`{outputs['context_dir']}` and build `{outputs['image_ref']}`{push}."
    )


def _ensure_base(client: docker.DockerClient, base: ImageReference) -> str | None:
    """None when ``base`` is on the engine (pulled or made if need be), else why it is not."""
    if project_base_kind(base) is not None:
        try:
            if base.registry and is_loopback_registry(base.registry):
                ensure_registry(base.registry, hold=True)
            done = make_project_base(client, base)
        except (ImageError, ServiceError) as err:
            return redact(err.message)
        log.info("base image %s: %s", base, done)
        return None
    try:
        client.images.get(str(base))
        return None
    except ImageNotFound:
        pass
    try:
        log.info("pulling base image %s", base)
        if base.digest:
            client.images.pull(f"{base.repository}@{base.digest}")
        else:
            client.images.pull(base.repository, tag=base.tag or "latest")
        return None
    except (APIError, ImageNotFound) as err:
        return redact(str(err))


def _push_project_base(client: docker.DockerClient, base: ImageReference) -> None:
    """Push a base flagrelease made to its registry, so the bundle's Dockerfile can be built elsewhere.

    The image just pushed carries the base's layers, so this sends only the base's manifest.
    """
    if project_base_kind(base) is None or not base.registry:
        return
    try:
        for chunk in client.api.push(base.repository, tag=base.tag or "latest", stream=True, decode=True):
            if isinstance(chunk, dict) and chunk.get("error"):
                log.warning("could not push the base image %s: %s", base, redact(str(chunk["error"])))
                return
    except APIError as err:
        log.warning("could not push the base image %s: %s", base, redact(str(err)))


def run_stage(ctx: ReleaseContext) -> StageResult:
    """Render the build context into ``layout.image_dir`` and the bundle, build it, push it.

    Returns:
        A result whose outputs are :class:`~flagrelease.image.outputs.ImageOutputs`.
        Status ``warning`` (with ``outputs.warning`` set) when the image could not be
        built here and ``image.on_missing_engine`` is ``keep-context``.

    Raises:
        ImageError: the build or push failed, or no engine and ``on_missing_engine: fail``.
        ConfigError: a config value cannot be rendered safely.
    """
    cfg, layout = ctx.config, ctx.layout
    ref, base = image_reference(cfg), base_image(cfg)
    context_dir = layout.image_dir
    model_path = image_model_path(cfg)
    outputs: dict[str, Any] = {
        "image_ref": str(ref),
        "digest": None,
        "context_dir": str(context_dir),
        "dockerfile": str(context_dir / "Dockerfile"),
        "bundle_context": None,
        "built": False,
        "pushed": False,
        "engine": None,
        "image_id": None,
        "base_image": str(base),
        "labels": image_labels(cfg, commit=source_commit()),
    }
    tables = {"labels": [{"label": k, "value": v} for k, v in outputs["labels"].items()]}
    if ctx.dry_run:
        render_dockerfile(cfg, model_path=model_path)  # checks every value, writes nothing
        return StageResult(
            stage="image",
            summary=_plan_summary(cfg, outputs),
            outputs=ImageOutputs.model_validate(outputs),
            tables=tables,
            status="skipped",
        )

    ctx.progress("image", 0.02, "rendering the build context")
    with atomic_dir(context_dir) as tmp:
        render_release(cfg, out_dir=tmp, model_path=model_path, wheels_dir=ctx.options.get("image_wheels_dir"))
        _readable(tmp)
    _copy_into_bundle(ctx, context_dir)
    outputs["bundle_context"] = BUNDLE_CONTEXT
    log.info("rendered the build context of %s in %s (and the bundle's %s/)", ref, context_dir, BUNDLE_CONTEXT)
    if not cfg.image.build:
        ctx.progress("image", 1.0, "rendered; image.build is false")
        return StageResult(
            stage="image",
            summary=f"Rendered the build context in `{context_dir}` (image.build is false: not built).",
            outputs=ImageOutputs.model_validate(outputs),
            tables=tables,
        )

    try:
        client = connect_engine()
    except ImageError as err:
        return _cannot_build(ctx, outputs, err.message, "")
    try:
        outputs["engine"] = engine_version(client)
        push = bool(cfg.image.push and cfg.image.registry)
        if push and cfg.image.registry and is_loopback_registry(cfg.image.registry):
            try:
                ensure_registry(cfg.image.registry, hold=True)
            except ServiceError as err:
                return _cannot_build(ctx, outputs, f"the registry {cfg.image.registry} is not available: {err}.", "")
        ctx.progress("image", 0.05, f"checking base image {base}")
        missing = _ensure_base(client, base)
        if missing is not None:
            return _cannot_build(
                ctx,
                outputs,
                f"the base image {base} is not on the engine and cannot be pulled or made ({missing}).",
                "Load it (docker load -i FILE, or docker pull from a registry you can reach) or set image.base.",
            )

        def on_line(line: str) -> None:
            if m := _STEP.match(line):
                step, total = int(m.group(1)), int(m.group(2))
                ctx.progress("image", 0.05 + 0.8 * step / total, line[:120])

        build_args = {str(k): str(v) for k, v in (ctx.options.get("image_build_args") or {}).items()}
        result = build_image(
            context_dir, ref=str(ref), build_args=build_args, push=push, client=client, on_line=on_line
        )
        if result.pushed:
            _push_project_base(client, base)
    finally:
        client.close()
    outputs.update(
        built=True,
        pushed=result.pushed,
        digest=result.digest,
        pushed_ref=result.pushed_ref,
        image_id=result.image_id,
        image_ref=result.ref,
        labels=result.labels,
    )
    tables["labels"] = [{"label": k, "value": v} for k, v in sorted(result.labels.items())]
    where = (
        f"pushed as `{result.pushed_ref}`"
        if result.pushed
        else ("not pushed (image.push is false)" if not cfg.image.push else "not pushed (no image.registry configured)")
    )
    ctx.progress("image", 1.0, "built" + (" and pushed" if result.pushed else ""))
    summary = (
        f"Built `{result.ref}` ({result.image_id[:19]}) FROM `{base}` on {result.engine} in "
        f"{result.duration_s:.0f}s; {where}."
    )
    return StageResult(stage="image", summary=summary, outputs=ImageOutputs.model_validate(outputs), tables=tables)
