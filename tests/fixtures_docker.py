"""Session fixtures for Docker: the engine, a loopback registry and a locally made base image.

- ``docker_engine``: a running dockerd.  The one already running is used; otherwise the
  fixture starts ``dockerd`` (as root), waits for its socket, and stops it at the end of
  the session, but only when it started it.
- ``docker_registry``: Debian's ``docker-registry`` on 127.0.0.1 and a free port, storing
  into a temporary folder.  Docker treats 127.0.0.0/8 as an insecure (plain HTTP) registry
  by default, so pushes need no TLS.
- ``docker_base_image``: a small base image with a working Python and pip, made without
  any outside registry: the interpreter running the tests, its standard library, pip and
  the shared libraries they load are packed into a tarball and ``docker import``-ed.
  It is tagged by content, so later sessions on the same machine reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
from docker.errors import DockerException, ImageNotFound

from tests.fixtures_prefect import free_port

__all__ = [
    "DockerEngine",
    "LocalRegistry",
    "docker_base_image",
    "docker_engine",
    "docker_registry",
    "free_port",
]

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    )
)


def _ping(base_url: str) -> bool:
    try:
        client = docker.DockerClient(base_url=base_url, timeout=10)
    except DockerException:
        return False
    try:
        return bool(client.ping())
    except DockerException:
        return False
    finally:
        client.close()


@dataclass
class DockerEngine:
    """A reachable Docker engine.

    Attributes:
        base_url: its address, e.g. ``unix:///var/run/docker.sock``.
        started: whether this session started it.
    """

    base_url: str
    started: bool

    def client(self) -> docker.DockerClient:
        """A new client of the engine (close it when done)."""
        return docker.DockerClient(base_url=self.base_url, timeout=600)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """A running dockerd: the existing one, else one this session starts and stops."""
    base_url = os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
    if _ping(base_url):
        yield DockerEngine(base_url=base_url, started=False)
        return
    if base_url != DEFAULT_SOCKET:
        pytest.fail(f"DOCKER_HOST={base_url} does not answer; unset it or start that engine")
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.fail("dockerd is not installed; run .ci/setup (it installs docker.io)")
    if os.geteuid() != 0:
        pytest.fail("dockerd is not running and only root can start it: run `sudo dockerd &` first")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [dockerd, "--host", DEFAULT_SOCKET], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 90
    while not _ping(DEFAULT_SOCKET):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"dockerd did not start (exit {proc.poll()}):\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    try:
        yield DockerEngine(base_url=DEFAULT_SOCKET, started=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@dataclass
class LocalRegistry:
    """A registry on loopback.

    Attributes:
        host: ``127.0.0.1:PORT``, the prefix of image references pushed here.
        url: its HTTP base URL.
        root: where it stores blobs.
    """

    host: str
    url: str
    root: Path

    def manifest(self, name: str, reference: str) -> tuple[str, dict]:
        """``GET /v2/<name>/manifests/<reference>``: the Docker-Content-Digest header and the manifest."""
        resp = httpx.get(f"{self.url}/v2/{name}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES}, timeout=30)
        resp.raise_for_status()
        return resp.headers["Docker-Content-Digest"], resp.json()


@pytest.fixture(scope="session")
def docker_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """Debian's docker-registry on 127.0.0.1, for the whole session."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry is not installed; run .ci/setup (it installs docker-registry)")
    folder = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log_path = folder / "registry.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/", timeout=2).status_code == 200:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"docker-registry did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)
    try:
        yield LocalRegistry(host=f"127.0.0.1:{port}", url=url, root=folder / "data")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- a Python base image made from this machine's interpreter ------------------------------------
_SKIP_STDLIB = {
    "site-packages",
    "dist-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "__pycache__",
    "EXTERNALLY-MANAGED",
}


def _skipped(rel: Path) -> bool:
    """Build-time files (static libpython) and Tk, which nothing here needs."""
    return rel.parts[0].startswith("config-") or rel.name.startswith("_tkinter")


def _shared_libraries(files: list[Path]) -> set[Path]:
    found: set[Path] = set()
    for path in files:
        proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            parts = line.split()
            if "=>" in parts:
                target = parts[parts.index("=>") + 1]
                if target.startswith("/"):
                    found.add(Path(target))
            elif parts and parts[0].startswith("/"):
                found.add(Path(parts[0]))
    return found


def _python_rootfs() -> tuple[dict[str, Path], dict[str, str], list[str]]:
    """Files (image path -> host path), symlinks and library folders of a minimal Python."""
    exe = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files: dict[str, Path] = {str(exe): exe}
    for path in stdlib.rglob("*"):
        rel = path.relative_to(stdlib)
        if path.is_file() and not _SKIP_STDLIB.intersection(rel.parts) and not _skipped(rel):
            files[str(stdlib / rel)] = path
    import pip

    pip_dir = Path(pip.__file__).resolve().parent
    for path in pip_dir.rglob("*"):
        rel = path.relative_to(pip_dir)
        if path.is_file() and "__pycache__" not in rel.parts:
            files[str(stdlib / "pip" / rel)] = path
    binaries = [exe, *(p for p in (stdlib / "lib-dynload").glob("*.so") if not _skipped(p.relative_to(stdlib)))]
    libs = _shared_libraries(binaries)
    for lib in libs:
        files[str(lib)] = lib.resolve()
    lib_dirs = sorted({str(lib.parent) for lib in libs})
    links = {"/usr/local/bin/python3": str(exe), "/usr/local/bin/python": str(exe)}
    return files, links, lib_dirs


def _rootfs_tarball(files: dict[str, Path], links: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = {"tmp", "root", "home", "etc", "usr/local/bin"}
        for image_path in [*files, *links]:
            parent = Path(image_path.lstrip("/")).parent
            while str(parent) not in ("", "."):
                dirs.add(str(parent))
                parent = parent.parent
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755, 0
            tar.addfile(info)
        for text_path, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            data = text.encode()
            info = tarfile.TarInfo(text_path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for image_path, host_path in sorted(files.items()):
            data = host_path.read_bytes()
            info = tarfile.TarInfo(image_path.lstrip("/"))
            info.size, info.mode = len(data), 0o755 if os.access(host_path, os.X_OK) else 0o644
            tar.addfile(info, io.BytesIO(data))
        for link, target in links.items():
            info = tarfile.TarInfo(link.lstrip("/"))
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="session")
def docker_base_image(docker_engine: DockerEngine) -> str:
    """A local image with Python 3 and pip at ``python3``, made offline; its reference."""
    files, links, lib_dirs = _python_rootfs()
    key = hashlib.sha256()
    for image_path, host_path in sorted(files.items()):
        st = host_path.stat()
        key.update(f"{image_path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    ref = f"flagrelease-test/python-base:{key.hexdigest()[:16]}"
    client = docker_engine.client()
    try:
        try:
            client.images.get(ref)
            return ref
        except ImageNotFound:
            pass
        repo, tag = ref.split(":")
        client.api.import_image_from_data(
            _rootfs_tarball(files, links),
            repository=repo,
            tag=tag,
            changes=[
                "ENV PATH=/usr/local/bin:/usr/bin:/bin",
                f"ENV LD_LIBRARY_PATH={':'.join(lib_dirs)}",
                'CMD ["python3"]',
            ],
        )
        client.images.get(ref)
        return ref
    finally:
        client.close()
