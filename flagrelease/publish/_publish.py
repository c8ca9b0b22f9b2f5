"""Publish a built bundle: a local folder, the Hugging Face Hub, ModelScope, S3, the registry.

Private first, public after the gate:

1. The bundle is checked against its manifest, and the gate decides
   (:func:`flagrelease.publish._plan.gate_decision`): an inconsistent, inconclusive or
   missing verdict blocks publishing unless the config opts in.
2. Every destination is **staged**: uploaded where nobody else sees it (a private repo,
   an S3 staging prefix, a hidden folder), downloaded back and verified against the
   manifest's sha256.
3. Only when every destination staged and verified is each one **promoted**: the repo
   made public, the S3 objects copied to the final prefix with the release pointer
   last, the folder swapped in.

A failed gate, a failed verification or an interrupted upload therefore leaves nothing
public, and publishing again resumes: uploads are idempotent (remote sha256s are compared
first) and resumable (S3 multipart uploads continue, Hub commits already made are kept).

Tokens come from the environment (:mod:`flagrelease.constants`) or, under Prefect, from
Secret blocks that the task layer resolves and passes in as :class:`PublishCredentials`
(through ``ctx.options["publish_credentials"]``).  They never reach a log line, an
artifact, the card or a returned object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flagrelease._filehash import HashCache
from flagrelease._redact import redact
from flagrelease.bundle import MANIFEST_NAME, load_manifest
from flagrelease.config import ReleaseConfig
from flagrelease.constants import hf_endpoint, modelscope_endpoint
from flagrelease.errors import ConfigError, PublishBlockedError, PublishError
from flagrelease.layout import BundleLayout
from flagrelease.publish._credentials import PublishCredentials, masked_logs
from flagrelease.publish._plan import (
    DestinationPlan,
    PublishPlan,
    PublishResult,
    check_local_dir,
    collect_files,
    gate_decision,
)
from flagrelease.publish._types import Destination, PlannedFile

__all__ = ["publish_bundle"]

log = logging.getLogger("flagrelease.publish")


def _plans(cfg: ReleaseConfig, manifest: Mapping[str, Any], files: list[PlannedFile]) -> list[DestinationPlan]:
    from flagrelease.publish.registry import target_reference
    from flagrelease.publish.s3 import s3_key

    pub = cfg.publish
    plans = []
    if pub.local_dir:
        plans.append(DestinationPlan("local", str(pub.local_dir), list(files)))
    if pub.hf_repo:
        plans.append(DestinationPlan("hf", f"{hf_endpoint()}/{pub.hf_repo}", list(files)))
    if pub.modelscope_repo:
        plans.append(
            DestinationPlan("modelscope", f"{modelscope_endpoint()}/models/{pub.modelscope_repo}", list(files))
        )
    if pub.s3:
        url = f"s3://{pub.s3.bucket}/{s3_key(pub.s3, '')}".rstrip("/")
        plans.append(DestinationPlan("s3", url, list(files)))
    if pub.registry:
        plans.append(DestinationPlan("registry", target_reference(manifest["image"]["ref"], pub.registry)))
    return plans


def _destination(
    plan: DestinationPlan,
    *,
    cfg: ReleaseConfig,
    manifest: Mapping[str, Any],
    layout: BundleLayout,
    cache: HashCache,
    creds: PublishCredentials,
    s3_transfer: Any | None,
    on_s3_part: Callable[[str, int, int], None] | None,
) -> Destination:
    pub = cfg.publish
    name = manifest["release"]["bundle_name"]
    if plan.name == "local" and pub.local_dir is not None:
        from flagrelease.publish.local import LocalDestination

        return LocalDestination(Path(pub.local_dir), cache=cache)
    if plan.name == "hf" and pub.hf_repo is not None:
        from flagrelease.publish.hf import HFDestination

        return HFDestination(
            repo_id=pub.hf_repo, bundle_name=name, token=creds.hf_token, endpoint=hf_endpoint(), private=pub.private
        )
    if plan.name == "modelscope" and pub.modelscope_repo is not None:
        from flagrelease.publish.modelscope import ModelScopeDestination

        slug = pub.modelscope_repo.replace("/", "--")
        return ModelScopeDestination(
            repo_id=pub.modelscope_repo,
            bundle_name=name,
            token=creds.modelscope_token,
            endpoint=modelscope_endpoint(),
            private=pub.private,
            license=cfg.model.license,
            staging_dir=layout.runs_dir / "publish" / f"modelscope-{slug}",
            tracker_path=layout.state_dir / f"modelscope-upload-{slug}.json",
        )
    if plan.name == "s3" and pub.s3 is not None:
        from flagrelease.publish.s3 import S3Destination

        manifest_file = next((f for f in plan.files if f.path == MANIFEST_NAME), None)
        pointer = {
            "release": cfg.name,
            "bundle_name": name,
            "manifest": MANIFEST_NAME,
            "manifest_sha256": manifest_file.sha256 if manifest_file else None,
            "files": len(plan.files),
            "bytes": plan.bytes,
        }
        return S3Destination(
            target=pub.s3,
            credentials=creds.boto3(),
            pointer=pointer,
            transfer=s3_transfer,
            state_path=layout.state_dir / "s3-uploads.json",
            on_part=on_s3_part,
        )
    if plan.name == "registry" and pub.registry is not None:
        from flagrelease.publish.registry import RegistryDestination

        return RegistryDestination(
            image_ref=manifest["image"]["ref"], digest=manifest["image"]["digest"], registry=pub.registry
        )
    raise ConfigError(f"unknown publish destination {plan.name!r}")


def publish_bundle(
    cfg: ReleaseConfig,
    *,
    bundle_dir: Path,
    dry_run: bool = False,
    weights_dir: Path | None = None,
    credentials: PublishCredentials | Mapping[str, Any] | None = None,
    gate_failed: bool | None = None,
    gate_verdict: str | None = None,
    s3_transfer: Any | None = None,
    on_s3_part: Callable[[str, int, int], None] | None = None,
    on_staged: Callable[[PublishResult], None] | None = None,
) -> PublishPlan | PublishResult:
    """Publish a built bundle to every destination in ``cfg.publish``: private first, public after.

    The bundle is checked against its manifest first; weights are added when the release
    converted them (``weights.published`` in the manifest).  Each destination compares
    remote checksums and uploads only what differs, into a private or staging place; every
    file is downloaded back and verified; only then are the destinations made public.

    Args:
        cfg: the release config.
        bundle_dir: the bundle (card, manifest, configs, logs).
        dry_run: return the plan (what would be uploaded, and where) without uploading.
        weights_dir: the converted weights (default: the folder the manifest records).
        credentials: tokens (default: the environment).
        gate_failed: whether the release failed its gate (default: the manifest's).
        gate_verdict: the gate's accuracy verdict (default: the manifest's; None counts as missing).
        s3_transfer: a ``boto3.s3.transfer.TransferConfig`` for S3 (part size, concurrency).
        on_s3_part: called after each S3 multipart part is stored.
        on_staged: called once every destination is staged and verified, before any is
            made public.

    Returns:
        A :class:`PublishPlan` in a dry run, else a :class:`PublishResult`.

    Raises:
        PublishBlockedError: the gate refuses (inconsistent without ``gates.publish_on_fail``;
            inconclusive or missing without ``publish.allow_verdicts``).
        PublishError: the bundle does not match its manifest, a destination failed, or a
            file did not verify (then nothing was made public).
    """
    bundle_dir = Path(bundle_dir).resolve()
    layout = BundleLayout.for_release(cfg)
    manifest = load_manifest(bundle_dir / MANIFEST_NAME)
    cache = HashCache(layout.state_dir / "hashes.json")
    wdir = None
    if manifest["weights"]["published"]:
        wdir = Path(weights_dir) if weights_dir else Path(manifest["weights"]["dir"] or layout.converted_dir)
    files = collect_files(bundle_dir, manifest, cache=cache, weights_dir=wdir)
    cache.save()
    if cfg.publish.local_dir:
        check_local_dir(cfg.publish.local_dir, bundle_dir=bundle_dir, work_dir=layout.root, weights_dir=wdir)
    card = (bundle_dir / "README.md").read_text(encoding="utf-8") if (bundle_dir / "README.md").is_file() else ""
    gate = gate_decision(
        cfg,
        manifest,
        failed=bool(manifest["gate"]["failed"] if gate_failed is None else gate_failed),
        verdict=manifest["gate"].get("verdict") if gate_verdict is None else gate_verdict,
        card=card,
    )
    plans = _plans(cfg, manifest, files)
    bundle_name = manifest["release"]["bundle_name"]
    if dry_run:
        return PublishPlan(cfg.name, bundle_name, plans, blocked=gate.blocked, warning=gate.warning)
    if gate.blocked:
        raise PublishBlockedError(gate.blocked, model=cfg.name, chip=cfg.chip)
    if gate.warning:
        log.warning("publish: %s", gate.warning)

    creds = PublishCredentials.from_mapping(credentials).resolved()
    result = PublishResult(cfg.name, bundle_name, gate_failed=gate.failed, gate_unverified=gate.unverified)
    with masked_logs(creds.secrets()):
        try:
            staged: list[Destination] = []
            for plan in plans:
                dest = _destination(
                    plan,
                    cfg=cfg,
                    manifest=manifest,
                    layout=layout,
                    cache=cache,
                    creds=creds,
                    s3_transfer=s3_transfer,
                    on_s3_part=on_s3_part,
                )
                result.destinations.append(dest.stage(plan.files))
                staged.append(dest)
            log.info("publish: every destination staged and verified; making them public")
            if on_staged is not None:
                on_staged(result)
            for dest, done in zip(staged, result.destinations, strict=True):
                dest.promote(done)
        except PublishError as err:
            raise PublishError(redact(err.message, extra=creds.secrets()), model=cfg.name, chip=cfg.chip) from err
        finally:
            cache.save()
    return result
