"""The release config: one model on one chip, and its cross-section rules."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flagrelease.chips import ChipProfile, list_chips, load_chip
from flagrelease.config._base import (
    _SLUG,
    ConvertMode,
    RuntimeKind,
    _Strict,
)
from flagrelease.config._eval import (
    EvalSection,
    GatesSection,
)
from flagrelease.config._grammar import check_cron, check_free_text
from flagrelease.config._model import (
    ConvertSection,
    ImageSection,
    ModelSection,
)
from flagrelease.config._publish import (
    PublishSection,
)
from flagrelease.config._serve import (
    Node,
    ServeSection,
)

__all__ = ["ReleaseConfig"]


class ReleaseConfig(_Strict):
    """One model on one chip: everything the pipeline needs."""

    name: str = Field(description="Release name; defaults to the file stem.")
    description: str = ""
    model: ModelSection
    chip: str
    convert: ConvertSection = Field(default_factory=ConvertSection)
    image: ImageSection = Field(default_factory=ImageSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    gates: GatesSection = Field(default_factory=GatesSection)
    publish: PublishSection = Field(default_factory=PublishSection)
    schedule: str | None = Field(default=None, description="Cron schedule for the Prefect deployment.")
    tags: list[str] = Field(default_factory=list)
    work_dir: Path | None = Field(default=None, description="Where the bundle is built; default below home.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError(f"{value!r} must be lowercase letters, digits, '.', '_' and '-'")
        return value

    @field_validator("description")
    @classmethod
    def _description(cls, value: str) -> str:
        return check_free_text(value, what="description", max_len=2048)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}", tag):
                raise ValueError(f"tag {tag!r} must be letters, digits and '.', '_', ':', '+', '-' (64 at most)")
        if len(value) > 64:
            raise ValueError(f"{len(value)} tags; 64 at most")
        return value

    @field_validator("chip")
    @classmethod
    def _chip(cls, value: str) -> str:
        known = list_chips()
        if value not in known:
            raise ValueError(f"unknown chip {value!r}; known chips: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _against_chip(self) -> ReleaseConfig:
        chip = load_chip(self.chip)
        args = self.serve.engine_args
        world = args.tensor_parallel_size * args.pipeline_parallel_size
        if not self.serve.nodes and world > chip.devices_per_node:
            raise ValueError(
                f"serve.engine_args: tensor_parallel_size x pipeline_parallel_size = {world} exceeds the "
                f"{chip.devices_per_node} devices of one {chip.name} node; list serve.nodes"
            )
        ref = self.eval.reference
        if ref.chip not in list_chips():
            raise ValueError(f"eval.reference.chip: unknown chip {ref.chip!r}")
        if self.remote_reference:
            if ref.results_dir is None:
                raise ValueError(
                    f"eval.reference.results_dir: a live reference on {ref.chip} runs on that chip's work pool "
                    "and hands its per-sample logs to this release through this folder; set it to storage both "
                    f"pools reach, or set eval.reference.mode: stored"
                )
            try:
                self.reference_side()
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(
                    f"eval.reference: serving the reference on {ref.chip} is invalid ({where}: "
                    f"{first['msg'].removeprefix('Value error, ')}); set eval.reference.nodes and "
                    "eval.reference.engine_args for that chip"
                ) from None
        return self

    @property
    def remote_reference(self) -> bool:
        """Whether the reference is served live on another chip, by that chip's work pool.

        A ``cpu`` reference is served live wherever the release runs; a release with no
        eval tasks needs no reference at all.
        """
        ref = self.eval.reference
        return bool(self.eval.tasks) and ref.mode == "live" and ref.chip not in ("cpu", self.chip)

    def reference_side(self) -> ReleaseConfig:
        """The release as the reference chip runs it (``role: reference``).

        Same model, revision and eval settings; the reference chip, its nodes and engine
        args (``eval.reference.nodes`` / ``engine_args`` over ``serve.engine_args``), its
        own image tag and work folder, FlagGems as ``eval.reference.flaggems`` says, no
        conversion unless the reference serves the converted weights, nothing published.

        Raises:
            pydantic.ValidationError: the derived config is invalid (TP x PP too large
                for the reference chip's nodes, say).
        """
        ref = self.eval.reference
        data = self.model_dump(mode="python")
        serve = data["serve"]
        serve.update(
            nodes=[n.model_dump() for n in ref.nodes],
            engine_args={**serve["engine_args"], **{str(k).replace("-", "_"): v for k, v in ref.engine_args.items()}},
            flaggems={**serve["flaggems"], "enabled": ref.flaggems, "excluded_ops": []},
            runtime=None,
            container_name=None,
            model_dir=None,
            envs={},
            before_start=[],
        )
        if ref.weights == "source":
            data["convert"] = {"mode": ConvertMode.NONE}
        data.update(
            name=f"{self.name}-reference",
            chip=ref.chip,
            image={**data["image"], "base": None, "tag": f"{self.image.tag}-reference-{ref.chip}"},
            gates={**data["gates"], "flaggems_compare": False, "bisect_on_failure": False},
            publish={},
            schedule=None,
            tags=[*self.tags, "role:reference"],
            work_dir=self.work_dir / "reference" if self.work_dir else None,
        )
        data["eval"]["reference"] = {
            "chip": ref.chip,
            "mode": "live",
            "weights": ref.weights,
            "flaggems": ref.flaggems,
            "results_dir": ref.results_dir,
        }
        return ReleaseConfig.model_validate(data)

    @property
    def chip_profile(self) -> ChipProfile:
        """The loaded chip profile."""
        return load_chip(self.chip)

    @property
    def runtime(self) -> RuntimeKind:
        """The deploy runtime: the config's choice, else the chip profile's default."""
        if self.serve.runtime is not None:
            return self.serve.runtime
        if len(self.serve.nodes) > 1:
            return RuntimeKind.MULTINODE
        return RuntimeKind(self.chip_profile.runtime)

    @property
    def nodes(self) -> list[Node]:
        """Serving nodes; one local node of the chip's size when none are listed."""
        if self.serve.nodes:
            return list(self.serve.nodes)
        return [Node(host="127.0.0.1", slots=self.chip_profile.devices_per_node, type="gpu")]

    @property
    def served_model_name(self) -> str:
        """The name the OpenAI endpoint serves the model under."""
        return self.serve.engine_args.served_model_name or f"{self.name}-flagos"
