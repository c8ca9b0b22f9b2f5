"""A live reference on another chip: the reference side of a release, run by that chip's pool.

A release whose ``eval.reference`` is ``mode: live`` on a chip other than its own (the
H100 CUDA reference of an Iluvatar release, say) is evaluated in two places:

1. **On the reference chip**, the same release config runs with the ``reference`` role:
   :meth:`flagrelease.config.ReleaseConfig.reference_side` says what that side serves
   (the reference chip, its nodes and engine args, its own image), and its stages are
   :func:`flagrelease.roles.reference_stages` (fetch, convert when it serves converted weights, image,
   eval).  Its eval stage evaluates the reference variant only and hands the finished
   lm-eval run over with :func:`publish_reference_run`: the whole folder is written into
   ``eval.reference.results_dir`` (storage both pools reach) under a temporary name,
   with a key file naming what was evaluated, then renamed.
2. **On the release's chip**, the eval stage reads that folder as a stored reference,
   once :func:`reference_ready` finds the key current.

The ``flagrelease`` flow starts side 1 through the deployment
:func:`flagrelease.roles.reference_deployment_name` (registered in the reference chip's work pool by
``flagrelease deploy``) and waits for it, unless a current run is already there.
Without Prefect, ``flagrelease run CONFIG --role reference`` on a reference-chip
machine does the same.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_dir, atomic_write_json
from flagrelease.config import ConvertMode, ReleaseConfig
from flagrelease.errors import ConfigError

__all__ = [
    "KEY_FILE",
    "publish_reference_run",
    "reference_key",
    "reference_ready",
]

#: The key file in a handed-over reference run.
KEY_FILE = "flagrelease-reference.json"


def reference_key(side: ReleaseConfig) -> str:
    """What a reference run evaluated, as a short hash of the reference side's config.

    Covers the model and revision, the conversion when the reference serves converted
    weights, the eval settings, and how the reference chip serves; not paths, names or
    publishing, which do not change the numbers.
    """
    parts: dict[str, Any] = {
        "model": side.model.model_dump(mode="json", include={"source", "repo_id", "revision", "generate"}),
        "convert": side.convert.model_dump(mode="json") if side.convert.mode is not ConvertMode.NONE else None,
        "chip": side.chip,
        "engine_args": {k: v for k, v in side.serve.engine_args.as_dict().items() if k not in ("port", "host")},
        "nodes": [n.slots for n in side.serve.nodes],
        "flaggems": side.serve.flaggems.enabled,
        "eval": side.eval.model_dump(mode="json", include={"tasks", "generation", "samples_per_item", "limit"}),
        "weights": side.eval.reference.weights,
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _key_of(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def reference_ready(cfg: ReleaseConfig) -> bool:
    """Whether ``eval.reference.results_dir`` holds a finished reference run of ``cfg``'s current settings."""
    folder = cfg.eval.reference.results_dir
    if folder is None or not cfg.remote_reference:
        return False
    key = _key_of(folder)
    return key is not None and key.get("key") == reference_key(cfg.reference_side())


def publish_reference_run(side: ReleaseConfig, run_dir: Path) -> Path:
    """Hand a finished reference eval over: copy ``run_dir`` into ``results_dir``, atomically.

    The folder is replaced whole (flagrelease owns it), its key file written last
    inside the temporary copy, so the release's side never reads a partial run.

    Args:
        side: the reference side's config (:meth:`ReleaseConfig.reference_side`).
        run_dir: the eval stage's folder of the reference variant.

    Returns:
        The results folder.

    Raises:
        ConfigError: the config names no results folder.
    """
    folder = side.eval.reference.results_dir
    if folder is None:
        raise ConfigError(
            f"{side.name}: eval.reference.results_dir is not set; the reference run has nowhere to go",
            model=side.name,
            chip=side.chip,
        )
    with atomic_dir(Path(folder)) as tmp:
        shutil.copytree(run_dir, tmp, dirs_exist_ok=True)
        atomic_write_json(
            tmp / KEY_FILE,
            {"key": reference_key(side), "release": side.name, "chip": side.chip, "model": side.model.repo_id},
        )
    return Path(folder)
