"""Private first, public after the gate: staging, verification by download, promotion.

Each path runs on the loopback fakes of the hubs (tests/_publish_fakes.py: like the real
hubs, they serve a public repo to anyone and a private one only with the token) and on
moto's S3 server: a clean publish, a file that does not verify, a SIGKILL between upload
and promotion (then a re-run that completes and a third that does nothing), gate verdicts
that block, and a large S3 object promoted by a multipart copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flagrelease._filehash import HashCache
from flagrelease.bundle import GATE_UNVERIFIED_MARKER, gate_unverified_verdict, load_manifest
from flagrelease.card import run_stage as card_stage
from flagrelease.config import S3Target
from flagrelease.errors import PublishBlockedError, PublishError
from flagrelease.publish import PlannedFile, PublishPlan, PublishResult, publish_bundle
from flagrelease.publish import run_stage as publish_stage
from flagrelease.publish.s3 import RELEASE_POINTER, STAGING_ROOT, S3Destination
from tests._publish_fakes import FakeHF, FakeModelScope, StoredFile
from tests._release_builder import build_release
from tests.fixtures_s3 import S3Server
from tests.publish._helpers import HF_REPO, MIB, MS_REPO, bundle_objects, expected, objects, s3_target, sha


def _anonymous(hf: FakeHF, path: str) -> httpx.Response:
    """What anyone without a token gets for ``path`` of the repo (the Hub's public view)."""
    return httpx.get(f"{hf.url}/{HF_REPO}/resolve/main/{path}", timeout=10)


def _result(out: PublishPlan | PublishResult) -> PublishResult:
    assert isinstance(out, PublishResult)
    return out


# -- Hugging Face: private, verified, public --------------------------------------------------------
@pytest.mark.slow
def test_hf_repo_is_private_until_every_file_is_verified(tmp_path: Path, fakes: tuple[FakeHF, FakeModelScope]) -> None:
    hf, _ = fakes
    ctx = build_release(tmp_path, weights_bytes=2 * MIB, publish={"hf_repo": HF_REPO})
    card_stage(ctx)
    want = expected(ctx)
    seen: dict[str, object] = {}

    def staged(result: PublishResult) -> None:
        seen["private"] = hf.repos[HF_REPO].private
        seen["anonymous"] = _anonymous(hf, "README.md").status_code
        seen["verified"] = sorted(result.destinations[0].verified)

    out = _result(publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir, on_staged=staged))
    assert seen == {"private": True, "anonymous": 401, "verified": sorted(want)}
    assert not hf.repos[HF_REPO].private and hf.repos[HF_REPO].visibility_changes == ["public"]
    assert out.destinations[0].promoted and out.warnings == []
    assert _anonymous(hf, "README.md").content == ctx.layout.card_path.read_bytes()
    assert {p: f.sha256 for p, f in hf.files(HF_REPO).items()} == want

    again = _result(publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir))
    assert (again.destinations[0].uploaded, again.destinations[0].verified) == ([], [])
    assert hf.repos[HF_REPO].visibility_changes == ["public"]  # nothing changed: it stayed public

    # A public repo whose files must change is hidden while they do, and shown once verified.
    hf.repos[HF_REPO].files["README.md"] = StoredFile(b"vandalised", lfs=False)
    seen.clear()
    third = _result(publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir, on_staged=staged))
    assert third.destinations[0].uploaded == ["README.md"] and seen["private"] is True
    assert hf.repos[HF_REPO].visibility_changes == ["public", "private", "public"]
    assert _anonymous(hf, "README.md").content == ctx.layout.card_path.read_bytes()


@pytest.mark.slow
def test_a_file_that_does_not_verify_leaves_nothing_public(
    tmp_path: Path, fakes: tuple[FakeHF, FakeModelScope], s3_server: S3Server
) -> None:
    hf, _ = fakes
    published = tmp_path / "published"
    ctx = build_release(
        tmp_path,
        publish={"local_dir": str(published), "hf_repo": HF_REPO, "s3": s3_target(s3_server, "verify-bucket")},
    )
    card_stage(ctx)
    hf.tamper = {"config.json"}  # the Hub stores something else than was sent
    with pytest.raises(PublishError, match=r"do not match the manifest's sha256 \(config.json\); nothing was made"):
        publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    assert hf.repos[HF_REPO].private and _anonymous(hf, "README.md").status_code == 401
    assert not published.exists() and objects(s3_server, "verify-bucket", "releases/tiny") == {}

    hf.tamper = set()
    out = _result(publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir))
    assert [d.name for d in out.destinations] == ["local", "hf", "s3"] and all(d.promoted for d in out.destinations)
    assert out.destinations[1].uploaded == ["config.json"] and not hf.repos[HF_REPO].private
    assert {k: sha(v) for k, v in bundle_objects(s3_server, "verify-bucket", "releases/tiny").items()} == expected(ctx)


