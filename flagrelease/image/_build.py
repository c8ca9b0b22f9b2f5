"""The image stage: render the vendor build context, build it, push it, record the digest.

Builds go through the docker SDK to a real engine (``$DOCKER_HOST`` or the local socket).
The build log is streamed line by line to the ``flagrelease.image`` logger, which the
Prefect task captures.  After a push the digest comes from the push response and is
checked against the engine's ``RepoDigests``.

When the image cannot be built here (no engine answers, or the base image is neither on
the engine nor pullable), ``image.on_missing_engine`` decides: ``fail`` raises an
:class:`~flagrelease.errors.ImageError` saying how to get an engine, ``keep-context``
keeps the rendered build context and returns a ``warning`` result that says how to build
it elsewhere.

``ctx.options`` may hold ``image_build_args`` (a mapping of Docker build args, e.g.
``{"FLAGRELEASE_DEPS": "skip"}`` for offline builds on a base that ships vLLM) and
``image_wheels_dir`` (a folder of wheels shipped in the context for offline installs).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound

from flagrelease._atomic import atomic_dir
from flagrelease._oci import ImageReference, parse_reference, parse_registry
from flagrelease._redact import redact
from flagrelease.config import ReleaseConfig
from flagrelease.constants import docker_host, registry_credentials
from flagrelease.errors import ConfigError, ImageError
from flagrelease.image._dockerfile import base_image, image_labels, render_dockerfile, render_release, source_commit
from flagrelease.pipeline import ReleaseContext, StageResult
from flagrelease.render import image_reference

__all__ = [
    "DEFAULT_DOCKER_HOST",
    "ImageBuildResult",
    "build_image",
    "connect_engine",
    "engine_version",
    "run_stage",
]

log = logging.getLogger("flagrelease.image")

#: Where the engine is looked for when ``$DOCKER_HOST`` is unset.
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
_STEP = re.compile(r"^Step (\d+)/(\d+) :")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BUILD_TIMEOUT_S = 6 * 3600

LineFn = Callable[[str], None]


@dataclass
class ImageBuildResult:
    """What :func:`build_image` did.

    Attributes:
        ref: the image reference built (and pushed).
        image_id: the engine's image id (``sha256:...``).
        digest: the manifest digest in the registry after a push, else None.
        pushed_ref: ``repository@digest`` after a push, else None.
        built: always True for a returned result.
        pushed: whether it was pushed.
        engine: the engine, e.g. ``docker 20.10.24``.
        labels: the image's labels, as the engine reports them.
        duration_s: wall time of build and push.
    """

    ref: str
    image_id: str
    digest: str | None = None
    pushed_ref: str | None = None
    built: bool = True
    pushed: bool = False
    engine: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-able dict."""
        return asdict(self)


def _no_engine_message(where: str, err: Exception) -> str:
    return (
        f"no Docker engine answers at {where} ({redact(str(err))}). Start one (as root: `dockerd &`, or "
        "`systemctl start docker`), or point DOCKER_HOST at a running engine "
        f"(e.g. export DOCKER_HOST={DEFAULT_DOCKER_HOST}). To render the build context without building, "
        "set image.on_missing_engine: keep-context or image.build: false."
    )


def connect_engine(*, base_url: str | None = None, timeout: float = _BUILD_TIMEOUT_S) -> docker.DockerClient:
    """A client of a Docker engine that answers a ping.

    Args:
        base_url: the engine's address (default: ``$DOCKER_HOST``, else the local socket).
        timeout: seconds a single API read may wait (builds print nothing for long stretches).

    Raises:
        ImageError: no engine answers; the message names DOCKER_HOST and how to start dockerd.
    """
    where = base_url or docker_host() or DEFAULT_DOCKER_HOST
    client: docker.DockerClient | None = None
    try:
        if base_url:
            client = docker.DockerClient(base_url=base_url, timeout=int(timeout))
        else:
            client = docker.from_env(timeout=int(timeout))
        client.ping()
    except DockerException as err:
        if client is not None:
            client.close()
        raise ImageError(_no_engine_message(where, err)) from err
    return client


