"""What the eval stage writes and the gate reads: lm-eval's per-sample logs, and published scores.

:func:`read_benchmark` turns a folder of ``samples_<task>_<date>.jsonl`` files (and
``results_*.json`` for task groups) into per-item sample scores with prompt hashes.
:func:`load_reference_scores` reads a reference given only as published numbers
(``eval.reference.mode: scores``): a YAML file of task -> score in percent, with the
number of items where it is known::

    label: DeepSeek-R1-H100-CUDA        # optional: the column's name in the card
    chip: nvidia-h100                   # optional
    source: https://...                 # optional: where the numbers come from
    scores:
      gsm8k: {score: 95.75, n: 1319}
      ceval-valid: 89.00                # n unknown

Pure Python; importing this module never imports lm-eval.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BenchmarkSamples",
    "ItemSamples",
    "PublishedScore",
    "ReferenceScores",
    "SampleRecord",
    "SamplesError",
    "benchmark_of",
    "canonical_json",
    "find_samples",
    "group_parents",
    "iter_per_sample",
    "leaves_of",
    "load_reference_scores",
    "prompt_hashes",
    "read_benchmark",
    "read_samples_file",
    "sha256_text",
]

_SAMPLES_NAME = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[0-9.\-]+)\.jsonl$")


# --------------------------------------------------------------------------------------
# Reading lm-eval's per-sample logs
# --------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    """``obj`` as canonical JSON (sorted keys, no spaces): the text request hashes are taken of."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    """The hex SHA-256 of ``text`` in UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_hashes(arguments: Any) -> tuple[str, str]:
    """Hashes of a logged sample's request arguments.

    Args:
        arguments: the ``arguments`` field of an lm-eval sample line (the
            ``{"gen_args_0": {"arg_0": ..., "arg_1": ...}, ...}`` form, or a raw list).

    Returns:
        ``(prompt_hash, gen_hash)``: SHA-256 of every text argument (contexts,
        continuations, chat messages) in order, and of the generation settings (the
        dict arguments: ``until``, temperature, ``max_gen_toks`` ...).
    """
    requests: list[list[Any]]
    if isinstance(arguments, dict):
        requests = [
            [args[k] for k in sorted(args, key=lambda s: int(s.split("_")[-1]))] if isinstance(args, dict) else [args]
            for _, args in sorted(arguments.items(), key=lambda kv: int(kv[0].split("_")[-1]))
        ]
    elif isinstance(arguments, list):
        requests = [list(a) if isinstance(a, list | tuple) else [a] for a in arguments]
    else:
        requests = [[arguments]]
    texts: list[list[Any]] = []
    gens: list[Any] = []
    for req in requests:
        texts.append([a for a in req if not isinstance(a, dict)])
        gens.extend(a for a in req if isinstance(a, dict))
    return sha256_text(canonical_json(texts)), sha256_text(canonical_json(gens))


@dataclass(frozen=True)
class SampleRecord:
    """One line of an lm-eval samples file, for one filter.

    Attributes:
        task: the leaf task that produced it.
        doc_id: the item's index in the task.
        filter: the lm-eval filter (``none``, ``strict-match``, ``flexible-extract`` ...).
        metrics: every scalar metric of the line.
        metric_order: metric names in lm-eval's order.
        prompt_hash: SHA-256 of the exact request texts (see :func:`prompt_hashes`).
        gen_hash: SHA-256 of the generation settings.
        lm_eval_prompt_hash: lm-eval's own ``prompt_hash`` (first argument only).
        response: the filtered response (text, or the logged loglikelihood tuples).
        target: the reference answer, as text.
        source: the samples file.
    """

    task: str
    doc_id: int
    filter: str
    metrics: dict[str, float]
    metric_order: tuple[str, ...]
    prompt_hash: str
    gen_hash: str
    lm_eval_prompt_hash: str | None
    response: Any
    target: str
    source: str


