"""The collection card: one model on every chip of its matrix, in the published cards' style.

The benchmark table has the published cards' shape -- a ``Metrics`` column, the reference
column (``<model>-H100-CUDA``) and one column per chip (``<model>-FlagOS-<chip>``) -- and a
support matrix above it says, per chip, whether the release passed its gate, its FlagGems
on/off throughput ratio, the operators left out and where its bundle is.  Rendered from
``templates/matrix/README.md.j2`` with ``StrictUndefined``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import yaml

from flagrelease.constants import templates_dir
from flagrelease.errors import ConfigError
from flagrelease.matrix._config import Matrix

__all__ = ["CARD_TEMPLATE", "benchmark_table", "render_collection_card", "support_matrix_table"]

#: The collection card's template, below templates/.
CARD_TEMPLATE = "matrix/README.md.j2"
TBD = "TBD"
NOT_EVALUATED = "n/a"
_STATUS = {
    "released": "released",
    "gate-failed": "failed its gate",
    "failed": "run failed",
    "missing": "not run",
}


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, first_left: bool = True) -> str:
    """A Markdown table with padded columns (``:---`` on the first column, as the published cards)."""
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in [headers, *rows]]
    widths = [max(4, *(len(r[i]) for r in cells)) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    seps = [(":" + "-" * (w - 1)) if i == 0 and first_left else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(cells[0]), "| " + " | ".join(seps) + " |", *(line(r) for r in cells[1:])])


def _num(value: Any) -> str:
    return TBD if value is None else f"{float(value):.2f}"


def benchmark_table(table: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The benchmark table (Markdown) and its notes.

    Rows are benchmarks; columns the reference(s) and then each chip.  A chip's score is
    followed by its verdict when that is not ``consistent``; a missing score is ``TBD``,
    and a benchmark the chip's release does not run is ``n/a``.
    """
    refs = table["references"]
    headers = ["Metrics", *(r["label"] for r in refs), *(str(r["label"]) for r in table["rows"])]
    rows = []
    flagged = False
    for bench in table["benchmarks"]:
        cells = [bench["label"], *(_num(r["scores"].get(bench["task"])) for r in refs)]
        for row in table["rows"]:
            if bench["task"] not in row["scores"] and row["status"] in ("released", "gate-failed"):
                cells.append(NOT_EVALUATED)  # that chip's release does not run this benchmark
                continue
            s = row["scores"].get(bench["task"]) or {}
            cell = _num(s.get("score"))
            verdict = s.get("verdict")
            if cell != TBD and verdict and verdict != "consistent":
                cell, flagged = f"{cell} ({verdict})", True
            cells.append(cell)
        rows.append(cells)
    notes = []
    if flagged:
        notes.append(
            "A score marked (inconclusive) or (inconsistent) did not pass the paired equivalence test against the "
            "reference; the chip's own card gives the difference with its confidence interval."
        )
    if any(c == TBD for r in rows for c in r):
        notes.append("TBD: not measured yet (the chip's release did not run, or did not finish).")
    if any(c == NOT_EVALUATED for r in rows for c in r):
        notes.append(f"{NOT_EVALUATED}: not among the benchmarks of that chip's release.")
    return _md_table(headers, rows), notes


def support_matrix_table(table: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The support matrix (Markdown; one row per chip) and its notes."""
    headers = ["Chip", "Status", "Verdict", "FlagGems on/off throughput", "Excluded FlagGems operators", "Bundle"]
    rows = []
    with_ci = False
    for row in table["rows"]:
        thr = row.get("throughput") or {}
        ratio = "" if thr.get("ratio") is None else f"{float(thr['ratio']):.2f}x"
        if ratio and thr.get("ci"):
            lo, hi = thr["ci"]
            ratio, with_ci = f"{ratio} [{float(lo):.2f}, {float(hi):.2f}]", True
        url = row.get("bundle_url")
        link = f"[{row.get('bundle_name') or row['pair']}]({url})" if url else "not published"
        rows.append(
            [
                row["chip_name"],
                _STATUS[row["status"]],
                row.get("verdict") or "",
                ratio or "not measured",
                ", ".join(f"`{op}`" for op in row["excluded_ops"]) or "none",
                link,
            ]
        )
    notes = [
        "Status: released (the run completed and passed its gate), failed its gate, run failed, or not run. "
        "Verdict: the paired consistency verdict over every benchmark against the reference."
    ]
    if with_ci:
        notes.append("The throughput ratio is FlagGems on / off output tokens per second, with its interval.")
    else:
        notes.append("The throughput ratio is FlagGems on / off output tokens per second.")
    return _md_table(headers, rows), notes


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_collection_card(matrix: Matrix, *, table: Mapping[str, Any]) -> str:
    """Render the collection card of ``matrix`` from its support table.

    Raises:
        ConfigError: the template is missing or uses a value this function does not give.
    """
    first = matrix.pairs[0].config
    model = table["model"]["display_name"]
    refs = table["references"]
    counts = table["counts"]
    n = len(table["rows"])
    counts_sentence = f"{counts['released']} of {n} chips are released" + (
        f"; {counts['gate-failed']} failed the gate" if counts["gate-failed"] else ""
    )
    if counts["failed"]:
        counts_sentence += f"; {counts['failed']} did not finish"
    if counts["missing"]:
        counts_sentence += f"; {counts['missing']} have not run"
    front = {
        "license": first.model.license,
        "base_model": first.model.repo_id,
        "tags": sorted({"flagos", "flagrelease", "flaggems", *(r["chip"] for r in table["rows"])}),
    }
    support, support_notes = support_matrix_table(table)
    bench, bench_notes = benchmark_table(table)
    bundles = [
        {
            "chip_name": r["chip_name"],
            "link": f"[{r.get('bundle_name') or r['pair']}]({r['bundle_url']})"
            if r.get("bundle_url")
            else "not published",
        }
        for r in table["rows"]
    ]
    try:
        template = _environment().get_template(CARD_TEMPLATE)
        return template.render(
            front_matter=yaml.safe_dump(front, sort_keys=False),
            title=matrix.title,
            model_name=model,
            description=matrix.config.description,
            reference_sentence=" and ".join(r["label"] for r in refs) or "its reference",
            counts_sentence=counts_sentence + ".",
            support_table=support,
            support_notes=support_notes,
            benchmark_table=bench,
            benchmark_notes=bench_notes,
            bundles=bundles,
            license=first.model.license,
        )
    except jinja2.TemplateNotFound as err:
        raise ConfigError(f"template {CARD_TEMPLATE} not found under {templates_dir()}") from err
    except jinja2.UndefinedError as err:
        raise ConfigError(f"template {CARD_TEMPLATE}: {err.message}; the template uses a value not given") from err
