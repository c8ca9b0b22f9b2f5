"""Publishing: a local folder, S3 (moto's server on loopback), the Hugging Face Hub and ModelScope
(loopback fakes of their upload APIs, see tests/_publish_fakes.py), gates, dry runs and secrets.

Every destination is published to twice: the second publish must upload nothing.  What
was published is read back (S3 objects, the local folder, the fakes' stored files) and
compared with the manifest's checksums.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

from flagrelease.bundle import GATE_FAILED_MARKER, load_manifest
from flagrelease.card import run_stage as card_stage
from flagrelease.errors import PublishError
from flagrelease.publish import (
    SECRET_BLOCKS,
    PublishCredentials,
    PublishPlan,
    PublishResult,
    credentials_from_secrets,
    publish_bundle,
)
from flagrelease.publish import run_stage as publish_stage
from flagrelease.publish.s3 import RELEASE_POINTER, STAGING_ROOT
from tests._publish_fakes import FakeHF, FakeModelScope, running
from tests._release_builder import build_release
from tests.fixtures_s3 import S3Server
from tests.publish._helpers import (
    HF_REPO,
    MIB,
    MS_REPO,
)
from tests.publish._helpers import (
    bundle_objects as _bundle_objects,
)
from tests.publish._helpers import (
    expected as _expected,
)
from tests.publish._helpers import (
    objects as _objects,
)
from tests.publish._helpers import (
    s3_target as _s3,
)
from tests.publish._helpers import (
    sha as _sha,
)


# -- local folder ---------------------------------------------------------------------------------
def test_local_publish_is_complete_and_idempotent(tmp_path: Path) -> None:
    ctx = build_release(tmp_path)
    card_stage(ctx)
    dest = tmp_path / "published"
    first = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    assert isinstance(first, PublishResult)
    expected = _expected(ctx)
    got = {p.relative_to(dest).as_posix(): _sha(p.read_bytes()) for p in dest.rglob("*") if p.is_file()}
    assert got == expected
    assert (dest / "README.md").read_text() == ctx.layout.card_path.read_text()  # the card, not the weights' README
    assert len(first.destinations[0].uploaded) == len(expected)
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    second = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    assert isinstance(second, PublishResult)
    assert second.destinations[0].uploaded == [] and len(second.destinations[0].skipped) == len(expected)
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == mtimes
    # a changed bundle replaces the folder atomically; stale files disappear
    (dest / "stale.txt").write_text("left over")
    third = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    assert isinstance(third, PublishResult) and not (dest / "stale.txt").exists()
    assert third.destinations[0].uploaded == []  # every file was linked from the previous publish


def test_local_dir_that_is_not_a_bundle_is_never_replaced(tmp_path: Path) -> None:
    ctx = build_release(tmp_path)
    card_stage(ctx)
    (tmp_path / "published").mkdir()
    (tmp_path / "published" / "precious.txt").write_text("not ours")
    with pytest.raises(PublishError, match="is not a published bundle"):
        publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    assert (tmp_path / "published" / "precious.txt").read_text() == "not ours"
    (tmp_path / "again").mkdir()
    overlapping = build_release(tmp_path / "again", publish={"local_dir": str(tmp_path / "again" / "work")})
    card_stage(overlapping)
    with pytest.raises(ValueError, match="overlaps the bundle"):
        publish_bundle(overlapping.config, bundle_dir=overlapping.layout.bundle_dir)


def test_a_bundle_changed_after_the_card_stage_is_refused(tmp_path: Path) -> None:
    ctx = build_release(tmp_path)
    card_stage(ctx)
    (ctx.layout.serve_dir / "hostfile.txt").write_text("10.0.0.9 slots=1 type=gpu\n")
    with pytest.raises(PublishError, match=r"changed since the card stage.*serve/hostfile.txt.*--stages card"):
        publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)


# -- gates ----------------------------------------------------------------------------------------
def test_a_failed_gate_blocks_publishing(tmp_path: Path) -> None:
    ctx = build_release(tmp_path, verdict="inconsistent")
    card_stage(ctx)
    with pytest.raises(PublishError) as err:
        publish_stage(ctx)
    assert "failed its consistency gate" in str(err.value) and "gates.publish_on_fail: true" in str(err.value)
    assert not (tmp_path / "published").exists()
    plan = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir, dry_run=True)
    assert isinstance(plan, PublishPlan) and "BLOCKED" in plan.to_text()


def test_publish_on_fail_publishes_with_the_warning(tmp_path: Path) -> None:
    ctx = build_release(tmp_path, verdict="inconsistent", publish_on_fail=True)
    card_stage(ctx)
    result = publish_stage(ctx)
    assert result.status == "warning" and "FAILED its gate" in result.summary
    published = (tmp_path / "published" / "README.md").read_text()
    assert GATE_FAILED_MARKER in published and published.index("[!WARNING]") < published.index("# Introduction")


def test_publish_on_fail_refuses_a_card_without_the_warning(tmp_path: Path) -> None:
    from flagrelease._filehash import HashCache
    from flagrelease.card.manifest import write_manifest

    ctx = build_release(tmp_path, verdict="inconsistent", publish_on_fail=True)
    card_stage(ctx)
    # A hand edit drops the warning and rewrites the manifest to match.
    ctx.layout.card_path.write_text(ctx.layout.card_path.read_text().replace(GATE_FAILED_MARKER, ""))
    manifest = load_manifest(ctx.layout.manifest_path)
    write_manifest(manifest, path=ctx.layout.manifest_path, bundle_dir=ctx.layout.bundle_dir, cache=HashCache())
    with pytest.raises(PublishError, match="no gate-failure warning"):
        publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)


# -- dry run --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_says_what_would_be_uploaded_and_where(
    tmp_path: Path, fakes: tuple[FakeHF, FakeModelScope], s3_server: S3Server
) -> None:
    hf, ms = fakes
    ctx = build_release(
        tmp_path,
        publish={
            "local_dir": str(tmp_path / "published"),
            "hf_repo": HF_REPO,
            "modelscope_repo": MS_REPO,
            "s3": _s3(s3_server, "dry-run-bucket"),
        },
    )
    card_stage(ctx)
    plan = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir, dry_run=True)
    assert isinstance(plan, PublishPlan)
    text = plan.to_text()
    assert [d.name for d in plan.destinations] == ["local", "hf", "modelscope", "s3"]
    assert f"{hf.url}/{HF_REPO}" in text and f"{ms.url}/models/{MS_REPO}" in text
    assert "s3://dry-run-bucket/releases/tiny" in text and str(tmp_path / "published") in text
    for path in _expected(ctx):
        assert f"    {path}  " in text
    assert hf.requests == [] and ms.requests == [] and not (tmp_path / "published").exists()
    assert _objects(s3_server, "dry-run-bucket", "releases/tiny") == {}


# -- S3 -------------------------------------------------------------------------------------------
class _Interrupt(Exception):
    """Stands for a lost connection or a killed worker in the middle of an upload."""


@pytest.mark.slow
def test_s3_multipart_upload_resumes_after_an_interruption(tmp_path: Path, s3_server: S3Server) -> None:
    ctx = build_release(tmp_path, weights_bytes=12 * MIB + 12345, publish={"s3": _s3(s3_server, "resume-bucket")})
    card_stage(ctx)
    transfer = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=1)
    parts: list[tuple[str, int, int]] = []

    def interrupt_after_first_part(path: str, number: int, total: int) -> None:
        parts.append((path, number, total))
        if len(parts) == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        publish_bundle(
            ctx.config, bundle_dir=ctx.layout.bundle_dir, s3_transfer=transfer, on_s3_part=interrupt_after_first_part
        )
    client = s3_server.client()
    key = "releases/tiny/model.safetensors"
    staged = f"{STAGING_ROOT}/{key}"  # uploads go to the staging prefix; nothing is public yet
    uploads = client.list_multipart_uploads(Bucket="resume-bucket", Prefix=staged)["Uploads"]
    assert len(uploads) == 1
    stored = client.list_parts(Bucket="resume-bucket", Key=staged, UploadId=uploads[0]["UploadId"])["Parts"]
    assert [p["PartNumber"] for p in stored] == [1]
    assert _objects(s3_server, "resume-bucket", "releases/tiny") == {}

    result = publish_bundle(
        ctx.config, bundle_dir=ctx.layout.bundle_dir, s3_transfer=transfer, on_s3_part=lambda *a: parts.append(a)
    )
    assert isinstance(result, PublishResult)
    s3 = result.destinations[0]
    assert s3.details == {"parts_sent": 2, "parts_reused": 1}
    assert parts[1:] == [("model.safetensors", 2, 3), ("model.safetensors", 3, 3)]
    assert client.list_multipart_uploads(Bucket="resume-bucket", Prefix=staged).get("Uploads", []) == []
    assert s3.verified and sorted(s3.verified) == sorted(s3.uploaded) and s3.promoted

    # Download everything back and compare with the manifest's checksums; staging is emptied.
    objects = _bundle_objects(s3_server, "resume-bucket", "releases/tiny")
    assert {k: _sha(v) for k, v in objects.items()} == _expected(ctx)
    assert _objects(s3_server, "resume-bucket", STAGING_ROOT) == {}
    pointer = json.loads(_objects(s3_server, "resume-bucket", "releases/tiny")[RELEASE_POINTER])
    assert pointer["manifest_sha256"] == _expected(ctx)["flagrelease.json"] and pointer["files"] == len(objects)
    head = client.head_object(Bucket="resume-bucket", Key=key)
    # The promoted copy is one object (its own ETag and full-object SHA-256), sha256 metadata kept.
    assert head["Metadata"]["sha256"] == _expected(ctx)["model.safetensors"]
    assert head["ContentType"] == "application/octet-stream"
    assert client.head_object(Bucket="resume-bucket", Key="releases/tiny/README.md")["ContentType"].startswith(
        "text/markdown"
    )

    again = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir, s3_transfer=transfer)
    assert isinstance(again, PublishResult)
    assert again.destinations[0].uploaded == [] and again.destinations[0].bytes_uploaded == 0
    assert sorted(again.destinations[0].skipped) == sorted(_expected(ctx))


@pytest.mark.slow
def test_s3_object_that_changed_remotely_is_uploaded_again(tmp_path: Path, s3_server: S3Server) -> None:
    ctx = build_release(tmp_path, publish={"s3": _s3(s3_server, "drift-bucket", prefix="")})
    card_stage(ctx)
    publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    client = s3_server.client()
    client.put_object(Bucket="drift-bucket", Key="README.md", Body=b"vandalised")
    result = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    assert isinstance(result, PublishResult) and result.destinations[0].uploaded == ["README.md"]
    body = client.get_object(Bucket="drift-bucket", Key="README.md")["Body"].read()
    assert body == ctx.layout.card_path.read_bytes()


@pytest.mark.slow
def test_s3_refusal_says_what_to_check(tmp_path: Path, s3_server: S3Server) -> None:
    ctx = build_release(
        tmp_path, publish={"s3": {"bucket": "no-such-bucket-here", "endpoint_url": s3_server.endpoint_url}}
    )
    card_stage(ctx)
    with pytest.raises(PublishError, match="check the bucket exists"):
        publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)


# -- Hugging Face Hub and ModelScope ----------------------------------------------------------------
@pytest.mark.slow
def test_hf_and_modelscope_publish_then_nothing_the_second_time(
    tmp_path: Path, fakes: tuple[FakeHF, FakeModelScope]
) -> None:
    hf, ms = fakes
    ctx = build_release(
        tmp_path, weights_bytes=2 * MIB, publish={"hf_repo": HF_REPO, "modelscope_repo": MS_REPO, "private": True}
    )
    card_stage(ctx)
    result = publish_stage(ctx)
    expected = _expected(ctx)
    assert result.status == "ok"
    dest = result.outputs["destinations"]
    assert dest["hf"]["uploaded"] == len(expected) and dest["modelscope"]["uploaded"] == len(expected)
    assert dest["hf"]["url"] == f"{hf.url}/{HF_REPO}"

    # Read back what each hub stored.
    assert {p: f.sha256 for p, f in hf.files(HF_REPO).items()} == expected
    assert {p: f.sha256 for p, f in ms.files(MS_REPO).items()} == expected
    assert hf.files(HF_REPO)["model.safetensors"].lfs and not hf.files(HF_REPO)["README.md"].lfs
    assert hf.files(HF_REPO)["README.md"].content == ctx.layout.card_path.read_bytes()
    assert hf.repos[HF_REPO].private and ms.repos[MS_REPO].private
    commits = hf.commits(HF_REPO)
    assert [c["summary"] for c in commits] == [
        "Publish Tiny-Qwen2-FlagOS-CPU-INT8 (1/2)",
        "Publish Tiny-Qwen2-FlagOS-CPU-INT8 (2/2)",
    ]
    assert commits[-1]["paths"] == ["README.md", "flagrelease.json"]  # the card lands last
    assert ms.commits(MS_REPO)[0]["summary"].startswith("Publish Tiny-Qwen2-FlagOS-CPU-INT8")
    assert hf.blob_uploads == 1 and ms.blob_uploads >= 1

    hf_before, ms_before = len(hf.requests), len(ms.requests)
    again = publish_stage(ctx)
    dest = again.outputs["destinations"]
    assert (dest["hf"]["uploaded"], dest["modelscope"]["uploaded"]) == (0, 0)
    assert dest["hf"]["skipped"] == len(expected) and dest["modelscope"]["skipped"] == len(expected)
    assert len(hf.commits(HF_REPO)) == 2 and len(ms.commits(MS_REPO)) == 1
    new_hf = hf.requests[hf_before:]
    assert all(
        not p.startswith(("/_lfs", "/api/models/FlagRelease/Tiny-Qwen2-FlagOS-CPU-INT8/commit")) for _, p in new_hf
    )
    assert ms.count("POST", r"/commit/") == 1 and ms.count("PUT", r"^/_blobs/") == ms.blob_uploads
    assert len(ms.requests) - ms_before <= 2
    ms_again = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    assert isinstance(ms_again, PublishResult)
    assert sorted(ms_again.destinations[1].skipped) == sorted(expected)  # paths, not files


@pytest.mark.slow
def test_hf_bad_token_says_what_to_fix(
    tmp_path: Path, fakes: tuple[FakeHF, FakeModelScope], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrongwrongwrongwrongwrong")
    ctx = build_release(tmp_path, publish={"hf_repo": HF_REPO})
    card_stage(ctx)
    with pytest.raises(PublishError, match=r"HTTP 401.*HF_TOKEN") as err:
        publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    assert "hf_wrongwrong" not in str(err.value)


# -- secrets --------------------------------------------------------------------------------------
ENV_SECRETS = {
    "HF_TOKEN": "hf_SentinelEnvTokenAbcdefghijklmnop",
    "MODELSCOPE_API_TOKEN": "ms-sentinel-env-token-0123456789",
    "AWS_ACCESS_KEY_ID": "AKIASENTINELENVKEY12",
    "AWS_SECRET_ACCESS_KEY": "sentinel/env/secret+key/0123456789abcdef",
}
ARG_SECRETS = {  # shaped like nothing the redactor knows: only explicit masking can hide them
    "hf_token": "plain-sentinel-hf-argument-4242",
    "modelscope_token": "plain-sentinel-ms-argument-4242",
    "aws_access_key_id": "PLAINSENTINELKEYID4242",
    "aws_secret_access_key": "plain-sentinel-aws-secret-4242",
}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["environment", "arguments"])
def test_tokens_never_appear_in_outputs_logs_or_artifacts(
    source: str,
    tmp_path: Path,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    if source == "environment":
        for k, v in ENV_SECRETS.items():
            monkeypatch.setenv(k, v)
        hf_token, ms_token, credentials = ENV_SECRETS["HF_TOKEN"], ENV_SECRETS["MODELSCOPE_API_TOKEN"], None
        secrets = list(ENV_SECRETS.values())
    else:
        hf_token, ms_token = ARG_SECRETS["hf_token"], ARG_SECRETS["modelscope_token"]
        credentials = PublishCredentials.from_mapping(ARG_SECRETS)
        secrets = list(ARG_SECRETS.values())
    caplog.set_level(logging.DEBUG)
    with running(FakeHF(token=hf_token)) as hf, running(FakeModelScope(token=ms_token)) as ms:
        monkeypatch.setenv("HF_ENDPOINT", hf.url)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", ms.url)
        ctx = build_release(
            tmp_path,
            publish={
                "local_dir": str(tmp_path / "published"),
                "hf_repo": HF_REPO,
                "modelscope_repo": MS_REPO,
                "s3": _s3(s3_server, f"secrets-{source}"),
                "private": True,  # ModelScope cannot be made public by API: that would be a warning
            },
        )
        ctx.options["publish_credentials"] = credentials
        card_stage(ctx)
        result = publish_stage(ctx)
        from flagrelease.pipeline import save_stage_result

        save_stage_result(ctx.layout, result)
        direct = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir, credentials=credentials)
        stored = [f.content for f in hf.files(HF_REPO).values()] + [f.content for f in ms.files(MS_REPO).values()]
    assert result.status == "ok" and hf.commits(HF_REPO) and ms.commits(MS_REPO)  # the tokens did work

    texts = {
        "stage result": json.dumps(result.to_json()),
        "publish result": direct.to_text() + repr(direct) + json.dumps(direct.to_outputs()),
        "credentials repr": repr(credentials) + repr(PublishCredentials.from_mapping(ARG_SECRETS)),
        "captured logs": caplog.text + "\n".join(r.getMessage() for r in caplog.records),
        "stdout/stderr": "".join(capsys.readouterr()),
    }
    for path in tmp_path.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    for i, content in enumerate(stored):
        texts[f"stored file {i}"] = content.decode("utf-8", "replace")
    client = s3_server.client()
    for obj in client.list_objects_v2(Bucket=f"secrets-{source}").get("Contents", []):
        head = client.head_object(Bucket=f"secrets-{source}", Key=obj["Key"])
        texts[f"s3 {obj['Key']}"] = client.get_object(Bucket=f"secrets-{source}", Key=obj["Key"])["Body"].read().decode(
            "utf-8", "replace"
        ) + json.dumps(head["Metadata"])
    assert len(texts) > 40 and "DEBUG" in caplog.text
    leaks = [(where, s) for where, text in texts.items() for s in secrets if s in text]
    assert leaks == []


# -- registry -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.docker
def test_registry_digest_is_verified_or_the_image_pushed(
    tmp_path: Path, docker_engine: Any, docker_registry: Any
) -> None:
    import io
    import tarfile

    from flagrelease.publish.registry import publish_registry

    client = docker_engine.client()
    repo = f"{docker_registry.host}/flagrelease"
    ref = f"{repo}:publish-test"
    payload = f"published from {tmp_path}".encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag="publish-test")
    try:
        for line in client.images.push(repo, tag="publish-test", stream=True, decode=True):
            assert "error" not in line, line
        digest = client.images.get_registry_data(ref).id

        # The image stage pushed it: publishing only verifies the digest.
        ctx = build_release(
            tmp_path,
            publish={"registry": docker_registry.host},
            image={"image_ref": ref, "digest": digest, "built": True, "pushed": True},
        )
        card_stage(ctx)
        result = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
        assert isinstance(result, PublishResult)
        reg = result.destinations[0]
        assert (reg.name, reg.uploaded, reg.skipped, reg.details["digest"]) == ("registry", [], [ref], digest)

        # A registry namespace that does not have it yet: the local image is pushed there.
        mirror = f"{docker_registry.host}/mirror"
        pushed = publish_registry(image_ref=ref, digest=digest, registry=mirror)
        assert pushed.uploaded == [f"{mirror}/flagrelease:publish-test"] and pushed.details["digest"] == digest
        assert docker_registry.manifest("mirror/flagrelease", "publish-test")[0] == digest
        again = publish_registry(image_ref=ref, digest=digest, registry=mirror)
        assert again.uploaded == [] and again.skipped == [f"{mirror}/flagrelease:publish-test"]
    finally:
        from docker.errors import ImageNotFound

        for tag in (ref, f"{docker_registry.host}/mirror/flagrelease:publish-test"):
            with contextlib.suppress(ImageNotFound):
                client.images.remove(tag, force=True)
        client.close()


def test_credentials_come_from_a_secret_store_and_never_show() -> None:
    store = {SECRET_BLOCKS["hf_token"]: "plain-hf-from-a-block", SECRET_BLOCKS["aws_access_key_id"]: "KEYFROMBLOCK"}
    creds = credentials_from_secrets(store.get)
    assert creds.hf_token == "plain-hf-from-a-block" and creds.modelscope_token is None
    assert creds.boto3() == {"aws_access_key_id": "KEYFROMBLOCK"}
    assert "plain-hf-from-a-block" not in repr(creds) and "KEYFROMBLOCK" not in repr(creds)
    with pytest.raises(ValueError, match="unknown publish credential"):
        PublishCredentials.from_mapping({"hf_tokn": "x"})


def test_cli_publish_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flagrelease.cli import main

    ctx = build_release(tmp_path)
    card_stage(ctx)
    assert main(["publish", str(tmp_path / "demo.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run, nothing is uploaded" in out and f"local      {tmp_path / 'published'}" in out
    assert "    model.safetensors  300.00 KB" in out and not (tmp_path / "published").exists()
