"""Target formats of the converter, found by name through a registry.

Each :class:`TargetFormat` says what a 2-D linear weight becomes (kept dense, INT8 per
channel, packed INT4 per group...) and which ``quantization_config`` goes into
``config.json``.  :func:`get_format` accepts a format name, an alias or a
:class:`~flagrelease.config.ConvertMode`; an unknown name raises a
:class:`~flagrelease.errors.ConvertError` that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flagrelease.config import ConvertMode
from flagrelease.errors import ConvertError

__all__ = [
    "TargetFormat",
    "get_format",
    "list_formats",
    "register_format",
]

#: compressed-tensors release whose config layout the written ``quantization_config`` follows.
_CT_VERSION = "0.17.0"


@dataclass(frozen=True)
class TargetFormat:
    """What the converter produces.

    Attributes:
        name: the CLI name (``bf16``, ``int8-w8a8``...).
        mode: the release-config mode it implements.
        description: one line for people.
        num_bits: weight bits for quantized formats; None keeps weights dense.
        strategy: ``channel`` or ``group``.
        packed: weights stored as ``weight_packed`` int32 (compressed-tensors ``pack-quantized``).
        act_bits: dynamic per-token activation bits (W8A8), None for weight-only.
        ct_format: compressed-tensors ``format`` value.
        aliases: other accepted names.
    """

    name: str
    mode: ConvertMode
    description: str
    num_bits: int | None = None
    strategy: str | None = None
    packed: bool = False
    act_bits: int | None = None
    ct_format: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def quantizes(self) -> bool:
        """Whether linear weights are quantized to integers."""
        return self.num_bits is not None

    def group_size(self, requested: int) -> int | None:
        """The group size used for ``requested`` (None for per-channel formats)."""
        return requested if self.strategy == "group" else None

    def quantization_config(self, *, ignore: Iterable[str], group_size: int) -> dict[str, Any] | None:
        """The ``quantization_config`` for ``config.json`` (None for dense formats).

        The layout is what llm-compressor writes and vLLM's compressed-tensors loader reads.

        Args:
            ignore: module names left unquantized (written to ``ignore``).
            group_size: columns per scale for group formats.
        """
        if not self.quantizes:
            return None
        weights: dict[str, Any] = {
            "num_bits": self.num_bits,
            "type": "int",
            "symmetric": True,
            "strategy": self.strategy,
            "group_size": self.group_size(group_size),
            "dynamic": False,
            "actorder": None,
            "block_structure": None,
            "observer": "minmax",
            "observer_kwargs": {},
        }
        acts = None
        if self.act_bits is not None:
            acts = {
                "num_bits": self.act_bits,
                "type": "int",
                "symmetric": True,
                "strategy": "token",
                "group_size": None,
                "dynamic": True,
                "actorder": None,
                "block_structure": None,
                "observer": None,
                "observer_kwargs": {},
            }
        return {
            "quant_method": "compressed-tensors",
            "format": self.ct_format,
            "quantization_status": "compressed",
            "version": _CT_VERSION,
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": acts,
                    "output_activations": None,
                    "format": self.ct_format,
                }
            },
            "ignore": sorted(set(ignore)),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }


_REGISTRY: dict[str, TargetFormat] = {}
_ALIASES: dict[str, str] = {}


def register_format(fmt: TargetFormat) -> TargetFormat:
    """Add ``fmt`` to the registry (its name and aliases must be new).

    Raises:
        ValueError: the name or an alias is taken.
    """
    for key in (fmt.name, *fmt.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"convert format name {key!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    for alias in fmt.aliases:
        _ALIASES[alias] = fmt.name
    return fmt


def list_formats() -> list[str]:
    """Registered format names, sorted."""
    return sorted(_REGISTRY)


def get_format(name: str | ConvertMode) -> TargetFormat:
    """The format called ``name`` (a name, an alias or a :class:`ConvertMode`).

    Raises:
        ConvertError: no such format; the message lists the valid names.
    """
    key = name.value if isinstance(name, ConvertMode) else str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ConvertError(
            f"unknown convert format {str(name)!r}; valid formats: {', '.join(list_formats())} "
            f"(release-config modes: {', '.join(m.value for m in ConvertMode)})"
        )
    return _REGISTRY[key]


register_format(
    TargetFormat(
        name="none",
        mode=ConvertMode.NONE,
        description="no conversion: the weights are used as fetched",
        aliases=("copy",),
    )
)
register_format(
    TargetFormat(
        name="bf16",
        mode=ConvertMode.FP8_BLOCK_TO_BF16,
        description="DeepSeek block-FP8 weights dequantized to BF16; other tensors kept",
        aliases=(ConvertMode.FP8_BLOCK_TO_BF16.value, "bfloat16"),
    )
)
register_format(
    TargetFormat(
        name="int8-w8a8",
        mode=ConvertMode.INT8_W8A8,
        description="INT8 weights per output channel, INT8 dynamic per-token activations (compressed-tensors)",
        num_bits=8,
        strategy="channel",
        act_bits=8,
        ct_format="int-quantized",
        aliases=("w8a8",),
    )
)
register_format(
    TargetFormat(
        name="int8-w8a16",
        mode=ConvertMode.INT8_W8A16,
        description="INT8 weights per output channel packed 4 per int32, 16-bit activations (compressed-tensors)",
        num_bits=8,
        strategy="channel",
        packed=True,
        ct_format="pack-quantized",
        aliases=("w8a16",),
    )
)
register_format(
    TargetFormat(
        name="int4-w4a16",
        mode=ConvertMode.INT4_W4A16,
        description="INT4 weights in groups of input columns packed 8 per int32, 16-bit activations "
        "(compressed-tensors)",
        num_bits=4,
        strategy="group",
        packed=True,
        ct_format="pack-quantized",
        aliases=("w4a16",),
    )
)
