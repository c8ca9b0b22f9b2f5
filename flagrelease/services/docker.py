"""A Docker engine and a loopback registry, started by flagrelease when none is running.

- :func:`ensure_engine`: ``$DOCKER_HOST`` when it is set (and only it); else the system
  engine at ``/var/run/docker.sock``; else, as root, flagrelease's own ``dockerd`` with
  its own data root and a private socket below :func:`flagrelease.constants.services_dir`
  (it also listens on the free system socket, so that plain ``docker`` commands reach it).
- :func:`ensure_registry`: a registry at a loopback ``host:port``; when none answers
  there, Debian's ``docker-registry`` (installed by ``.ci/setup``) started on that
  address, storing below the services folder.  Docker treats 127.0.0.0/8 as an insecure
  (plain HTTP) registry by default, so pushes need no TLS.

Services started here run under a lease (:mod:`flagrelease.services._managed`): they
stop when the last process using them exits, and a start after a crash reaps what was
left.  ``hold=True`` keeps the lease for the rest of this process.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_write_text
from flagrelease.constants import docker_host, services_dir
from flagrelease.errors import ServiceError
from flagrelease.services._managed import Lease, ServiceSpec, acquire, running, short_path

__all__ = [
    "DEFAULT_DOCKER_HOST",
    "MANIFEST_TYPES",
    "DockerEngine",
    "LocalRegistry",
    "engine_answers",
    "ensure_engine",
    "ensure_registry",
    "is_loopback_registry",
    "registry_answers",
    "release_held",
]

#: The system engine's socket.
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
#: What a registry client accepts when it asks for a manifest.
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    )
)
_HELD: dict[str, Any] = {}


def engine_answers(base_url: str) -> bool:
    """Whether a Docker engine answers a ping at ``base_url``."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.DockerClient(base_url=base_url, timeout=10)
    except DockerException:
        return False
    try:
        return bool(client.ping())
    except (DockerException, OSError):
        return False
    finally:
        client.close()


@dataclass
class DockerEngine:
    """A Docker engine that answered.

    Attributes:
        base_url: its address (``unix:///...``).
        managed: whether flagrelease runs it (its own dockerd), rather than the system.
        lease: the hold that keeps a managed engine running, None for the system's.
    """

    base_url: str
    managed: bool = False
    lease: Lease | None = field(default=None, repr=False)

    def client(self, *, timeout: int = 600) -> Any:
        """A new ``docker.DockerClient`` of the engine (close it when done)."""
        import docker

        return docker.DockerClient(base_url=self.base_url, timeout=timeout)

    def env(self) -> dict[str, str]:
        """What a ``docker`` CLI run needs in its environment to reach this engine."""
        return {"DOCKER_HOST": self.base_url}

    def close(self) -> None:
        """Give the lease back (a managed engine stops when no process holds one)."""
        if self.lease is not None:
            self.lease.close()


def _engine_spec() -> tuple[ServiceSpec, str]:
    folder = services_dir() / "docker"
    sock = short_path(folder / "docker.sock")
    exec_root = short_path(folder / "run", room=len("/containerd/containerd.sock"))
    dockerd = shutil.which("dockerd") or "dockerd"
    url = f"unix://{sock}"
    argv = [
        dockerd,
        "--host",
        url,
        # No engine answers on the system socket (else none would be started): listen there too, so
        # that a plain `docker` command (the card's `docker pull`, say) reaches this engine as well.
        "--host",
        DEFAULT_DOCKER_HOST,
        "--data-root",
        str(folder / "data"),
        "--exec-root",
        str(exec_root),
        "--pidfile",
        str(folder / "dockerd.pid"),
    ]
    spec = ServiceSpec(
        name="dockerd", argv=argv, folder=folder, ready=lambda: engine_answers(url), start_timeout_s=120.0
    )
    return spec, url


def ensure_engine(*, base_url: str | None = None, hold: bool = False) -> DockerEngine:
    """A Docker engine that answers, started by flagrelease when none runs.

    Args:
        base_url: use this engine and no other (default: ``$DOCKER_HOST`` when set).
        hold: keep the lease until this process exits, and reuse the held engine on later calls.

    Returns:
        The engine; ``managed`` says whether flagrelease runs it.

    Raises:
        ServiceError: the named engine does not answer, or none answers and flagrelease
            cannot start one (not root, dockerd missing, dockerd failed); the message says
            what to do.
    """
    held = _HELD.get("engine")
    alive = isinstance(held, DockerEngine) and not (held.lease and held.lease.closed)
    if hold and alive and isinstance(held, DockerEngine) and engine_answers(held.base_url):
        return held
    explicit = base_url or docker_host()
    if explicit:
        if engine_answers(explicit):
            return DockerEngine(explicit)
        raise ServiceError(
            f"no Docker engine answers at {explicit} (DOCKER_HOST). Start that engine, or unset DOCKER_HOST so "
            "that flagrelease uses the system engine or, as root, starts its own dockerd"
        )
    spec, url = _engine_spec()
    lease = running(spec)  # flagrelease's own, started by another process: hold it too
    if lease is not None:
        engine = DockerEngine(url, managed=True, lease=lease)
    elif engine_answers(DEFAULT_DOCKER_HOST):
        engine = DockerEngine(DEFAULT_DOCKER_HOST)
    else:
        if os.geteuid() != 0:
            raise ServiceError(
                f"no Docker engine answers at {DEFAULT_DOCKER_HOST}, and only root may start one: start Docker "
                "(sudo systemctl start docker, or sudo dockerd &), run as root so that flagrelease starts its own, "
                "or point DOCKER_HOST at a running engine"
            )
        if shutil.which("dockerd") is None:
            raise ServiceError(
                "no Docker engine answers and dockerd is not installed; install it (as root: bash .ci/setup, which "
                "runs apt-get install docker.io), or point DOCKER_HOST at a running engine"
            )
        engine = DockerEngine(url, managed=True, lease=acquire(spec))
    if hold:
        _HELD["engine"] = engine
    return engine


