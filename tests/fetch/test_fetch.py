"""The fetch stage against real hubs on loopback: an olah HF mirror and a ModelScope endpoint.

Covers: both hubs end to end, resuming an interrupted transfer, a damaged file downloaded
once more and then reported by name, hostile file names, a second fetch with no network
work, tokens kept out of logs and artifacts, local sources, dry runs and ``run_stage``.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
from pathlib import Path
from typing import Any

import pytest

from flagrelease.config import ModelSection, parse_release
from flagrelease.errors import FetchError
from flagrelease.fetch import MANIFEST_NAME, STAGING_NAME, FetchResult, fetch_model, partial_path, run_stage
from flagrelease.pipeline import ReleaseContext
from tests.fixtures_hub import ModelScopeFake, OlahHub, tiny_weights

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def _model(source: str, repo_id: str, revision: str | None = None, **kw: Any) -> ModelSection:
    return ModelSection(source=source, repo_id=repo_id, revision=revision, **kw)


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def _assert_files(dest: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (dest / name).read_bytes() == data, name


def _all_text(dest: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in dest.rglob("*") if p.is_file())


def _by_path(result: FetchResult) -> dict[str, Any]:
    return {f.path: f for f in result.files}


# -- names (no server) -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "C:/x",
        "a\\b",
        "",
        "a//b",
        "./a",
        "a/.",
        "a\x00b",
        MANIFEST_NAME,
        f"{STAGING_NAME}/x.part",
    ],
)
def test_hostile_names_are_rejected(tmp_path: Path, name: str) -> None:
    from flagrelease.fetch._names import safe_relpath

    with pytest.raises(FetchError, match="refusing hub file name"):
        safe_relpath(name, tmp_path)


def test_names_through_a_symlinked_folder_are_rejected(tmp_path: Path) -> None:
    from flagrelease.fetch._names import safe_relpath

    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    assert safe_relpath("ok/config.json", dest) == "ok/config.json"
    with pytest.raises(FetchError, match="symbolic link"):
        safe_relpath("sub/config.json", dest)


# -- local sources (no server) ------------------------------------------------------------------
def _local_model(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_local_source_is_copied_verified_and_reused(tmp_path: Path) -> None:
    files = tiny_weights(seed=7)
    src = _local_model(tmp_path / "src", files)
    dest = tmp_path / "dest"
    model = _model("local", "flagtest/local", path=src)

    first = fetch_model(model, dest=dest)
    _assert_files(dest, files)
    assert {f.action for f in first.files} == {"copied"}
    assert first.revision is not None and first.revision.startswith("sha256:")
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert manifest["source"] == "local" and manifest["revision"] == first.revision
    assert {e["file"] for e in manifest["files"]} == set(files)

    second = fetch_model(model, dest=dest)
    assert second.downloaded_bytes == 0 and {f.action for f in second.files} == {"reused"}
    assert second.revision == first.revision

    # A changed source file is copied again; the rest is kept.
    (src / "config.json").write_bytes(b'{"model_type": "qwen2", "changed": true}')
    third = fetch_model(model, dest=dest)
    assert _by_path(third)["config.json"].action == "copied"
    assert _by_path(third)[SHARD1].action == "reused"
    assert (dest / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert third.revision != first.revision


def test_local_source_drops_files_no_longer_selected(tmp_path: Path) -> None:
    src = _local_model(tmp_path / "src", tiny_weights(seed=8))
    dest = tmp_path / "dest"
    fetch_model(_model("local", "flagtest/local", path=src), dest=dest)
    assert (dest / "README.md").is_file()
    fetch_model(_model("local", "flagtest/local", path=src, ignore_patterns=["*.md"]), dest=dest)
    assert not (dest / "README.md").exists() and (dest / SHARD1).is_file()


def test_local_truncated_safetensors_fails_naming_the_file(tmp_path: Path) -> None:
    files = tiny_weights(seed=9)
    files[SHARD2] = files[SHARD2][:-100]
    src = _local_model(tmp_path / "src", files)
    with pytest.raises(FetchError, match=rf"{SHARD2}.*truncated.*copied twice"):
        fetch_model(_model("local", "flagtest/local", path=src), dest=tmp_path / "dest")
    assert not (tmp_path / "dest" / SHARD2).exists()
    assert not (tmp_path / "dest" / MANIFEST_NAME).exists()


def test_local_symlink_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    src = _local_model(tmp_path / "src", tiny_weights(seed=10))
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    (src / "extra.txt").symlink_to(secret)
    with pytest.raises(FetchError, match="outside"):
        fetch_model(_model("local", "flagtest/local", path=src), dest=tmp_path / "dest")
    assert not (tmp_path / "dest" / "extra.txt").exists()


def test_index_naming_a_shard_left_out_fails(tmp_path: Path) -> None:
    src = _local_model(tmp_path / "src", tiny_weights(seed=11))
    model = _model("local", "flagtest/local", path=src, ignore_patterns=[SHARD2])
    with pytest.raises(FetchError, match=rf"not fetched: {SHARD2}"):
        fetch_model(model, dest=tmp_path / "dest")


def test_local_generate_calls_the_tiny_model_generator(tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    model = _model("local", "flagrelease/tiny-qwen2", path=path, generate="tiny-qwen2")
    plan = fetch_model(model, dest=tmp_path / "dest", dry_run=True)
    assert plan.dry_run and not path.exists() and "would generate" in plan.notes[0]
    result = fetch_model(model, dest=tmp_path / "dest")
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    assert any(f.path.endswith(".safetensors") for f in result.files)
    assert "generated" in result.notes[0]


# -- Hugging Face Hub through olah ---------------------------------------------------------------
@pytest.mark.slow
def test_hf_fetch_verifies_every_file_and_writes_the_manifest(hf_env: OlahHub, tmp_path: Path) -> None:
    repo = hf_env.repos["good"]
    dest = tmp_path / "dest"
    seen: list[tuple[float, str]] = []
    result = fetch_model(
        _model("hf", repo.repo_id, "v1.0"), dest=dest, workers=3, progress=lambda f, m: seen.append((f, m))
    )

    _assert_files(dest, repo.files)
    assert result.revision == repo.revision  # the tag resolved to the commit
    assert result.network and result.bytes == sum(len(d) for d in repo.files.values())
    kinds = {f.path: f.verified_by for f in result.files}
    assert kinds[SHARD1] == kinds[SHARD2] == "hub-sha256"
    assert kinds["config.json"] == kinds["tokenizer/tokenizer_config.json"] == "git-blob-sha1"
    assert not (dest / STAGING_NAME).exists()

    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert manifest["revision"] == repo.revision and manifest["requested_revision"] == "v1.0"
    assert manifest["repo_id"] == repo.repo_id and manifest["source"] == "hf"
    assert manifest["endpoint"] == hf_env.endpoint and manifest["timestamp"].endswith("Z")
    entries = {e["file"]: e for e in manifest["files"]}
    assert set(entries) == set(repo.files)
    for name in repo.files:
        assert entries[name]["sha256"] == repo.sha256(name) and entries[name]["size"] == len(repo.files[name])

    fractions = [f for f, _ in seen]
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)


@pytest.mark.slow
def test_hf_second_fetch_does_no_network_work(hf_env: OlahHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = hf_env.repos["good"]
    dest = tmp_path / "dest"
    model = _model("hf", repo.repo_id, repo.revision)
    fetch_model(model, dest=dest)
    manifest_before = (dest / MANIFEST_NAME).read_bytes()

    mark = hf_env.log_mark()
    again = fetch_model(model, dest=dest)
    assert not again.network and again.downloaded_bytes == 0
    assert {f.action for f in again.files} == {"reused"} and again.revision == repo.revision
    assert (dest / MANIFEST_NAME).read_bytes() == manifest_before
    assert hf_env.log_mark() == mark  # olah saw no request at all

    monkeypatch.setenv("HF_ENDPOINT", _dead_endpoint())  # the hub is gone
    assert not fetch_model(model, dest=dest).network

    # A damaged file on disk no longer matches the manifest: that needs the hub again.
    shard = dest / SHARD2
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(FetchError, match="reachable"):
        fetch_model(model, dest=dest)
    monkeypatch.setenv("HF_ENDPOINT", hf_env.endpoint)
    healed = fetch_model(model, dest=dest)
    assert _by_path(healed)[SHARD2].action == "downloaded" and _by_path(healed)[SHARD1].action == "reused"
    _assert_files(dest, repo.files)


@pytest.mark.slow
def test_hf_fetch_resumes_after_an_interruption(hf_env: OlahHub, tmp_path: Path) -> None:
    repo = hf_env.repos["good"]
    dest = tmp_path / "dest"
    # What a killed run leaves: one shard finished (no manifest yet), one half-transferred.
    dest.mkdir()
    (dest / SHARD1).write_bytes(repo.files[SHARD1])
    inode = (dest / SHARD1).stat().st_ino
    part = partial_path(dest, SHARD2)
    part.parent.mkdir(parents=True)
    part.write_bytes(repo.files[SHARD2][: len(repo.files[SHARD2]) // 2])

    mark = hf_env.log_mark()
    result = fetch_model(_model("hf", repo.repo_id, repo.revision), dest=dest)
    _assert_files(dest, repo.files)
    actions = {f.path: f.action for f in result.files}
    assert actions[SHARD1] == "reused" and (dest / SHARD1).stat().st_ino == inode
    assert hf_env.downloads(repo, SHARD1, since=mark) == 0
    # olah answers a range request with the whole file; the client rewinds, and the
    # result is still exact.  (Byte-level resume is shown against ModelScope below.)
    assert actions[SHARD2] == "resumed" and hf_env.downloads(repo, SHARD2, since=mark, expect=1) == 1
    assert result.downloaded_bytes == result.bytes - len(repo.files[SHARD1])


@pytest.mark.slow
def test_hf_damaged_hub_file_is_downloaded_twice_then_named(
    hf_env: OlahHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = hf_env.repos["damaged"]
    dest = tmp_path / "dest"
    mark = hf_env.log_mark()
    with caplog.at_level(logging.WARNING, logger="flagrelease.fetch"), pytest.raises(FetchError) as info:
        fetch_model(_model("hf", repo.repo_id, repo.revision), dest=dest)
    message = str(info.value)
    assert SHARD2 in message and "downloaded twice" in message and "sha256" in message
    assert [r for r in caplog.records if SHARD2 in r.getMessage() and "again" in r.getMessage()]
    assert not (dest / SHARD2).exists() and not (dest / MANIFEST_NAME).exists()
    assert hf_env.downloads(repo, SHARD2, since=mark, expect=2) == 2


@pytest.mark.slow
def test_hf_dry_run_plans_without_writing(hf_env: OlahHub, tmp_path: Path) -> None:
    repo = hf_env.repos["good"]
    dest = tmp_path / "dest"
    plan = fetch_model(
        _model("hf", repo.repo_id, repo.revision, allow_patterns=["*.safetensors", "*.json"]), dest=dest, dry_run=True
    )
    assert plan.dry_run and plan.manifest is None and not dest.exists()
    assert {f.path for f in plan.files} == {n for n in repo.files if n.endswith((".safetensors", ".json"))}
    assert plan.bytes == plan.downloaded_bytes == sum(f.size for f in plan.files)
    assert {f.action for f in plan.files} == {"planned"}
    assert plan.to_json()["files"][0]["size"] > 0


@pytest.mark.slow
def test_hf_token_never_reaches_logs_or_artifacts(
    hf_env: OlahHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    token = "hf_SENTINEL" + secrets.token_hex(12)
    monkeypatch.setenv("HF_TOKEN", token)
    repo = hf_env.repos["good"]
    dest = tmp_path / "dest"
    caplog.set_level(logging.DEBUG)
    result = fetch_model(_model("hf", repo.repo_id, repo.revision), dest=dest)
    with pytest.raises(FetchError) as info:
        fetch_model(_model("hf", "flagtest/no-such-repo", repo.revision), dest=tmp_path / "other")
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, str(info.value), json.dumps(result.to_json()), _all_text(dest)):
        assert token not in text
        assert "SENTINEL" not in text


# -- ModelScope ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_modelscope_fetch_verifies_against_the_hub_checksums(ms_env: ModelScopeFake, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    result = fetch_model(_model("modelscope", "flagtest/tiny-ms", "v1.0"), dest=dest, workers=2)
    repo_files = tiny_weights(seed=3)
    _assert_files(dest, repo_files)
    assert {f.verified_by for f in result.files} == {"hub-sha256"}
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert manifest["source"] == "modelscope" and manifest["revision"] == "v1.0"
    assert manifest["endpoint"] == ms_env.endpoint
    assert len(ms_env.file_requests(SHARD1)) == 1

    ms_env.clear_log()
    again = fetch_model(_model("modelscope", "flagtest/tiny-ms", "v1.0"), dest=dest)
    assert not again.network and ms_env.requests == []


@pytest.mark.slow
def test_modelscope_interrupted_fetch_resumes_with_a_range_request(ms_env: ModelScopeFake, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    model = _model("modelscope", "flagtest/slow-ms", "v1.0")
    part = partial_path(dest, SHARD2)

    def interrupt(fraction: float, message: str) -> None:
        if part.is_file() and part.stat().st_size > 0:
            raise KeyboardInterrupt  # what Ctrl-C does mid-transfer

    with pytest.raises(KeyboardInterrupt):
        fetch_model(model, dest=dest, progress=interrupt)
    size = len(tiny_weights(seed=6, big_rows=8192)[SHARD2])
    kept = part.stat().st_size
    assert 0 < kept < size
    assert not (dest / SHARD2).exists() and not (dest / MANIFEST_NAME).exists()

    ms_env.clear_log()
    served = ms_env.served("flagtest/slow-ms", "v1.0", SHARD2)
    throttle, served.throttle_s = served.throttle_s, 0.0
    try:
        result = fetch_model(model, dest=dest)
    finally:
        served.throttle_s = throttle
    assert _by_path(result)[SHARD2].action == "resumed"
    (req,) = ms_env.file_requests(SHARD2)
    assert req.range is not None and req.range.startswith(f"bytes={kept}-")
    assert req.sent == size - kept
    _assert_files(dest, tiny_weights(seed=6, big_rows=8192))
    assert not part.exists()


@pytest.mark.slow
def test_modelscope_bad_partial_is_downloaded_again_once(ms_env: ModelScopeFake, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    files = tiny_weights(seed=3)
    part = partial_path(dest, SHARD2)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * (len(files[SHARD2]) // 2))  # a partial file of the wrong bytes
    result = fetch_model(_model("modelscope", "flagtest/tiny-ms", "v1.0"), dest=dest)
    assert _by_path(result)[SHARD2].action == "redownloaded"
    ranges = [r.range for r in ms_env.file_requests(SHARD2)]
    assert len(ranges) == 2 and ranges[0] is not None and ranges[0].startswith(f"bytes={len(files[SHARD2]) // 2}-")
    assert ranges[1] is None or ranges[1].startswith("bytes=0-")
    _assert_files(dest, files)


@pytest.mark.slow
def test_modelscope_flaky_file_is_healed_by_one_more_download(ms_env: ModelScopeFake, tmp_path: Path) -> None:
    served = ms_env.served("flagtest/flaky-ms", "v1.0", SHARD2)
    before = served.gets
    result = fetch_model(_model("modelscope", "flagtest/flaky-ms", "v1.0"), dest=tmp_path / "dest")
    assert served.gets - before == 2
    assert _by_path(result)[SHARD2].action == "redownloaded"
    _assert_files(tmp_path / "dest", tiny_weights(seed=5))


@pytest.mark.slow
def test_modelscope_damaged_file_fails_naming_it(ms_env: ModelScopeFake, tmp_path: Path) -> None:
    served = ms_env.served("flagtest/damaged-ms", "v1.0", SHARD2)
    before = served.gets
    with pytest.raises(FetchError, match=rf"{SHARD2}: sha256 .* downloaded twice"):
        fetch_model(_model("modelscope", "flagtest/damaged-ms", "v1.0"), dest=tmp_path / "dest")
    assert served.gets - before == 2
    assert not (tmp_path / "dest" / SHARD2).exists()


@pytest.mark.slow
def test_modelscope_traversal_name_is_rejected(ms_env: ModelScopeFake, tmp_path: Path) -> None:
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(FetchError, match=r"refusing hub file name '\.\./escape\.txt'"):
        fetch_model(_model("modelscope", "flagtest/evil-ms", "v1.0"), dest=dest)
    assert not (tmp_path / "deep" / "escape.txt").exists()
    assert [p for p in dest.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []
    assert ms_env.file_requests("../escape.txt") == [] and ms_env.file_requests("config.json") == []


@pytest.mark.slow
def test_modelscope_token_is_sent_but_never_logged(
    ms_env: ModelScopeFake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    token = "ms-SENTINEL-" + secrets.token_hex(12)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    dest = tmp_path / "dest"
    result = fetch_model(_model("modelscope", "flagtest/tiny-ms", "v1.0"), dest=dest)
    assert any(token in r.headers.get("Authorization", "") for r in ms_env.file_requests(SHARD1))
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, json.dumps(result.to_json()), _all_text(dest)):
        assert token not in text


# -- the stage ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_stage_fills_source_dir_with_the_contract_outputs(hf_env: OlahHub, tmp_path: Path) -> None:
    repo = hf_env.repos["good"]
    cfg = parse_release(
        {
            "name": "fetch-test",
            "chip": "cpu",
            "work_dir": str(tmp_path / "work"),
            "model": {"source": "hf", "repo_id": repo.repo_id, "revision": repo.revision},
        }
    )
    seen: list[tuple[str, float]] = []
    ctx = ReleaseContext.create(cfg, progress=lambda stage, f, m="": seen.append((stage, f)))
    result = run_stage(ctx)
    out = result.outputs
    assert Path(out["model_dir"]) == ctx.layout.source_dir
    assert Path(out["manifest"]) == ctx.layout.source_dir / MANIFEST_NAME
    assert out["files"] == len(repo.files) and out["bytes"] == sum(len(d) for d in repo.files.values())
    assert out["revision"] == repo.revision and out["source"] == "hf"
    assert {row["file"] for row in result.tables["files"]} == set(repo.files)
    assert result.status == "ok" and repo.revision[:12] in result.summary
    assert seen and {s for s, _ in seen} == {"fetch"}
    json.dumps(result.to_json())

    dry = run_stage(ReleaseContext.create(cfg, dry_run=True))
    assert dry.summary.startswith("Plan:") and dry.outputs["manifest"] is None


def test_cli_fetch_prints_the_result(tmp_path: Path) -> None:
    import yaml

    from flagrelease.cli import main

    src = _local_model(tmp_path / "src", tiny_weights(seed=12))
    config = tmp_path / "rel.yaml"
    config.write_text(
        yaml.safe_dump({"chip": "cpu", "model": {"source": "local", "repo_id": "flagtest/local", "path": str(src)}})
    )
    assert main(["fetch", str(config), str(tmp_path / "dest"), "--workers", "2"]) == 0
    assert (tmp_path / "dest" / MANIFEST_NAME).is_file()
