"""The model card (the bundle's README.md) and the card stage, which also writes the manifest.

The card is rendered from data only: the release config, the chip profile, the bundle
manifest and the gate's evaluation results.  A result that is missing renders as ``TBD``
and is listed under "Missing results"; nothing else is ever a placeholder.  A release that
failed its gate and was published anyway (``gates.publish_on_fail``) carries a warning at
the top.  The template is ``templates/card/README.md.j2`` (Jinja2, StrictUndefined).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import yaml

from flagrelease._atomic import atomic_copy, atomic_write_text
from flagrelease._filehash import HashCache
from flagrelease._redact import redact
from flagrelease.card.manifest import (
    build_manifest,
    stage_results,
    tool_versions,
    write_manifest,
)
from flagrelease.chips import load_chip
from flagrelease.config import ConvertMode, ModelSource, ReleaseConfig, load_release
from flagrelease.constants import hf_endpoint, modelscope_endpoint, templates_dir
from flagrelease.errors import ConfigError, GateError
from flagrelease.pipeline import ReleaseContext, StageResult

__all__ = [
    "CARD_TEMPLATE",
    "eval_table_rows",
    "render_card",
    "render_card_cli",
    "run_stage",
]

log = logging.getLogger("flagrelease.card")

#: The card template, below ``templates/card/``.
CARD_TEMPLATE = "README.md.j2"
TBD = "TBD"

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_LICENSES = {
    "apache-2.0": "Apache 2.0",
    "mit": "MIT",
    "bsd-3-clause": "BSD 3-Clause",
    "cc-by-4.0": "CC BY 4.0",
    "cc-by-nc-4.0": "CC BY-NC 4.0",
    "llama3": "Llama 3 Community",
    "llama3.1": "Llama 3.1 Community",
    "gemma": "Gemma",
    "openrail": "OpenRAIL",
}
_QUANT_TEXT = {
    ConvertMode.FP8_BLOCK_TO_BF16: (
        "BF16",
        "BF16 Dequantization",
        "BF16 checkpoints dequantized from the official {model} FP8 (block-scaled) weights.",
        "The FP8 block-scaled weights of {model} are dequantized to bfloat16 with their per-block scales, "
        "so that chips without FP8 support run the model; configuration files and tokenizer are adapted.",
    ),
    ConvertMode.INT8_W8A8: (
        "INT8",
        "INT8 Quantization",
        "INT8 checkpoints quantized from the official {model} weights (W8A8: INT8 weights and activations).",
        "The weights of {model} are quantized to INT8 and its activations to INT8 "
        "(compressed-tensors W8A8, served by vLLM).",
    ),
    ConvertMode.INT8_W8A16: (
        "INT8",
        "INT8 Quantization",
        "INT8 checkpoints quantized from the official {model} weights (W8A16: INT8 weights, 16-bit activations).",
        "The weights of {model} are quantized to INT8; activations stay in 16-bit "
        "(compressed-tensors W8A16, served by vLLM).",
    ),
    ConvertMode.INT4_W4A16: (
        "INT4",
        "INT4 Quantization",
        "INT4 checkpoints quantized from the official {model} weights (W4A16: INT4 weights, 16-bit activations).",
        "The weights of {model} are quantized to INT4 in groups; activations stay in 16-bit "
        "(compressed-tensors W4A16, served by vLLM).",
    ),
}
_LANG = {".yaml": "yaml", ".yml": "yaml", ".txt": "text", ".sh": "bash", ".json": "json"}


# -- formatting helpers ---------------------------------------------------------------------
def _num(value: Any) -> str:
    return TBD if value is None else f"{float(value):.2f}"


def _signed(value: Any) -> str:
    return f"{float(value):+.2f}"


def _ci(ci: Any) -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2 or None in ci:
        return ""
    return f"[{_signed(ci[0])}, {_signed(ci[1])}]"


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns."""
    cells = [[str(c).replace("|", "\\|") for c in r] for r in [headers, *rows]]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def eval_table_rows(manifest: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The evaluation table: headers and rows of strings, in the results' row order.

    Columns: Metrics, the reference label, the target label, the difference with its
    confidence interval (at the gate's level, ``1 - 2 alpha`` for its equivalence test), and
    the gate's verdict.  A missing score is ``TBD``.
    """
    ev = manifest["eval"]
    level = f"{float(ev['diff_ci_level']) * 100:g}%"
    headers = ["Metrics", ev["reference"]["label"], ev["target"]["label"], f"Diff ({level} CI)", "Verdict"]
    rows: list[list[str]] = []
    for r in ev["rows"]:
        ref, tgt = r.get("reference"), r.get("target")
        if ref is None or tgt is None:
            diff = TBD
        else:
            d = r.get("diff")
            d = (float(tgt) - float(ref)) if d is None else d
            diff = f"{_signed(d)} {_ci(r.get('diff_ci'))}".strip()
        verdict = r.get("verdict") or "missing"
        rows.append([str(r.get("label") or r.get("task")), _num(ref), _num(tgt), diff, verdict])
    return headers, rows


def _verdict_sentence(manifest: Mapping[str, Any]) -> str:
    verdict = manifest["eval"]["verdict"]
    margin = manifest["eval"]["margin"]
    if verdict == "consistent":
        return f": the gate found them **consistent** (equivalent within ±{margin:g} points)."
    if verdict == "inconsistent":
        return ": the gate found them **inconsistent**."
    if verdict == "inconclusive":
        return f": the gate verdict is **inconclusive** (equivalence within ±{margin:g} points is not shown)."
    if verdict == "missing":
        return ": some results are missing, so the gate gave no verdict."
    return "."


def _items(n_items: list[int]) -> str:
    lo, hi = min(n_items), max(n_items)
    return f" over {lo} items per benchmark." if lo == hi else f" over {lo}–{hi} items per benchmark."


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _eval_notes(manifest: Mapping[str, Any], cfg: ReleaseConfig) -> list[str]:
    ev = manifest["eval"]
    notes: list[str] = []
    tested = [r for r in ev["rows"] if r.get("test")]
    if tested:
        tests = sorted({str(r["test"]) for r in tested})
        n_items = [int(r["n_items"]) for r in tested if r.get("n_items")]
        notes.append(
            f"Scores are percentages. Each row compares the two runs item by item ({', '.join(tests)}); "
            f"a row is *consistent* when the {float(ev['diff_ci_level']) * 100:g}% confidence interval of the "
            "difference lies within "
            f"±{ev['margin']:g} points (alpha {ev['alpha']:g}), with {ev['samples_per_item']} sample(s) per item"
            + (_items(n_items) if n_items else ".")
        )
    elif any(r.get("reference") is not None or r.get("target") is not None for r in ev["rows"]):
        notes.append(
            "Scores are percentages. These results carry no per-item data, so no confidence intervals were computed."
        )
    else:
        notes.append("Scores are percentages.")
    verdict = ev["verdict"]
    if verdict:
        notes.append("")
        notes.append(f"Overall gate verdict: **{verdict}**.")
    thr = ev.get("throughput") or {}
    if thr.get("gems_on_tok_s") is not None and thr.get("gems_off_tok_s") is not None:
        ok = "passes" if thr.get("ok") else "fails"
        notes.append("")
        notes.append(
            f"Throughput with FlagGems on: {float(thr['gems_on_tok_s']):.1f} output tokens/s; off: "
            f"{float(thr['gems_off_tok_s']):.1f} tokens/s (ratio {float(thr.get('ratio') or 0):.2f}, "
            f"minimum {float(thr.get('min_ratio') or cfg.gates.throughput_min_ratio):.2f}: {ok})."
        )
    if ev.get("flaggems_on_vs_off"):
        notes.append("")
        notes.append(f"Results with FlagGems on versus off: **{ev['flaggems_on_vs_off']}**.")
    if ev.get("blamed_ops"):
        notes.append("")
        notes.append(
            "Operators blamed for a difference by the FlagGems bisection: "
            + ", ".join(f"`{o}`" for o in ev["blamed_ops"])
            + "."
        )
    return notes


def _front_matter(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> str:
    chip = manifest["chip"]
    tags: list[str] = []
    quant = manifest["conversion"]["quant"]
    for t in [
        "flagos",
        "flagrelease",
        "flaggems",
        "vllm",
        chip["vendor"],
        chip["name"],
        *([quant.lower()] if quant else []),
        *cfg.tags,
    ]:
        if t and t not in tags:
            tags.append(t)
    data: dict[str, Any] = {"license": cfg.model.license}
    if cfg.model.license == "other" and cfg.model.license_url:
        data["license_link"] = cfg.model.license_url
    if cfg.model.source is not ModelSource.LOCAL:  # the Hub checks that base_model exists
        data["base_model"] = cfg.model.repo_id
        if quant in ("INT8", "INT4"):
            data["base_model_relation"] = "quantized"
    data["tags"] = tags
    data["pipeline_tag"] = "text-generation"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _license_text(cfg: ReleaseConfig) -> str:
    name = _LICENSES.get(cfg.model.license.lower(), cfg.model.license)
    text = f"The weights of this model are based on {cfg.model.repo_id} and are open-sourced under the {name} License"
    return text + (f": {cfg.model.license_url}." if cfg.model.license_url else ".")


def _model_dir(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> str:
    """The weights folder on the serving host: the serve config's ``model``, else a folder named after the bundle."""
    return manifest["serve"]["model_dir"] or cfg.serve.model_dir or f"/models/{manifest['release']['bundle_name']}"


def _weights_commands(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> list[str]:
    local = shlex.quote(_model_dir(cfg, manifest))
    pub = cfg.publish
    if manifest["weights"]["published"]:
        if pub.modelscope_repo:
            return ["pip install modelscope", f"modelscope download --model {pub.modelscope_repo} --local_dir {local}"]
        if pub.hf_repo:
            return ["pip install -U huggingface_hub", f"hf download {pub.hf_repo} --local-dir {local}"]
        if pub.s3:
            prefix = f"/{pub.s3.prefix}" if pub.s3.prefix else ""
            endpoint = f" --endpoint-url {shlex.quote(pub.s3.endpoint_url)}" if pub.s3.endpoint_url else ""
            return [f"aws s3 cp --recursive s3://{pub.s3.bucket}{prefix} {local}{endpoint}"]
        if pub.local_dir:
            return [f"cp -r {shlex.quote(str(pub.local_dir))} {local}"]
    m = cfg.model
    rev = manifest["model"]["revision"]
    if m.source is ModelSource.MODELSCOPE:
        revision = f" --revision {shlex.quote(rev)}" if rev else ""
        return ["pip install modelscope", f"modelscope download --model {m.repo_id}{revision} --local_dir {local}"]
    if m.source is ModelSource.HF:
        revision = f" --revision {shlex.quote(rev)}" if rev else ""
        return ["pip install -U huggingface_hub", f"hf download {m.repo_id}{revision} --local-dir {local}"]
    return [f"cp -r {shlex.quote(str(m.path))} {local}"]


def _docker_run(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> str:
    chip = cfg.chip_profile
    model_dir = _model_dir(cfg, manifest)
    argv = [
        "docker", "run", "-itd", "--name", manifest["serve"]["container_name"], *chip.docker_run_flags,
        "-v", f"{model_dir}:{model_dir}", manifest["image"]["ref"], "/bin/bash",
    ]  # fmt: skip
    return " ".join(shlex.quote(a) for a in argv)


def _flaggems_commands(manifest: Mapping[str, Any]) -> list[str]:
    version = manifest["flaggems"]["version"]
    lines = ["git clone https://github.com/FlagOpen/FlagGems.git", "cd FlagGems"]
    if version:
        tag = version if str(version).startswith("v") else f"v{version}"
        lines.append(f"git checkout {shlex.quote(tag)}")
    lines += ["pip install .", "cd ../"]
    return lines


def _serve_configs(cfg: ReleaseConfig, bundle_dir: Path, manifest: Mapping[str, Any]) -> list[dict[str, str]]:
    """The FlagScale configs to show: experiment config, serve config, and the hostfile when nodes are listed."""
    picked: list[tuple[int, str]] = []
    for f in manifest["serve"]["files"]:
        rel = str(f["path"]).removeprefix("serve/")
        name = Path(rel).name
        if name.startswith("config_") and name.endswith((".yaml", ".yml")):
            picked.append((0, rel))
        elif name.endswith((".yaml", ".yml")):
            picked.append((1, rel))
        elif name.startswith("hostfile") and cfg.serve.nodes:
            picked.append((2, rel))
    out = []
    for _, rel in sorted(picked):
        path = bundle_dir / "serve" / rel
        if not path.is_file():
            continue
        content = redact(path.read_text(encoding="utf-8")).rstrip("\n")
        out.append({"path": rel, "lang": _LANG.get(Path(rel).suffix, "text"), "content": content})
    return out


def _download_table(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> str:
    image = manifest["image"]
    pub = cfg.publish
    rows: list[list[str]] = [["Docker image", f"`{image['ref']}`"]]
    if image["digest"]:
        rows.append(["Image digest", f"`{image['digest']}`"])
    elif image["built"] is False:
        built = "not built by this release"
        if image["dockerfile"]:
            built += f"; build it from `{image['dockerfile']}` in this bundle"
        rows.append(["Image digest", built])
    elif image["pushed"] is False:
        rows.append(["Image digest", "built locally, not pushed to a registry"])
    else:
        rows.append(["Image digest", "not recorded"])
    links: list[str] = []
    if pub.hf_repo:
        links.append(f"[Hugging Face]({hf_endpoint()}/{pub.hf_repo})")
    if pub.modelscope_repo:
        links.append(f"[ModelScope]({modelscope_endpoint()}/models/{pub.modelscope_repo})")
    if pub.s3:
        links.append(f"`{manifest['publish']['s3']}`")
    weights = manifest["weights"]
    if weights["published"]:
        where = ", ".join(links) if links else f"`{pub.local_dir}`"
        total = weights["total_bytes"]
        size = f" ({_human(total)}, {len(weights['files'])} files)" if total else ""
        rows.append(["Weights", f"{manifest['conversion']['quant']} checkpoint{size}: {where}"])
    else:
        m = cfg.model
        rev = f" @ `{manifest['model']['revision']}`" if manifest["model"]["revision"] else ""
        if m.source is ModelSource.HF:
            rows.append(["Weights", f"official weights: [{m.repo_id}]({hf_endpoint()}/{m.repo_id}){rev}"])
        elif m.source is ModelSource.MODELSCOPE:
            rows.append(
                ["Weights", f"official weights: [{m.repo_id}]({modelscope_endpoint()}/models/{m.repo_id}){rev}"]
            )
        else:
            rows.append(["Weights", f"local folder `{m.path}`"])
    bundle = "card, serving configs, evaluation logs, reports and `flagrelease.json`"
    rows.append(["Bundle", f"{bundle}: {', '.join(links)}" if links else bundle])
    return _md_table(["Item", "Location"], rows)


def _quant(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> dict[str, str] | None:
    text = _QUANT_TEXT.get(cfg.convert.mode)
    if text is None:
        return None
    name, section, intro, description = text
    model = cfg.model.name
    return {
        "name": name,
        "section": section,
        "intro": intro.format(model=model),
        "description": description.format(model=model),
    }


def _scheme_lines(manifest: Mapping[str, Any]) -> list[str]:
    """The quantization scheme as the converted checkpoint's config.json declares it."""
    scheme = manifest["conversion"].get("scheme") or {}
    lines = []
    for part, title in (("weights", "Weights"), ("input_activations", "Activations")):
        spec = scheme.get(part)
        if not isinstance(spec, dict) or not spec.get("num_bits"):
            continue
        words = [f"{spec['num_bits']}-bit {spec.get('type') or 'int'}"]
        if spec.get("strategy"):
            words.append(f"per {spec['strategy']}")
        if spec.get("group_size"):
            words.append(f"group size {spec['group_size']}")
        if spec.get("symmetric") is not None:
            words.append("symmetric" if spec["symmetric"] else "asymmetric")
        if spec.get("dynamic") is not None:
            words.append("scales computed at run time" if spec["dynamic"] else "static scales")
        lines.append(f"{title}: {', '.join(words)}.")
    if lines and scheme.get("quant_method"):
        fmt = f", format `{scheme['format']}`" if scheme.get("format") else ""
        lines.append(f"Checkpoint: `{scheme['quant_method']}`{fmt} (declared in `config.json`).")
    return lines


def _quant_summary(manifest: Mapping[str, Any]) -> str:
    summary = manifest["conversion"]["summary"] or {}
    rows = []
    for key, value in summary.items():
        if isinstance(value, bool) or value is None:
            shown = str(value).lower()
        elif isinstance(value, float):
            shown = f"{value:.6g}"
        elif isinstance(value, int | str):
            shown = str(value)
        else:
            continue
        rows.append([str(key), shown])
    return _md_table(["Measure", "Value"], rows) if rows else ""


def _prebuilt(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> bool:
    """Whether users can pull the image: it was pushed, or (no image stage yet) the config pushes it."""
    image = manifest["image"]
    if image["pushed"] is not None or image["built"] is not None:
        return bool(image["pushed"] or image["digest"])
    return bool(cfg.image.push and cfg.image.registry)


def _image_note(manifest: Mapping[str, Any]) -> str:
    image = manifest["image"]
    if image["pushed"] is False or image["built"] is False:
        where = f" from `{image['dockerfile']}` in this bundle" if image["dockerfile"] else ""
        return f"The image was not pushed by this release; build it{where} with `docker build -t {image['ref']} .`."
    return ""


def _context(cfg: ReleaseConfig, manifest: Mapping[str, Any], bundle_dir: Path) -> dict[str, Any]:
    chip = cfg.chip_profile
    quant = _quant(cfg, manifest)
    headers, rows = eval_table_rows(manifest)
    share = manifest["flaggems"]["triton_share"]
    pub = cfg.publish
    return {
        "front_matter": _front_matter(cfg, manifest),
        "gate": manifest["gate"],
        "bundle_name": manifest["release"]["bundle_name"],
        "model_name": cfg.model.name,
        "chip": chip,
        "cpu_chip": chip.accelerator.value == "cpu",
        "vendor_vllm": chip.vllm_package == "vendor",
        "reference_chip": load_chip(cfg.eval.reference.chip),
        "labels": {"reference": manifest["eval"]["reference"]["label"], "target": manifest["eval"]["target"]["label"]},
        "prebuilt_image": _prebuilt(cfg, manifest),
        "feature_count": 3 if quant else 2,
        "feature_words": _NUMBER_WORDS[3 if quant else 2],
        "hf_url": f"{hf_endpoint()}/{pub.hf_repo}" if pub.hf_repo else None,
        "weights": manifest["weights"],
        "quant": quant,
        "quant_summary": _quant_summary(manifest),
        "scheme_lines": _scheme_lines(manifest),
        "conversion": manifest["conversion"],
        "verdict_sentence": _verdict_sentence(manifest),
        "flaggems": manifest["flaggems"],
        "triton_share": f"{share * 100:.1f}%" if share is not None else None,
        "download_table": _download_table(cfg, manifest),
        "eval_table": _md_table(headers, rows),
        "eval_notes": _eval_notes(manifest, cfg),
        "missing": manifest["missing"],
        "weights_commands": _weights_commands(cfg, manifest),
        "image": manifest["image"],
        "image_note": _image_note(manifest),
        "multinode": len(cfg.nodes) > 1,
        "nodes": cfg.nodes,
        "docker_run": _docker_run(cfg, manifest),
        "serve": manifest["serve"],
        "flaggems_commands": _flaggems_commands(manifest),
        "serve_configs": _serve_configs(cfg, bundle_dir, manifest),
        "license_text": _license_text(cfg),
    }


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir() / "card")),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["code"] = lambda s: f"`{s}`"
    return env


def render_card(cfg: ReleaseConfig, *, manifest: Mapping[str, Any], bundle_dir: Path) -> str:
    """Render the model card.

    Args:
        cfg: the release config.
        manifest: the bundle manifest (:func:`flagrelease.card.manifest.build_manifest`).
        bundle_dir: the bundle; the serve configs shown are read from its ``serve/`` folder.

    Returns:
        The card as Markdown with a Hugging Face metadata header, secrets redacted.
    """
    text = _environment().get_template(CARD_TEMPLATE).render(**_context(cfg, manifest, bundle_dir))
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return redact(text)


# -- gate results --------------------------------------------------------------------------
def _load_gate(path: Path) -> dict[str, Any]:
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


def _render_serve_configs(cfg: ReleaseConfig, serve_dir: Path) -> None:
    """Write the FlagScale configs with the render module when ``serve_dir`` has none."""
    if serve_dir.is_dir() and any(p.is_file() for p in serve_dir.rglob("*")):
        return
    from flagrelease.render import render_serve_configs

    render_serve_configs(cfg, out_dir=serve_dir)


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
    gate = _load_gate(results) if results is not None else None
    out_dir = Path(out_dir)
    _render_serve_configs(cfg, out_dir / "serve")
    from flagrelease import __version__

    manifest = build_manifest(cfg, bundle_dir=out_dir, gate=gate, tools={"flagrelease": __version__})
    card = out_dir / "README.md"
    atomic_write_text(card, render_card(cfg, manifest=manifest, bundle_dir=out_dir))
    return card


# -- the card stage ---------------------------------------------------------------------------
def _copy_into(src: Any, dst: Path, *, dry_run: bool) -> Path | None:
    """Copy ``src`` to ``dst`` unless it is already there; return where it lies in the bundle."""
    if not src:
        return None
    path = Path(str(src))
    if not path.is_file():
        return None
    if path.resolve() == dst.resolve():
        return dst
    if not dry_run:
        atomic_copy(path, dst)
    return dst


def run_stage(ctx: ReleaseContext) -> StageResult:
    """The card stage: write the card to ``bundle/README.md`` and the manifest to ``bundle/flagrelease.json``.

    Gate results, the quantization error report and the Dockerfile are copied into the
    bundle when they lie outside it.  Upstream stages that did not run are recorded as such.

    Returns:
        A result whose outputs are ``card`` and ``manifest`` (paths).
    """
    cfg, layout = ctx.config, ctx.layout
    results = stage_results(ctx)
    ctx.progress("card", 0.05, "collecting stage results")

    gate_res = results.get("gate")
    gate_file: Path | None = None
    gate: dict[str, Any] | None = None
    if gate_res is not None and gate_res.outputs.get("results"):
        gate_file = _copy_into(
            gate_res.outputs["results"], layout.reports_dir / "gate_results.json", dry_run=ctx.dry_run
        )
        if gate_file is not None:
            gate = _load_gate(Path(str(gate_res.outputs["results"])) if ctx.dry_run else gate_file)
    conv = results.get("convert")
    if conv is not None and conv.outputs.get("report"):
        src = Path(str(conv.outputs["report"]))
        copied = _copy_into(src, layout.reports_dir / src.name, dry_run=ctx.dry_run)
        if copied is not None and not ctx.dry_run:
            results["convert"] = dataclasses.replace(conv, outputs={**conv.outputs, "report": str(copied)})
    image = results.get("image")
    if image is not None and image.outputs.get("dockerfile"):
        _copy_into(image.outputs["dockerfile"], layout.bundle_dir / "image" / "Dockerfile", dry_run=ctx.dry_run)
    if not ctx.dry_run:
        try:
            _render_serve_configs(cfg, layout.serve_dir)
        except ImportError as err:
            raise ConfigError(
                "the bundle has no serve configs and flagrelease.render is unavailable; run the deploy stage first",
                model=cfg.name,
                stage="card",
            ) from err

    ctx.progress("card", 0.3, "hashing files")
    cache = HashCache(layout.state_dir / "hashes.json")
    deploy_res, image_res = results.get("deploy"), results.get("image")
    deploy = deploy_res.outputs if deploy_res is not None else {}
    image_out = image_res.outputs if image_res is not None else {}
    manifest = build_manifest(
        cfg,
        bundle_dir=layout.bundle_dir,
        results=results,
        gate=gate,
        gate_file=gate_file,
        config_path=ctx.config_path,
        tools=tool_versions(deploy=deploy, image=image_out),
        cache=cache,
    )
    card_text = render_card(cfg, manifest=manifest, bundle_dir=layout.bundle_dir)
    headers, rows = eval_table_rows(manifest)
    table = [dict(zip(headers, r, strict=True)) for r in rows]
    status = "warning" if manifest["gate"]["failed"] or manifest["missing"] else "ok"
    if ctx.dry_run:
        return StageResult(
            stage="card",
            summary=f"dry run: would write the card {layout.card_path} and the manifest {layout.manifest_path}",
            outputs={"card": str(layout.card_path), "manifest": str(layout.manifest_path)},
            tables={"evaluation": table},
            status="skipped",
        )
    atomic_write_text(layout.card_path, card_text)
    ctx.progress("card", 0.8, "writing the manifest")
    write_manifest(manifest, path=layout.manifest_path, bundle_dir=layout.bundle_dir, cache=cache)
    cache.save()
    missing = f"; missing: {', '.join(manifest['missing'])}" if manifest["missing"] else ""
    failed = " GATE FAILED (published only with publish_on_fail)." if manifest["gate"]["failed"] else ""
    summary = (
        f"card for {manifest['release']['bundle_name']} with {len(rows)} evaluation row(s) and a manifest of "
        f"{len(manifest['files'])} bundle file(s){missing}.{failed}"
    )
    log.info("card: wrote %s and %s", layout.card_path, layout.manifest_path)
    return StageResult(
        stage="card",
        summary=summary,
        outputs={
            "card": str(layout.card_path),
            "manifest": str(layout.manifest_path),
            "missing": list(manifest["missing"]),
            "gate_failed": manifest["gate"]["failed"],
        },
        tables={"evaluation": table},
        status=status,
    )
