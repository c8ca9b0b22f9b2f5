"""Prefect flows: the ``flagrelease`` flow, its deployments and the demo."""

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "flagrelease")
