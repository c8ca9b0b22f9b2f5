"""The fetch stage: weights from the HF Hub, ModelScope or a local folder at a pinned revision.

Transfers resume, every file is verified, and a checksum manifest lists them
(:func:`fetch_model`); :func:`run_stage` is the pipeline's entry point.
"""

from __future__ import annotations

from flagrelease.fetch._fetch import fetch_model
from flagrelease.fetch._stage import run_stage
from flagrelease.fetch._types import MANIFEST_NAME, STAGING_NAME, FetchedFile, FetchResult, partial_path
from flagrelease.fetch.outputs import FetchOutputs

__all__ = [
    "MANIFEST_NAME",
    "STAGING_NAME",
    "FetchOutputs",
    "FetchResult",
    "FetchedFile",
    "fetch_model",
    "partial_path",
    "run_stage",
]
