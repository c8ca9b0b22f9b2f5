"""Loopback fakes of the Hugging Face Hub and ModelScope upload APIs, for the publish tests.

These are fakes -- allowed here because they stand for a boundary no machine here can
reach: the public Hugging Face Hub and ModelScope are outside the network, and neither
ships a server one could run locally.  Each fake implements only the few endpoints the
real clients (``huggingface_hub`` and ``modelscope``'s ``HubApi``) call to create a repo,
read its info and visibility, list its files, pre-upload, send LFS objects, commit,
change visibility (HF) and download a file -- with the same request and response shapes,
bearer-token checks and content checks (an LFS object whose bytes do not hash to its oid
is refused) -- and keeps what it receives, so tests can download it back and compare
checksums.  Like the real hubs, a public repo can be read without a token and a private
one cannot.  Hugging Face's Xet storage is not faked: tests turn it off, so
``huggingface_hub`` uses the LFS batch API, which the Hub also serves.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import yaml

__all__ = ["FakeHF", "FakeModelScope", "StoredFile", "running"]


@dataclass
class StoredFile:
    """A file as a fake hub keeps it."""

    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def blob_id(self) -> str:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(f"blob {len(self.content)}\0".encode())
        h.update(self.content)
        return h.hexdigest()


@dataclass
class _Repo:
    private: bool
    files: dict[str, StoredFile] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    visibility_changes: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _FakeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return None

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: Any = None, headers: dict[str, str] | None = None, *, head: bool = False
    ) -> None:
        data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        self.send_response(status)
        if not (headers or {}).get("Content-Type"):
            kind = "application/octet-stream" if isinstance(body, bytes) else "application/json"
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        body = self._body() if method in ("POST", "PUT") else b""
        with self.server.lock:
            self.server.requests.append((method, url.path))
        token = self.server.token
        auth = self.headers.get("Authorization", "")
        cookie = self.headers.get("Cookie", "")
        presigned = parse_qs(url.query).get("sig") == [self.server.signature]  # like an S3 pre-signed URL
        authorized = token is None or presigned or auth == f"Bearer {token}" or f"m_session_id={token}" in cookie
        anonymous_read = method in ("GET", "HEAD") and self.server.public_read(url.path)
        if not authorized and not anonymous_read:
            self._send(401, {"error": "Invalid credentials", "Code": 401, "Message": "Unauthorized"})
            return
        status, payload, headers = self.server.route(method, url.path, parse_qs(url.query), body, self.headers)
        self._send(status, payload, headers, head=method == "HEAD")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_HEAD(self) -> None:
        self._handle("HEAD")


class _FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token: str | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.lock = threading.Lock()
        self.repos: dict[str, _Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.blob_uploads = 0
        self.signature = uuid.uuid4().hex
        #: Paths whose committed content the fake corrupts (a storage fault, for verification tests).
        self.tamper: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def route(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, headers: Any
    ) -> tuple[int, Any, dict[str, str] | None]:
        raise NotImplementedError

    def public_read(self, path: str) -> bool:
        """Whether ``path`` reads a public repo (allowed without a token, as on the real hub)."""
        return False

    def _public(self, repo_id: str) -> bool:
        repo = self.repos.get(unquote(repo_id))
        return repo is not None and not repo.private

    def _put_blob(self, oid: str, body: bytes) -> tuple[int, Any, None]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "content does not match its oid"}, None
        with self.lock:
            self.blobs[oid] = body
            self.blob_uploads += 1
        return 200, None, None

    def count(self, method: str, pattern: str) -> int:
        """How many requests matched ``method`` and the regex ``pattern``."""
        return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))


class FakeHF(_FakeServer):
    """A fake of the Hugging Face Hub's repo, tree, preupload, LFS batch and commit APIs."""

    def route(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, headers: Any
    ) -> tuple[int, Any, dict[str, str] | None]:
        if method == "POST" and path == "/api/repos/create":
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            with self.lock:
                if repo_id in self.repos:
                    return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, None
                self.repos[repo_id] = _Repo(private=data.get("visibility") == "private" or bool(data.get("private")))
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, None
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            if m is None:
                return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}, None
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError as err:
                return 400, {"error": f"invalid yaml: {err}"}, None
            if not isinstance(meta, dict):
                return 400, {"error": "metadata must be a mapping"}, None
            return 200, {"errors": [], "warnings": []}, None
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/settings)?", path)
        if m:
            repo = self.repos.get(m.group(1))
            if repo is None:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if m.group(2) and method == "PUT":
                data = json.loads(body)
                visibility = data.get("visibility")
                if visibility not in ("public", "private") and "private" not in data:
                    return 400, {"error": "fake Hub: give visibility"}, None
                with self.lock:
                    repo.private = visibility == "private" if visibility else bool(data["private"])
                    repo.visibility_changes.append("private" if repo.private else "public")
                return 200, {}, None
            if not m.group(2) and method == "GET":
                return 200, self._info(m.group(1), repo), None
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            repo = self.repos.get(m.group(1))
            stored = None if repo is None else repo.files.get(unquote(m.group(3)))
            if stored is None:
                return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
            return 200, stored.content, {"Content-Type": "application/octet-stream"}
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(tree|preupload|commit|revision)/([^/]+)(/.*)?", path)
        if m:
            repo_id, what = m.group(1), m.group(2)
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if what == "tree" and method == "GET":
                return 200, self._tree(repo), None
            if what == "preupload" and method == "POST":
                return 200, self._preupload(repo, json.loads(body)), None
            if what == "commit" and method == "POST":
                return self._commit(repo_id, repo, body)
            if what == "revision" and method == "GET":
                return 200, self._info(repo_id, repo), None
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            data = json.loads(body)
            objects = []
            for obj in data["objects"]:
                entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in self.blobs:
                    entry["actions"] = {
                        "upload": {"href": f"{self.url}/_lfs/{obj['oid']}?sig={self.signature}", "header": {}},
                        "verify": {"href": f"{self.url}/_lfs/{obj['oid']}/verify", "header": {}},
                    }
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}, None
        m = re.fullmatch(r"/_lfs/([0-9a-f]{64})(/verify)?", path)
        if m and method == "PUT" and not m.group(2):
            return self._put_blob(m.group(1), body)
        if m and method == "POST" and m.group(2):
            return (200, {}, None) if m.group(1) in self.blobs else (404, {"error": "object not found"}, None)
        return 404, {"error": f"fake Hub: no route {method} {path}"}, None

    def public_read(self, path: str) -> bool:
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/(tree|revision)/.*)?", path) or re.fullmatch(
            r"/([^/]+/[^/]+)/resolve/.+", path
        )
        return m is not None and self._public(m.group(1))

    @staticmethod
    def _info(repo_id: str, repo: _Repo) -> dict[str, Any]:
        sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": sha,
            "private": repo.private,
            "siblings": [{"rfilename": p} for p in sorted(repo.files)],
        }

    def _tree(self, repo: _Repo) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path, f in sorted(repo.files.items()):
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                folders.add("/".join(parts[:i]))
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(f.content), "oid": f.blob_id}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.content), "pointerSize": 134}
            out.append(entry)
        out += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(folders)]
        return out

    @staticmethod
    def _preupload(repo: _Repo, data: dict[str, Any]) -> dict[str, Any]:
        files = []
        for f in data["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["size"] > 1_000_000 or b"\0" in sample or f["path"].endswith(".safetensors")
            existing = repo.files.get(f["path"])
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.blob_id)
            files.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return {"files": files, "commitOid": repo.commits[-1]["oid"] if repo.commits else None}

    def _commit(self, repo_id: str, repo: _Repo, body: bytes) -> tuple[int, Any, None]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        staged: dict[str, StoredFile] = {}
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                staged[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif item["key"] == "lfsFile":
                blob = self.blobs.get(value["oid"])
                if blob is None:
                    return 422, {"error": f"LFS object {value['oid']} was never uploaded"}, None
                staged[value["path"]] = StoredFile(blob, lfs=True)
            else:
                return 400, {"error": f"fake Hub: unsupported commit operation {item['key']}"}, None
        for path in self.tamper & set(staged):
            staged[path] = StoredFile(staged[path].content + b"\n(corrupted in storage)", lfs=staged[path].lfs)
        oid = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        with self.lock:
            repo.files.update(staged)
            repo.commits.append({"oid": oid, "summary": header["summary"], "paths": sorted(staged)})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}, None

    def files(self, repo_id: str) -> dict[str, StoredFile]:
        """The files the fake holds for ``repo_id``."""
        return dict(self.repos[repo_id].files)

    def commits(self, repo_id: str) -> list[dict[str, Any]]:
        """The commits made to ``repo_id``: oid, summary and paths."""
        return list(self.repos[repo_id].commits)


