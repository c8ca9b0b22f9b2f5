"""Session fixtures for Docker: the engine, a loopback registry and a locally made base image.

All three come from the library, exactly as the image stage and the demo get them:

- ``docker_engine``: :func:`flagrelease.services.ensure_engine` -- ``$DOCKER_HOST`` when
  set, else the system engine, else (as root) flagrelease's own dockerd, which stops when
  the session (and every other process holding a lease on it) ends.
- ``docker_registry``: :func:`flagrelease.services.ensure_registry` on 127.0.0.1 and a
  free port, storing into a temporary folder.
- ``docker_base_image``: :func:`flagrelease.image.make_project_base` -- Python and pip
  from this machine, ``docker import``-ed without any outside registry, tagged
  ``flagrelease/python-base:<X.Y>`` and reused while its content key matches.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from flagrelease._oci import parse_reference
from flagrelease.errors import ServiceError
from flagrelease.image import make_project_base
from flagrelease.services import DockerEngine, LocalRegistry, ensure_engine, ensure_registry
from tests.fixtures_prefect import free_port

__all__ = [
    "DockerEngine",
    "LocalRegistry",
    "docker_base_image",
    "docker_engine",
    "docker_registry",
    "free_port",
]


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A running Docker engine for the session (flagrelease's own dockerd when none runs)."""
    try:
        engine = ensure_engine()
    except ServiceError as err:
        pytest.fail(f"no Docker engine: {err.message}")
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def docker_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A registry on 127.0.0.1 and a free port, for the whole session."""
    root = tmp_path_factory.mktemp("registry")
    try:
        registry = ensure_registry(f"127.0.0.1:{free_port()}", root=root / "data")
    except ServiceError as err:
        pytest.fail(f"no registry: {err.message}")
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture(scope="session")
def docker_base_image(docker_engine: DockerEngine) -> str:
    """A local image with Python 3 and pip at ``python3``, made offline; its reference."""
    ref = f"flagrelease/python-base:{sys.version_info.major}.{sys.version_info.minor}"
    client = docker_engine.client()
    try:
        make_project_base(client, parse_reference(ref), push=False)
    finally:
        client.close()
    return ref
