"""Make sure the release's image is in the registry: re-verify its digest, push it if needed.

The image stage already pushes; publishing checks through the Docker engine (which holds
the registry login; :func:`flagrelease.services.ensure_engine`) that the recorded digest
resolves in the target registry, and pushes the local image only when it does not.  The
check is the staging step; there is nothing to promote.
"""

from __future__ import annotations

import logging
from typing import Any

from flagrelease.errors import PublishError, ServiceError
from flagrelease.publish._types import Destination, DestinationResult, PlannedFile

__all__ = ["RegistryDestination", "publish_registry", "target_reference"]

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
    from docker.errors import APIError, ImageNotFound

    from flagrelease.services import ensure_engine, ensure_registry, is_loopback_registry

    target = target_reference(image_ref, registry)
    result = DestinationResult(name="registry", url=target, details={"expected_digest": digest})
    if dry_run:
        return result
    try:
        client = ensure_engine(hold=True).client(timeout=600)
        if is_loopback_registry(registry):
            ensure_registry(registry, hold=True)
    except ServiceError as err:
        raise PublishError(f"cannot reach a Docker engine or registry to check {target}: {err.message}") from err
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


class RegistryDestination(Destination):
    """``publish.registry``: the image by digest.

    Args:
        image_ref: the image the release built.
        digest: the digest the image stage recorded.
        registry: ``host[:port][/namespace]``.
    """

    name = "registry"

    def __init__(self, *, image_ref: str, digest: str | None, registry: str) -> None:
        self.image_ref, self.digest, self.registry = image_ref, digest, registry
        self.url = target_reference(image_ref, registry)

    def stage(self, files: list[PlannedFile]) -> DestinationResult:
        """Verify the digest in the registry, pushing the local image when it is missing."""
        result = publish_registry(image_ref=self.image_ref, digest=self.digest, registry=self.registry)
        result.verified = [self.url] if result.details.get("digest") else []
        return result

    def promote(self, result: DestinationResult) -> None:
        """Nothing to do: a registry has no private step."""
        result.promoted = True
