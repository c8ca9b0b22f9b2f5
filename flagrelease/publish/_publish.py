"""Publish a built bundle: a local folder, the Hugging Face Hub, ModelScope, S3, the registry.

Publishing is idempotent (a second publish of the same bundle uploads nothing: remote
sha256s are compared before any upload) and resumable (S3 multipart uploads continue,
Hub commits already made are kept).  A release that failed its gate is not published
unless ``gates.publish_on_fail`` is set, in which case its card carries a warning.

Tokens come from the environment (:mod:`flagrelease.constants`) or, under Prefect, from
Secret blocks that the task layer resolves and passes in as :class:`PublishCredentials`
(through ``ctx.options["publish_credentials"]``).  They never reach a log line, an
artifact, the card or a returned object.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_copy
from flagrelease._filehash import HashCache, walk_files
from flagrelease._redact import redact
from flagrelease.bundle import GATE_FAILED_MARKER, MANIFEST_NAME, gate_failure_reasons, load_manifest
from flagrelease.config import ReleaseConfig
from flagrelease.constants import aws_credentials, hf_endpoint, hf_token, modelscope_endpoint, modelscope_token
from flagrelease.errors import ConfigError, PublishBlockedError, PublishError
from flagrelease.layout import BundleLayout
from flagrelease.pipeline import ReleaseContext, StageResult
from flagrelease.publish._types import DestinationResult, PlannedFile

__all__ = [
    "SECRET_BLOCKS",
    "DestinationPlan",
    "DestinationResult",
    "PlannedFile",
    "PublishCredentials",
    "PublishPlan",
    "PublishResult",
    "credentials_from_secrets",
    "publish_bundle",
    "run_stage",
]

log = logging.getLogger("flagrelease.publish")


# -- credentials -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishCredentials:
    """Tokens for the destinations; each None falls back to the environment.

    The repr never shows a value.
    """

    hf_token: str | None = field(default=None, repr=False)
    modelscope_token: str | None = field(default=None, repr=False)
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | PublishCredentials | None) -> PublishCredentials:
        """Credentials from a mapping of the field names (unknown keys are refused)."""
        if isinstance(data, PublishCredentials):
            return data
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"unknown publish credential(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**{k: (str(v) if v else None) for k, v in data.items()})

    def resolved(self) -> PublishCredentials:
        """These credentials with the environment filling what is missing."""
        aws = aws_credentials()
        return PublishCredentials(
            hf_token=self.hf_token or hf_token(),
            modelscope_token=self.modelscope_token or modelscope_token(),
            aws_access_key_id=self.aws_access_key_id or aws.get("aws_access_key_id"),
            aws_secret_access_key=self.aws_secret_access_key or aws.get("aws_secret_access_key"),
            aws_session_token=self.aws_session_token or aws.get("aws_session_token"),
        )

    def boto3(self) -> dict[str, str]:
        """boto3 client keyword arguments (empty: boto3's own credential chain)."""
        out = {
            "aws_access_key_id": self.aws_access_key_id,
            "aws_secret_access_key": self.aws_secret_access_key,
            "aws_session_token": self.aws_session_token,
        }
        return {k: v for k, v in out.items() if v}

    def secrets(self) -> list[str]:
        """Every value, for masking."""
        values = [
            self.hf_token,
            self.modelscope_token,
            self.aws_access_key_id,
            self.aws_secret_access_key,
            self.aws_session_token,
        ]
        return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)


#: Prefect Secret block names the task layer resolves into :class:`PublishCredentials` fields.
SECRET_BLOCKS: dict[str, str] = {
    "hf_token": "flagrelease-hf-token",
    "modelscope_token": "flagrelease-modelscope-token",
    "aws_access_key_id": "flagrelease-aws-access-key-id",
    "aws_secret_access_key": "flagrelease-aws-secret-access-key",
    "aws_session_token": "flagrelease-aws-session-token",
}


def credentials_from_secrets(get: Callable[[str], str | None]) -> PublishCredentials:
    """Credentials from secret storage, without this library knowing the store.

    Args:
        get: returns the value of the named secret, or None when there is none; under
            Prefect, the task passes a function that loads the ``Secret`` block of that name
            (:data:`SECRET_BLOCKS`).

    Returns:
        Credentials with a field for each secret found (the rest fall back to the environment).
    """
    return PublishCredentials(**{field_name: get(block) or None for field_name, block in SECRET_BLOCKS.items()})


