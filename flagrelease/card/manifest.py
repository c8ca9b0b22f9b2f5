"""The bundle manifest ``flagrelease.json``: what was released, from what, with which tools.

The manifest is built from the release config, the chip profile and the upstream stages'
typed outputs (:class:`~flagrelease.card._upstream.Upstream`).  Stages that did not run,
or were skipped, are recorded as such.  Before it is written it is validated against the
committed JSON Schema ``flagrelease/card/schema/flagrelease.schema.json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flagrelease import __version__
from flagrelease._atomic import atomic_write_json
from flagrelease._filehash import HashCache, walk_files
from flagrelease._redact import redact_obj
from flagrelease.bundle import MANIFEST_NAME, SCHEMA_VERSION, gate_failure_reasons, validate_manifest
from flagrelease.card._example import eval_example
from flagrelease.card._names import bundle_name, default_labels, flagscale_name, image_reference, quant_tag
from flagrelease.card._record import executed_commands
from flagrelease.card._scrub import BuildPaths, build_paths
from flagrelease.card._tools import OPLIB_NAME, provenance, tool_versions
from flagrelease.card._upstream import UPSTREAM_STAGES, Upstream, upstream_results
from flagrelease.card._weights import bundle_rel, quant_scheme, read_json, served_model_path, weight_files
from flagrelease.chips import ChipProfile, load_chip
from flagrelease.config import ConvertMode, ReleaseConfig
from flagrelease.constants import templates_dir
from flagrelease.deploy.outputs import DeployOutputs
from flagrelease.evaluate.outputs import EvalOutputs
from flagrelease.image.outputs import ImageOutputs
from flagrelease.layout import BundleLayout

__all__ = [
    "Upstream",
    "build_manifest",
    "bundle_name",
    "default_labels",
    "flagscale_name",
    "image_reference",
    "quant_tag",
    "tool_versions",
    "upstream_results",
    "write_manifest",
]


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _stages_section(upstream: Upstream) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in UPSTREAM_STAGES:
        res = upstream.results.get(stage)
        if res is None:
            out[stage] = {"status": "not-run", "summary": "", "started_at": None, "finished_at": None}
        else:
            out[stage] = {
                "status": res.status,
                "summary": res.summary,
                "started_at": _iso(res.started_at),
                "finished_at": _iso(res.finished_at),
            }
    return out


def _chip_section(chip: ChipProfile) -> dict[str, Any]:
    return {
        "name": chip.name,
        "display_name": chip.display_name,
        "card_name": chip.card_name,
        "vendor": chip.vendor,
        "device_type": chip.device_type,
        "accelerator": chip.accelerator.value,
        "gems_vendor": chip.gems_vendor,
    }


def _eval_section(
    cfg: ReleaseConfig, gate: Mapping[str, Any] | None, evals: EvalOutputs | None, results_rel: str | None
) -> dict[str, Any]:
    ref_label, target_label = default_labels(cfg)
    tasks = [{"name": t.name, "label": t.label or t.name, "metric": t.metric} for t in cfg.eval.tasks]
    if gate:
        rows = [dict(r) for r in gate.get("rows") or []]
        reference = dict(gate.get("reference") or {"label": ref_label, "chip": cfg.eval.reference.chip})
        target = dict(gate.get("target") or {"label": target_label, "chip": cfg.chip})
    else:
        rows = [
            {
                "task": t["name"],
                "label": t["label"],
                "metric": t["metric"],
                "reference": None,
                "target": None,
                "verdict": "missing",
            }
            for t in tasks
        ]
        reference = {"label": ref_label, "chip": cfg.eval.reference.chip}
        target = {"label": target_label, "chip": cfg.chip}
    variants: dict[str, Any] = {}
    for name, v in (evals.variants if evals is not None else {}).items():
        variants[str(name)] = {
            "scores": dict(v.scores),
            "throughput": v.throughput,
            "chip": v.chip,
            "weights": v.weights,
            "flaggems": v.flaggems,
        }
    flaggems = (gate or {}).get("flaggems") or {}
    alpha = float((gate or {}).get("alpha", cfg.gates.alpha))
    return {
        "tasks": tasks,
        "samples_per_item": cfg.eval.samples_per_item,
        "reference": reference,
        "target": target,
        "margin": (gate or {}).get("margin", cfg.gates.accuracy_margin),
        "alpha": alpha,
        "diff_ci_level": (gate or {}).get("diff_ci_level") or round(1 - 2 * alpha, 4),
        "rows": rows,
        "verdict": (gate or {}).get("verdict"),
        "throughput": (gate or {}).get("throughput"),
        "flaggems_on_vs_off": (flaggems.get("on_vs_off") or {}).get("verdict"),
        "blamed_ops": list(flaggems.get("blamed_ops") or []),
        "variants": variants,
        "results_file": results_rel,
    }


def _missing(manifest: Mapping[str, Any], cfg: ReleaseConfig) -> list[str]:
    missing: list[str] = []
    ev = manifest["eval"]
    for row in ev["rows"]:
        label = row.get("label") or row.get("task")
        if row.get("reference") is None:
            missing.append(f"{label}: {ev['reference']['label']} score")
        if row.get("target") is None:
            missing.append(f"{label}: {ev['target']['label']} score")
    gems = manifest["flaggems"]
    triton_expected = gems["library"] == "flag_gems" or (
        gems["library"] is None and gems["requested"] and cfg.chip_profile.gems_vendor != "cpu"
    )
    if triton_expected and gems["triton_share"] is None:
        missing.append("Share of Triton kernels (not measured)")
    if cfg.convert.mode is not ConvertMode.NONE and not manifest["conversion"]["summary"]:
        missing.append("Quantization error report")
    return missing


def _vendor_flag_gems(cfg: ReleaseConfig) -> bool:
    """Whether the chip's Dockerfile installs FlagGems without dependencies (the vendor families)."""
    template = templates_dir() / "docker" / cfg.chip_profile.dockerfile_template
    try:
        return "vendor-base.Dockerfile.j2" in template.read_text(encoding="utf-8")
    except OSError:
        return False


