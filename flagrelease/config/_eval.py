"""The ``eval`` and ``gates`` sections of a release config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flagrelease.config._base import (
    _Strict,
)
from flagrelease.config._grammar import check_free_text
from flagrelease.config._serve import EngineArgs, Node, _parse_node_lines, normalise_engine_args

__all__ = [
    "EvalSection",
    "EvalTask",
    "GatesSection",
    "GenerationSettings",
    "ProbeSettings",
    "ReferenceSection",
    "ThroughputGate",
]


class GenerationSettings(_Strict):
    """Sampling settings for generative tasks."""

    temperature: float = Field(default=0.0, ge=0, le=100)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=256, ge=1, le=2**24)
    seed: int = Field(default=1234, ge=0)


class EvalTask(_Strict):
    """One benchmark of the evaluation."""

    name: str = Field(description="lm-eval task name, e.g. gsm8k, mmlu, ceval-valid.")
    label: str | None = Field(default=None, description="Row label in the card, e.g. 'GSM8K (EM)'.")
    metric: str | None = Field(default=None, description="lm-eval metric reported, e.g. exact_match.")
    filter: str | None = Field(default=None, description="lm-eval filter of that metric, e.g. flexible-extract.")
    kind: Literal["generate", "loglikelihood"] = "generate"
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0, le=1000)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", value):
            raise ValueError(f"task name {value!r} must be letters, digits, '_', '.' or '-' (128 at most)")
        return value

    @field_validator("metric", "filter")
    @classmethod
    def _word(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.,:-]{1,128}", value):
            raise ValueError(f"{value!r} must be an lm-eval name: letters, digits, '_', '.', ',', ':' or '-'")
        return value

    @field_validator("label")
    @classmethod
    def _label(cls, value: str | None) -> str | None:
        return None if value is None else check_free_text(value, what="label", max_len=128)


class ReferenceSection(_Strict):
    """What the target is compared with: by default the H100 CUDA run."""

    chip: str = "nvidia-h100"
    mode: Literal["live", "stored", "scores"] = "live"
    results_dir: Path | None = Field(default=None, description="Stored per-sample logs, for mode: stored.")
    scores: Path | None = Field(
        default=None,
        description="Published scores (YAML: task -> score, n where known), for mode: scores; gated unpaired.",
    )
    weights: Literal["source", "converted"] = "source"
    flaggems: bool = False
    nodes: list[Node] = Field(
        default_factory=list, description="Hostfile lines on the reference chip (live reference on another chip)."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="serve.engine_args overrides on the reference chip (TP, PP, ...)."
    )

    @field_validator("nodes", mode="before")
    @classmethod
    def _parse_nodes(cls, value: Any) -> Any:
        return _parse_node_lines(value)

    @field_validator("engine_args", mode="before")
    @classmethod
    def _engine_args(cls, value: Any) -> Any:
        value = normalise_engine_args(value)
        if isinstance(value, dict):
            try:  # the same names, types and bounds as serve.engine_args
                EngineArgs.model_validate(value)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
            value.pop("model", None)
        return value

    @model_validator(mode="after")
    def _stored(self) -> ReferenceSection:
        if self.mode == "stored" and self.results_dir is None:
            raise ValueError("reference mode 'stored' needs 'results_dir'")
        if self.mode == "scores" and self.scores is None:
            raise ValueError("reference mode 'scores' needs 'scores' (a YAML file of task -> score)")
        return self


class ProbeSettings(_Strict):
    """Checks of each served variant before its long eval."""

    enabled: bool = True
    items_per_task: int = Field(default=4, ge=1, description="Items of each generative task the truncation probe runs.")
    max_truncated: float = Field(
        default=0.5, ge=0, le=1, description="Largest share of probe answers cut at max_tokens that lets the eval run."
    )


class EvalSection(_Strict):
    """Evaluation on the target chip and on the reference."""

    tasks: list[EvalTask] = Field(default_factory=list)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    samples_per_item: int = Field(default=1, ge=1, le=1024)
    concurrency: int = Field(default=8, ge=1, le=4096)
    reference: ReferenceSection = Field(default_factory=ReferenceSection)
    include_path: Path | None = Field(default=None, description="Folder of local lm-eval task definitions.")
    dataset_cache: Path | None = None
    limit: int | None = Field(default=None, ge=1, description="Cap on items per task (all tasks).")
    probes: ProbeSettings = Field(default_factory=ProbeSettings)


class ThroughputGate(_Strict):
    """How the FlagGems on/off throughput is measured: interleaved trials, after a warm-up."""

    trials: int = Field(default=8, ge=4, description="Rounds; each measures both arms once, alternating the order.")
    requests: int = Field(default=8, ge=1, description="Requests per trial.")
    concurrency: int | None = Field(default=None, ge=1, description="Requests in flight (default eval.concurrency).")
    max_tokens: int = Field(default=32, ge=1, description="Output tokens of every request (ignore_eos).")
    warmup_requests: int = Field(default=8, ge=0, description="Requests sent to each arm after it is served.")
    settle_s: float = Field(
        default=1.5,
        ge=0,
        description="Idle seconds before each trial: vLLM's workers keep polling for a second after their last "
        "request, which would slow the other arm's server.",
    )
    servers: Literal["auto", "both", "alternate"] = Field(
        default="auto",
        description="both: both arms served at once; alternate: one at a time, in four servings (A B B A); "
        "auto: both on the cpu chip, alternate elsewhere.",
    )
    metric: Literal["auto", "wall", "cpu"] = Field(
        default="wall",
        description="What the ratio compares: output tokens per second of wall time, or of the server's own CPU "
        "time (local servers only); auto: cpu on the cpu chip, whose cores other work shares, wall elsewhere.",
    )
    timeout_s: float = Field(default=300, gt=0)


class GatesSection(_Strict):
    """Pass/fail rules for the release."""

    rule: Literal["absolute", "relative"] = Field(
        default="absolute",
        description="absolute: TOST of the difference against accuracy_margin points; relative: FlagRelease's "
        "rule, a drop of at most relative_margin percent of the reference, with its small-sample noise zone.",
    )
    relative_margin: float = Field(default=5.0, gt=0, lt=100, description="Largest drop, percent of the reference.")
    noise_zone_items: int = Field(default=2, ge=0, description="relative rule: a gap of this many items or fewer ...")
    noise_zone_max_n: int = Field(default=100, ge=1, description="... on this many items or fewer means retest.")
    accuracy_margin: float = Field(default=5.0, gt=0, le=100, description="Equivalence margin, percentage points.")
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    bootstrap_resamples: int = Field(default=2000, ge=100, le=1_000_000)
    throughput_min_ratio: float = Field(default=0.8, gt=0, le=10, description="FlagGems on / off output tokens/s.")
    throughput: ThroughputGate = Field(default_factory=ThroughputGate)
    flaggems_compare: bool = True
    bisect_on_failure: bool = True
    publish_on_fail: bool = False
