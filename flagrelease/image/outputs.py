"""What the image stage hands downstream."""

from __future__ import annotations

from flagrelease.pipeline import StageOutputs

__all__ = ["ImageOutputs"]


class ImageOutputs(StageOutputs):
    """The release's image and its build context.

    Attributes:
        image_ref: the image reference (``registry/name:tag``).
        digest: the pushed manifest digest (``sha256:...``), None when not pushed.
        pushed_ref: the image by digest (``registry/name@sha256:...``), None when not pushed.
        context_dir: the rendered build context (in the work folder).
        dockerfile: the rendered Dockerfile.
        bundle_context: the bundle-relative folder holding the whole build context
            (``image``: the Dockerfile and every file it copies), None when not rendered.
        built: whether a Docker engine built it.
        pushed: whether it was pushed to the registry.
        engine: the Docker engine's version, None without an engine.
        image_id: the local image id, None when not built.
        base_image: the base image the Dockerfile starts FROM.
        labels: the image's OCI labels.
        warning: why the image was not built although the config asked for it (no usable
            engine, registry or base image); the card shows it as a banner.  None when built.
    """

    image_ref: str
    digest: str | None = None
    pushed_ref: str | None = None
    context_dir: str | None = None
    dockerfile: str | None = None
    bundle_context: str | None = None
    built: bool = False
    pushed: bool = False
    engine: str | None = None
    image_id: str | None = None
    base_image: str | None = None
    labels: dict[str, str] = {}
    warning: str | None = None
