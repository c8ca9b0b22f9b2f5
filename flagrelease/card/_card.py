"""The model card (the bundle's README.md), rendered from the manifest.

The card is rendered from data only: the release config, the chip profile, the bundle
manifest and the gate's evaluation results.  A result that is missing renders as ``TBD``
and is listed under "Missing results"; nothing else is ever a placeholder.  A release that
failed its gate and was published anyway (``gates.publish_on_fail``) carries a warning at
the top.  The template is ``templates/card/README.md.j2`` (Jinja2, StrictUndefined).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from flagrelease import __version__, render
from flagrelease._atomic import atomic_write_text
from flagrelease._redact import redact
from flagrelease.card import _howto as howto
from flagrelease.card import _text as text
from flagrelease.card._record import model_mount
from flagrelease.card._scrub import BuildPaths, build_paths
from flagrelease.card.manifest import build_manifest
from flagrelease.chips import load_chip
from flagrelease.config import ReleaseConfig, load_release
from flagrelease.constants import hf_endpoint, templates_dir
from flagrelease.errors import GateError
from flagrelease.layout import BundleLayout

__all__ = ["CARD_TEMPLATE", "load_gate_results", "render_card", "render_card_cli", "render_serve_configs"]

#: The card template, below ``templates/card/``.
CARD_TEMPLATE = "README.md.j2"


def _operators(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the card says about the operator library: which one served, and which of its operators ran."""
    gems = manifest["flaggems"]
    deployed = manifest["stages"]["deploy"]["status"] not in ("not-run", "skipped")
    if not gems["requested"]:
        kind = "off"
    elif gems["enabled"]:
        kind = "flag_gems"
    elif gems["library"] and gems["library"] != "flag_gems" and gems["operators"]:
        kind = "standin"
    elif deployed:
        kind = "none"
    else:
        kind = "unknown"
    share = gems["triton_share"]
    return {
        "kind": kind,
        "library": gems["library"],
        "version": gems["library_version"],
        "operators": gems["operators"],
        "excluded": gems["excluded_ops"],
        "triton_share": f"{share * 100:.1f}%" if share is not None else None,
        "triton_share_source": gems["triton_share_source"],
    }


def _context(cfg: ReleaseConfig, manifest: Mapping[str, Any], bundle_dir: Path) -> dict[str, Any]:
    chip = cfg.chip_profile
    quant = text.quant_text(cfg, manifest)
    headers, rows = text.eval_table_rows(manifest)
    pub = cfg.publish
    steps = howto.recorded_steps(cfg, manifest)
    weights_lines = howto.weights_commands(cfg, manifest)
    return {
        "front_matter": text.front_matter(cfg, manifest),
        "gate": manifest["gate"],
        "image_warning": manifest["image"]["warning"],
        # Names from the config are prose here: escaped so that they render as written.
        "bundle_name": render.markdown_text(manifest["release"]["bundle_name"]),
        "model_name": render.markdown_text(cfg.model.name),
        "chip": chip,
        "cpu_chip": chip.accelerator.value == "cpu",
        "vendor_vllm": chip.vllm_package == "vendor",
        "reference_chip": load_chip(cfg.eval.reference.chip),
        "labels": {k: render.markdown_text(manifest["eval"][k]["label"]) for k in ("reference", "target")},
        "prebuilt_image": howto.prebuilt(manifest),
        "verified_weights": bool(manifest["weights"]["published"] and manifest["weights"]["verified"]),
        "feature_count": 3 if quant else 2,
        "feature_words": text.NUMBER_WORDS[3 if quant else 2],
        "hf_url": f"{hf_endpoint()}/{pub.hf_repo}" if pub.hf_repo else None,
        "weights": manifest["weights"],
        "quant": quant,
        "quant_summary": text.quant_summary(manifest),
        "scheme_lines": text.scheme_lines(manifest),
        "conversion": manifest["conversion"],
        "verdict_sentence": text.verdict_sentence(manifest),
        "ops": _operators(manifest),
        "download_table": howto.download_table(cfg, manifest),
        "eval_table": text.md_table(headers, rows),
        "eval_notes": text.eval_notes(manifest, cfg),
        "missing": manifest["missing"],
        "steps": steps,
        "weights_commands": weights_lines,
        "placeholders": howto.placeholders_in(weights_lines),
        "image": manifest["image"],
        "pull": howto.pull_reference(manifest),
        "image_note": howto.image_note(manifest),
        "multinode": len(cfg.nodes) > 1,
        "nodes": cfg.nodes,
        "docker_run": howto.docker_run(cfg, manifest, recorded=steps is not None),
        "serve": manifest["serve"],
        "flaggems_commands": howto.flaggems_commands(cfg, manifest),
        "serve_configs": howto.serve_configs(cfg, bundle_dir, manifest),
        "license_text": text.license_text(cfg),
    }