def read_samples_file(path: Path) -> list[SampleRecord]:
    """Parse one ``samples_<task>_<date>.jsonl`` file.

    Raises:
        ValueError: a line is not JSON or lacks ``doc_id``; the message names the line.
    """
    path = Path(path)
    m = _SAMPLES_NAME.match(path.name)
    task_from_name = m.group("task") if m else path.stem.removeprefix("samples_")
    out: list[SampleRecord] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                doc_id = int(row["doc_id"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: not an lm-eval sample line ({err})") from err
            names = [str(n) for n in row.get("metrics") or []]
            metrics: dict[str, float] = {}
            for name in names or [k for k in row if k not in _SAMPLE_KEYS]:
                value = row.get(name)
                if isinstance(value, bool | int | float):
                    metrics[name] = float(value)
            p_hash, g_hash = prompt_hashes(row.get("arguments"))
            resp = row.get("filtered_resps", row.get("resps"))
            if isinstance(resp, list) and len(resp) == 1:
                resp = resp[0]
            out.append(
                SampleRecord(
                    task=task_from_name,
                    doc_id=doc_id,
                    filter=str(row.get("filter", "none")),
                    metrics=metrics,
                    metric_order=tuple(n for n in names if n in metrics) or tuple(metrics),
                    prompt_hash=p_hash,
                    gen_hash=g_hash,
                    lm_eval_prompt_hash=row.get("prompt_hash"),
                    response=resp,
                    target=str(row.get("target", "")),
                    source=str(path),
                )
            )
    return out


_SAMPLE_KEYS = frozenset(
    {
        "doc_id",
        "doc",
        "target",
        "arguments",
        "resps",
        "filtered_resps",
        "filter",
        "metrics",
        "doc_hash",
        "prompt_hash",
        "target_hash",
    }
)


def find_samples(root: Path) -> dict[str, list[Path]]:
    """Every lm-eval samples file below ``root``, by leaf task, in a stable order."""
    found: dict[str, list[Path]] = {}
    for path in sorted(Path(root).rglob("samples_*.jsonl")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # temporary folders of interrupted writes
        m = _SAMPLES_NAME.match(path.name)
        task = m.group("task") if m else path.stem.removeprefix("samples_")
        found.setdefault(task, []).append(path)
    return found


def group_parents(root: Path) -> dict[str, str]:
    """Child task -> parent group, from every ``results_*.json`` below ``root``."""
    parents: dict[str, str] = {}
    for path in sorted(Path(root).rglob("results_*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for group, children in (data.get("group_subtasks") or {}).items():
            for child in children or []:
                if child != group:
                    parents.setdefault(str(child), str(group))
    return parents


def _ancestors(task: str, parents: dict[str, str]) -> list[str]:
    chain = [task]
    while chain[-1] in parents and parents[chain[-1]] not in chain:
        chain.append(parents[chain[-1]])
    return chain


def benchmark_of(task: str, parents: dict[str, str]) -> str:
    """The top-level benchmark (outermost group) a leaf task belongs to."""
    return _ancestors(task, parents)[-1]


def leaves_of(name: str, tasks: Iterable[str], parents: dict[str, str]) -> list[str]:
    """The leaf tasks that make up benchmark ``name``.

    Group membership comes from lm-eval's ``group_subtasks``; for folders without
    results files, a group ``mmlu`` that is not itself a logged task is taken to be the
    logged tasks named ``mmlu_*``.
    """
    tasks = list(tasks)
    out = [t for t in tasks if name in _ancestors(t, parents)]
    if not out:
        out = [t for t in tasks if t.startswith(f"{name}_") and len(_ancestors(t, parents)) == 1]
    return sorted(out)


@dataclass
class ItemSamples:
    """The samples of one item (``leaf task``, ``doc_id``) of a benchmark."""

    task: str
    doc_id: int
    prompt_hash: str
    gen_hash: str
    scores: list[float] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    target: str = ""


@dataclass
class BenchmarkSamples:
    """Per-item samples of one benchmark read from one folder."""

    name: str
    metric: str
    filter: str
    items: dict[tuple[str, int], ItemSamples]
    leaves: list[str]
    passes: int


class SamplesError(ValueError):
    """lm-eval output that cannot be read as asked (no such metric, hashes differ ...)."""


def read_benchmark(
    root: Path,
    *,
    name: str,
    metric: str | None = None,
    filter: str | None = None,
    samples: dict[str, list[Path]] | None = None,
    parents: dict[str, str] | None = None,
) -> BenchmarkSamples | None:
    """Read one benchmark's per-item scores from an lm-eval output folder.

    Each samples file of a leaf task counts as one pass (one sample per item); ``k``
    passes give ``k`` samples per item.

    Args:
        root: the folder (searched recursively).
        name: benchmark (task or group) name.
        metric: the metric to read; default the first scalar metric lm-eval logged.
        filter: the lm-eval filter; default ``none`` if present, else the first one.
        samples: :func:`find_samples` of ``root``, if already computed.
        parents: :func:`group_parents` of ``root``, if already computed.

    Returns:
        The benchmark's items, or None when the folder holds none of its tasks.

    Raises:
        SamplesError: the metric or filter is not in the logs, or an item's prompt
            differs between passes.
    """
    samples = find_samples(root) if samples is None else samples
    parents = group_parents(root) if parents is None else parents
    leaves = leaves_of(name, samples, parents)
    if not leaves:
        return None
    items: dict[tuple[str, int], ItemSamples] = {}
    chosen_metric, chosen_filter = metric, filter
    passes = 0
    for leaf in leaves:
        for path in samples[leaf]:
            records = read_samples_file(path)
            if not records:
                continue
            filters = list(dict.fromkeys(r.filter for r in records))
            use_filter = chosen_filter or ("none" if "none" in filters else filters[0])
            if use_filter not in filters:
                raise SamplesError(
                    f"{path}: filter {use_filter!r} not logged for task {leaf}; logged filters: {', '.join(filters)}"
                )
            rows = [r for r in records if r.filter == use_filter]
            use_metric = chosen_metric or (rows[0].metric_order[0] if rows[0].metric_order else None)
            if use_metric is None or use_metric not in rows[0].metrics:
                raise SamplesError(
                    f"{path}: metric {use_metric!r} not logged for task {leaf}; logged metrics: "
                    f"{', '.join(rows[0].metrics) or 'none'}"
                )
            chosen_metric, chosen_filter = use_metric, use_filter
            passes_in_file = 0
            for r in rows:
                key = (leaf, r.doc_id)
                item = items.get(key)
                if item is None:
                    item = items[key] = ItemSamples(leaf, r.doc_id, r.prompt_hash, r.gen_hash, target=r.target)
                elif item.prompt_hash != r.prompt_hash:
                    raise SamplesError(
                        f"task {leaf} doc {r.doc_id}: the prompt differs between {item.sources[0]} and {path}; "
                        "every pass must use the same prompts (same lm-eval version, fewshot seed and chat template)"
                    )
                if use_metric not in r.metrics:
                    raise SamplesError(f"{path}: doc {r.doc_id} has no value for metric {use_metric!r}")
                item.scores.append(r.metrics[use_metric])
                item.responses.append(r.response)
                item.sources.append(str(path))
                passes_in_file = 1
            passes += passes_in_file
    assert chosen_metric is not None and chosen_filter is not None
    n_leaves = max(1, len(leaves))
    return BenchmarkSamples(name, chosen_metric, chosen_filter, items, leaves, max(1, passes // n_leaves))


def iter_per_sample(path: Path) -> Iterator[dict[str, Any]]:
    """The lines of a ``per_sample.jsonl`` file."""
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


# --------------------------------------------------------------------------------------
# Published reference scores (no per-sample logs)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishedScore:
    """One benchmark's published score.

    Attributes:
        score: percent (0-100).
        n: items it was computed on, None when unknown.
        samples_per_item: samples per item, None when unknown.
    """

    score: float
    n: int | None = None
    samples_per_item: int | None = None


@dataclass(frozen=True)
class ReferenceScores:
    """A reference given as published numbers (``eval.reference.mode: scores``)."""

    path: Path
    scores: dict[str, PublishedScore]
    label: str | None = None
    chip: str | None = None
    source: str | None = None


def _published(task: str, value: Any, path: Path) -> PublishedScore:
    where = f"{path}: scores.{task}"
    entry = value if isinstance(value, dict) else {"score": value}
    unknown = sorted(set(entry) - {"score", "n", "samples_per_item"})
    if unknown:
        raise SamplesError(f"{where}: unknown key(s) {unknown}; valid: score, n, samples_per_item")
    score = entry.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise SamplesError(f"{where}: score must be a number in percent, got {score!r}")
    if not 0 <= score <= 100:
        raise SamplesError(f"{where}: score {score} is not a percentage in [0, 100]")
    counts: dict[str, int | None] = {}
    for key in ("n", "samples_per_item"):
        v = entry.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SamplesError(f"{where}: {key} must be a positive integer, got {v!r}")
        counts[key] = v
    return PublishedScore(float(score), counts["n"], counts["samples_per_item"])


def load_reference_scores(path: Path) -> ReferenceScores:
    """Read a published-scores file (format in the module docstring).

    Raises:
        SamplesError: the file is missing, not YAML, or a score is not a percentage; the
            message names the file and the entry.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SamplesError(
            f"reference scores file {path} cannot be read ({err}); point eval.reference.scores at it"
        ) from err
    except yaml.YAMLError as err:
        raise SamplesError(f"reference scores file {path} is not YAML: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict) or not data["scores"]:
        raise SamplesError(f"{path}: expected a mapping with 'scores: {{task: score, ...}}' (percent)")
    unknown = sorted(set(data) - {"scores", "label", "chip", "source"})
    if unknown:
        raise SamplesError(f"{path}: unknown key(s) {unknown}; valid: scores, label, chip, source")
    scores = {str(task): _published(str(task), value, path) for task, value in data["scores"].items()}
    text = {k: (str(data[k]) if data.get(k) is not None else None) for k in ("label", "chip", "source")}
    return ReferenceScores(path=path, scores=scores, label=text["label"], chip=text["chip"], source=text["source"])
