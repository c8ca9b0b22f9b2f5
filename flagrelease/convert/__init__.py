"""The convert stage: streaming FP8 -> BF16, INT8 and INT4 conversion with bounded memory.

``convert_checkpoint(src, dst=..., to="int8-w8a8")`` reads a safetensors checkpoint
tensor by tensor, converts chunks of rows on a pool of threads and writes the output
shards in place (header first, then each chunk at its offset), so memory stays bounded
whatever the checkpoint's size. The output is a compressed-tensors checkpoint that vLLM
loads (INT formats) or a plain BF16 one; ``run_stage`` is the pipeline's entry point.

The arithmetic lives in :mod:`flagrelease.convert.ops` (pure torch, CPU or CUDA);
formats are looked up in :mod:`flagrelease.convert.registry`.
"""

from __future__ import annotations

from flagrelease.convert._convert import convert_checkpoint, plan_conversion, work_dir_for
from flagrelease.convert._plan import DEFAULT_IGNORE, CheckpointPlan, ignore_matches
from flagrelease.convert._stage import link_tree, run_stage
from flagrelease.convert.ops import (
    dequant_fp8_block,
    dequantize_int,
    pack_int32,
    quantize_int,
    quantize_int4_group,
    quantize_int8_per_channel,
    unpack_int32,
)
from flagrelease.convert.registry import TargetFormat, get_format, list_formats, register_format
from flagrelease.convert.report import ConvertReport, TensorReport

__all__ = [
    "DEFAULT_IGNORE",
    "CheckpointPlan",
    "ConvertReport",
    "TargetFormat",
    "TensorReport",
    "convert_checkpoint",
    "dequant_fp8_block",
    "dequantize_int",
    "get_format",
    "ignore_matches",
    "link_tree",
    "list_formats",
    "pack_int32",
    "plan_conversion",
    "quantize_int",
    "quantize_int4_group",
    "quantize_int8_per_channel",
    "register_format",
    "run_stage",
    "unpack_int32",
    "work_dir_for",
]
