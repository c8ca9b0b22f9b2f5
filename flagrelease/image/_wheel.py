"""A wheel of flagrelease itself, for the image's build context.

The image installs flagrelease with ``pip install --no-deps`` from the build context
(the serving plugin is its ``vllm.general_plugins`` entry point).  The wheel is built by
the project's own build backend (hatchling, from ``pyproject.toml``), offline:
``pip wheel --no-deps --no-build-isolation --no-index``.  ``SOURCE_DATE_EPOCH`` is
fixed, so the same sources give the same bytes and Docker's layer cache holds across
renders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import flagrelease
from flagrelease._atomic import atomic_copy
from flagrelease.constants import REPO_ROOT
from flagrelease.errors import ImageError

__all__ = ["build_self_wheel", "wheel_name"]

#: 1980-01-01, the earliest time a zip file can hold.
_SOURCE_DATE_EPOCH = "315532800"


def wheel_name() -> str:
    """File name of the wheel :func:`build_self_wheel` writes."""
    return f"flagrelease-{flagrelease.__version__}-py3-none-any.whl"


def build_self_wheel(out_dir: Path) -> Path:
    """Build ``flagrelease-<version>-py3-none-any.whl`` from the checkout into ``out_dir``.

    Returns:
        The wheel's path.

    Raises:
        ImageError: flagrelease is not a source checkout, or the build backend failed.
    """
    if not (REPO_ROOT / "pyproject.toml").is_file():
        raise ImageError(
            f"{REPO_ROOT} has no pyproject.toml: the image stage builds flagrelease's wheel from a source "
            "checkout; run it from a clone of the flagrelease repository"
        )
    env = {**os.environ, "SOURCE_DATE_EPOCH": _SOURCE_DATE_EPOCH, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    with tempfile.TemporaryDirectory(prefix="flagrelease-wheel-") as tmp:
        argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        proc = subprocess.run(
            [*argv, "-q", "--wheel-dir", tmp, str(REPO_ROOT)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        built = Path(tmp) / wheel_name()
        if proc.returncode != 0 or not built.is_file():
            raise ImageError(
                f"building flagrelease's wheel failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                "The build backend (hatchling) must be installed beside flagrelease: pip install hatchling"
            )
        return atomic_copy(built, Path(out_dir) / wheel_name())
