"""Session fixtures: model hubs on loopback, for the fetch tests.

- ``olah_hub``: a real Hugging Face Hub mirror (``olah``) serving local git repositories
  (``mirrors-path``, offline mode) on 127.0.0.1.  The repositories are built here with git;
  weights are stored the way git-lfs stores them (a pointer file in git, the object under
  ``.git/lfs/objects``), which is what olah reads to publish each file's LFS sha256.
- ``modelscope_hub``: a ModelScope-compatible endpoint (:class:`ModelScopeFake`).

Function-scoped wrappers (``hf_env``, ``ms_env``) point ``HF_ENDPOINT`` /
``MODELSCOPE_ENDPOINT`` at them for one test.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as st_save

__all__ = [
    "HubRepo",
    "ModelScopeFake",
    "OlahHub",
    "hf_env",
    "modelscope_hub",
    "ms_env",
    "olah_hub",
    "tiny_weights",
]

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "flagrelease-tests",
    "GIT_AUTHOR_EMAIL": "tests@flagrelease.invalid",
    "GIT_COMMITTER_NAME": "flagrelease-tests",
    "GIT_COMMITTER_EMAIL": "tests@flagrelease.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def tiny_weights(*, seed: int = 0, big_rows: int = 256) -> dict[str, bytes]:
    """A small sharded safetensors checkpoint with config and index, as file name -> bytes."""
    rng = np.random.default_rng(seed)
    shard1 = {"model.embed_tokens.weight": rng.standard_normal((64, 32), dtype=np.float32)}
    shard2 = {
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((big_rows, 128), dtype=np.float32),
        "lm_head.weight": rng.standard_normal((64, 32), dtype=np.float32),
    }
    files = {
        "config.json": json.dumps({"model_type": "qwen2", "hidden_size": 32, "seed": seed}).encode(),
        "model-00001-of-00002.safetensors": st_save(shard1),
        "model-00002-of-00002.safetensors": st_save(shard2),
        "tokenizer/tokenizer_config.json": b'{"model_max_length": 512}',
        "README.md": b"# tiny test model\n",
    }
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in shard2})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- olah: a real HF mirror --------------------------------------------------------------------
@dataclass
class HubRepo:
    """A repository a test hub serves: its id, pinned revision and files."""

    repo_id: str
    revision: str
    files: dict[str, bytes]

    def sha256(self, name: str) -> str:
        """The sha256 of one of the repo's files."""
        return hashlib.sha256(self.files[name]).hexdigest()


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, **_GIT_ENV}
    out = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip()


def _build_git_repo(
    root: Path,
    repo_id: str,
    files: dict[str, bytes],
    *,
    lfs_suffix: str = ".safetensors",
    served: dict[str, bytes] | None = None,
) -> str:
    """A git repo at ``root/models/<repo_id>`` with LFS-stored weights; returns the commit sha.

    ``served`` replaces the stored LFS object of some files (a damaged hub copy).
    """
    repo = root / "models" / repo_id
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    for name, data in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(lfs_suffix):
            oid = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes((served or {}).get(name, data))
            path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")
        else:
            path.write_bytes(data)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "tiny test model")
    _git(repo, "tag", "v1.0")
    return _git(repo, "rev-parse", "HEAD")


@dataclass
class OlahHub:
    """A running olah mirror and the repositories it serves."""

    endpoint: str
    repos: dict[str, HubRepo]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def log_mark(self) -> int:
        """The current length of olah's access log, to count requests made after it."""
        return self.log_path.stat().st_size

    def downloads(self, repo: HubRepo, name: str, *, since: int = 0, expect: int | None = None) -> int:
        """How many file GETs of ``repo``'s ``name`` olah logged after ``since``.

        With ``expect``, wait up to 2 s for the log to reach that count (it is written by
        another process).
        """
        needle = f'"GET /{repo.repo_id}/resolve/{repo.revision}/{name} HTTP'
        deadline = time.monotonic() + (2 if expect is not None else 0)
        while True:
            with open(self.log_path, "rb") as fh:
                fh.seek(since)
                count = fh.read().decode("utf-8", "replace").count(needle)
            if expect is None or count >= expect or time.monotonic() > deadline:
                return count
            time.sleep(0.05)


