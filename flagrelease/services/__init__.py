"""Services flagrelease starts itself when none runs: a Docker engine and a loopback registry.

Shared by the image stage, the demo and the tests' fixtures.  A service started here
runs under a supervisor and a lease: it stops when the last process that uses it exits
(``SIGKILL`` included), and a start after a crash reaps what its pid file still names.
"""

from __future__ import annotations

from flagrelease.services._managed import Lease, ServiceSpec, acquire, reap_stale
from flagrelease.services.docker import (
    DEFAULT_DOCKER_HOST,
    MANIFEST_TYPES,
    DockerEngine,
    LocalRegistry,
    engine_answers,
    ensure_engine,
    ensure_registry,
    is_loopback_registry,
    registry_answers,
    release_held,
)

__all__ = [
    "DEFAULT_DOCKER_HOST",
    "MANIFEST_TYPES",
    "DockerEngine",
    "Lease",
    "LocalRegistry",
    "ServiceSpec",
    "acquire",
    "engine_answers",
    "ensure_engine",
    "ensure_registry",
    "is_loopback_registry",
    "reap_stale",
    "registry_answers",
    "release_held",
]