class _MaskFilter(logging.Filter):
    """Masks given secret values (and every known token shape) in log records."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, extra=self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


@contextlib.contextmanager
def _masked_logs(secrets: list[str]) -> Iterator[None]:
    """While publishing, mask the tokens in every handler's records (ours and the clients')."""
    filt = _MaskFilter(secrets)
    handlers: set[logging.Handler] = set(logging.getLogger().handlers)
    for obj in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(obj, logging.Logger):
            handlers.update(obj.handlers)
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)


# -- plans and results --------------------------------------------------------------------------
@dataclass
class DestinationPlan:
    """Where files would go.

    Attributes:
        name: ``local``, ``hf``, ``modelscope``, ``s3`` or ``registry``.
        url: the destination.
        files: what would be sent (nothing already there is skipped in a plan: remotes
            are not contacted in a dry run).
    """

    name: str
    url: str
    files: list[PlannedFile] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Bytes to send at most."""
        return sum(f.size for f in self.files)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


@dataclass
class PublishPlan:
    """What a publish would upload, and where (``--dry-run``).

    Attributes:
        release: the release name.
        bundle_name: the bundle's display name.
        destinations: one plan per configured destination.
        blocked: why publishing would be refused (a failed gate), else None.
        warning: shown when a failed release would be published anyway.
    """

    release: str
    bundle_name: str
    destinations: list[DestinationPlan] = field(default_factory=list)
    blocked: str | None = None
    warning: str | None = None

    def to_text(self) -> str:
        """The plan, one line per destination and file."""
        lines = [f"publish {self.bundle_name} (release {self.release}) -- dry run, nothing is uploaded"]
        if self.blocked:
            lines.append(f"  BLOCKED: {self.blocked}")
        if self.warning:
            lines.append(f"  WARNING: {self.warning}")
        if not self.destinations:
            lines.append("  no destination configured (publish: hf_repo, modelscope_repo, s3, registry, local_dir)")
        for d in self.destinations:
            if d.name == "registry":
                lines.append(f"  {d.name:10s} {d.url}: verify the image digest, push the image if it is missing")
                continue
            lines.append(
                f"  {d.name:10s} {d.url}: up to {len(d.files)} file(s), {_size(d.bytes)} "
                "(files already there with the same sha256 are skipped)"
            )
            lines += [f"    {f.path}  {_size(f.size)}  sha256:{f.sha256[:12]}" for f in d.files]
        return redact("\n".join(lines))

    def to_outputs(self) -> dict[str, Any]:
        """The stage outputs of a dry run."""
        return {
            "destinations": {
                d.name: {"url": redact(d.url), "uploaded": 0, "skipped": 0, "planned": len(d.files), "bytes": d.bytes}
                for d in self.destinations
            },
            "blocked": self.blocked,
        }


@dataclass
class PublishResult:
    """What a publish did.

    Attributes:
        release: the release name.
        bundle_name: the bundle's display name.
        destinations: one result per destination.
        gate_failed: the release failed its gate and was published anyway.
    """

    release: str
    bundle_name: str
    destinations: list[DestinationResult] = field(default_factory=list)
    gate_failed: bool = False

    def to_text(self) -> str:
        """One line per destination."""
        lines = [f"published {self.bundle_name} (release {self.release})"]
        if self.gate_failed:
            lines.append("  WARNING: the release failed its gate; published because gates.publish_on_fail is set")
        if not self.destinations:
            lines.append("  no destination configured")
        for d in self.destinations:
            lines.append(
                f"  {d.name:10s} {d.url}: uploaded {len(d.uploaded)} ({_size(d.bytes_uploaded)}), "
                f"unchanged {len(d.skipped)}"
            )
        return redact("\n".join(lines))

    def to_outputs(self) -> dict[str, Any]:
        """The stage outputs: ``destinations``: name -> {url, uploaded, skipped, bytes, details}."""
        return {
            "destinations": {d.name: _redact_json(d.to_json()) for d in self.destinations},
            "gate_failed": self.gate_failed,
        }


def _redact_json(obj: Any) -> Any:
    from flagrelease._redact import redact_obj

    return redact_obj(obj)


