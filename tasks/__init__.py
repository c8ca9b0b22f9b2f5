"""Prefect tasks: one per pipeline stage, each a thin wrapper of the library's ``run_stage``."""

import os

from flagrelease.constants import PREFECT_ENV_DEFAULTS

# Before Prefect is imported: it reads its settings then (what each one does: constants.py).
os.environ.update({k: v for k, v in PREFECT_ENV_DEFAULTS.items() if k not in os.environ})

from tasks.card import card
from tasks.convert import convert
from tasks.deploy import deploy
from tasks.eval import evaluate
from tasks.fetch import fetch
from tasks.gate import gate
from tasks.image import image
from tasks.publish import publish

__all__ = ["STAGE_TASKS", "card", "convert", "deploy", "evaluate", "fetch", "gate", "image", "publish"]

#: Stage name -> task, in pipeline order.
STAGE_TASKS = {
    "fetch": fetch,
    "convert": convert,
    "image": image,
    "deploy": deploy,
    "eval": evaluate,
    "gate": gate,
    "card": card,
    "publish": publish,
}