def _flaggems_section(cfg: ReleaseConfig, deploy: DeployOutputs | None) -> dict[str, Any]:
    """The operator library that served: flag_gems with its version and op log, or the CPU stand-in."""
    library = deploy.gems_library if deploy is not None else None
    ops = [str(o) for o in (deploy.gems_ops if deploy is not None else [])]
    share = deploy.triton_share if deploy is not None else None
    served_gems = library == "flag_gems" and bool(ops)
    version = deploy.flag_gems_version if deploy is not None and library == "flag_gems" else None
    library_version = version if library == "flag_gems" else __version__ if library == OPLIB_NAME else None
    return {
        "enabled": served_gems,
        "requested": cfg.serve.flaggems.enabled,
        "library": library,
        "library_version": library_version,
        "version": version,
        "configured_version": cfg.image.flag_gems_version,
        "no_deps": _vendor_flag_gems(cfg),
        "operators": ops,
        "calls": {str(k): int(v) for k, v in (deploy.gems_calls if deploy is not None else {}).items()},
        "excluded_ops": list(cfg.serve.flaggems.excluded_ops),
        "triton_share": float(share) if share is not None and served_gems else None,
        "triton_share_source": "deploy" if share is not None and served_gems else None,
    }


def _image_section(cfg: ReleaseConfig, image: ImageOutputs | None, up: Upstream, bundle_dir: Path) -> dict[str, Any]:
    res = up.results.get("image")
    warning = image.warning if image is not None else None
    if warning is None and res is not None and res.status == "warning":
        warning = res.summary or "the image stage ended with a warning"
    context = (image.bundle_context if image is not None else None) or "image"
    has_context = (bundle_dir / context / "Dockerfile").is_file()
    return {
        "ref": str((image.image_ref if image else None) or image_reference(cfg)),
        "digest": image.digest if image else None,
        "base": (image.base_image if image else None) or cfg.image.base or cfg.chip_profile.base_image,
        "built": image.built if image else None,
        "pushed": image.pushed if image else None,
        "engine": image.engine if image else None,
        "dockerfile": f"{context}/Dockerfile" if has_context else None,
        "context": context if has_context else None,
        "warning": warning,
    }