def engine_version(client: docker.DockerClient) -> str:
    """``docker <server version>`` of the engine."""
    return f"docker {client.version().get('Version', 'unknown')}"


def _target(ref: str, registry: str | None) -> ImageReference:
    parsed = parse_reference(ref)
    if not registry:
        return parsed
    host, namespace = parse_registry(registry)
    prefix = "/".join(p for p in (host, namespace) if p)
    if parsed.repository.startswith(prefix + "/"):
        return parsed
    return parse_reference(f"{prefix}/{parsed.path}:{parsed.tag or 'latest'}")


class _Lines:
    """Joins streamed chunks into whole lines and hands each to the logger and a callback."""

    def __init__(self, on_line: LineFn | None) -> None:
        self.on_line = on_line
        self.buffer = ""
        self.tail: list[str] = []

    def feed(self, text: str) -> None:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.emit(line)

    def emit(self, line: str) -> None:
        line = redact(_ANSI.sub("", line).rstrip("\r"))
        if not line.strip():
            return
        log.info("%s", line)
        self.tail = [*self.tail[-39:], line]
        if self.on_line is not None:
            self.on_line(line)

    def close(self) -> None:
        if self.buffer:
            self.emit(self.buffer)
            self.buffer = ""


def _stream_build(
    client: docker.DockerClient,
    context_dir: Path,
    *,
    tag: str,
    dockerfile: str,
    labels: Mapping[str, str] | None,
    build_args: Mapping[str, str] | None,
    pull: bool,
    lines: _Lines,
) -> str | None:
    image_id: str | None = None
    chunks: Iterator[dict[str, Any]] = client.api.build(
        path=str(context_dir),
        dockerfile=dockerfile,
        tag=tag,
        labels=dict(labels or {}) or None,
        buildargs=dict(build_args or {}) or None,
        rm=True,
        forcerm=True,
        pull=pull,
        decode=True,
    )
    for chunk in chunks:
        if "stream" in chunk:
            lines.feed(str(chunk["stream"]))
        elif "status" in chunk and not chunk.get("progressDetail"):
            lines.feed(f"{chunk['status']} {chunk.get('id', '')}".rstrip() + "\n")
        if "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
            image_id = str(chunk["aux"]["ID"])
        if "error" in chunk:
            lines.close()
            detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
            tail = "\n".join(lines.tail[-15:])
            raise ImageError(
                f"docker build of {tag} failed: {redact(str(detail).strip())}\nlast lines of the build "
                f"log:\n{tail}\nFix the step above (the full log is in the flagrelease.image log)."
            )
    lines.close()
    return image_id


def _push(client: docker.DockerClient, target: ImageReference, lines: _Lines) -> str | None:
    digest: str | None = None
    try:
        chunks = client.api.push(
            target.repository, tag=target.tag, stream=True, decode=True, auth_config=registry_credentials()
        )
        for chunk in chunks:
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise ImageError(
                    f"push of {target} failed: {redact(str(detail))}. Check that the registry "
                    f"{target.registry or 'docker.io'} is reachable and that you may push there (docker login, or "
                    "FLAGRELEASE_REGISTRY_USERNAME / FLAGRELEASE_REGISTRY_PASSWORD)."
                )
            aux = chunk.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
            if "status" in chunk and not chunk.get("progressDetail"):
                lines.feed(f"{chunk.get('id', '')} {chunk['status']}".strip() + "\n")
    except APIError as err:
        raise ImageError(f"push of {target} failed: {redact(str(err))}; check the registry and credentials") from err
    lines.close()
    return digest


