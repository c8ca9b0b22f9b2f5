"""What the manifest says about the weights: their files with sha256, and the quantization scheme."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from flagrelease._filehash import FileEntry, HashCache, walk_files
from flagrelease.bundle import MANIFEST_NAME

__all__ = ["bundle_rel", "quant_scheme", "read_json", "served_model_path", "weight_files"]

log = logging.getLogger("flagrelease.card.manifest")


def read_json(path: str | Path | None) -> Any:
    """The JSON in ``path``, or None when there is no path, no file or no JSON."""
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


def bundle_rel(path: str | Path | None, bundle_dir: Path) -> str | None:
    """``path`` relative to the bundle (POSIX), or None when it lies outside."""
    if not path:
        return None
    p = Path(str(path)).resolve()
    try:
        return p.relative_to(bundle_dir.resolve()).as_posix()
    except ValueError:
        return None


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


def weight_files(weights_dir: Path | None, manifests: list[Any], cache: HashCache | None) -> list[FileEntry]:
    """Every file of the weights with its sha256 (checksums already known from ``manifests`` are reused)."""
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


def quant_scheme(weights_dir: Path | None) -> dict[str, Any] | None:
    """The first config group of a compressed-tensors ``quantization_config`` in the weights' config.json."""
    if weights_dir is None:
        return None
    config = read_json(weights_dir / "config.json")
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


def served_model_path(serve_dir: Path, files: list[str]) -> str | None:
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
