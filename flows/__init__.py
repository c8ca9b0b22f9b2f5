"""Prefect flows: the ``flagrelease`` flow, its deployments and the demo."""

import os

from flagrelease.constants import PREFECT_ENV_DEFAULTS

# Before Prefect is imported: it reads its settings then (what each one does: constants.py).
os.environ.update({k: v for k, v in PREFECT_ENV_DEFAULTS.items() if k not in os.environ})
