"""The card's text from the manifest: the evaluation table and its notes, the quantization
section, the metadata header and the license line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from flagrelease.config import ConvertMode, ModelSource, ReleaseConfig
from flagrelease.render import markdown_cell, markdown_text

__all__ = [
    "LANG",
    "NUMBER_WORDS",
    "TBD",
    "eval_notes",
    "eval_table_rows",
    "front_matter",
    "gems_claimed",
    "human_size",
    "license_text",
    "md_table",
    "ops_name",
    "quant_summary",
    "quant_text",
    "scheme_lines",
    "verdict_sentence",
]

TBD = "TBD"

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
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
LANG = {".yaml": "yaml", ".yml": "yaml", ".txt": "text", ".sh": "bash", ".json": "json"}


# -- formatting helpers ---------------------------------------------------------------------
def _num(value: Any) -> str:
    return TBD if value is None else f"{float(value):.2f}"


def _signed(value: Any) -> str:
    return f"{float(value):+.2f}"


def _ci(ci: Any) -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2 or None in ci:
        return ""
    return f"[{_signed(ci[0])}, {_signed(ci[1])}]"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns."""
    cells = [[markdown_cell(" ".join(str(c).split())) for c in r] for r in [headers, *rows]]
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
        label = markdown_text(" ".join(str(r.get("label") or r.get("task")).split()))
        rows.append([label, _num(ref), _num(tgt), diff, verdict])
    return headers, rows


def verdict_sentence(manifest: Mapping[str, Any]) -> str:
    """The end of the introduction's consistency sentence: the gate's verdict in words."""
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


