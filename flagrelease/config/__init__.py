"""Release configs: one YAML file per model x chip release, validated by typed models.

Defaults live here and nowhere else.  :func:`load_release` reads a file and raises a
:class:`~flagrelease.errors.ConfigError` that names the file, each bad field, the bad
value and the valid choices.  One module per part: ``_model`` (model, convert, image),
``_serve``, ``_eval`` (eval, gates), ``_publish``, ``_release`` (the whole config and its
cross-section rules) and ``_load`` (files).

Hostile or mistaken input stops here (issue 12): ``_yaml`` reads a file within bounds
(size, depth, aliases, duplicate keys, UTF-8), ``_grammar`` gives every string a grammar,
``_base`` keeps numbers finite and bounded and text free of control characters, ``_load``
refuses literal secrets (``{secret: NAME}`` references instead, :class:`SecretRef`) and
``_engine_check`` checks engine args against the argument parser of the vLLM that will
serve them.
"""

from __future__ import annotations

from flagrelease.config._base import ConvertMode, ModelSource, RuntimeKind, SecretRef
from flagrelease.config._engine_check import (
    VllmArgs,
    engine_arg_problems,
    record_vllm_args,
    recorded_vllm_versions,
    vllm_args_for_chip,
)
from flagrelease.config._eval import (
    EvalSection,
    EvalTask,
    GatesSection,
    GenerationSettings,
    ProbeSettings,
    ReferenceSection,
    ThroughputGate,
)
from flagrelease.config._load import load_release, parse_release, validate_files
from flagrelease.config._model import ConvertSection, ImageSection, ModelSection
from flagrelease.config._publish import PublishSection, S3Target
from flagrelease.config._release import ReleaseConfig
from flagrelease.config._serve import EngineArgs, FlagGemsSection, LoadTestSettings, Node, ServeSection
from flagrelease.config._yaml import read_yaml as read_config_file

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
    "ProbeSettings",
    "PublishSection",
    "ReferenceSection",
    "ReleaseConfig",
    "RuntimeKind",
    "S3Target",
    "SecretRef",
    "ServeSection",
    "ThroughputGate",
    "VllmArgs",
    "engine_arg_problems",
    "load_release",
    "parse_release",
    "read_config_file",
    "record_vllm_args",
    "recorded_vllm_versions",
    "validate_files",
    "vllm_args_for_chip",
]
