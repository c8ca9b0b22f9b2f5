"""Make sure the release's image is in the registry: re-verify its digest, push it if needed.

The image stage already pushes; publishing checks through dockerd (which holds the
registry login) that the recorded digest resolves in the target registry, and pushes the
local image only when it does not.
"""

from __future__ import annotations

import logging
from typing import Any

from flagrelease.errors import PublishError
from flagrelease.publish._types import DestinationResult

__all__ = ["publish_registry", "target_reference"]

log = logging.getLogger("flagrelease.publish.registry")


def _split(ref: str) -> tuple[str, str]:
    """``repo[:tag]`` -> (repo, tag); digests are not accepted here."""
    name, _, last = ref.rpartition("/")
    if ":" in last:
        last, tag = last.split(":", 1)
    else:
        tag = "latest"
    return (f"{name}/{last}" if name else last), tag


def target_reference(image_ref: str, registry: str) -> str:
    """``image_ref`` moved into ``registry`` (kept as is when it is already there)."""
    repo, tag = _split(image_ref)
    if repo.startswith(registry.rstrip("/") + "/"):
        return f"{repo}:{tag}"
    return f"{registry.rstrip('/')}/{repo.rsplit('/', 1)[-1]}:{tag}"


def _registry_digest(client: Any, ref: str) -> str | None:
    from docker.errors import APIError, NotFound

    try:
        return str(client.images.get_registry_data(ref).id)
    except (NotFound, APIError):
        return None


def publish_registry(*, image_ref: str, digest: str | None, registry: str, dry_run: bool = False) -> DestinationResult:
    """Verify (or push) the image in ``registry``.

    Args:
        image_ref: the image the release built (``[registry/]name:tag``).
        digest: the manifest digest the image stage recorded, if any.
        registry: ``host[:port][/namespace]`` to publish to.
        dry_run: only report what would happen.

    Returns:
        ``uploaded`` holds the reference pushed (empty when the registry already had it);
        ``details`` the digest found in the registry.

    Raises:
        PublishError: dockerd is unreachable, the image is neither in the registry nor
            local, or the push failed.
    """
    import docker
    from docker.errors import APIError, DockerException, ImageNotFound

    target = target_reference(image_ref, registry)
    result = DestinationResult(name="registry", url=target, details={"expected_digest": digest})
    if dry_run:
        return result
    try:
        client = docker.from_env(timeout=60)
    except DockerException as err:
        raise PublishError(
            f"cannot reach dockerd to check {target} ({err}); start Docker (or set DOCKER_HOST) and publish again"
        ) from err
    try:
        repo, _tag = _split(target)
        if digest and _registry_digest(client, f"{repo}@{digest}") == digest:
            result.skipped.append(target)
            result.details["digest"] = digest
            return result
        try:
            image = client.images.get(image_ref)
        except ImageNotFound as err:
            raise PublishError(
                f"{target} is not in the registry{f' at {digest}' if digest else ''} and the image {image_ref} "
                "is not in the local Docker engine; run the image stage again (flagrelease run CONFIG --stages image)"
            ) from err
        repo, tag = _split(target)
        if target != image_ref:
            image.tag(repo, tag=tag)
        for line in client.images.push(repo, tag=tag, stream=True, decode=True):
            if isinstance(line, dict) and line.get("error"):
                raise PublishError(f"pushing {target} failed: {line['error']}; check `docker login {registry}`")
        pushed = _registry_digest(client, target)
        if pushed is None:
            raise PublishError(f"pushed {target} but the registry does not report it; publish again")
        result.uploaded.append(target)
        result.details["digest"] = pushed
        if digest and pushed != digest:
            log.warning("registry: %s has digest %s, the image stage recorded %s", target, pushed, digest)
        return result
    except APIError as err:
        raise PublishError(f"the Docker engine refused a request for {target}: {err.explanation or err}") from err
    finally:
        client.close()
