"""The upstream stages' results as the card stage reads them: typed, None where a stage did not run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from flagrelease.convert.outputs import ConvertOutputs
from flagrelease.deploy.outputs import DeployOutputs
from flagrelease.errors import ConfigError
from flagrelease.evaluate.outputs import EvalOutputs
from flagrelease.fetch.outputs import FetchOutputs
from flagrelease.gate.outputs import GateOutputs
from flagrelease.image.outputs import ImageOutputs
from flagrelease.pipeline import STAGES, ReleaseContext, StageOutputs, StageResult

__all__ = ["UPSTREAM_STAGES", "Upstream", "upstream_results"]

#: The stages whose results the manifest records (the card stage writes it).
UPSTREAM_STAGES: tuple[str, ...] = STAGES[: STAGES.index("card")]

_O = TypeVar("_O", bound=StageOutputs)


@dataclass(frozen=True)
class Upstream:
    """What the stages before the card did.

    Attributes:
        results: each upstream stage's result (status, summary, times); None where it has not run.
        fetch, convert, image, deploy, eval, gate: each stage's typed outputs; None where it
            has not run or was skipped (a skipped stage's outputs are a plan, not facts).
    """

    results: Mapping[str, StageResult | None] = field(default_factory=dict)
    fetch: FetchOutputs | None = None
    convert: ConvertOutputs | None = None
    image: ImageOutputs | None = None
    deploy: DeployOutputs | None = None
    eval: EvalOutputs | None = None
    gate: GateOutputs | None = None

    @classmethod
    def from_results(cls, results: Mapping[str, StageResult | None]) -> Upstream:
        """Typed outputs of ``results`` (stage name -> result or None).

        Raises:
            ConfigError: a saved result does not fit its stage's outputs model.
        """

        def typed(stage: str, kind: type[_O]) -> _O | None:
            res = results.get(stage)
            if res is None or res.status == "skipped":
                return None
            return res.typed(kind)

        return cls(
            results={s: results.get(s) for s in UPSTREAM_STAGES},
            fetch=typed("fetch", FetchOutputs),
            convert=typed("convert", ConvertOutputs),
            image=typed("image", ImageOutputs),
            deploy=typed("deploy", DeployOutputs),
            eval=typed("eval", EvalOutputs),
            gate=typed("gate", GateOutputs),
        )


def upstream_results(ctx: ReleaseContext) -> Upstream:
    """Each upstream stage's result from ``ctx`` (memory or ``state/``), typed.

    Raises:
        ConfigError: a saved result does not fit its stage's outputs model.
    """
    found: dict[str, StageResult | None] = {}
    for stage in UPSTREAM_STAGES:
        try:
            found[stage] = ctx.result(stage)
        except ConfigError:
            found[stage] = None
    return Upstream.from_results(found)