def is_loopback_registry(registry: str) -> bool:
    """Whether ``registry`` (``host:port[/namespace]``) is on this machine's loopback, with a port."""
    host, _, port = registry.split("/", 1)[0].rpartition(":")
    if not port.isdigit():
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def registry_answers(url: str) -> bool:
    """Whether a registry (the v2 API) answers at ``url``."""
    import httpx

    try:
        return httpx.get(f"{url}/v2/", timeout=3).status_code in (200, 401)
    except httpx.HTTPError:
        return False


@dataclass
class LocalRegistry:
    """A registry on loopback.

    Attributes:
        host: ``127.0.0.1:PORT``, the prefix of image references pushed here.
        url: its HTTP base URL.
        root: where it stores blobs, when flagrelease runs it.
        managed: whether flagrelease runs it.
        lease: the hold that keeps a managed registry running.
    """

    host: str
    url: str
    root: Path | None = None
    managed: bool = False
    lease: Lease | None = field(default=None, repr=False)

    def manifest(self, name: str, reference: str) -> tuple[str, dict[str, Any]]:
        """``GET /v2/<name>/manifests/<reference>``: the Docker-Content-Digest header and the manifest."""
        import httpx

        resp = httpx.get(f"{self.url}/v2/{name}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES}, timeout=30)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return resp.headers["Docker-Content-Digest"], data

    def close(self) -> None:
        """Give the lease back (a managed registry stops when no process holds one)."""
        if self.lease is not None:
            self.lease.close()


def _registry_spec(host: str, port: int, root: Path | None) -> ServiceSpec:
    binary = shutil.which("docker-registry")
    if binary is None:
        raise ServiceError(
            f"no registry answers at {host}:{port} and docker-registry is not installed; install it (as root: "
            "bash .ci/setup, which runs apt-get install docker-registry) or start a registry there"
        )
    folder = services_dir() / f"registry-{port}"
    data = Path(root) if root is not None else folder / "data"
    config = folder / "config.yml"
    atomic_write_text(
        config,
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {host}:{port}\n",
    )
    url = f"http://{host}:{port}"
    return ServiceSpec(
        name=f"registry {host}:{port}",
        argv=[binary, "serve", str(config)],
        folder=folder,
        ready=lambda: registry_answers(url),
        start_timeout_s=60.0,
        grace_s=10.0,
    )


def ensure_registry(address: str = "127.0.0.1:5000", *, root: Path | None = None, hold: bool = False) -> LocalRegistry:
    """A registry at the loopback ``address``, started by flagrelease when none answers there.

    Args:
        address: ``host:port`` on loopback (``127.0.0.1``, ``localhost`` or ``[::1]``).
        root: where a registry started here stores blobs (default: below the services folder).
        hold: keep the lease until this process exits, and reuse the held registry on later calls.

    Raises:
        ServiceError: ``address`` is not on loopback, docker-registry is missing, or it did
            not start (the port is taken by something else, say).
    """
    address = address.split("/", 1)[0]
    if not is_loopback_registry(address):
        raise ServiceError(f"flagrelease starts registries only on loopback with a port, not at {address!r}")
    key = f"registry:{address}"
    held = _HELD.get(key)
    alive = isinstance(held, LocalRegistry) and not (held.lease and held.lease.closed)
    if hold and alive and isinstance(held, LocalRegistry) and registry_answers(held.url):
        return held
    host, _, port_s = address.rpartition(":")
    bind = "127.0.0.1" if host == "localhost" else host.strip("[]")
    url_host = f"[{bind}]" if ":" in bind else bind
    spec = _registry_spec(url_host, int(port_s), root)
    url = f"http://{url_host}:{port_s}"
    if registry_answers(url) and not spec.lease_socket.exists():
        registry = LocalRegistry(host=address, url=url)
    else:
        registry = LocalRegistry(
            host=address, url=url, root=Path(root) if root else spec.folder / "data", managed=True, lease=acquire(spec)
        )
    if hold:
        _HELD[key] = registry
    return registry


def release_held() -> None:
    """Give back every lease this process holds with ``hold=True`` (the rest stop at exit)."""
    for key in list(_HELD):
        with contextlib.suppress(Exception):
            _HELD.pop(key).close()
