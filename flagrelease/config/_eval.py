"""The ``eval`` and ``gates`` sections of a release config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from flagrelease.config._base import (
    _Strict,
)
from flagrelease.config._serve import Node, _parse_node_lines

__all__ = ["EvalSection", "EvalTask", "GatesSection", "GenerationSettings", "ReferenceSection"]


class GenerationSettings(_Strict):
    """Sampling settings for generative tasks."""

    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=256, ge=1)
    seed: int = 1234


class EvalTask(_Strict):
    """One benchmark of the evaluation."""

    name: str = Field(description="lm-eval task name, e.g. gsm8k, mmlu, ceval-valid.")
    label: str | None = Field(default=None, description="Row label in the card, e.g. 'GSM8K (EM)'.")
    metric: str | None = Field(default=None, description="lm-eval metric reported, e.g. exact_match.")
    filter: str | None = Field(default=None, description="lm-eval filter of that metric, e.g. flexible-extract.")
    kind: Literal["generate", "loglikelihood"] = "generate"
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_.-]+$", value):
            raise ValueError(f"task name {value!r} must be letters, digits, '_', '.' or '-'")
        return value


class ReferenceSection(_Strict):
    """What the target is compared with: by default the H100 CUDA run."""

    chip: str = "nvidia-h100"
    mode: Literal["live", "stored"] = "live"
    results_dir: Path | None = Field(default=None, description="Stored per-sample logs, for mode: stored.")
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

    @model_validator(mode="after")
    def _stored(self) -> ReferenceSection:
        if self.mode == "stored" and self.results_dir is None:
            raise ValueError("reference mode 'stored' needs 'results_dir'")
        return self


class EvalSection(_Strict):
    """Evaluation on the target chip and on the reference."""

    tasks: list[EvalTask] = Field(default_factory=list)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    samples_per_item: int = Field(default=1, ge=1)
    concurrency: int = Field(default=8, ge=1)
    reference: ReferenceSection = Field(default_factory=ReferenceSection)
    include_path: Path | None = Field(default=None, description="Folder of local lm-eval task definitions.")
    dataset_cache: Path | None = None
    limit: int | None = Field(default=None, ge=1, description="Cap on items per task (all tasks).")


class GatesSection(_Strict):
    """Pass/fail rules for the release."""

    accuracy_margin: float = Field(default=5.0, gt=0, description="Equivalence margin, percentage points.")
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    bootstrap_resamples: int = Field(default=2000, ge=100)
    throughput_min_ratio: float = Field(default=0.8, gt=0, description="FlagGems on / off output tokens/s.")
    flaggems_compare: bool = True
    bisect_on_failure: bool = True
    publish_on_fail: bool = False
