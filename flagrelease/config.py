"""Release configs: one YAML file per model x chip release, validated by typed models.

Defaults live here and nowhere else.  :func:`load_release` reads a file and raises a
:class:`~flagrelease.errors.ConfigError` that names the file, each bad field, the bad
value and the valid choices.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flagrelease.chips import ChipProfile, list_chips, load_chip
from flagrelease.errors import ConfigError

__all__ = [
    "ConvertMode",
    "ConvertSection",
    "EngineArgs",
    "EvalSection",
    "EvalTask",
    "FlagGemsSection",
    "GatesSection",
    "GenerationSettings",
    "ImageSection",
    "LoadTestSettings",
    "ModelSection",
    "ModelSource",
    "Node",
    "PublishSection",
    "ReferenceSection",
    "ReleaseConfig",
    "RuntimeKind",
    "S3Target",
    "ServeSection",
    "load_release",
    "validate_files",
]

_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ARG_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_HOST = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
_OP_NAME = re.compile(r"^[A-Za-z0-9_.:]+$")
_BRANCHES = frozenset({"main", "master", "dev", "develop", "HEAD"})


def _no_control(value: str, what: str) -> str:
    if any(c in value for c in "\n\r\x00"):
        raise ValueError(f"{what} must be one line with no control characters")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True)


class ModelSource(StrEnum):
    """Where the weights come from."""

    HF = "hf"
    MODELSCOPE = "modelscope"
    LOCAL = "local"


class ConvertMode(StrEnum):
    """What the convert stage does to the checkpoint."""

    NONE = "none"
    FP8_BLOCK_TO_BF16 = "fp8-block-to-bf16"
    INT8_W8A8 = "int8-w8a8"
    INT8_W8A16 = "int8-w8a16"
    INT4_W4A16 = "int4-w4a16"


class RuntimeKind(StrEnum):
    """How the deploy stage runs the engine."""

    LOCAL = "local"
    CONTAINER = "container"
    MULTINODE = "multinode"


class ModelSection(_Strict):
    """The model to release and where to fetch it from."""

    source: ModelSource
    repo_id: str = Field(description="Hub repo id, e.g. deepseek-ai/DeepSeek-R1.")
    revision: str | None = Field(default=None, description="Pinned revision (commit sha) on the hub.")
    path: Path | None = Field(default=None, description="Local folder, for source: local.")
    allow_patterns: list[str] = Field(default_factory=list)
    ignore_patterns: list[str] = Field(default_factory=list)
    display_name: str | None = Field(default=None, description="Name used in cards; defaults to the repo name.")
    license: str = "apache-2.0"
    license_url: str | None = None
    generate: Literal["tiny-qwen2"] | None = Field(
        default=None, description="Generate this built-in model at `path` if it is missing (demo only)."
    )

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, value: str) -> str:
        if not _REPO_ID.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not a hub repo id of the form 'owner/name'")
        return value

    @field_validator("allow_patterns", "ignore_patterns")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pat in value:
            _no_control(pat, "a file pattern")
            if pat.startswith("/") or ".." in Path(pat).parts:
                raise ValueError(f"file pattern {pat!r} must be relative and stay inside the repo")
        return value

    @model_validator(mode="after")
    def _source_fields(self) -> ModelSection:
        if self.source is ModelSource.LOCAL:
            if self.path is None:
                raise ValueError("source 'local' needs 'path'")
        elif not self.revision:
            raise ValueError(f"source {self.source.value!r} needs a pinned 'revision' (a commit sha or tag)")
        if self.revision is not None:
            _no_control(self.revision, "revision")
            if not re.match(r"^[A-Za-z0-9._/-]{1,128}$", self.revision) or ".." in self.revision:
                raise ValueError(f"revision {self.revision!r} is not a valid git revision")
            if self.source is not ModelSource.LOCAL and self.revision in _BRANCHES:
                raise ValueError(
                    f"revision {self.revision!r} is a branch, not a pinned revision; use the commit sha "
                    "(hub page > Files > history) or a release tag"
                )
        return self

    @property
    def name(self) -> str:
        """Display name of the model."""
        return self.display_name or self.repo_id.split("/", 1)[1]


class ConvertSection(_Strict):
    """Checkpoint conversion."""

    mode: ConvertMode = ConvertMode.NONE
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head", "embed_tokens", "norm", "mlp.gate"],
        description="Name fragments of tensors that are never quantized.",
    )
    group_size: int = Field(default=128, ge=16, description="Group size for INT4.")
    workers: int = Field(default=0, ge=0, description="Worker threads; 0 uses every core.")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower().replace("_", "-")
        valid = [m.value for m in ConvertMode]
        if isinstance(value, str) and value not in valid:
            raise ValueError(f"unknown convert mode {value!r}; valid modes: {', '.join(valid)}")
        return value


class ImageSection(_Strict):
    """The container image for the release."""

    base: str | None = Field(default=None, description="Overrides the chip profile's base image.")
    name: str = "flagrelease"
    tag: str = "latest"
    registry: str | None = Field(default=None, description="Registry host[:port][/namespace] to push to.")
    build: bool = True
    push: bool = True
    on_missing_engine: Literal["fail", "keep-context"] = "fail"
    pip_index_url: str | None = None
    flag_gems_version: str | None = None
    vllm_version: str | None = None


class Node(_Strict):
    """One hostfile line: ``ip slots=N type=gpu``."""

    host: str
    slots: int = Field(ge=1)
    type: str = "gpu"

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not _HOST.match(value):
            raise ValueError(f"host {value!r} is not a host name or address")
        return value

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9_-]+$", value):
            raise ValueError(f"node type {value!r} must be a simple word such as gpu")
        return value

    def hostfile_line(self) -> str:
        """The node as FlagScale writes it in hostfile.txt."""
        return f"{self.host} slots={self.slots} type={self.type}"


def _parse_node_lines(value: Any) -> Any:
    """Hostfile lines (``ip slots=N type=gpu``) as Node mappings; other items pass through."""
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            parts = item.split()
            if not parts:
                raise ValueError(f"nodes[{i}] is empty")
            node: dict[str, Any] = {"host": parts[0]}
            for part in parts[1:]:
                key, sep, val = part.partition("=")
                if not sep or key not in ("slots", "type"):
                    raise ValueError(f"nodes[{i}]: {part!r} is not 'slots=N' or 'type=T'")
                node[key] = val
            if "slots" not in node:
                raise ValueError(f"nodes[{i}]: {item!r} needs 'slots=N'")
            out.append(node)
        else:
            out.append(item)
    return out


class EngineArgs(BaseModel):
    """vLLM engine arguments, in FlagScale's ``engine_args`` form.

    The common ones are typed; others pass through to vLLM as they are, after checking
    that the name is an identifier and the value a scalar or list of scalars.
    Hyphenated names (``tensor-parallel-size``) are accepted and normalised.
    """

    model_config = ConfigDict(extra="allow", validate_default=True)

    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int = Field(default=256, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    port: int = Field(default=9010, ge=1, le=65535)
    host: str = "127.0.0.1"
    trust_remote_code: bool = True
    enforce_eager: bool | None = None
    enable_chunked_prefill: bool | None = None
    dtype: str | None = None
    served_model_name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {str(k).replace("-", "_"): v for k, v in data.items()}
            data.pop("model", None)  # the model path is the converted weights, set by deploy
        return data

    @model_validator(mode="after")
    def _extras(self) -> EngineArgs:
        for key, value in (self.model_extra or {}).items():
            if not _ARG_NAME.match(key):
                raise ValueError(f"engine arg name {key!r} must be lowercase letters, digits and '_'")
            items = value if isinstance(value, list) else [value]
            for item in items:
                if not isinstance(item, str | int | float | bool) or (
                    isinstance(item, str) and any(c in item for c in "\n\r\x00")
                ):
                    raise ValueError(f"engine arg {key} must be a scalar or list of scalars, one line each")
        return self

    def as_dict(self) -> dict[str, Any]:
        """All set arguments, with None dropped, in a stable order."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class FlagGemsSection(_Strict):
    """FlagGems (Triton operators) in the serving engine."""

    enabled: bool = True
    excluded_ops: list[str] = Field(default_factory=list)
    record_ops: bool = True

    @field_validator("excluded_ops")
    @classmethod
    def _ops(cls, value: list[str]) -> list[str]:
        for op in value:
            if not _OP_NAME.match(op):
                raise ValueError(f"operator name {op!r} must be letters, digits, '_', '.' or ':'")
        return value


