"""The bundle's contract: what the card stage writes and the publish stage reads.

A bundle is the folder a release publishes: weights, serve configs, evaluation
evidence, the model card (``README.md``) and the manifest (:data:`MANIFEST_NAME`), which
lists every file with its sha256 and is checked against the committed JSON Schema
(``card/schema/flagrelease.schema.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from flagrelease.config import ReleaseConfig
from flagrelease.errors import PublishError
from flagrelease.pipeline import StageResult

__all__ = [
    "GATE_FAILED_MARKER",
    "GATE_UNVERIFIED_MARKER",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "UNVERIFIED_VERDICTS",
    "gate_failure_reasons",
    "gate_unverified_verdict",
    "load_manifest",
    "manifest_schema",
    "release_labels",
    "validate_manifest",
]

#: An HTML comment the card carries when the release failed its gate; publish checks for it.
GATE_FAILED_MARKER = "<!-- flagrelease:gate-failed -->"
#: An HTML comment the card carries when the release is published although its gate verdict
#: is inconclusive or missing (``publish.allow_verdicts``); publish checks for it.
GATE_UNVERIFIED_MARKER = "<!-- flagrelease:gate-unverified -->"
#: Gate verdicts that block publishing unless ``publish.allow_verdicts`` names them.
UNVERIFIED_VERDICTS = ("inconclusive", "missing")
#: The bundle manifest's file name.
MANIFEST_NAME = "flagrelease.json"
#: The version of the manifest's schema.
SCHEMA_VERSION = 2
_SCHEMA_PATH = Path(__file__).parent / "card" / "schema" / "flagrelease.schema.json"


def release_labels(cfg: ReleaseConfig) -> tuple[str, str]:
    """Column labels of a release's card: ``(reference, target)``.

    The reference is ``<model>-H100-CUDA`` on nvidia-h100, else ``<model>-<card name>``;
    the target ``<model>-FlagOS-<card name>``.
    """
    from flagrelease.chips import load_chip

    model = cfg.model.name
    ref_chip = cfg.eval.reference.chip
    ref = f"{model}-H100-CUDA" if ref_chip == "nvidia-h100" else f"{model}-{load_chip(ref_chip).card_name}"
    return ref, f"{model}-FlagOS-{cfg.chip_profile.card_name}"


def gate_failure_reasons(gate: Mapping[str, Any] | None, *, stage: StageResult | None = None) -> list[str]:
    """Why the release failed its gates; empty when it did not.

    A release fails when the gate stage says ``failed``, when the accuracy verdict is
    ``inconsistent``, or when the operator library's (FlagGems or its CPU stand-in) on/off
    throughput check failed.  The wording names no library: the card says which one served.
    """
    reasons: list[str] = []
    outputs: Mapping[str, Any] = {}
    if stage is not None:
        outputs = stage.outputs if isinstance(stage.outputs, dict) else stage.outputs.model_dump(mode="json")
    if gate:
        if gate.get("verdict") == "inconsistent":
            bad = [
                str(r.get("label") or r.get("task"))
                for r in gate.get("rows") or []
                if r.get("verdict") == "inconsistent"
            ]
            reasons.append("accuracy is inconsistent with the reference" + (f" on {', '.join(bad)}" if bad else ""))
        thr = gate.get("throughput") or {}
        if thr.get("ok") is False:
            reasons.append(
                f"the operator-library on/off throughput ratio {thr.get('ratio')} is below the minimum "
                f"{thr.get('min_ratio')}"
            )
        on_off = ((gate.get("flaggems") or {}).get("on_vs_off") or {}).get("verdict")
        if on_off == "inconsistent":
            reasons.append("results with the operator library on are inconsistent with it off")
    elif outputs.get("verdict") == "inconsistent":
        reasons.append("accuracy is inconsistent with the reference")
    if stage is not None and outputs.get("throughput_ok") is False and not any("throughput" in r for r in reasons):
        reasons.append("the operator-library on/off throughput check failed")
    if stage is not None and stage.status == "failed" and not reasons:
        reasons.append(f"the gate stage failed: {stage.summary}")
    return reasons


def gate_unverified_verdict(verdict: str | None) -> str | None:
    """``inconclusive`` or ``missing`` when the gate did not show the release consistent, else None.

    No verdict at all counts as ``missing``; ``inconsistent`` is a failure
    (:func:`gate_failure_reasons`), not this.
    """
    if verdict in (None, "", "missing"):
        return "missing"
    return "inconclusive" if verdict == "inconclusive" else None


@lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The committed JSON Schema of ``flagrelease.json``."""
    data: dict[str, Any] = json.loads(_SCHEMA_PATH.read_text(encoding="utf-8"))
    return data


def validate_manifest(manifest: Mapping[str, Any]) -> None:
    """Check ``manifest`` against the committed JSON Schema.

    Raises:
        PublishError: the manifest does not match; the message names each bad field.
    """
    validator = jsonschema.Draft202012Validator(manifest_schema())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n".join(
            f"  {'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in errors[:20]
        )
        raise PublishError(
            f"the bundle manifest does not match {_SCHEMA_PATH.name} ({len(errors)} error(s)):\n{lines}\n"
            "This is a flagrelease bug or a hand-edited manifest; re-run the card stage "
            "(flagrelease run CONFIG --stages card --force).",
            stage="card",
        )


def load_manifest(path: Path) -> dict[str, Any]:
    """Read and validate a bundle manifest.

    Raises:
        PublishError: the file is missing, not JSON, or does not match the schema.
    """
    if not path.is_file():
        raise PublishError(
            f"{path} does not exist: the bundle has no manifest; run the card stage first "
            "(flagrelease run CONFIG --stages card)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise PublishError(f"{path} is not valid JSON ({err}); re-run the card stage") from err
    validate_manifest(data)
    return dict(data)