# -- a kill between upload and promotion -------------------------------------------------------------
_PUBLISHER = """
import sys, time
from pathlib import Path
from flagrelease.config import load_release
from flagrelease.publish import publish_bundle

def staged(result):
    print("STAGED " + ",".join(d.name for d in result.destinations), flush=True)
    time.sleep(600)

publish_bundle(load_release(Path(sys.argv[1])), bundle_dir=Path(sys.argv[2]), on_staged=staged)
"""


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return line.strip()
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(
        f"the publisher never printed {prefix!r} (exit {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}"
    )


@pytest.mark.slow
def test_sigkill_between_upload_and_promotion_leaves_nothing_public(
    tmp_path: Path, fakes: tuple[FakeHF, FakeModelScope], s3_server: S3Server
) -> None:
    hf, _ = fakes
    published = tmp_path / "published"
    ctx = build_release(
        tmp_path,
        weights_bytes=6 * MIB,
        publish={"local_dir": str(published), "hf_repo": HF_REPO, "s3": s3_target(s3_server, "kill-bucket")},
    )
    card_stage(ctx)
    want = expected(ctx)
    script = tmp_path / "publisher.py"
    script.write_text(_PUBLISHER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "demo.yaml"), str(ctx.layout.bundle_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert _wait_for_line(proc, "STAGED", 300) == "STAGED local,hf,s3"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # Everything was uploaded, and nothing is public.
    assert {p: f.sha256 for p, f in hf.files(HF_REPO).items()} == want
    assert hf.repos[HF_REPO].private and _anonymous(hf, "README.md").status_code == 401
    assert objects(s3_server, "kill-bucket", "releases/tiny") == {}
    assert {k: sha(v) for k, v in objects(s3_server, "kill-bucket", f"{STAGING_ROOT}/releases/tiny").items()} == want
    assert not published.exists()

    # Publishing again completes it without sending anything twice ...
    out = _result(publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir))
    by_name = {d.name: d for d in out.destinations}
    assert by_name["hf"].uploaded == [] and sorted(by_name["hf"].verified) == sorted(want)
    assert by_name["s3"].bytes_uploaded == 0 and sorted(by_name["s3"].uploaded) == sorted(want)
    assert all(d.promoted for d in out.destinations)
    assert not hf.repos[HF_REPO].private and _anonymous(hf, "README.md").status_code == 200
    assert {k: sha(v) for k, v in bundle_objects(s3_server, "kill-bucket", "releases/tiny").items()} == want
    assert RELEASE_POINTER in objects(s3_server, "kill-bucket", "releases/tiny")
    assert objects(s3_server, "kill-bucket", STAGING_ROOT) == {}
    assert {
        p.relative_to(published).as_posix(): sha(p.read_bytes()) for p in published.rglob("*") if p.is_file()
    } == want

    # ... and once more changes nothing.
    third = _result(publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir))
    assert all(d.uploaded == [] for d in third.destinations)
    assert hf.repos[HF_REPO].visibility_changes == ["public"]


# -- the gate -----------------------------------------------------------------------------------------
def test_unverified_verdicts() -> None:
    assert [gate_unverified_verdict(v) for v in (None, "", "missing", "inconclusive", "consistent")] == [
        "missing",
        "missing",
        "missing",
        "inconclusive",
        None,
    ]
    assert gate_unverified_verdict("inconsistent") is None  # a failure, handled by gates.publish_on_fail


def _rewrite_card(ctx: object, text: str) -> None:
    """Replace the card and rewrite the manifest to match (as a hand edit would)."""
    from flagrelease.card.manifest import write_manifest

    layout = ctx.layout  # type: ignore[attr-defined]
    layout.card_path.write_text(text)
    manifest = load_manifest(layout.manifest_path)
    write_manifest(manifest, path=layout.manifest_path, bundle_dir=layout.bundle_dir, cache=HashCache())


