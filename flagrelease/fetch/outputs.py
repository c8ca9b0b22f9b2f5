"""What the fetch stage hands downstream."""

from __future__ import annotations

from flagrelease.pipeline import StageOutputs

__all__ = ["FetchOutputs"]


class FetchOutputs(StageOutputs):
    """The fetched weights.

    Attributes:
        model_dir: the verified weights folder.
        manifest: the fetch manifest (sizes and sha256 of every file), None in a dry run.
        files: how many files the model has.
        bytes: their total size.
        revision: the pinned revision (commit) fetched, None for a local folder.
        source: ``hf``, ``modelscope``, ``local`` or ``generated``.
        endpoint: the hub endpoint used, None for a local folder.
        downloaded_bytes: bytes downloaded in this run (0 when everything was cached).
        network: whether the network was used.
    """

    model_dir: str
    manifest: str | None = None
    files: int = 0
    bytes: int = 0
    revision: str | None = None
    source: str = ""
    endpoint: str | None = None
    downloaded_bytes: int = 0
    network: bool = False