class FakeModelScope(_FakeServer):
    """A fake of ModelScope's legacy repo, file list, LFS batch and commit APIs (``/api/v1``)."""

    @staticmethod
    def _ok(data: Any) -> dict[str, Any]:
        return {"Code": 200, "Data": data, "Message": "success", "RequestId": uuid.uuid4().hex, "Success": True}

    def route(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, headers: Any
    ) -> tuple[int, Any, dict[str, str] | None]:
        if method == "POST" and path == "/api/v1/models":
            data = json.loads(body)
            repo_id = f"{data['Path']}/{data['Name']}"
            with self.lock:
                if repo_id in self.repos:
                    return 400, {"Code": 400, "Message": f"model {repo_id} already exists", "Success": False}, None
                self.repos[repo_id] = _Repo(private=int(data.get("Visibility", 5)) == 1)
            return 200, self._ok({"Path": data["Path"], "Name": data["Name"]}), None
        m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)", path)
        if m and method == "GET":
            repo = self.repos.get(unquote(m.group(1)))
            if repo is None:
                return 404, {"Code": 10010205001, "Message": "model not found", "Success": False}, None
            owner, name = unquote(m.group(1)).split("/")
            info = {"Path": owner, "Name": name, "Visibility": 1 if repo.private else 5, "Private": repo.private}
            return 200, self._ok(info), None
        m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo", path)
        if m and method in ("GET", "HEAD"):
            repo = self.repos.get(unquote(m.group(1)))
            stored = None if repo is None else repo.files.get(query.get("FilePath", [""])[0])
            if stored is None:
                return 404, {"Code": 404, "Message": "file not found", "Success": False}, None
            return 200, stored.content, {"Content-Type": "application/octet-stream"}
        m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo/files", path)
        if m and method == "GET":
            repo = self.repos.get(unquote(m.group(1)))
            if repo is None:
                return 404, {"Code": 10010205001, "Message": "model not found", "Success": False}, None
            files = [
                {
                    "Path": p,
                    "Name": p.rsplit("/", 1)[-1],
                    "Size": len(f.content),
                    "Sha256": f.sha256,
                    "Id": f.blob_id,
                    "Type": "blob",
                    "IsLFS": f.lfs,
                }
                for p, f in sorted(repo.files.items())
            ]
            return 200, self._ok({"Files": files}), None
        m = re.fullmatch(r"/api/v1/repos/models/([^/]+/[^/]+)/info/lfs/objects/batch", path)
        if m and method == "POST":
            if unquote(m.group(1)) not in self.repos:
                return 404, {"Code": 404, "Message": "model not found", "Success": False}, None
            objects = []
            for obj in json.loads(body)["objects"]:
                entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "actions": {}}
                if obj["oid"] not in self.blobs:
                    entry["actions"] = {"upload": {"href": f"{self.url}/_blobs/{obj['oid']}?sig={self.signature}"}}
                objects.append(entry)
            return 200, self._ok({"objects": objects}), None
        m = re.fullmatch(r"/_blobs/([0-9a-f]{64})", path)
        if m and method == "PUT":
            return self._put_blob(m.group(1), body)
        m = re.fullmatch(r"/api/v1/repos/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if m and method == "POST":
            repo = self.repos.get(unquote(m.group(1)))
            if repo is None:
                return 404, {"Code": 404, "Message": "model not found", "Success": False}, None
            data = json.loads(body)
            staged: dict[str, StoredFile] = {}
            for act in data["actions"]:
                if act["type"] == "lfs":
                    blob = self.blobs.get(act["sha256"])
                    if blob is None or len(blob) != act["size"]:
                        return (
                            400,
                            {"Code": 400, "Message": f"lfs object of {act['path']} missing", "Success": False},
                            None,
                        )
                    staged[act["path"]] = StoredFile(blob, lfs=True)
                else:
                    staged[act["path"]] = StoredFile(base64.b64decode(act["content"]), lfs=False)
            oid = uuid.uuid4().hex
            with self.lock:
                repo.files.update(staged)
                repo.commits.append({"oid": oid, "summary": data["commit_message"], "paths": sorted(staged)})
            return 200, self._ok({"sha": oid}), None
        return 404, {"Code": 404, "Message": f"fake ModelScope: no route {method} {path}", "Success": False}, None

    def public_read(self, path: str) -> bool:
        m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)(/repo|/repo/files)?", path)
        return m is not None and self._public(m.group(1))

    def files(self, repo_id: str) -> dict[str, StoredFile]:
        """The files the fake holds for ``repo_id``."""
        return dict(self.repos[repo_id].files)

    def commits(self, repo_id: str) -> list[dict[str, Any]]:
        """The commits made to ``repo_id``."""
        return list(self.repos[repo_id].commits)


class running:
    """Serve a fake in a thread for the duration of a ``with`` block."""

    def __init__(self, server: _FakeServer) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, name=type(server).__name__, daemon=True)

    def __enter__(self) -> _FakeServer:
        self.thread.start()
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def iter_files(server: FakeHF | FakeModelScope, repo_id: str) -> Iterator[tuple[str, StoredFile]]:
    """Each stored file of ``repo_id``, sorted by path."""
    yield from sorted(server.files(repo_id).items())