def build_image(
    context_dir: Path,
    *,
    ref: str,
    labels: Mapping[str, str] | None = None,
    build_args: Mapping[str, str] | None = None,
    push: bool = False,
    registry: str | None = None,
    dockerfile: str = "Dockerfile",
    pull: bool = False,
    client: docker.DockerClient | None = None,
    on_line: LineFn | None = None,
) -> ImageBuildResult:
    """Build ``context_dir`` into ``ref``, optionally push it, and record its digest.

    Args:
        context_dir: the build context (holds the Dockerfile).
        ref: the image reference to tag, e.g. ``registry:5000/flagrelease:v1``.
        labels: extra labels set by the build (the Dockerfile's own are kept).
        build_args: Docker build args, e.g. ``{"FLAGRELEASE_DEPS": "skip"}``.
        push: push after building.
        registry: ``host[:port][/namespace]`` to push to; ``ref`` is re-tagged under it
            when it is not already there.
        dockerfile: the Dockerfile's name inside the context.
        pull: always pull a newer base image.
        client: an engine client (default: :func:`connect_engine`).
        on_line: called with every build and push log line (they also go to the
            ``flagrelease.image`` logger).

    Returns:
        The image id, digest (after a push) and labels.

    Raises:
        ImageError: no engine, the build failed (with the last log lines), or the push failed.
        ConfigError: ``ref`` or ``registry`` is not a valid reference.
    """
    context_dir = Path(context_dir)
    if not (context_dir / dockerfile).is_file():
        raise ImageError(f"{context_dir / dockerfile} does not exist; render the context first (flagrelease render)")
    target = _target(ref, registry)
    if target.digest:
        raise ConfigError(f"cannot build into {target}: a reference with a digest names an existing image")
    own_client = client is None
    engine = client or connect_engine()
    lines = _Lines(on_line)
    started = time.monotonic()
    try:
        version = engine_version(engine)
        log.info("building %s from %s on %s", target, context_dir, version)
        try:
            image_id = _stream_build(
                engine,
                context_dir,
                tag=str(target),
                dockerfile=dockerfile,
                labels=labels,
                build_args=build_args,
                pull=pull,
                lines=lines,
            )
            image = engine.images.get(str(target))
        except (APIError, ImageNotFound) as err:
            raise ImageError(f"docker build of {target} failed: {redact(str(err))}") from err
        result = ImageBuildResult(
            ref=str(target), image_id=image_id or str(image.id), engine=version, labels=dict(image.labels or {})
        )
        if push:
            log.info("pushing %s", target)
            digest = _push(engine, target, lines)
            image.reload()
            repo_digests = [d for d in image.attrs.get("RepoDigests") or [] if d.startswith(target.repository + "@")]
            if digest is None and repo_digests:
                digest = repo_digests[0].split("@", 1)[1]
            if digest is None:
                raise ImageError(f"the push of {target} reported no digest; check the registry's logs")
            if repo_digests and f"{target.repository}@{digest}" not in repo_digests:
                raise ImageError(
                    f"the push of {target} reported {digest}, but the engine records {repo_digests}; push again"
                )
            result.digest, result.pushed, result.pushed_ref = digest, True, f"{target.repository}@{digest}"
            log.info("pushed %s", result.pushed_ref)
        result.duration_s = round(time.monotonic() - started, 3)
        return result
    finally:
        if own_client:
            engine.close()


# -- the stage ---------------------------------------------------------------------------------
def _model_path(ctx: ReleaseContext) -> str:
    """The weights folder the image's configs and CMD serve."""
    if ctx.config.serve.model_dir:
        return ctx.config.serve.model_dir
    try:
        return str(ctx.result("convert").outputs["model_dir"])
    except (ConfigError, KeyError):
        return str(ctx.layout.converted_dir)


def _ensure_base(client: docker.DockerClient, base: ImageReference) -> str | None:
    """None when ``base`` is on the engine (pulled if need be), else why it is not."""
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


