"""The card stage: the model card and the machine-readable bundle manifest (``flagrelease.json``, with its JSON Schema).

- :mod:`.manifest`: the manifest, built from the config and the upstream stages' typed outputs;
- :mod:`._card`: the card (``templates/card/README.md.j2``), rendered from the manifest;
- :mod:`._stage`: ``run_stage``, which writes both into the bundle.
"""

from __future__ import annotations

from flagrelease.card._card import CARD_TEMPLATE, render_card, render_card_cli
from flagrelease.card._stage import run_stage
from flagrelease.card._text import eval_table_rows
from flagrelease.card.manifest import (
    Upstream,
    build_manifest,
    bundle_name,
    tool_versions,
    upstream_results,
    write_manifest,
)

__all__ = [
    "CARD_TEMPLATE",
    "Upstream",
    "build_manifest",
    "bundle_name",
    "eval_table_rows",
    "render_card",
    "render_card_cli",
    "run_stage",
    "tool_versions",
    "upstream_results",
    "write_manifest",
]