def _environment() -> jinja2.Environment:
    return _card_environment(templates_dir() / "card")


@functools.lru_cache(maxsize=4)
def _card_environment(folder: Path) -> jinja2.Environment:
    """One environment per template folder: Jinja keeps the compiled template (and reloads it when it changes)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["code"] = render.markdown_code
    return env


def render_card(
    cfg: ReleaseConfig, *, manifest: Mapping[str, Any], bundle_dir: Path, paths: BuildPaths | None = None
) -> str:
    """Render the model card.

    Args:
        cfg: the release config.
        manifest: the bundle manifest (:func:`flagrelease.card.manifest.build_manifest`).
        bundle_dir: the bundle; the serve configs shown are read from its ``serve/`` folder.
        paths: the build machine's folders, replaced by placeholders should any reach the card.

    Returns:
        The card as Markdown with a Hugging Face metadata header, secrets redacted.
    """
    out = _environment().get_template(CARD_TEMPLATE).render(**_context(cfg, manifest, bundle_dir))
    while "\n\n\n" in out:
        out = out.replace("\n\n\n", "\n\n")
    out = redact(out)
    return paths.text(out) if paths is not None else out


# -- gate results --------------------------------------------------------------------------
def load_gate_results(path: Path) -> dict[str, Any]:
    """Read and check the gate results JSON (docs/ARCHITECTURE.md, "Gate results JSON").

    Raises:
        GateError: the file is unreadable, not JSON or not gate results.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise GateError(f"cannot read gate results {path}: {err}") from err
    except ValueError as err:
        raise GateError(
            f"{path} is not JSON ({err}); pass the gate results JSON (bundle/reports/gate_results.json)"
        ) from err
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise GateError(
            f"{path} is not gate results: it needs a 'rows' list (format in docs/ARCHITECTURE.md, 'Gate results JSON')"
        )
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict) or "label" not in row or "task" not in row:
            raise GateError(f"{path}: rows[{i}] needs 'task' and 'label'")
    return data


def render_serve_configs(cfg: ReleaseConfig, serve_dir: Path, *, replace: bool = False) -> None:
    """Write the FlagScale configs of ``cfg`` into ``serve_dir`` (unless it has some and ``replace`` is off).

    The weights path in them is the one inside the release's container (``serve.model_dir``,
    else ``/models/<model>``), never a folder of the machine that made the release.
    """
    if not replace and serve_dir.is_dir() and any(p.is_file() for p in serve_dir.rglob("*")):
        return
    render.render_serve_configs(cfg, out_dir=serve_dir, model_path=model_mount(cfg))


def render_card_cli(config: Path, *, results: Path | None, out_dir: Path) -> Path:
    """Render a release's card from its config and, optionally, its gate results.

    Backs ``flagrelease card CONFIG [--results RESULTS.json] --out DIR``.  Without results,
    the evaluation rows (from ``eval.tasks``) render as TBD and are listed as missing.

    Args:
        config: the release config file.
        results: the gate results JSON (format in docs/ARCHITECTURE.md).
        out_dir: where to write ``README.md``; the FlagScale configs go to ``out_dir/serve``.

    Returns:
        The card's path.

    Raises:
        ConfigError: the config is invalid.
        GateError: the results file is not gate results.
    """
    cfg = load_release(config)
    gate = load_gate_results(results) if results is not None else None
    out_dir = Path(out_dir)
    render_serve_configs(cfg, out_dir / "serve")
    paths = build_paths(cfg, layout=BundleLayout.for_release(cfg), config_path=Path(config))
    manifest = build_manifest(
        cfg, bundle_dir=out_dir, gate=gate, config_path=Path(config), tools={"flagrelease": __version__}, paths=paths
    )
    card = out_dir / "README.md"
    atomic_write_text(card, render_card(cfg, manifest=manifest, bundle_dir=out_dir, paths=paths))
    return card
