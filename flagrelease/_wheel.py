"""A pure-Python wheel of flagrelease itself, for the image's build context.

The image installs flagrelease with ``pip install --no-deps`` from the build context
(the serving plugin is its ``vllm.general_plugins`` entry point).  Building that wheel
with a build backend would need the network or a backend in the orchestrator's venv, so
it is written here directly: the package's files, ``METADATA``, ``WHEEL``,
``entry_points.txt`` (taken from the installed distribution, i.e. pyproject.toml) and
``RECORD``.  Timestamps are fixed, so the same sources give the same bytes and Docker's
layer cache holds across renders.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from importlib import metadata
from pathlib import Path

import flagrelease
from flagrelease._atomic import atomic_write_bytes

__all__ = ["build_self_wheel", "wheel_name"]

_EPOCH = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__", "_data"}
_FALLBACK_ENTRY_POINTS = (
    "[console_scripts]\nflagrelease = flagrelease.cli:main\n\n"
    "[vllm.general_plugins]\nflagrelease_gems = flagrelease.vllm_plugin:register\n"
)


def _dist() -> metadata.Distribution | None:
    try:
        return metadata.distribution("flagrelease")
    except metadata.PackageNotFoundError:
        return None


def _version() -> str:
    return flagrelease.__version__


def wheel_name() -> str:
    """File name of the wheel :func:`build_self_wheel` writes."""
    return f"flagrelease-{_version()}-py3-none-any.whl"


def _entry_points() -> str:
    dist = _dist()
    text = dist.read_text("entry_points.txt") if dist is not None else None
    return text if text and "vllm.general_plugins" in text else _FALLBACK_ENTRY_POINTS


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _package_files() -> list[tuple[str, bytes]]:
    root = Path(flagrelease.__file__).resolve().parent
    files: list[tuple[str, bytes]] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or _SKIP_DIRS.intersection(rel.parts) or path.suffix in (".pyc", ".pyo"):
            continue
        files.append((f"flagrelease/{rel.as_posix()}", path.read_bytes()))
    return files


def build_self_wheel(out_dir: Path) -> Path:
    """Write ``flagrelease-<version>-py3-none-any.whl`` into ``out_dir``.

    Returns:
        The wheel's path.
    """
    version = _version()
    info = f"flagrelease-{version}.dist-info"
    entries = _package_files()
    entries.append(
        (
            f"{info}/METADATA",
            (
                "Metadata-Version: 2.1\nName: flagrelease\n"
                f"Version: {version}\nSummary: flagrelease serving plugin and library (installed with --no-deps)\n"
            ).encode(),
        )
    )
    entries.append(
        (
            f"{info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: flagrelease\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
    )
    entries.append((f"{info}/entry_points.txt", _entry_points().encode()))
    record = [_record_line(n, d) for n, d in entries] + [f"{info}/RECORD,,"]
    entries.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zi = zipfile.ZipInfo(name, date_time=_EPOCH)
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o644 << 16
            zf.writestr(zi, data)
    return atomic_write_bytes(Path(out_dir) / wheel_name(), buf.getvalue())
