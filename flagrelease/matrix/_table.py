"""The support table: where one model stands on every chip of its matrix.

Built from each pair's bundle manifest (``flagrelease.json``, read with
:func:`flagrelease.bundle.load_manifest`) and the outcome of each pair's run: one row per
chip with each benchmark's score and verdict, the reference's score, the FlagGems
on/off throughput ratio with its interval, the FlagGems operators left out, and where
the bundle is published.  Written as JSON checked against the committed schema
``schema/support.schema.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema

from flagrelease._atomic import atomic_write_json
from flagrelease._redact import redact_obj
from flagrelease.bundle import load_manifest, release_labels
from flagrelease.errors import ConfigError
from flagrelease.matrix._config import Matrix, MatrixPair
from flagrelease.matrix._manifests import find_manifest

if TYPE_CHECKING:
    from flagrelease.publish import PublishCredentials

__all__ = [
    "SUPPORT_NAME",
    "SUPPORT_SCHEMA_VERSION",
    "PairOutcome",
    "support_schema",
    "support_table",
    "table_rows",
    "validate_support",
    "write_support",
]

#: The support table's file name, beside the collection card.
SUPPORT_NAME = "support.json"
#: The version of its schema.
SUPPORT_SCHEMA_VERSION = 1
_SCHEMA_PATH = Path(__file__).parent / "schema" / "support.schema.json"


@dataclass(frozen=True)
class PairOutcome:
    """How one pair's run ended, as the matrix flow saw it.

    Attributes:
        chip: the pair's chip.
        state: the run's final state (``COMPLETED``, ``FAILED``, ``CRASHED``, ...),
            ``NOT_STARTED`` when its run could not be started (no deployment), or
            ``NOT_RUN`` when the matrix run did not run it.
        flow_run: the run's id, None when none was started.
        run_name: the run's name.
        message: the state's message (why it failed).
    """

    chip: str
    state: str = "NOT_RUN"
    flow_run: str | None = None
    run_name: str | None = None
    message: str = ""


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _bundle_url(manifest: Mapping[str, Any], pair: MatrixPair, *, relative_to: Path | None) -> str | None:
    """Where the bundle is published: the Hub, ModelScope, S3, or the local folder.

    A local folder (the pair's ``publish.local_dir``; the manifest does not name it) is
    given relative to ``relative_to``, the collection's folder, so that no absolute path
    of this machine reaches the table or the card.
    """
    pub = manifest.get("publish") or {}
    if pub.get("hf_repo"):
        return f"https://huggingface.co/{pub['hf_repo']}"
    if pub.get("modelscope_repo"):
        return f"https://www.modelscope.cn/models/{pub['modelscope_repo']}"
    if pub.get("s3"):
        return str(pub["s3"])
    local = pair.config.publish.local_dir
    if pub.get("local_dir") and local is not None and relative_to is not None:
        return os.path.relpath(local, relative_to).replace(os.sep, "/") + "/"
    return None


def _interval(thr: Mapping[str, Any]) -> list[float] | None:
    """The throughput ratio's interval, under whichever key the gate results give it."""
    for key in ("ratio_ci", "ci", "ratio_interval"):
        value = thr.get(key)
        if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
            return [float(value[0]), float(value[1])]
    return None


def _throughput(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    thr = (manifest.get("eval") or {}).get("throughput")
    if not isinstance(thr, Mapping) or thr.get("ratio") is None:
        return None
    return {
        "ratio": float(thr["ratio"]),
        "ci": _interval(thr),
        "min_ratio": thr.get("min_ratio"),
        "ok": thr.get("ok"),
    }


def _status(outcome: PairOutcome, manifest: Mapping[str, Any] | None) -> str:
    if outcome.state not in ("COMPLETED", "NOT_RUN"):
        return "failed"
    if manifest is None:
        return "missing"
    if (manifest.get("gate") or {}).get("failed"):
        return "gate-failed"
    return "released"


def _row(
    pair: MatrixPair, outcome: PairOutcome, manifest: Mapping[str, Any] | None, *, relative_to: Path | None
) -> dict[str, Any]:
    chip = pair.profile
    cfg = pair.config
    row: dict[str, Any] = {
        "chip": chip.name,
        "chip_name": chip.display_name,
        "card_name": chip.card_name,
        "pair": pair.name,
        "status": _status(outcome, manifest),
        "run": {"state": outcome.state, "flow_run": outcome.flow_run, "name": outcome.run_name},
        "message": outcome.message or None,
        "label": release_labels(cfg)[1],
        "bundle_name": None,
        "conversion": cfg.convert.mode.value,
        "verdict": None,
        "reference": None,
        "scores": {},
        "throughput": None,
        "excluded_ops": list(cfg.serve.flaggems.excluded_ops),
        "bundle_url": None,
    }
    if manifest is None:
        return row
    ev = manifest.get("eval") or {}
    row.update(
        label=(ev.get("target") or {}).get("label") or row["label"],
        bundle_name=(manifest.get("release") or {}).get("bundle_name"),
        verdict=ev.get("verdict"),
        reference={
            "label": (ev.get("reference") or {}).get("label"),
            "chip": (ev.get("reference") or {}).get("chip"),
        },
        throughput=_throughput(manifest),
        excluded_ops=list((manifest.get("flaggems") or {}).get("excluded_ops") or []),
        bundle_url=_bundle_url(manifest, pair, relative_to=relative_to),
    )
    for r in ev.get("rows") or []:
        row["scores"][str(r["task"])] = {
            "score": r.get("target"),
            "reference": r.get("reference"),
            "diff": r.get("diff"),
            "diff_ci": r.get("diff_ci"),
            "verdict": r.get("verdict") or "missing",
        }
    return row


def _references(
    rows: Sequence[Mapping[str, Any]], tasks: Sequence[Mapping[str, Any]], *, default: tuple[str, str]
) -> list[dict[str, Any]]:
    """One reference column per distinct reference label, its scores from the first pair that has them.

    With no pair results at all, the one column the config gives (``default``: label, chip).
    """
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        ref = row.get("reference")
        if not ref or not ref.get("label"):
            continue
        entry = out.setdefault(ref["label"], {"label": ref["label"], "chip": ref.get("chip"), "scores": {}})
        for t in tasks:
            score = (row["scores"].get(t["task"]) or {}).get("reference")
            if score is not None and entry["scores"].get(t["task"]) is None:
                entry["scores"][t["task"]] = score
    if not out:
        out[default[0]] = {"label": default[0], "chip": default[1], "scores": {}}
    for entry in out.values():
        for t in tasks:
            entry["scores"].setdefault(t["task"], None)
    return list(out.values())


def support_table(
    matrix: Matrix,
    outcomes: Mapping[str, PairOutcome] | None = None,
    *,
    manifests: Mapping[str, Path | None] | None = None,
    credentials: PublishCredentials | Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The support table of ``matrix``, validated against its schema.

    Args:
        matrix: the loaded matrix.
        outcomes: chip -> how its run ended (default: nothing run, manifests read as found).
        manifests: chip -> its manifest file (default: :func:`find_manifest`, which
            downloads a remote one into ``<matrix work folder>/manifests``).
        credentials: tokens to read remote manifests (default: the environment).
        now: the table's time stamp (default: now).

    Returns:
        The table as a JSON-able dict (``schema/support.schema.json``), secrets redacted.

    Raises:
        PublishError: a manifest exists but is invalid (it does not match its schema).
    """
    outcomes = outcomes or {}
    relative_to = matrix.config.collection.publish.local_dir
    first = matrix.pairs[0].config
    tasks = [{"task": t.name, "label": t.label or t.name, "metric": t.metric} for t in first.eval.tasks]
    rows = []
    for pair in matrix.pairs:
        outcome = outcomes.get(pair.chip) or PairOutcome(chip=pair.chip)
        path = (
            manifests.get(pair.chip)
            if manifests is not None
            else find_manifest(pair, download_dir=matrix.work_dir / "manifests", credentials=credentials)
        )
        manifest = load_manifest(path) if path is not None else None
        row = _row(pair, outcome, manifest, relative_to=relative_to)
        for t in manifest.get("eval", {}).get("tasks", []) if manifest else []:
            if not any(x["task"] == t["name"] for x in tasks):
                tasks.append({"task": t["name"], "label": t.get("label") or t["name"], "metric": t.get("metric")})
        rows.append(row)
    table = {
        "schema_version": SUPPORT_SCHEMA_VERSION,
        "matrix": matrix.name,
        "title": matrix.title,
        "description": matrix.config.description,
        "generated_at": _iso(now or datetime.now(UTC)),
        "model": {
            "repo_id": first.model.repo_id,
            "display_name": first.model.name,
            "revision": first.model.revision,
        },
        "benchmarks": tasks,
        "references": _references(rows, tasks, default=(release_labels(first)[0], first.eval.reference.chip)),
        "rows": rows,
        "counts": {
            status: sum(1 for r in rows if r["status"] == status)
            for status in ("released", "gate-failed", "failed", "missing")
        },
    }
    table = redact_obj(table)
    validate_support(table)
    return table


def _fmt(value: Any) -> str:
    return "" if value is None else f"{float(value):.2f}"


def table_rows(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The table as flat rows of strings (a Prefect table artifact, a terminal): one per chip."""
    out = []
    for row in table["rows"]:
        flat: dict[str, Any] = {"chip": row["chip_name"], "status": row["status"]}
        for t in table["benchmarks"]:
            s = row["scores"].get(t["task"]) or {}
            score = _fmt(s.get("score"))
            flat[t["label"]] = f"{score} ({s.get('verdict', 'missing')})" if score else ""
        thr = row.get("throughput") or {}
        ratio = _fmt(thr.get("ratio"))
        ci = thr.get("ci")
        flat["FlagGems on/off throughput"] = f"{ratio} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ratio and ci else ratio
        flat["excluded FlagGems ops"] = ", ".join(row["excluded_ops"]) or "none"
        flat["bundle"] = row.get("bundle_url") or ""
        out.append(flat)
    return out


@lru_cache(maxsize=1)
def support_schema() -> dict[str, Any]:
    """The committed JSON Schema of ``support.json``."""
    data: dict[str, Any] = json.loads(_SCHEMA_PATH.read_text(encoding="utf-8"))
    return data


def validate_support(table: Mapping[str, Any]) -> None:
    """Check ``table`` against the committed schema.

    Raises:
        ConfigError: it does not match; the message names each bad field.
    """
    validator = jsonschema.Draft202012Validator(support_schema())
    errors = sorted(validator.iter_errors(table), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n".join(
            f"  {'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in errors[:20]
        )
        raise ConfigError(
            f"the support table does not match {_SCHEMA_PATH.name} ({len(errors)} error(s)):\n{lines}\n"
            "This is a flagrelease bug or a hand-edited table; build it again from the manifests."
        )


def write_support(table: Mapping[str, Any], *, out_dir: Path) -> Path:
    """Validate ``table`` and write it atomically as ``out_dir/support.json``."""
    validate_support(table)
    return atomic_write_json(Path(out_dir) / SUPPORT_NAME, dict(table))
