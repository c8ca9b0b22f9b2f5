"""The card stage: the model card and the machine-readable bundle manifest (``flagrelease.json``, with its JSON Schema)."""

from __future__ import annotations

from flagrelease.card._card import (
    CARD_TEMPLATE,
    eval_table_rows,
    render_card,
    render_card_cli,
    run_stage,
)

__all__ = [
    "CARD_TEMPLATE",
    "eval_table_rows",
    "render_card",
    "render_card_cli",
    "run_stage",
]
