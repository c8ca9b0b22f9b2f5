"""What a publish sends, and whether it may: the bundle checked against its manifest, the gate.

:func:`collect_files` lists the bundle (and converted weights) after checking each file
against the manifest's sha256.  :func:`gate_decision` says whether the gate allows
publishing: an ``inconsistent`` (failed) release needs ``gates.publish_on_fail``, an
``inconclusive`` or ``missing`` verdict needs ``publish.allow_verdicts``, and either
opt-in needs the matching banner in the card.  :class:`PublishPlan` and
:class:`PublishResult` are what a dry run and a publish return.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagrelease._filehash import HashCache, walk_files
from flagrelease._redact import redact, redact_obj
from flagrelease.bundle import GATE_FAILED_MARKER, GATE_UNVERIFIED_MARKER, MANIFEST_NAME, gate_unverified_verdict
from flagrelease.config import ReleaseConfig
from flagrelease.errors import ConfigError, PublishError
from flagrelease.publish._types import DestinationResult, PlannedFile

__all__ = [
    "DestinationPlan",
    "GateDecision",
    "PublishPlan",
    "PublishResult",
    "check_local_dir",
    "collect_files",
    "gate_decision",
]


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


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


@dataclass
class PublishPlan:
    """What a publish would upload, and where (``--dry-run``).

    Attributes:
        release: the release name.
        bundle_name: the bundle's display name.
        destinations: one plan per configured destination.
        blocked: why publishing would be refused (a failed or unverified gate), else None.
        warning: shown when a failed or unverified release would be published anyway.
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
        if self.destinations:
            lines.append(
                "  each destination is staged privately (private repo, S3 staging prefix, hidden folder), downloaded "
                "back and verified; only then is it made public"
            )
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
        gate_unverified: the gate verdict (``inconclusive`` or ``missing``) published
            anyway because ``publish.allow_verdicts`` names it, else None.
    """

    release: str
    bundle_name: str
    destinations: list[DestinationResult] = field(default_factory=list)
    gate_failed: bool = False
    gate_unverified: str | None = None

    @property
    def warnings(self) -> list[str]:
        """What a person must know or still do."""
        out = []
        if self.gate_failed:
            out.append("the release failed its gate; published because gates.publish_on_fail is set")
        if self.gate_unverified:
            out.append(f"the gate verdict is {self.gate_unverified}; published because publish.allow_verdicts names it")
        return out + [w for d in self.destinations for w in d.warnings]

    def to_text(self) -> str:
        """One line per destination."""
        lines = [f"published {self.bundle_name} (release {self.release})"]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        if not self.destinations:
            lines.append("  no destination configured")
        for d in self.destinations:
            state = "public" if d.promoted else "not public"
            lines.append(
                f"  {d.name:10s} {d.url}: uploaded {len(d.uploaded)} ({_size(d.bytes_uploaded)}), "
                f"unchanged {len(d.skipped)}, verified {len(d.verified)}; {state}"
            )
        return redact("\n".join(lines))

    def to_outputs(self) -> dict[str, Any]:
        """The stage outputs: ``destinations``: name -> {url, uploaded, skipped, bytes, details, verified, ...}."""
        return {
            "destinations": {d.name: redact_obj(d.to_json()) for d in self.destinations},
            "gate_failed": self.gate_failed,
            "gate_unverified": self.gate_unverified,
            "warnings": [redact(w) for w in self.warnings],
        }


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


def collect_files(
    bundle_dir: Path, manifest: Mapping[str, Any], *, cache: HashCache, weights_dir: Path | None
) -> list[PlannedFile]:
    """Every file to publish: the bundle, then the weights when ``weights_dir`` is given.

    Raises:
        PublishError: a file differs from the manifest, or a listed weight file is missing.
    """
    files = _bundle_files(bundle_dir, manifest, cache)
    if weights_dir is not None:
        files += _weight_files(weights_dir, manifest, cache, {f.path for f in files})
    return files


def _check_inside(a: Path, b: Path, what: str) -> None:
    a, b = a.resolve(), b.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise ConfigError(f"publish.local_dir {a} overlaps the {what} {b}; choose a separate folder")


def check_local_dir(local_dir: Path, *, bundle_dir: Path, work_dir: Path, weights_dir: Path | None) -> None:
    """Refuse a ``publish.local_dir`` that overlaps what it is published from.

    Raises:
        ConfigError: it overlaps the bundle, the release's work folder or the weights.
    """
    _check_inside(local_dir, bundle_dir, "bundle")
    _check_inside(local_dir, work_dir, "release work folder")
    if weights_dir is not None:
        _check_inside(local_dir, weights_dir, "weights folder")


# -- the gate ----------------------------------------------------------------------------------------
@dataclass
class GateDecision:
    """Whether the gate lets the release be published.

    Attributes:
        blocked: why publishing is refused, else None.
        warning: why it is published anyway (an opt-in), else None.
        failed: the release failed its gate (inconsistent).
        unverified: ``inconclusive`` or ``missing`` when the gate did not show it consistent.
    """

    blocked: str | None = None
    warning: str | None = None
    failed: bool = False
    unverified: str | None = None


def gate_decision(
    cfg: ReleaseConfig, manifest: Mapping[str, Any], *, failed: bool, verdict: str | None, card: str
) -> GateDecision:
    """What the gate allows for ``cfg``.

    Args:
        cfg: the release.
        manifest: the bundle manifest (its ``gate.reasons``).
        failed: the release failed its gate.
        verdict: the gate's accuracy verdict (None: no gate result).
        card: the card's text (an opt-in needs its banner there).

    Raises:
        PublishError: publishing is allowed by an opt-in but the card lacks its banner.
    """
    out = GateDecision(failed=failed)
    if failed:
        reasons = "; ".join(manifest["gate"]["reasons"]) or "the gate stage failed"
        if not cfg.gates.publish_on_fail:
            out.blocked = (
                f"release {cfg.name} failed its consistency gate ({reasons}). Fix the cause and run the release "
                "again, or set `gates.publish_on_fail: true` in the release config to publish it with a warning on "
                "the card"
            )
            return out
        out.warning = f"publishing a release that failed its gate ({reasons}) because gates.publish_on_fail is set"
        if GATE_FAILED_MARKER not in card:
            raise PublishError(
                "the release failed its gate but its card has no gate-failure warning; re-run the card stage "
                "(flagrelease run CONFIG --stages card --force), then publish"
            )
        return out
    unverified = gate_unverified_verdict(verdict)
    if unverified is None:
        return out
    out.unverified = unverified
    what = "no gate verdict" if unverified == "missing" else "an inconclusive gate verdict"
    if unverified not in cfg.publish.allow_verdicts:
        out.blocked = (
            f"release {cfg.name} has {what}: the evaluation did not show it consistent with the reference. Run the "
            f"release again with more items (or the missing benchmarks), or set `publish.allow_verdicts: "
            f"[{unverified}]` in the release config to publish it with a banner on the card"
        )
        return out
    out.warning = f"publishing a release with {what} because publish.allow_verdicts names {unverified}"
    if GATE_UNVERIFIED_MARKER not in card:
        raise PublishError(
            f"the release's gate verdict is {unverified} and publish.allow_verdicts lets it through, but its card "
            "has no banner saying so; re-run the card stage (flagrelease run CONFIG --stages card --force), then "
            "publish"
        )
    return out
