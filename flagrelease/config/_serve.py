"""The ``serve`` section of a release config: engine args, nodes, FlagGems, load test."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from flagrelease.config._base import (
    _ARG_NAME,
    _ENV_NAME,
    _HOST,
    _OP_NAME,
    RuntimeKind,
    _no_control,
    _Strict,
)

__all__ = ["EngineArgs", "FlagGemsSection", "LoadTestSettings", "Node", "ServeSection"]


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
