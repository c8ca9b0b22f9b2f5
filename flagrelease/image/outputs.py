"""What the image stage hands downstream."""

from __future__ import annotations

from flagrelease.pipeline import StageOutputs

__all__ = ["ImageOutputs"]


class ImageOutputs(StageOutputs):
    """The release's image and its build context.

    Attributes:
        image_ref: the image reference (``registry/name:tag``).
        digest: the pushed manifest digest (``sha256:...``), None when not pushed.
        context_dir: the rendered build context.
        dockerfile: the rendered Dockerfile.
        built: whether a Docker engine built it.
        pushed: whether it was pushed to the registry.
        engine: the Docker engine's version, None without an engine.
        image_id: the local image id, None when not built.
        base_image: the chip profile's base image.
        labels: the image's OCI labels.
    """

    image_ref: str
    digest: str | None = None
    context_dir: str | None = None
    dockerfile: str | None = None
    built: bool = False
    pushed: bool = False
    engine: str | None = None
    image_id: str | None = None
    base_image: str | None = None
    labels: dict[str, str] = {}