@pytest.mark.parametrize("verdict", ["inconclusive", "missing"])
def test_inconclusive_and_missing_verdicts_block_unless_the_config_opts_in(tmp_path: Path, verdict: str) -> None:
    (tmp_path / "blocked").mkdir()
    (tmp_path / "allowed").mkdir()
    published = tmp_path / "blocked" / "published"
    ctx = build_release(tmp_path / "blocked", verdict=verdict, publish={"local_dir": str(published)})
    card_stage(ctx)
    with pytest.raises(PublishBlockedError, match=rf"publish\.allow_verdicts: \[{verdict}\]"):
        publish_stage(ctx)
    assert not published.exists()
    plan = publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir, dry_run=True)
    assert isinstance(plan, PublishPlan) and "BLOCKED" in plan.to_text()

    published = tmp_path / "allowed" / "published"
    ctx = build_release(
        tmp_path / "allowed", verdict=verdict, publish={"local_dir": str(published), "allow_verdicts": [verdict]}
    )
    card_stage(ctx)
    card = ctx.layout.card_path.read_text().replace(GATE_UNVERIFIED_MARKER, "")
    _rewrite_card(ctx, card)
    with pytest.raises(PublishError, match="has no banner"):
        publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    _rewrite_card(ctx, f"{GATE_UNVERIFIED_MARKER}\n> [!WARNING]\n> The gate verdict is {verdict}.\n\n{card}")
    result = publish_stage(ctx)
    assert result.status == "warning" and verdict.upper() in result.summary
    assert result.outputs["gate_unverified"] == verdict
    assert GATE_UNVERIFIED_MARKER in (published / "README.md").read_text()


def test_no_gate_verdict_counts_as_missing(tmp_path: Path) -> None:
    ctx = build_release(tmp_path)
    card_stage(ctx)
    with pytest.raises(PublishBlockedError, match="has no gate verdict"):
        publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir, gate_verdict="")


# -- S3: a large object is promoted by a multipart copy -------------------------------------------------
@pytest.mark.slow
def test_s3_large_object_is_promoted_by_a_multipart_copy(tmp_path: Path, s3_server: S3Server) -> None:
    data = os.urandom(12 * MIB + 7)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(data)
    files = [PlannedFile("model.safetensors", weights, len(data), hashlib.sha256(data).hexdigest(), "weights")]
    target = S3Target(bucket=s3_server.create_bucket("copy-bucket"), prefix="big", endpoint_url=s3_server.endpoint_url)
    dest = S3Destination(
        target=target,
        credentials={"aws_access_key_id": "testing", "aws_secret_access_key": "testing"},
        pointer={"bundle_name": "big"},
        copy_threshold=5 * MIB,
        copy_part_size=5 * MIB,
    )
    result = dest.stage(files)
    assert result.verified == ["model.safetensors"] and objects(s3_server, "copy-bucket", "big") == {}
    dest.promote(result)
    client = s3_server.client()
    head = client.head_object(Bucket="copy-bucket", Key="big/model.safetensors")
    assert head["ETag"].endswith('-3"')  # copied in three parts
    assert head["Metadata"]["sha256"] == files[0].sha256 and head["ContentType"] == "application/octet-stream"
    assert sha(client.get_object(Bucket="copy-bucket", Key="big/model.safetensors")["Body"].read()) == files[0].sha256
    assert json.loads(objects(s3_server, "copy-bucket", "big")[RELEASE_POINTER]) == {"bundle_name": "big"}
    assert objects(s3_server, "copy-bucket", STAGING_ROOT) == {}


# -- ModelScope: no visibility API ----------------------------------------------------------------------
@pytest.mark.slow
def test_modelscope_stays_private_and_asks_a_person(tmp_path: Path, fakes: tuple[FakeHF, FakeModelScope]) -> None:
    _, ms = fakes
    ctx = build_release(tmp_path, publish={"modelscope_repo": MS_REPO})
    card_stage(ctx)
    result = publish_stage(ctx)
    assert result.status == "warning" and "make it public in its settings" in " ".join(result.outputs["warnings"])
    dest = result.outputs["destinations"]["modelscope"]
    assert dest["verified"] == len(expected(ctx)) and dest["promoted"] is False
    assert ms.repos[MS_REPO].private

    # A repo someone made public is never written to: a half-updated release would be public.
    ms.repos[MS_REPO].private = False
    ms.repos[MS_REPO].files["README.md"] = StoredFile(b"vandalised", lfs=False)
    with pytest.raises(PublishError, match="is public and 1 file"):
        publish_bundle(ctx.config, bundle_dir=ctx.layout.bundle_dir)
    assert ms.repos[MS_REPO].files["README.md"].content == b"vandalised"