def _flip_tail(data: bytes) -> bytes:
    """Same size, one byte changed in the tensor data: passes a size check, fails sha256."""
    buf = bytearray(data)
    buf[-1] ^= 0xFF
    return bytes(buf)


@pytest.fixture(scope="session")
def olah_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OlahHub]:
    """olah serving git repos from ``mirrors-path`` on 127.0.0.1, offline; stopped at session end."""
    base = tmp_path_factory.mktemp("olah")
    mirrors = base / "mirrors"
    repos: dict[str, HubRepo] = {}
    good = tiny_weights(seed=1)
    repos["good"] = HubRepo("flagtest/tiny-hf", _build_git_repo(mirrors, "flagtest/tiny-hf", good), good)
    bad = tiny_weights(seed=2)
    shard = "model-00002-of-00002.safetensors"
    commit = _build_git_repo(mirrors, "flagtest/damaged-hf", bad, served={shard: _flip_tail(bad[shard])})
    repos["damaged"] = HubRepo("flagtest/damaged-hf", commit, bad)

    port = _free_port()
    config = base / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{base / "cache"}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        "[accessibility]\noffline = true\n"
    )
    log_path = base / "olah.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(base / "logs")],
            cwd=base,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    hub = OlahHub(endpoint, repos, log_path, proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"olah exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                r = httpx.get(f"{endpoint}/api/models/flagtest/tiny-hf/revision/main", timeout=2)
                if r.status_code == 200 and r.json().get("sha") == repos["good"].revision:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"olah did not answer in 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield hub
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def hf_env(olah_hub: OlahHub, monkeypatch: pytest.MonkeyPatch) -> OlahHub:
    """Point HF_ENDPOINT at the olah mirror for one test."""
    monkeypatch.setenv("HF_ENDPOINT", olah_hub.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return olah_hub


# -- a ModelScope-compatible endpoint ------------------------------------------------------------
@dataclass
class _Served:
    data: bytes
    corrupt: str = ""  # "" | "always" | "once"
    throttle_s: float = 0.0  # pause after every 256 KiB
    gets: int = 0


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    range: str | None
    sent: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class ModelScopeFake:
    """A ModelScope-compatible HTTP endpoint on 127.0.0.1.

    A FAKE, allowed here because the real ModelScope hub is a boundary no machine of this
    project can reach.  It implements exactly the calls that ``modelscope``'s download
    path makes (read from the installed client): the file listing
    ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=`` (with ``Sha256``
    per file), the file download ``GET /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=``
    (with HTTP range requests, 206 and ``Content-Range``, as the hub's CDN answers), and
    404 JSON for everything else (e.g. the client's ``/api/v1/repos/internalAccelerationInfo``
    probe).  Every request is logged for assertions.  Per file it can serve damaged bytes
    (always, or only the first time) and throttle its transfer.
    """

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], dict[str, _Served]] = {}
        self.requests: list[_Request] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                fake._handle(self)

            def do_HEAD(self) -> None:
                fake._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="modelscope-fake", daemon=True)

    def add_repo(self, repo_id: str, revision: str, files: dict[str, bytes]) -> HubRepo:
        """Serve ``files`` as ``repo_id`` at ``revision``."""
        self.repos[(repo_id, revision)] = {name: _Served(data) for name, data in files.items()}
        return HubRepo(repo_id, revision, dict(files))

    def served(self, repo_id: str, revision: str, name: str) -> _Served:
        """The serving state of one file (to set ``corrupt``/``throttle_s``, read ``gets``)."""
        return self.repos[(repo_id, revision)][name]

    def file_requests(self, name: str) -> list[_Request]:
        """Download requests logged for file ``name``."""
        with self.lock:
            return [r for r in self.requests if r.path.endswith("/repo") and r.query.get("FilePath") == name]

    def clear_log(self) -> None:
        """Forget the logged requests."""
        with self.lock:
            self.requests.clear()

    # -- HTTP ----------------------------------------------------------------------------------
    def _json(self, h: BaseHTTPRequestHandler, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        req = _Request(h.command, url.path, query, h.headers.get("Range"), headers=dict(h.headers.items()))
        with self.lock:
            self.requests.append(req)
        parts = url.path.strip("/").split("/")
        # api/v1/models/{owner}/{name}/repo[/files]
        if len(parts) >= 6 and parts[:3] == ["api", "v1", "models"] and parts[5] == "repo":
            repo_id = f"{parts[3]}/{parts[4]}"
            files = self.repos.get((repo_id, query.get("Revision", "master")))
            if files is None:
                self._json(
                    h, 404, {"Code": 10010205001, "Success": False, "Message": f"repo {repo_id} or revision not found"}
                )
                return
            if len(parts) == 7 and parts[6] == "files":
                self._list(h, files, query.get("Revision", "master"))
                return
            if len(parts) == 6:
                self._download(h, req, files, query.get("FilePath", ""))
                return
        self._json(h, 404, {"Code": 404, "Success": False, "Message": "not found"})

    def _list(self, h: BaseHTTPRequestHandler, files: dict[str, _Served], revision: str) -> None:
        entries = [
            {
                "Name": name.rsplit("/", 1)[-1],
                "Path": name,
                "Type": "blob",
                "Size": len(s.data),
                "Sha256": hashlib.sha256(s.data).hexdigest(),
                "Revision": revision,
                "IsLFS": name.endswith(".safetensors"),
                "CommittedDate": 1700000000,
            }
            for name, s in files.items()
        ]
        self._json(h, 200, {"Code": 200, "Success": True, "Message": "success", "Data": {"Files": entries}})

    def _download(self, h: BaseHTTPRequestHandler, req: _Request, files: dict[str, _Served], name: str) -> None:
        served = files.get(name)
        if served is None:
            self._json(h, 404, {"Code": 404, "Success": False, "Message": f"file {name} not found"})
            return
        with self.lock:
            served.gets += 1
            damaged = served.corrupt == "always" or (served.corrupt == "once" and served.gets == 1)
        data = _flip_tail(served.data) if damaged else served.data
        start = 0
        status = 200
        if req.range and req.range.startswith("bytes="):
            first, _, last = req.range[6:].partition("-")
            start = int(first)
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            data_range = data[start:end]
            status = 206
        else:
            data_range = data
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data_range)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{start + len(data_range) - 1}/{len(data)}")
        h.end_headers()
        if h.command == "HEAD":
            return
        step = 256 << 10
        try:
            for i in range(0, len(data_range), step):
                h.wfile.write(data_range[i : i + step])
                h.wfile.flush()
                req.sent += len(data_range[i : i + step])
                if served.throttle_s:
                    time.sleep(served.throttle_s)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True