def _load_test(deploy: DeployOutputs | None, bundle_dir: Path) -> dict[str, Any] | None:
    if deploy is None:
        return None
    out = dict(deploy.load_test)
    if out.get("report"):
        out["report"] = bundle_rel(out["report"], bundle_dir)
    return out


def build_manifest(
    cfg: ReleaseConfig,
    *,
    bundle_dir: Path,
    upstream: Upstream | None = None,
    gate: Mapping[str, Any] | None = None,
    gate_file: Path | None = None,
    config_path: Path | None = None,
    tools: Mapping[str, str | None] | None = None,
    cache: HashCache | None = None,
    paths: BuildPaths | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The manifest of a release, without its ``files`` list (see :func:`write_manifest`).

    Args:
        cfg: the release config.
        bundle_dir: the bundle (its ``serve/`` folder holds the serve configs); paths in
            it are recorded relative to it.
        upstream: what the upstream stages did (:func:`upstream_results`); default: nothing ran.
        gate: the gate results JSON (docs/ARCHITECTURE.md), if there is one.
        gate_file: where the gate results lie in the bundle.
        config_path: the release config file, recorded with its sha256.
        tools: tool versions; default: :func:`tool_versions` of this release.
        cache: a hash cache for the weights' files.
        paths: the build machine's folders, recorded as placeholders (default: this release's).
        now: the creation time (default: now).

    Returns:
        The manifest as a JSON-able dict: secrets redacted, no folder of the build machine.
    """
    up = upstream or Upstream()
    paths = paths or build_paths(cfg, layout=BundleLayout.for_release(cfg), config_path=config_path)
    chip = cfg.chip_profile
    fetch, convert, image, deploy, gate_out = up.fetch, up.convert, up.image, up.deploy, up.gate

    converted = cfg.convert.mode is not ConvertMode.NONE
    weights_dir_s = (convert.model_dir if convert else None) or (fetch.model_dir if fetch else None)
    weights_dir = Path(weights_dir_s) if weights_dir_s else None
    fetch_manifest = read_json(fetch.manifest if fetch else None)
    weight_manifests = [fetch_manifest] if not converted and fetch_manifest is not None else []
    weights = weight_files(weights_dir, weight_manifests, cache)
    pub = cfg.publish
    weights_published = converted and bool(pub.hf_repo or pub.modelscope_repo or pub.s3 or pub.local_dir)

    report_path = convert.report if convert else None
    summary: Any = convert.summary if convert else None
    if not summary:
        report = read_json(report_path)
        summary = report.get("summary") if isinstance(report, dict) else None

    serve_files = walk_files(bundle_dir / "serve", cache=None)
    served_path = served_model_path(bundle_dir / "serve", [f.path for f in serve_files])
    serve_rel = [f"serve/{f.path}" for f in serve_files]
    fs_name = flagscale_name(cfg, [f.path for f in serve_files])
    served_from = [p for p in (weights_dir, Path(convert.model_dir) if convert else None) if p is not None]

    config_sha = None
    if config_path is not None and Path(config_path).is_file():
        config_sha = hashlib.sha256(Path(config_path).read_bytes()).hexdigest()

    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generator": {"name": "flagrelease", "version": __version__},
        "created_at": (now or datetime.now(UTC)).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "release": {
            "name": cfg.name,
            "bundle_name": bundle_name(cfg),
            "description": cfg.description,
            "tags": list(cfg.tags),
            "config_sha256": config_sha,
        },
        "model": {
            "repo_id": cfg.model.repo_id,
            "source": cfg.model.source.value,
            "revision": (fetch.revision if fetch else None) or cfg.model.revision,
            "display_name": cfg.model.name,
            "license": cfg.model.license,
            "license_url": cfg.model.license_url,
        },
        "chip": _chip_section(chip),
        "reference_chip": _chip_section(load_chip(cfg.eval.reference.chip)),
        "stages": _stages_section(up),
        "conversion": {
            "mode": cfg.convert.mode.value,
            "quant": quant_tag(cfg),
            "ignore": list(cfg.convert.ignore) if converted else [],
            "group_size": cfg.convert.group_size if cfg.convert.mode is ConvertMode.INT4_W4A16 else None,
            "report": bundle_rel(report_path, bundle_dir),
            "summary": summary if isinstance(summary, dict) else None,
            "scheme": quant_scheme(weights_dir) if converted else None,
        },
        "weights": {
            "location": "converted" if converted else "source",
            # Where the weights lay on the build machine is not recorded: in a published
            # bundle they lie beside this manifest (or come from the source repo).
            "dir": None,
            "published": weights_published,
            "verified": bool(fetch is not None and fetch.manifest),
            "total_bytes": sum(f.size for f in weights),
            "files": [f.to_json() for f in weights],
        },
        "image": _image_section(cfg, image, up, bundle_dir),
        "serve": {
            "runtime": str((deploy.runtime if deploy else None) or cfg.runtime.value),
            "served_model_name": cfg.served_model_name,
            "flagscale_name": fs_name,
            "command": f"flagscale serve {fs_name}",
            "container_name": cfg.serve.container_name or "flagrelease",
            "model_dir": served_path or cfg.serve.model_dir,
            "engine_args": cfg.serve.engine_args.as_dict(),
            "nodes": [n.hostfile_line() for n in cfg.nodes],
            "files": [
                {"path": rel, "size": f.size, "sha256": f.sha256} for rel, f in zip(serve_rel, serve_files, strict=True)
            ],
            "executed": executed_commands(
                cfg,
                deploy=deploy,
                weights=served_from,
                bundle_dir=bundle_dir,
                model_rel="." if weights_published else "weights",
                paths=paths,
            ),
            "example": eval_example(cfg, up.eval),
        },
        "flaggems": _flaggems_section(cfg, deploy),
        "load_test": _load_test(deploy, bundle_dir),
        "eval": _eval_section(cfg, gate, up.eval, bundle_rel(gate_file, bundle_dir) if gate_file else None),
        "gate": {
            "verdict": (gate or {}).get("verdict") or (gate_out.verdict if gate_out else None),
            "failed": False,
            "reasons": [],
            "throughput_ok": gate_out.throughput_ok if gate_out else ((gate or {}).get("throughput") or {}).get("ok"),
            "blamed_ops": list(gate_out.blamed_ops if gate_out else []),
            "proposed_excluded_ops": list(gate_out.proposed_excluded_ops if gate_out else []),
            "publish_on_fail": cfg.gates.publish_on_fail,
        },
        "publish": {
            "hf_repo": pub.hf_repo,
            "modelscope_repo": pub.modelscope_repo,
            "s3": f"s3://{pub.s3.bucket}/{pub.s3.prefix}".rstrip("/") if pub.s3 else None,
            "registry": pub.registry,
            "local_dir": "<PUBLISHED_DIR>" if pub.local_dir else None,
            "private": pub.private,
            "weights_published": weights_published,
        },
        "tools": dict(tools) if tools is not None else tool_versions(deploy=deploy, image=image),
        "provenance": provenance(cfg, config_path=config_path, deploy=deploy, image=image, paths=paths),
        "missing": [],
        "files": [],
    }
    reasons = gate_failure_reasons(gate, stage=up.results.get("gate"))
    manifest["gate"]["failed"] = bool(reasons)
    manifest["gate"]["reasons"] = reasons
    manifest["missing"] = _missing(manifest, cfg)
    return dict(paths.obj(redact_obj(manifest)))


def write_manifest(manifest: dict[str, Any], *, path: Path, bundle_dir: Path, cache: HashCache | None = None) -> Path:
    """Record every bundle file's sha256 in ``manifest``, validate it and write it atomically.

    Args:
        manifest: from :func:`build_manifest`; its ``files`` list is filled in place.
        path: where to write (normally ``bundle/flagrelease.json``).
        bundle_dir: the bundle whose files are listed (the manifest itself excluded).
        cache: a hash cache.

    Returns:
        ``path``.
    """
    exclude = frozenset({bundle_rel(path, bundle_dir) or MANIFEST_NAME})
    manifest["files"] = [f.to_json() for f in walk_files(bundle_dir, cache=cache, exclude=exclude)]
    manifest = redact_obj(manifest)
    validate_manifest(manifest)
    return atomic_write_json(path, manifest)