# -- collecting the files ---------------------------------------------------------------------------
def _bundle_files(bundle_dir: Path, manifest: Mapping[str, Any], cache: HashCache) -> list[PlannedFile]:
    entries = walk_files(bundle_dir, cache=cache)
    listed = {f["path"]: f for f in manifest["files"]}
    local = {e.path: e for e in entries if e.path != MANIFEST_NAME}
    changed = sorted(
        p
        for p in set(listed) | set(local)
        if p not in listed or p not in local or listed[p]["sha256"] != local[p].sha256
    )
    if changed:
        raise PublishError(
            f"the bundle {bundle_dir} changed since the card stage wrote its manifest "
            f"({len(changed)} file(s): {', '.join(changed[:5])}); re-run the card stage "
            "(flagrelease run CONFIG --stages card --force), then publish"
        )
    return [PlannedFile(e.path, e.local, e.size, e.sha256, "bundle") for e in entries]


def _weight_files(
    weights_dir: Path, manifest: Mapping[str, Any], cache: HashCache, taken: set[str]
) -> list[PlannedFile]:
    if not weights_dir.is_dir():
        raise PublishError(
            f"the weights folder {weights_dir} does not exist; run the convert stage again or pass weights_dir"
        )
    listed = {f["path"]: f for f in manifest["weights"]["files"]}
    out = []
    for e in walk_files(weights_dir, cache=cache, links_outside=True):
        if e.path in taken:
            continue  # the bundle's own file (README.md: the card) wins
        known = listed.get(e.path)
        if known is not None and known["sha256"] != e.sha256:
            raise PublishError(
                f"{e.local} differs from the manifest's sha256; the weights changed after the card stage: "
                "re-run the card stage, then publish"
            )
        out.append(PlannedFile(e.path, e.local, e.size, e.sha256, "weights"))
    missing = sorted(set(listed) - {f.path for f in out} - taken)
    if missing:
        raise PublishError(
            f"{len(missing)} weight file(s) in the manifest are missing from {weights_dir}: "
            f"{', '.join(missing[:5])}; run the convert stage again"
        )
    return out


def _check_inside(a: Path, b: Path, what: str) -> None:
    a, b = a.resolve(), b.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise ConfigError(f"publish.local_dir {a} overlaps the {what} {b}; choose a separate folder")


# -- local folder ------------------------------------------------------------------------------------
def _same(dst: Path, f: PlannedFile, cache: HashCache) -> bool:
    return dst.is_file() and not dst.is_symlink() and dst.stat().st_size == f.size and cache.sha256(dst) == f.sha256


def _publish_local(files: list[PlannedFile], *, dest: Path, cache: HashCache) -> DestinationResult:
    """Copy ``files`` into ``dest``, atomically: the folder is replaced only once complete.

    Unchanged files are hard-linked from the previous publish; nothing happens when the
    folder already holds exactly these files.
    """
    result = DestinationResult(name="local", url=str(dest))
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / MANIFEST_NAME).is_file())):
        raise PublishError(
            f"publish.local_dir {dest} exists and is not a published bundle (it has no {MANIFEST_NAME}); "
            "publishing replaces the folder, so point local_dir at an empty or new folder"
        )
    existing = {e.path for e in walk_files(dest, cache=cache)} if dest.is_dir() else set()
    same = {f.path for f in files if _same(dest / f.path, f, cache)}
    if same == {f.path for f in files} and existing == same:
        result.skipped.extend(sorted(same))
        return result
    from flagrelease._atomic import atomic_dir

    with atomic_dir(dest) as tmp:
        for f in files:
            out = tmp / f.path
            out.parent.mkdir(parents=True, exist_ok=True)
            if f.path in same:
                try:
                    os.link(dest / f.path, out)
                except OSError:
                    shutil.copy2(dest / f.path, out)
                result.skipped.append(f.path)
            else:
                atomic_copy(f.local, out)
                if cache.sha256(out) != f.sha256:
                    raise PublishError(f"copying {f.local} to {dest} gave different content; publish again")
                result.uploaded.append(f.path)
                result.bytes_uploaded += f.size
    log.info("local: %d file(s) copied, %d unchanged, into %s", len(result.uploaded), len(result.skipped), dest)
    return result


# -- the entry point ---------------------------------------------------------------------------------
def _destinations(cfg: ReleaseConfig, manifest: Mapping[str, Any], files: list[PlannedFile]) -> list[DestinationPlan]:
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