@pytest.fixture(scope="session")
def modelscope_hub() -> Iterator[ModelScopeFake]:
    """The ModelScope-compatible endpoint, with the test repositories; stopped at session end."""
    fake = ModelScopeFake()
    fake.add_repo("flagtest/tiny-ms", "v1.0", tiny_weights(seed=3))
    evil = {"config.json": b"{}", "../escape.txt": b"outside"}
    fake.add_repo("flagtest/evil-ms", "v1.0", evil)
    fake.add_repo("flagtest/damaged-ms", "v1.0", tiny_weights(seed=4))
    fake.served("flagtest/damaged-ms", "v1.0", "model-00002-of-00002.safetensors").corrupt = "always"
    fake.add_repo("flagtest/flaky-ms", "v1.0", tiny_weights(seed=5))
    fake.served("flagtest/flaky-ms", "v1.0", "model-00002-of-00002.safetensors").corrupt = "once"
    # ~4 MiB, sent in 256 KiB pieces 150 ms apart (~2.4 s): long enough to interrupt.
    slow = tiny_weights(seed=6, big_rows=8192)
    fake.add_repo("flagtest/slow-ms", "v1.0", slow)
    fake.served("flagtest/slow-ms", "v1.0", "model-00002-of-00002.safetensors").throttle_s = 0.15
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


@pytest.fixture
def ms_env(modelscope_hub: ModelScopeFake, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModelScopeFake:
    """Point MODELSCOPE_ENDPOINT at the fake for one test; keep the client's state in tmp_path."""
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", modelscope_hub.endpoint)
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "modelscope-home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope-cache"))
    modelscope_hub.clear_log()
    return modelscope_hub