def human_size(n: float) -> str:
    """``n`` bytes in decimal units (``300.38 KB``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def gems_claimed(manifest: Mapping[str, Any]) -> bool:
    """Whether the card may name FlagGems as what served: it did, or (nothing served yet) a GPU release asks for it."""
    gems = manifest["flaggems"]
    if gems["library"] is not None or manifest["stages"]["deploy"]["status"] not in ("not-run", "skipped"):
        return bool(gems["enabled"])
    return bool(gems["requested"]) and manifest["chip"]["gems_vendor"] != "cpu"


def ops_name(manifest: Mapping[str, Any]) -> str:
    """How the card names the operator library in sentences: FlagGems only when it is FlagGems."""
    gems = manifest["flaggems"]
    if gems["library"] and gems["library"] != "flag_gems":
        return f"the operator library (`{gems['library']}`)"
    return "FlagGems" if gems_claimed(manifest) else "the operator library"


def eval_notes(manifest: Mapping[str, Any], cfg: ReleaseConfig) -> list[str]:
    """The sentences under the evaluation table: the test, the verdict, throughput and operator checks."""
    lib = ops_name(manifest)
    ev = manifest["eval"]
    notes: list[str] = []
    tested = [r for r in ev["rows"] if r.get("test")]
    unpaired = [r for r in tested if r.get("unpaired")]
    if unpaired:
        powers = ", ".join(f"{r['label']} {float(r['power']):.0%}" for r in unpaired if r.get("power") is not None)
        notes.append(
            "Scores are percentages. The reference is published scores without per-item data, so each row is "
            "*unpaired*: the two scores are compared as independent samples (two one-sided tests of two "
            f"proportions, margin ±{ev['margin']:g} points, alpha {ev['alpha']:g}), which decides far less than an "
            "item-by-item comparison" + (f" (power to show equivalence: {powers})." if powers else ".")
        )
    elif tested:
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
    if any(r.get("rule") == "relative" for r in tested):
        g = cfg.gates
        notes.append("")
        notes.append(
            f"Verdicts follow FlagRelease's relative rule: a row is *consistent* when the target scores at most "
            f"{g.relative_margin:g}% (of the reference's score) below the reference; a gap of at most "
            f"{g.noise_zone_items} questions on at most {g.noise_zone_max_n} means retest (*inconclusive*)."
        )
    verdict = ev["verdict"]
    if verdict:
        notes.append("")
        notes.append(f"Overall gate verdict: **{verdict}**.")
    thr = ev.get("throughput") or {}
    if thr.get("ratio_ci"):
        notes.append("")
        notes.extend(_throughput_trials(thr, lib))
    elif thr.get("gems_on_tok_s") is not None and thr.get("gems_off_tok_s") is not None:
        ok = "passes" if thr.get("ok") else "fails"
        notes.append("")
        notes.append(
            f"Throughput with {lib} on: {float(thr['gems_on_tok_s']):.1f} output tokens/s; off: "
            f"{float(thr['gems_off_tok_s']):.1f} tokens/s (ratio {float(thr.get('ratio') or 0):.2f}, "
            f"minimum {float(thr.get('min_ratio') or cfg.gates.throughput_min_ratio):.2f}: {ok})."
        )
    if ev.get("flaggems_on_vs_off"):
        notes.append("")
        notes.append(f"Results with {lib} on versus off: **{ev['flaggems_on_vs_off']}**.")
    if ev.get("blamed_ops"):
        notes.append("")
        notes.append(
            f"Operators of {lib} blamed for a difference by the bisection: "
            + ", ".join(f"`{o}`" for o in ev["blamed_ops"])
            + "."
        )
    return notes


def _throughput_trials(thr: Mapping[str, Any], lib: str) -> list[str]:
    """The throughput verdict with its interval, and every trial, round by round."""
    settings = thr.get("settings") or {}
    cpu = thr.get("metric") == "cpu"
    unit = "tokens per CPU-second of the server" if cpu else "tokens/s"
    lo, hi = (float(x) for x in thr["ratio_ci"])
    lines = [
        f"Throughput with {lib} on versus off, measured in {thr['rounds']} interleaved rounds (each round runs both, "
        f"in alternating order, {settings.get('requests', '?')} requests at concurrency "
        f"{settings.get('concurrency', '?')} with {settings.get('max_tokens', '?')} output tokens each, after a "
        f"warm-up), compared in output {unit}"
        + (" (the cores are shared, so wall-clock rates mostly measure other work)" if cpu else "")
        + f": ratio {float(thr['ratio']):.2f}, {float(thr['ci_level']) * 100:g}% confidence interval "
        f"[{lo:.2f}, {hi:.2f}], minimum {float(thr['min_ratio']):.2f}: **{thr['verdict']}**.",
        "",
        f"| Round | {lib} on ({unit}) | off ({unit}) | On / off |",
        "| ---: | ---: | ---: | ---: |",
    ]
    arms = thr.get("arms") or {"on": "target", "off": "target_gems_off"}
    by_round: dict[int, dict[str, float]] = {}
    for t in thr.get("trials") or []:
        rate = float(t["output_tokens"]) / float(t["cpu_s"]) if cpu and t.get("cpu_s") else float(t["tok_s"])
        by_round.setdefault(int(t["round"]), {})[str(t["arm"])] = rate
    for rnd, got in sorted(by_round.items()):
        on, off = got.get(arms["on"]), got.get(arms["off"])
        ratio = f"{on / off:.2f}" if on and off else "-"
        lines.append(f"| {rnd + 1} | {on or 0:.1f} | {off or 0:.1f} | {ratio} |")
    return lines


def front_matter(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> str:
    """The card's Hugging Face metadata (YAML): license, base model, tags."""
    chip = manifest["chip"]
    tags: list[str] = []
    quant = manifest["conversion"]["quant"]
    for t in [
        "flagos",
        "flagrelease",
        *(["flaggems"] if gems_claimed(manifest) else []),
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


def license_text(cfg: ReleaseConfig) -> str:
    """The license sentence at the end of the card."""
    name = _LICENSES.get(cfg.model.license.lower()) or markdown_text(cfg.model.license)
    text = f"The weights of this model are based on {cfg.model.repo_id} and are open-sourced under the {name} License"
    return text + (f": {cfg.model.license_url}." if cfg.model.license_url else ".")


def quant_text(cfg: ReleaseConfig, manifest: Mapping[str, Any]) -> dict[str, str] | None:
    """The quantization section's name, title and sentences, None when nothing was converted."""
    text = _QUANT_TEXT.get(cfg.convert.mode)
    if text is None:
        return None
    name, section, intro, description = text
    model = cfg.model.name
    return {
        "name": name,
        "section": section,
        "intro": intro.format(model=markdown_text(model)),
        "description": description.format(model=markdown_text(model)),
    }


def scheme_lines(manifest: Mapping[str, Any]) -> list[str]:
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


def quant_summary(manifest: Mapping[str, Any]) -> str:
    """The quantization error report's totals as a table, empty when there is none."""
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
    return md_table(["Measure", "Value"], rows) if rows else ""
