"""migrate-with-failover: move a VM whose passthrough primary NIC cannot migrate, keeping its
network on the virtio standby, and leave it running on exactly one host with exactly one
primary attached - whatever fails.

Source agent, verb `migrate_with_failover`, one long operation:
  plan     find primary and standby, choose the mode, refuse when there is no standby
  reserve  the destination agent holds an equivalent primary (failover.reserve, with a lease)
  unplug   record the primary in the domain's metadata, then detach it and wait for
           DEVICE_REMOVED (mode `qemu`: QEMU unplugs it itself during the migration)
  migrate  live migration, as `migrate`; where the domain runs is then checked, not assumed
  replug   the destination agent plugs the primary (failover.replug; it also does so on its
           own: agent/failover.py)
  verify   running on the destination only, primary attached, record cleared
A failure before the migration completes plugs the primary back on the source (`rollback`,
final state `rolled_back`); after it, the destination's reconcile loop owes the primary.
An operation interrupted by the agent's death is adopted after restart (`recover`).

Destination agent: `failover.reserve`, `failover.release`, `failover.replug`.

The package: plan.py (find the pair, choose the mode), steps.py (its typed journal),
source.py (the operation and its rollback), recovery.py (after the source's agent restarted),
destination.py (the verbs a source calls).
"""

from __future__ import annotations

from agent.context import Verb
from agent.peers import VERBS as PEER_VERBS
from agent.peers import AdmitRequest, ReleaseRequest, ReplugRequest, ReserveRequest
from handlers.failover.destination import admit, release, replug, reserve
from handlers.failover.plan import FailoverRequest, find_pair
from handlers.failover.recovery import recovery
from handlers.failover.source import migrate_with_failover

__all__ = ["VERBS", "find_pair"]

VERBS = [
    Verb(
        "migrate_with_failover",
        FailoverRequest,
        migrate_with_failover,
        recover=recovery,
    ),
    Verb(PEER_VERBS[ReserveRequest], ReserveRequest, reserve, peer=True),
    Verb(PEER_VERBS[AdmitRequest], AdmitRequest, admit, peer=True),
    Verb(PEER_VERBS[ReleaseRequest], ReleaseRequest, release, peer=True),
    Verb(PEER_VERBS[ReplugRequest], ReplugRequest, replug, peer=True),
]
