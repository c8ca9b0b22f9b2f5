"""The card replay test: the demo's published bundle, followed as a stranger would follow it.

The published bundle is copied to a fresh folder (as a download would give it).  The
shell blocks of its card's "Getting Started" are taken verbatim; the only change made to
them is the substitution of the placeholders the card itself documents (a local publish
folder means nothing to anyone but the machine that made the release).  They then run,
in order, in one ``bash -euo pipefail`` in an empty folder: copy the bundle with its
weights, pull the image by digest from the loopback registry, start the server in a
container on the CPU exactly as written, and send the card's request.  The answer must be
the sum the TinyArith question asks for.  Any block that fails fails the test.

A second test scans every text file of the published bundle (card, manifest, serve
configs, logs, evaluation results) for the build machine's folders and host name.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from flagrelease._oci import parse_reference
from flagrelease.constants import REPO_ROOT
from flagrelease.services import LocalRegistry
from tests.fixtures_demo import DemoRun

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.vllm]

#: How long the card's steps may take together (the server starts on two CPU cores).
REPLAY_TIMEOUT_S = 1200


def _section(card: str, heading: str) -> str:
    """From ``heading`` to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = card.index(heading + "\n")
    rest = card[start + len(heading) + 1 :]
    m = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return card[start : start + len(heading) + 1 + (m.start() if m else len(rest))]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)\n```$", text, re.S | re.M)


def _documented_placeholders(text: str) -> set[str]:
    return set(re.findall(r"^- `(<[A-Z_]+>)`: ", text, re.M))


def _container_name(blocks: list[str]) -> str | None:
    for block in blocks:
        words = shlex.split(block.replace("\\\n", " "), comments=True)
        if words[:2] == ["docker", "run"] and "--name" in words:
            return words[words.index("--name") + 1]
    return None


def _docker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def test_the_published_card_runs_as_written(
    demo_run: DemoRun, demo_registry: LocalRegistry, docker_engine: Any, tmp_path: Path
) -> None:
    published = demo_run.root / "publish"
    card = (published / "README.md").read_text()
    manifest = json.loads((published / "flagrelease.json").read_text())
    steps = _section(card, "## 📌 Getting Started")
    blocks = _bash_blocks(steps)
    assert len(blocks) >= 4, f"Getting Started has {len(blocks)} shell block(s):\n{steps}"

    # The bundle as a download gives it, in a place of its own.
    download = tmp_path / "download"
    shutil.copytree(published, download)
    user = tmp_path / "user"
    user.mkdir()

    # Only documented placeholders are substituted, and every placeholder used is documented.
    documented = _documented_placeholders(steps)
    used = set(re.findall(r"<[A-Z_]+>", "\n".join(blocks)))
    assert used <= documented, f"undocumented placeholders in the card's steps: {sorted(used - documented)}"
    values = {"<PUBLISHED_DIR>": str(download)}
    assert used <= set(values), f"the test does not know how to fill {sorted(used - set(values))}"
    script = ["set -euo pipefail"]
    for i, block in enumerate(blocks, 1):
        for token in used:
            block = block.replace(token, shlex.quote(values[token]))
        script += [f"echo '>>> step {i}' >&2", block]

    # The image lies in the loopback registry the card names (held for the session by ``demo_registry``).
    pull = manifest["image"]["digest"] and parse_reference(str(manifest["image"]["ref"]))
    assert pull and pull.registry == demo_registry.host, f"the demo pushed no image there: {manifest['image']}"

    # The user's environment: a Docker engine to talk to (the session's), nothing of flagrelease's.
    env = {**os.environ, "HOME": str(tmp_path / "home"), "DOCKER_HOST": docker_engine.base_url}
    name = _container_name(blocks)
    if name:
        _docker(env, "rm", "--force", name)
    try:
        proc = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=user,
            env=env,
            capture_output=True,
            text=True,
            timeout=REPLAY_TIMEOUT_S,
            check=False,
        )
        logs = ""
        if name and proc.returncode:
            state = _docker(env, "inspect", "--format", "{{.State.Status}} exit={{.State.ExitCode}}", name)
            tail = _docker(env, "logs", "--tail", "60", name)
            logs = f"container {name}: {state.stdout.strip()}\n{tail.stdout[-3000:]}{tail.stderr[-5000:]}"
    finally:
        if name:
            _docker(env, "rm", "--force", name)
    assert proc.returncode == 0, (
        f"a step of the card failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}\n{logs}"
    )

    # The last step printed the server's answer to a TinyArith question.
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    request = json.loads(shlex.split(blocks[-1].replace("\\\n", " "))[-1])
    question = request["messages"][-1]["content"] if "messages" in request else request["prompt"]
    m = re.search(r"What is (-?\d+)\s*\+\s*(-?\d+)\?", question)
    assert m is not None, f"the card's request is not a TinyArith question: {question!r}"
    choice = answer["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    assert re.findall(r"-?\d+", text)[:1] == [str(int(m.group(1)) + int(m.group(2)))], (question, text)
    assert f"answered `{text.strip()}`" in card  # what the card says the model answers


def _text_files(folder: Path) -> list[Path]:
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if b"\0" not in data[: 1 << 16]:
            out.append(path)
    return out


def test_the_published_bundle_names_no_path_of_the_build_machine(
    demo_run: DemoRun, tmp_path_factory: pytest.TempPathFactory
) -> None:
    published = demo_run.root / "publish"
    roots = {
        "the demo's folder (work dir, config, source model, publish folder)": demo_run.root,
        "the test session's temporary folder (caches, Prefect home)": tmp_path_factory.getbasetemp(),
        "the home folder": Path.home(),
        "the checkout": REPO_ROOT,
    }
    needles = {what: {str(p), str(p.resolve())} for what, p in roots.items()}
    host = socket.gethostname()
    files = _text_files(published)
    assert (published / "flagrelease.json") in files and (published / "README.md") in files
    assert any(f.suffix == ".log" for f in files), "the bundle's logs are not published"
    found = []
    for path in files:
        text = path.read_text(errors="replace")
        for what, spellings in needles.items():
            for s in spellings:
                if re.search(re.escape(s) + r"(?![\w-])", text):
                    found.append(f"{path.relative_to(published)}: {what} ({s})")
        if re.search(rf"(?<![\w.-]){re.escape(host)}(?![\w.-])", text):
            found.append(f"{path.relative_to(published)}: the host name ({host})")
    assert not found, "build-machine paths in the published bundle:\n" + "\n".join(found[:40])
