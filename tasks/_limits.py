"""Prefect concurrency limits around the stages that serve the model (:mod:`flagrelease.limits`).

A release holds every device of each node it serves on while its deploy, eval or gate
stage runs: one Prefect global concurrency limit per node, ``flagrelease-host-<host>``,
of the chip's ``devices_per_node`` slots, created on first use, all of which it takes.  A second release that
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


def ensure_limits(slots: list[ConcurrencySlot]) -> dict[str, int]:
    """Create each slot's global concurrency limit if missing; return each limit's size on the server.

    A limit that exists keeps its size: two chip profiles that name one host (a machine
    that serves two profiles) share its limit, whichever made it.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    sizes = {}
    with get_client(sync_client=True) as client:
        for slot in slots:
            try:
                sizes[slot.name] = client.read_global_concurrency_limit_by_name(slot.name).limit
                continue
            except ObjectNotFound:
                pass
            # Two releases may create the same limit at once: the loser's create conflicts.
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=slot.name, limit=slot.limit))
            sizes[slot.name] = client.read_global_concurrency_limit_by_name(slot.name).limit
    return sizes


@contextlib.contextmanager
def hold_accelerators(cfg: ReleaseConfig, stage: str) -> Iterator[None]:
    """Hold the release's nodes while ``stage`` runs, when it is a stage that serves the model.

    Every slot of each node's limit is taken (a node is never shared), one node after
    another in name order, so that two releases that want the same nodes cannot each
    hold a part of them.
    """
    if stage not in ACCELERATOR_STAGES:
        yield
        return
    from prefect.concurrency.sync import concurrency

    slots = release_slots(cfg)
    sizes = ensure_limits(slots)
    log.info("%s: waiting for the accelerators of %s", stage, ", ".join(sizes))
    with contextlib.ExitStack() as held:
        for name in sorted(sizes):
            held.enter_context(concurrency(name, occupy=sizes[name], strict=True))
        log.info("%s: holding %s", stage, ", ".join(sorted(sizes)))
        yield
