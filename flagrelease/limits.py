"""Concurrency limits: two releases never share one node's accelerators.

flagrelease does not split a node's devices between releases (the serving engine sees
every device of the node), so a release that serves on a node holds the whole node:

- **per host**: one limit per node, ``flagrelease-host-<host>``, of ``devices_per_node``
  slots; a release takes all of them on every node it serves on (``serve.nodes``, or the
  worker's own host), for the stages that use the accelerators (deploy, eval, gate);
- **per work pool**: the chip's pool runs at most ``nodes`` flow runs at once (its
  Prefect work pool concurrency limit), one per node of the pool.

Both numbers come from the chip profile (``devices_per_node``, ``nodes``).  The Prefect
layer creates the limits and holds the slots (``flows/``); this module only says which.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from flagrelease.chips import ChipProfile
from flagrelease.config import ReleaseConfig

__all__ = ["ACCELERATOR_STAGES", "ConcurrencySlot", "host_limit_name", "pool_concurrency", "release_slots"]

#: Stages that serve the model on the chip's devices.
ACCELERATOR_STAGES = ("deploy", "eval", "gate")
_LOCAL = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


@dataclass(frozen=True)
class ConcurrencySlot:
    """Slots a release takes from one concurrency limit.

    Attributes:
        name: the limit's name (a Prefect global concurrency limit).
        limit: the limit's size.
        occupy: how many of its slots the release holds.
    """

    name: str
    limit: int
    occupy: int


def host_limit_name(host: str) -> str:
    """The limit of one node: ``flagrelease-host-<host>`` (lowercase; other characters as ``-``)."""
    return "flagrelease-host-" + re.sub(r"[^a-z0-9.-]+", "-", host.lower()).strip("-")


def pool_concurrency(chip: ChipProfile) -> int:
    """How many flow runs the chip's work pool runs at once: one per node of the pool."""
    return chip.nodes


def _hosts(cfg: ReleaseConfig) -> list[str]:
    """The nodes the release serves on; a local node is this machine (the worker's)."""
    hosts = [n.host for n in cfg.serve.nodes] or ["127.0.0.1"]
    return sorted({socket.gethostname() if h in _LOCAL else h for h in hosts})


def release_slots(cfg: ReleaseConfig) -> list[ConcurrencySlot]:
    """The slots a release holds while it serves: every device of each of its nodes.

    Args:
        cfg: the release (for a reference side, the config that role works on).

    Returns:
        One slot per node, sorted by name.
    """
    devices = cfg.chip_profile.devices_per_node
    return [ConcurrencySlot(host_limit_name(h), devices, devices) for h in _hosts(cfg)]
