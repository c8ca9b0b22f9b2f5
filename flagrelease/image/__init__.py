"""The image stage: the vendor Dockerfile rendered from templates, built with a real Docker engine, pushed, and its digest recorded."""

from __future__ import annotations

from flagrelease.image._build import (
    DEFAULT_DOCKER_HOST,
    ImageBuildResult,
    build_image,
    connect_engine,
    engine_version,
    run_stage,
)
from flagrelease.image._dockerfile import (
    DEFAULT_FLAG_GEMS_VERSION,
    ImagePlan,
    base_image,
    image_labels,
    image_plan,
    render_dockerfile,
    render_image_context,
    render_release,
    source_commit,
)

__all__ = [
    "DEFAULT_DOCKER_HOST",
    "DEFAULT_FLAG_GEMS_VERSION",
    "ImageBuildResult",
    "ImagePlan",
    "base_image",
    "build_image",
    "connect_engine",
    "engine_version",
    "image_labels",
    "image_plan",
    "render_dockerfile",
    "render_image_context",
    "render_release",
    "run_stage",
    "source_commit",
]
