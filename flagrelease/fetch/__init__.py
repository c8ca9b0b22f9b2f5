"""The fetch stage: weights from the HF Hub, ModelScope or a local folder at a pinned revision, resumed, verified and listed in a checksum manifest."""

from __future__ import annotations

from flagrelease.fetch._fetch import (
    MANIFEST_NAME,
    STAGING_NAME,
    FetchedFile,
    FetchResult,
    fetch_model,
    partial_path,
    run_stage,
)

__all__ = [
    "MANIFEST_NAME",
    "STAGING_NAME",
    "FetchResult",
    "FetchedFile",
    "fetch_model",
    "partial_path",
    "run_stage",
]