def _cannot_build(ctx: ReleaseContext, outputs: dict[str, Any], why: str, hint: str) -> StageResult:
    cfg = ctx.config
    if cfg.image.on_missing_engine == "fail":
        raise ImageError(f"{why} {hint}", model=cfg.name, chip=cfg.chip)
    log.warning("%s; keeping the rendered build context in %s", why, outputs["context_dir"])
    build_cmd = f"docker build -t {outputs['image_ref']} {outputs['context_dir']}"
    summary = (
        f"Image not built: {why} The build context is kept in `{outputs['context_dir']}`; build it where "
        f"an engine is available with `{build_cmd}` (image.on_missing_engine is keep-context)."
    )
    ctx.progress("image", 1.0, "build context kept; not built")
    return StageResult(stage="image", summary=summary, outputs=outputs, status="warning")


def _plan_summary(cfg: ReleaseConfig, outputs: dict[str, Any]) -> str:
    push = f", push to {cfg.image.registry}" if cfg.image.push and cfg.image.registry else ""
    return (
        f"Would render `{cfg.chip_profile.dockerfile_template}` FROM `{outputs['base_image']}` into "
        f"`{outputs['context_dir']}` and build `{outputs['image_ref']}`{push}."
    )


def run_stage(ctx: ReleaseContext) -> StageResult:
    """Render the build context into ``layout.image_dir``, build it, push it.

    Returns:
        outputs: ``image_ref``, ``digest`` (or None), ``context_dir``, ``dockerfile``, ``built``,
        ``pushed``, ``engine`` (or None), plus ``image_id``, ``base_image`` and ``labels``.
        Status ``warning`` when the image could not be built here and
        ``image.on_missing_engine`` is ``keep-context``.

    Raises:
        ImageError: the build or push failed, or no engine and ``on_missing_engine: fail``.
        ConfigError: a config value cannot be rendered safely.
    """
    cfg, layout = ctx.config, ctx.layout
    ref, base = image_reference(cfg), base_image(cfg)
    context_dir = layout.image_dir
    model_path = _model_path(ctx)
    outputs: dict[str, Any] = {
        "image_ref": str(ref),
        "digest": None,
        "context_dir": str(context_dir),
        "dockerfile": str(context_dir / "Dockerfile"),
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
            stage="image", summary=_plan_summary(cfg, outputs), outputs=outputs, tables=tables, status="skipped"
        )

    ctx.progress("image", 0.02, "rendering the build context")
    with atomic_dir(context_dir) as tmp:
        render_release(cfg, out_dir=tmp, model_path=model_path, wheels_dir=ctx.options.get("image_wheels_dir"))
    log.info("rendered the build context of %s in %s", ref, context_dir)
    if not cfg.image.build:
        ctx.progress("image", 1.0, "rendered; image.build is false")
        return StageResult(
            stage="image",
            summary=f"Rendered the build context in `{context_dir}` (image.build is false: not built).",
            outputs=outputs,
            tables=tables,
        )

    try:
        client = connect_engine()
    except ImageError as err:
        if cfg.image.on_missing_engine == "fail":
            raise ImageError(err.message, model=cfg.name, chip=cfg.chip) from err
        return _cannot_build(ctx, outputs, err.message, "")
    try:
        outputs["engine"] = engine_version(client)
        ctx.progress("image", 0.05, f"checking base image {base}")
        missing = _ensure_base(client, base)
        if missing is not None:
            return _cannot_build(
                ctx,
                outputs,
                f"the base image {base} is not on the engine and cannot be pulled ({missing}).",
                "Load it (docker load -i FILE, or docker pull from a registry you can reach) or set image.base.",
            )

        def on_line(line: str) -> None:
            if m := _STEP.match(line):
                step, total = int(m.group(1)), int(m.group(2))
                ctx.progress("image", 0.05 + 0.8 * step / total, line[:120])

        push = bool(cfg.image.push and cfg.image.registry)
        build_args = {str(k): str(v) for k, v in (ctx.options.get("image_build_args") or {}).items()}
        result = build_image(
            context_dir, ref=str(ref), build_args=build_args, push=push, client=client, on_line=on_line
        )
    finally:
        client.close()
    outputs.update(
        built=True,
        pushed=result.pushed,
        digest=result.digest,
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
    return StageResult(stage="image", summary=summary, outputs=outputs, tables=tables)
