"""The image stage: the vendor Dockerfile rendered from templates, built, pushed, its digest recorded."""

from __future__ import annotations

from flagrelease.image._base import PROJECT_BASES, make_project_base, project_base_kind, python_rootfs
from flagrelease.image._build import (
    DEFAULT_DOCKER_HOST,
    ImageBuildResult,
    build_image,
    connect_engine,
    engine_version,
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
from flagrelease.image._stage import BUNDLE_CONTEXT, image_model_path, run_stage

__all__ = [
    "BUNDLE_CONTEXT",
    "DEFAULT_DOCKER_HOST",
    "DEFAULT_FLAG_GEMS_VERSION",
    "PROJECT_BASES",
    "ImageBuildResult",
    "ImagePlan",
    "base_image",
    "build_image",
    "connect_engine",
    "engine_version",
    "image_labels",
    "image_model_path",
    "image_plan",
    "make_project_base",
    "project_base_kind",
    "python_rootfs",
    "render_dockerfile",
    "render_image_context",
    "render_release",
    "run_stage",
    "source_commit",
]
