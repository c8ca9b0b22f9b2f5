"""Build a rendered context with a real Docker engine, push it, and record its digest.

Builds go through the docker SDK to the engine :func:`flagrelease.services.ensure_engine`
finds: ``$DOCKER_HOST`` when set, else the system engine, else (as root) flagrelease's
own dockerd.  The build log is streamed line by line to the ``flagrelease.image``
logger, which the Prefect task captures.  After a push the digest comes from the push
response and is checked against the engine's ``RepoDigests``.
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

from flagrelease._oci import ImageReference, parse_reference, parse_registry
from flagrelease._redact import redact
from flagrelease.constants import registry_credentials
from flagrelease.errors import ConfigError, ImageError, ServiceError
from flagrelease.services import DEFAULT_DOCKER_HOST, ensure_engine

__all__ = [
    "DEFAULT_DOCKER_HOST",
    "ImageBuildResult",
    "build_image",
    "connect_engine",
    "engine_version",
]

log = logging.getLogger("flagrelease.image")

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


def connect_engine(*, base_url: str | None = None, timeout: float = _BUILD_TIMEOUT_S) -> docker.DockerClient:
    """A client of a Docker engine that answers a ping, started by flagrelease when none runs.

    The engine is :func:`flagrelease.services.ensure_engine`'s, held for the rest of this
    process: ``$DOCKER_HOST`` (or ``base_url``) when set, else the system engine, else, as
    root, flagrelease's own dockerd.

    Args:
        base_url: use this engine and no other.
        timeout: seconds a single API read may wait (builds print nothing for long stretches).

    Raises:
        ImageError: no engine answers and none can be started; the message says why and
            names DOCKER_HOST and dockerd.
    """
    try:
        engine = ensure_engine(base_url=base_url, hold=True)
    except ServiceError as err:
        raise ImageError(
            f"{err.message}. To render the build context without building, set image.on_missing_engine: "
            "keep-context or image.build: false."
        ) from err
    client = engine.client(timeout=int(timeout))
    try:
        client.ping()
    except DockerException as err:
        client.close()
        raise ImageError(f"the Docker engine at {engine.base_url} stopped answering ({redact(str(err))})") from err
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
