"""Prefect concurrency limits around the stages that serve the model (:mod:`flagrelease.limits`).

A release holds every device of each node it serves on while its deploy, eval or gate
stage runs: one Prefect global concurrency limit per node, ``flagrelease-host-<host>``,
of the chip's ``devices_per_node`` slots, created on first use.  A second release that
wants the same node waits (its task logs that it waits, and for which node).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from flagrelease.config import ReleaseConfig
from flagrelease.limits import ACCELERATOR_STAGES, ConcurrencySlot, release_slots

__all__ = ["ensure_limits", "hold_accelerators"]

log = logging.getLogger("flagrelease.limits")


def ensure_limits(slots: list[ConcurrencySlot]) -> None:
    """Create each slot's global concurrency limit if missing, or set its size to the profile's."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for slot in slots:
            # Two releases may create the same limit at once: the loser's create conflicts.
            with contextlib.suppress(ObjectAlreadyExists):
                client.upsert_global_concurrency_limit_by_name(slot.name, slot.limit)


@contextlib.contextmanager
def hold_accelerators(cfg: ReleaseConfig, stage: str) -> Iterator[None]:
    """Hold the release's nodes while ``stage`` runs, when it is a stage that serves the model."""
    if stage not in ACCELERATOR_STAGES:
        yield
        return
    from prefect.concurrency.sync import concurrency

    slots = release_slots(cfg)
    ensure_limits(slots)
    names = [s.name for s in slots]
    log.info("%s: waiting for the accelerators of %s", stage, ", ".join(names))
    # Every node of one release is of its chip, so each limit takes the same number of slots.
    with concurrency(names, occupy=slots[0].occupy, strict=True):
        log.info("%s: holding %s", stage, ", ".join(names))
        yield