class LoadTestSettings(_Strict):
    """The short concurrency sweep run once the server is healthy."""

    concurrency: list[int] = Field(default_factory=lambda: [1, 4])
    requests_per_level: int = Field(default=8, ge=1)
    prompt: str = "Write a short sentence about the sea."
    max_tokens: int = Field(default=32, ge=1)
    timeout_s: float = Field(default=300, gt=0)

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, value: list[int]) -> list[int]:
        if not value or any(v < 1 for v in value):
            raise ValueError("concurrency levels must be positive integers")
        return value


class ServeSection(_Strict):
    """Serving, in FlagScale terms."""

    engine: Literal["vllm"] = "vllm"
    serve_id: str = "vllm_model"
    engine_args: EngineArgs = Field(default_factory=EngineArgs)
    nodes: list[Node] = Field(default_factory=list)
    flaggems: FlagGemsSection = Field(default_factory=FlagGemsSection)
    envs: dict[str, str] = Field(default_factory=dict)
    before_start: list[str] = Field(default_factory=list)
    runtime: RuntimeKind | None = Field(default=None, description="Defaults to the chip profile's runtime.")
    container_name: str | None = None
    model_dir: str | None = Field(default=None, description="Where the weights are mounted on serving hosts.")
    health_timeout_s: float = Field(default=900, gt=0)
    load_test: LoadTestSettings = Field(default_factory=LoadTestSettings)

    @field_validator("nodes", mode="before")
    @classmethod
    def _parse_nodes(cls, value: Any) -> Any:
        return _parse_node_lines(value)

    @field_validator("envs", mode="before")
    @classmethod
    def _envs(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key, val in value.items():
                if not _ENV_NAME.match(str(key)):
                    raise ValueError(f"environment variable name {key!r} is not valid")
                if isinstance(val, dict | list) or any(c in str(val) for c in "\n\x00"):
                    raise ValueError(f"environment value of {key} must be one scalar line")
            return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
        return value

    @field_validator("before_start")
    @classmethod
    def _cmds(cls, value: list[str]) -> list[str]:
        return [_no_control(v, "a before_start command") for v in value]

    @field_validator("container_name")
    @classmethod
    def _container(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$", value):
            raise ValueError(f"container name {value!r} must be letters, digits, '_', '.' or '-'")
        return value

    @model_validator(mode="after")
    def _parallelism_fits(self) -> ServeSection:
        world = self.engine_args.tensor_parallel_size * self.engine_args.pipeline_parallel_size
        if self.nodes:
            slots = sum(n.slots for n in self.nodes)
            if world > slots:
                raise ValueError(
                    f"tensor_parallel_size x pipeline_parallel_size = {world} exceeds the "
                    f"{slots} slots of the {len(self.nodes)} node(s); add nodes or lower the parallelism"
                )
        return self


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


class S3Target(_Strict):
    """An S3 bucket and prefix."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", value):
            raise ValueError(f"bucket {value!r} is not a valid S3 bucket name")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        if ".." in value.split("/") or any(c in value for c in "\n\x00\\"):
            raise ValueError(f"prefix {value!r} must be a plain key prefix")
        return value


class PublishSection(_Strict):
    """Where the bundle goes."""

    hf_repo: str | None = None
    modelscope_repo: str | None = None
    s3: S3Target | None = None
    registry: str | None = None
    local_dir: Path | None = None
    private: bool = False

    @field_validator("hf_repo", "modelscope_repo")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        if value is not None and (not _REPO_ID.match(value) or ".." in value):
            raise ValueError(f"{value!r} is not a repo id of the form 'owner/name'")
        return value


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


def _format_errors(path: str, err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and section)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        bad = e.get("input")
        if (
            e["type"] not in ("missing", "extra_forbidden")
            and isinstance(bad, str | int | float | bool)
            and repr(bad) not in msg
        ):
            msg = f"{msg} (got {bad!r})"
        out.append((loc, msg))
    return out


def _resolve_paths(cfg: ReleaseConfig, base: Path) -> ReleaseConfig:
    """Resolve relative paths in the config against the config file's folder."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p).resolve()

    cfg.model.path = fix(cfg.model.path)
    cfg.eval.include_path = fix(cfg.eval.include_path)
    cfg.eval.dataset_cache = fix(cfg.eval.dataset_cache)
    cfg.eval.reference.results_dir = fix(cfg.eval.reference.results_dir)
    cfg.publish.local_dir = fix(cfg.publish.local_dir)
    cfg.work_dir = fix(cfg.work_dir)
    return cfg


def parse_release(data: Any, *, path: Path | str = "<config>") -> ReleaseConfig:
    """Validate an already-loaded mapping as a release config.

    Raises:
        ConfigError: with one ``(field, reason)`` per problem, the file named in the message.
    """
    path = Path(path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a release config must be a YAML mapping",
            path=str(path),
            errors=[("(top level)", "must be a mapping")],
        )
    data = dict(data)
    data.setdefault("name", path.stem)
    try:
        cfg = ReleaseConfig.model_validate(data)
    except ValidationError as err:
        errors = _format_errors(str(path), err)
        lines = "\n".join(f"  {path}: {field}: {msg}" for field, msg in errors)
        raise ConfigError(
            f"{path}: {len(errors)} error(s) in release config:\n{lines}",
            path=str(path),
            errors=errors,
            model=str(data.get("name")),
        ) from err
    return _resolve_paths(cfg, path.parent.resolve())


def load_release(path: Path | str) -> ReleaseConfig:
    """Load and validate a release config file.

    Args:
        path: the YAML file.

    Returns:
        The validated config, relative paths resolved against the file's folder.

    Raises:
        ConfigError: the file is missing, not YAML, or invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such release config file", path=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{path}: not valid YAML: {err}", path=str(path), errors=[("(file)", "not valid YAML")]
        ) from err
    return parse_release(data, path=path)


def validate_files(paths: list[Path]) -> dict[Path, ConfigError | None]:
    """Validate each file; map it to its error, or None when it is valid."""
    out: dict[Path, ConfigError | None] = {}
    for p in paths:
        try:
            load_release(p)
            out[p] = None
        except ConfigError as err:
            out[p] = err
    return out