def publish_bundle(
    cfg: ReleaseConfig,
    *,
    bundle_dir: Path,
    dry_run: bool = False,
    weights_dir: Path | None = None,
    credentials: PublishCredentials | Mapping[str, Any] | None = None,
    gate_failed: bool | None = None,
    s3_transfer: Any | None = None,
    on_s3_part: Callable[[str, int, int], None] | None = None,
) -> PublishPlan | PublishResult:
    """Publish a built bundle to every destination in ``cfg.publish``.

    The bundle is checked against its manifest first; weights are added when the release
    converted them (``weights.published`` in the manifest).  Each destination compares
    remote checksums and uploads only what differs.

    Args:
        cfg: the release config.
        bundle_dir: the bundle (card, manifest, configs, logs).
        dry_run: return the plan (what would be uploaded, and where) without uploading.
        weights_dir: the converted weights (default: the folder the manifest records).
        credentials: tokens (default: the environment).
        gate_failed: the gate verdict (default: the manifest's).
        s3_transfer: a ``boto3.s3.transfer.TransferConfig`` for S3 (part size, concurrency).
        on_s3_part: called after each S3 multipart part is stored.

    Returns:
        A :class:`PublishPlan` in a dry run, else a :class:`PublishResult`.

    Raises:
        PublishError: the release failed its gate (and ``gates.publish_on_fail`` is not
            set), the bundle does not match its manifest, or a destination failed.
    """
    bundle_dir = Path(bundle_dir).resolve()
    layout = BundleLayout.for_release(cfg)
    manifest = load_manifest(bundle_dir / MANIFEST_NAME)
    cache = HashCache(layout.state_dir / "hashes.json")
    files = _bundle_files(bundle_dir, manifest, cache)
    if manifest["weights"]["published"]:
        wdir = Path(weights_dir) if weights_dir else Path(manifest["weights"]["dir"] or layout.converted_dir)
        files += _weight_files(wdir, manifest, cache, {f.path for f in files})
    cache.save()
    if cfg.publish.local_dir:
        _check_inside(cfg.publish.local_dir, bundle_dir, "bundle")
        _check_inside(cfg.publish.local_dir, layout.root, "release work folder")
        if manifest["weights"]["published"] and manifest["weights"]["dir"]:
            _check_inside(cfg.publish.local_dir, Path(manifest["weights"]["dir"]), "weights folder")
    failed = manifest["gate"]["failed"] if gate_failed is None else gate_failed
    reasons = "; ".join(manifest["gate"]["reasons"]) or "the gate stage failed"
    blocked = warning = None
    if failed and not cfg.gates.publish_on_fail:
        blocked = (
            f"release {cfg.name} failed its consistency gate ({reasons}). Fix the cause and run the release again, "
            "or set `gates.publish_on_fail: true` in the release config to publish it with a warning on the card"
        )
    elif failed:
        warning = f"publishing a release that failed its gate ({reasons}) because gates.publish_on_fail is set"
        card = (bundle_dir / "README.md").read_text(encoding="utf-8") if (bundle_dir / "README.md").is_file() else ""
        if GATE_FAILED_MARKER not in card:
            raise PublishError(
                "the release failed its gate but its card has no gate-failure warning; re-run the card stage "
                "(flagrelease run CONFIG --stages card --force), then publish"
            )
    plans = _destinations(cfg, manifest, files)
    if dry_run:
        return PublishPlan(cfg.name, manifest["release"]["bundle_name"], plans, blocked=blocked, warning=warning)
    if blocked:
        raise PublishBlockedError(blocked, model=cfg.name, chip=cfg.chip)
    if warning:
        log.warning("publish: %s", warning)

    creds = PublishCredentials.from_mapping(credentials).resolved()
    result = PublishResult(cfg.name, manifest["release"]["bundle_name"], gate_failed=bool(failed))
    with _masked_logs(creds.secrets()):
        try:
            for plan in plans:
                result.destinations.append(
                    _publish_one(
                        plan,
                        cfg=cfg,
                        manifest=manifest,
                        layout=layout,
                        cache=cache,
                        creds=creds,
                        s3_transfer=s3_transfer,
                        on_s3_part=on_s3_part,
                    )
                )
        except PublishError as err:
            raise PublishError(redact(err.message, extra=creds.secrets()), model=cfg.name, chip=cfg.chip) from err
        finally:
            cache.save()
    return result


