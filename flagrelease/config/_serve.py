"""The ``serve`` section of a release config: engine args, nodes, FlagGems, load test."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flagrelease.config._base import (
    _ARG_NAME,
    _OP_NAME,
    MAX_FLOAT,
    MAX_INT,
    RuntimeKind,
    SecretRef,
    _no_control,
    _Strict,
    check_input,
)
from flagrelease.config._grammar import (
    DTYPES,
    check_env_name,
    check_host,
    check_path_text,
    check_served_model_name,
    looks_secret_name,
)

__all__ = [
    "EngineArgs",
    "FlagGemsSection",
    "LoadTestSettings",
    "Node",
    "ServeSection",
    "check_extra_arg",
    "normalise_engine_args",
]


class Node(_Strict):
    """One hostfile line: ``ip slots=N type=gpu``."""

    host: str
    slots: int = Field(ge=1, le=1024)
    type: str = "gpu"

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value)

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9_-]{1,32}$", value):
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
            _no_control(item, f"nodes[{i}]")
            parts = item.split()
            if not parts:
                raise ValueError(f"nodes[{i}] is empty")
            node: dict[str, Any] = {"host": parts[0]}
            for part in parts[1:]:
                key, sep, val = part.partition("=")
                if not sep or key not in ("slots", "type"):
                    raise ValueError(f"nodes[{i}]: {part!r} is not 'slots=N' or 'type=T'")
                node[key] = int(val) if key == "slots" and val.isdigit() and len(val) < 10 else val
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

    model_config = ConfigDict(extra="allow", validate_default=True, allow_inf_nan=False)

    tensor_parallel_size: int = Field(default=1, ge=1, le=1024)
    pipeline_parallel_size: int = Field(default=1, ge=1, le=1024)
    max_model_len: int | None = Field(default=None, ge=16, le=2**24)
    max_num_seqs: int = Field(default=256, ge=1, le=65536)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    port: int = Field(default=9010, ge=1, le=65535)
    host: str = "127.0.0.1"
    trust_remote_code: bool = True
    enforce_eager: bool | None = None
    enable_chunked_prefill: bool | None = None
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    served_model_name: str | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _input(cls, value: Any, info: ValidationInfo) -> Any:
        return check_input(cls, value, info)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value, what="serve host")

    @field_validator("served_model_name")
    @classmethod
    def _served(cls, value: str | None) -> str | None:
        return None if value is None else check_served_model_name(value)

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
            check_extra_arg(key, value)
        return self

    def as_dict(self) -> dict[str, Any]:
        """All set arguments, with None dropped, in a stable order."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def check_extra_arg(key: str, value: Any) -> None:
    """An engine argument flagrelease does not type: an identifier, and a scalar or list of scalars.

    Raises:
        ValueError: the name or value cannot be passed to vLLM safely.
    """
    if not _ARG_NAME.match(key):
        raise ValueError(f"engine arg name {key!r} must be lowercase letters, digits and '_' (64 at most)")
    if looks_secret_name(key) and value is not None:
        raise ValueError(
            f"engine arg {key} would put a secret on the command line, where every user of the machine and "
            f"every rendered file sees it; remove it and give the secret as serve.envs: "
            f"{{VLLM_{key.upper()}: {{secret: NAME}}}} (vLLM reads VLLM_API_KEY for api_key)"
        )
    items = value if isinstance(value, list) else [value]
    if len(items) > 64:
        raise ValueError(f"engine arg {key} has {len(items)} values; 64 at most")
    for item in items:
        if not isinstance(item, str | int | float | bool):
            raise ValueError(f"engine arg {key} must be a scalar or a list of scalars")
        if isinstance(item, str):
            _no_control(item, f"engine arg {key}")
        elif isinstance(item, float) and not (abs(item) <= MAX_FLOAT):
            raise ValueError(f"engine arg {key}: {item!r} is not a finite number of at most {MAX_FLOAT:g}")
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INT:
            raise ValueError(f"engine arg {key}: {item} is out of range; {MAX_INT} at most")


