"""Names a release derives from its config: the bundle's name, its precision tag, its FlagScale name."""

from __future__ import annotations

import re
from pathlib import Path

from flagrelease.bundle import release_labels
from flagrelease.config import ConvertMode, ReleaseConfig

__all__ = ["bundle_name", "default_labels", "flagscale_name", "image_reference", "quant_tag"]

_QUANT = {
    ConvertMode.NONE: None,
    ConvertMode.FP8_BLOCK_TO_BF16: "BF16",
    ConvertMode.INT8_W8A8: "INT8",
    ConvertMode.INT8_W8A16: "INT8",
    ConvertMode.INT4_W4A16: "INT4",
}


def quant_tag(cfg: ReleaseConfig) -> str | None:
    """The precision suffix of the bundle name (``INT8``, ``INT4``, ``BF16``), or None."""
    return _QUANT[cfg.convert.mode]


def bundle_name(cfg: ReleaseConfig) -> str:
    """``<Model>-FlagOS-<ChipCardName>[-<QUANT>]``, e.g. ``DeepSeek-R1-FlagOS-Iluvatar-INT8``."""
    name = f"{cfg.model.name}-FlagOS-{cfg.chip_profile.card_name}"
    quant = quant_tag(cfg)
    return f"{name}-{quant}" if quant else name


def default_labels(cfg: ReleaseConfig) -> tuple[str, str]:
    """Column labels of the evaluation table when no gate results name them: the gate's own labels."""
    return release_labels(cfg)


def flagscale_name(cfg: ReleaseConfig, serve_files: list[str] | None = None) -> str:
    """The FlagScale example name (``flagscale serve <name>``).

    Taken from the rendered experiment config ``config_<name>.yaml`` when there is one,
    else the model name in snake case (``deepseek_r1_distill_qwen_32b``).
    """
    for rel in serve_files or []:
        m = re.fullmatch(r"config_([A-Za-z0-9_.-]+)\.ya?ml", Path(rel).name)
        if m:
            return m.group(1)
    return re.sub(r"[^a-z0-9]+", "_", cfg.model.name.lower()).strip("_")


def image_reference(cfg: ReleaseConfig) -> str:
    """The image reference the config asks for: ``[registry/]name:tag``."""
    return "/".join(p for p in (cfg.image.registry, cfg.image.name) if p) + f":{cfg.image.tag}"
