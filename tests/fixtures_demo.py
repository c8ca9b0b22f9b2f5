"""Session fixture: the demo release, run once for real through a real Prefect server.

The demo config is copied into a temporary folder with absolute paths and a free port,
so the run never touches the checkout's build/ folder and never collides with a server
someone else left on the default port.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from flagrelease.constants import REPO_ROOT
from flagrelease.pipeline import STAGES
from flagrelease.services import LocalRegistry, ensure_registry
from tests.fixtures_prefect import PrefectServer, free_port

__all__ = ["DemoRun", "demo_registry", "demo_run", "write_demo_config"]

DEMO = REPO_ROOT / "release_configs" / "demo-tiny-cpu.yaml"
FLAGRELEASE = str(Path(sys.executable).parent / "flagrelease")


def write_demo_config(folder: Path, root: Path, *, name: str = "demo-tiny-cpu", **overrides: object) -> Path:
    """Write the demo config into ``folder`` with every path below ``root``."""
    data = yaml.safe_load(DEMO.read_text())
    data["model"]["path"] = str(root / "tiny-qwen2")
    data["work_dir"] = str(root / "work")
    data["publish"]["local_dir"] = str(root / "publish")
    data["serve"]["engine_args"]["port"] = free_port()
    include = data.get("eval", {}).get("include_path")
    if include and not Path(include).is_absolute():
        data["eval"]["include_path"] = str((DEMO.parent / include).resolve())
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class DemoRun:
    """The finished demo release."""

    config: Path
    root: Path
    output: str
    #: Each stage's summary as the run left it (later tests may run stages of it again).
    summaries: dict[str, str] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.root / "work"

    def state(self, stage: str) -> dict:
        return json.loads((self.work / "state" / f"{stage}.json").read_text())


@pytest.fixture(scope="session")
def demo_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """The loopback registry the demo pushes its image to, held for the whole session.

    A registry the demo's run started itself would stop when the run ends; the card
    replay test (tests/test_bundle_replay.py) pulls the image from it afterwards.
    """
    address = str(yaml.safe_load(DEMO.read_text())["image"]["registry"])
    registry = ensure_registry(address, root=tmp_path_factory.mktemp("demo-registry"))
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture(scope="session")
def demo_run(
    tmp_path_factory: pytest.TempPathFactory, prefect_server: PrefectServer, demo_registry: LocalRegistry
) -> Iterator[DemoRun]:
    """Run ``flagrelease run`` on the demo config against the session's Prefect server."""
    root = tmp_path_factory.mktemp("demo-release")
    config = write_demo_config(root / "configs", root)
    proc = subprocess.run(
        [FLAGRELEASE, "run", str(config)],
        env=prefect_server.env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    output = proc.stdout + proc.stderr
    (root / "run.log").write_text(output)
    assert proc.returncode == 0, f"demo release failed:\n{output[-6000:]}"
    run = DemoRun(config=config, root=root, output=output)
    run.summaries = {stage: run.state(stage)["summary"] for stage in STAGES}
    yield run