def _publish_one(
    plan: DestinationPlan,
    *,
    cfg: ReleaseConfig,
    manifest: Mapping[str, Any],
    layout: BundleLayout,
    cache: HashCache,
    creds: PublishCredentials,
    s3_transfer: Any | None,
    on_s3_part: Callable[[str, int, int], None] | None,
) -> DestinationResult:
    pub = cfg.publish
    name = manifest["release"]["bundle_name"]
    if plan.name == "local":
        assert pub.local_dir is not None
        return _publish_local(plan.files, dest=Path(pub.local_dir), cache=cache)
    if plan.name == "hf":
        from flagrelease.publish.hf import publish_hf

        assert pub.hf_repo is not None
        return publish_hf(
            plan.files,
            repo_id=pub.hf_repo,
            bundle_name=name,
            token=creds.hf_token,
            endpoint=hf_endpoint(),
            private=pub.private,
        )
    if plan.name == "modelscope":
        from flagrelease.publish.modelscope import publish_modelscope

        assert pub.modelscope_repo is not None
        slug = pub.modelscope_repo.replace("/", "--")
        return publish_modelscope(
            plan.files,
            repo_id=pub.modelscope_repo,
            bundle_name=name,
            token=creds.modelscope_token,
            endpoint=modelscope_endpoint(),
            private=pub.private,
            license=cfg.model.license,
            staging_dir=layout.runs_dir / "publish" / f"modelscope-{slug}",
            tracker_path=layout.state_dir / f"modelscope-upload-{slug}.json",
        )
    if plan.name == "s3":
        from flagrelease.publish.s3 import publish_s3

        assert pub.s3 is not None
        return publish_s3(
            plan.files,
            target=pub.s3,
            credentials=creds.boto3(),
            transfer=s3_transfer,
            state_path=layout.state_dir / "s3-uploads.json",
            on_part=on_s3_part,
        )
    if plan.name == "registry":
        from flagrelease.publish.registry import publish_registry

        assert pub.registry is not None
        return publish_registry(
            image_ref=manifest["image"]["ref"], digest=manifest["image"]["digest"], registry=pub.registry
        )
    raise ConfigError(f"unknown publish destination {plan.name!r}")


# -- the stage ---------------------------------------------------------------------------------------
def run_stage(ctx: ReleaseContext) -> StageResult:
    """The publish stage: publish ``bundle/`` (and converted weights) to every configured destination.

    The gate verdict is read from ``ctx.result("gate")``; tokens from
    ``ctx.options["publish_credentials"]`` (resolved Prefect Secret blocks) or the environment.

    Returns:
        A result whose outputs hold ``destinations``: name -> {url, uploaded, skipped, bytes}.
    """
    cfg = ctx.config
    try:
        gate_stage = ctx.result("gate")
    except ConfigError:
        gate_stage = None
    gate_failed = None
    if gate_stage is not None:
        gate_failed = bool(gate_failure_reasons(None, stage=gate_stage)) or None
    pub = cfg.publish
    if not any((pub.local_dir, pub.hf_repo, pub.modelscope_repo, pub.s3, pub.registry)):
        return StageResult(
            stage="publish", summary="no publish destination configured", status="skipped", outputs={"destinations": {}}
        )
    ctx.progress("publish", 0.05, "checking the bundle against its manifest")

    def on_part(path: str, number: int, total: int) -> None:
        ctx.progress("publish", 0.1 + 0.8 * number / max(total, 1), f"s3: {path} part {number}/{total}")

    out = publish_bundle(
        cfg,
        bundle_dir=ctx.layout.bundle_dir,
        dry_run=ctx.dry_run,
        credentials=ctx.options.get("publish_credentials"),
        gate_failed=gate_failed,
        on_s3_part=on_part,
    )
    if isinstance(out, PublishPlan):
        return StageResult(
            stage="publish", summary=out.to_text().splitlines()[0], outputs=out.to_outputs(), status="skipped"
        )
    rows = [
        {"destination": d.name, "path": p, "action": action}
        for d in out.destinations
        for action, paths in (("uploaded", d.uploaded), ("unchanged", d.skipped))
        for p in paths
    ]
    parts = [f"{d.name}: {len(d.uploaded)} uploaded, {len(d.skipped)} unchanged" for d in out.destinations]
    summary = f"published {out.bundle_name} ({'; '.join(parts)})"
    if out.gate_failed:
        summary += " -- the release FAILED its gate (publish_on_fail)"
    return StageResult(
        stage="publish",
        summary=redact(summary),
        outputs=out.to_outputs(),
        tables={"files": rows},
        status="warning" if out.gate_failed else "ok",
    )