def normalise_engine_args(data: Any) -> Any:
    """``tensor-parallel-size`` as ``tensor_parallel_size``; other inputs unchanged."""
    if isinstance(data, dict):
        return {str(k).replace("-", "_"): v for k, v in data.items()}
    return data


class FlagGemsSection(_Strict):
    """FlagGems (Triton operators) in the serving engine."""

    enabled: bool = True
    excluded_ops: list[str] = Field(default_factory=list)
    record_ops: bool = True
    clean_caches: bool = Field(
        default=False, description="Remove the Triton and FlagGems kernel caches before every FlagGems serve."
    )

    @field_validator("excluded_ops")
    @classmethod
    def _ops(cls, value: list[str]) -> list[str]:
        for op in value:
            if not _OP_NAME.match(op):
                raise ValueError(f"operator name {op!r} must be letters, digits, '_', '.' or ':'")
        return value


class LoadTestSettings(_Strict):
    """The short concurrency sweep run once the server is healthy."""

    concurrency: list[int] = Field(default_factory=lambda: [1, 4], max_length=32)
    requests_per_level: int = Field(default=8, ge=1, le=100_000)
    prompt: str = "Write a short sentence about the sea."
    max_tokens: int = Field(default=32, ge=1, le=2**20)
    timeout_s: float = Field(default=300, gt=0, le=86_400)

    @field_validator("concurrency", mode="before")
    @classmethod
    def _level_types(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError("concurrency levels must be whole numbers, e.g. [1, 4, 16]")
        return value

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, value: list[int]) -> list[int]:
        if not value or any(v < 1 or v > 4096 for v in value):
            raise ValueError("concurrency levels must be whole numbers from 1 to 4096")
        return value


def _env_value(key: Any, value: Any) -> Any:
    """One ``serve.envs`` entry: a checked name, and a one-line scalar or a ``{secret: NAME}`` reference."""
    check_env_name(key)
    if isinstance(value, dict):
        if set(value) != {"secret"}:
            raise ValueError(f"environment value of {key} must be a scalar or {{secret: NAME}}")
        return value
    if value is None or isinstance(value, list):
        raise ValueError(f"environment value of {key} must be a scalar or {{secret: NAME}}")
    if isinstance(value, float) and not abs(value) <= MAX_FLOAT:
        raise ValueError(f"environment value of {key} must be a finite number")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    _no_control(text, f"environment value of {key}")
    if looks_secret_name(str(key)):
        raise ValueError(
            f"{key} looks like a secret, and a literal value would be written into the serve scripts, the "
            f"FlagScale config, the image and the card; write `{key}: {{secret: {key}}}` and set {key} in the "
            f"environment of the run (or, under Prefect, a Secret block named {str(key).lower().replace('_', '-')})"
        )
    return text


class ServeSection(_Strict):
    """Serving, in FlagScale terms."""

    engine: Literal["vllm"] = "vllm"
    serve_id: str = Field(default="vllm_model", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    engine_args: EngineArgs = Field(default_factory=EngineArgs)
    nodes: list[Node] = Field(default_factory=list)
    flaggems: FlagGemsSection = Field(default_factory=FlagGemsSection)
    envs: dict[str, str | SecretRef] = Field(
        default_factory=dict,
        max_length=256,
        description="Serving environment; a secret is given as {secret: NAME}, read from the environment at run time.",
    )
    before_start: list[str] = Field(default_factory=list)
    runtime: RuntimeKind | None = Field(default=None, description="Defaults to the chip profile's runtime.")
    container_name: str | None = None
    model_dir: str | None = Field(default=None, description="Where the weights are mounted on serving hosts.")
    health_timeout_s: float = Field(default=900, gt=0, le=7 * 86_400)
    load_test: LoadTestSettings = Field(default_factory=LoadTestSettings)

    @field_validator("nodes", mode="before")
    @classmethod
    def _parse_nodes(cls, value: Any) -> Any:
        return _parse_node_lines(value)

    @field_validator("envs", mode="before")
    @classmethod
    def _envs(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): _env_value(k, v) for k, v in value.items()}
        return value

    @field_validator("model_dir")
    @classmethod
    def _model_dir(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"model_dir {value!r} must be an absolute path on the serving hosts")
        return check_path_text(value, what="model_dir")

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
