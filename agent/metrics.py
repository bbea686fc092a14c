"""Prometheus metrics of one agent, in a registry of its own (tests run several agents)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NS = "virt_agent"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.events_received = Counter(
            f"{NS}_events_received",
            "Domain events delivered by libvirt, by type",
            ["type"],
            registry=r,
        )
        self.events_published = Counter(
            f"{NS}_events_published", "Messages acknowledged by JetStream", registry=r
        )
        self.events_dropped = Counter(
            f"{NS}_events_dropped", "Domain events dropped because the queue was full", registry=r
        )
        self.events_inferred = Counter(
            f"{NS}_events_inferred",
            "Lifecycle events computed from snapshot differences after a libvirt reconnect",
            registry=r,
        )
        self.spooled = Counter(f"{NS}_spooled", "Messages written to the on-disk spool", registry=r)
        self.spool_dropped = Counter(
            f"{NS}_spool_dropped",
            "Spooled messages given up because the spool exceeded its bound",
            registry=r,
        )
        self.spool_write_errors = Counter(
            f"{NS}_spool_write_errors",
            "Spool writes that failed (disk full, I/O error); the messages stayed in memory",
            registry=r,
        )
        self.spool_depth = Gauge(f"{NS}_spool_depth", "Spooled messages not yet sent", registry=r)
        self.spool_bytes = Gauge(f"{NS}_spool_bytes", "Size of the spool on disk", registry=r)
        self.publish_retries = Counter(
            f"{NS}_publish_retries",
            "JetStream publishes sent again after a timeout or error",
            registry=r,
        )
        self.publish_errors = Counter(
            f"{NS}_publish_errors", "JetStream publish failures, by kind", ["kind"], registry=r
        )
        self.dead_letters = Counter(
            f"{NS}_dead_letters",
            "Messages JetStream would never accept, set aside in the dead-letter file",
            registry=r,
        )
        self.streams_recreated = Counter(
            f"{NS}_streams_recreated",
            "JetStream streams found missing while running and created again",
            ["stream"],
            registry=r,
        )
        self.stream_config_mismatch = Gauge(
            f"{NS}_stream_config_mismatch",
            "1 while the fleet's stream differs from this agent's settings (left as it is)",
            ["stream"],
            registry=r,
        )
        self.stream_captures_own_subjects = Gauge(
            f"{NS}_stream_captures_own_subjects",
            "1 while a stream takes this host's command or inbox subjects (none should)",
            ["stream"],
            registry=r,
        )
        self.duplicate_host_id = Gauge(
            f"{NS}_duplicate_host_id",
            "1 while another live agent writes this host id's registration",
            registry=r,
        )
        self.journal_rows = Gauge(
            f"{NS}_journal_rows",
            "Rows in the operations journal, by table (bounded by the retention settings)",
            ["table"],
            registry=r,
        )
        self.admissions = Gauge(
            f"{NS}_admissions", "Incoming migrations admitted here whose lease runs", registry=r
        )
        self.admissions_refused = Counter(
            f"{NS}_admissions_refused",
            "Incoming migrations refused at admission, by reason",
            ["reason"],
            registry=r,
        )
        self.journal_bytes = Gauge(
            f"{NS}_journal_bytes", "Disk use of the operations journal (with its WAL)", registry=r
        )
        self.domain_entries = Gauge(
            f"{NS}_domain_entries",
            "Per-domain entries the agent holds, by table (tracked: the domains libvirt has; "
            "the others empty while nothing runs)",
            ["table"],
            registry=r,
        )
        self._current_state(r)
        self.publish_batches = Counter(
            f"{NS}_publish_batches",
            "JetStream fast-ingest batches committed (agent/batching.py)",
            registry=r,
        )
        self.publish_latency = Histogram(
            f"{NS}_publish_latency_seconds",
            "From the libvirt callback to the JetStream acknowledgement",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.resyncs = Counter(
            f"{NS}_resyncs", "Resync snapshots published, by reason", ["reason"], registry=r
        )
        self.libvirt_connected = Gauge(
            f"{NS}_libvirt_connected", "1 while libvirt is connected", registry=r
        )
        self.libvirt_reconnects = Counter(
            f"{NS}_libvirt_reconnects", "libvirt connections re-opened", registry=r
        )
        self.nats_connected = Gauge(f"{NS}_nats_connected", "1 while NATS is connected", registry=r)
        self.nats_reconnects = Counter(f"{NS}_nats_reconnects", "NATS reconnections", registry=r)
        self.queue_depth = Gauge(
            f"{NS}_queue_depth", "Events waiting for the publisher", registry=r
        )
        self.queue_capacity = Gauge(f"{NS}_queue_capacity", "Bound of the event queue", registry=r)
        self.inflight = Gauge(
            f"{NS}_inflight_acks", "Publishes awaiting a JetStream ack", registry=r
        )
        self.inflight_capacity = Gauge(
            f"{NS}_inflight_acks_capacity", "Bound of in-flight acks", registry=r
        )
        self.executor_busy = Gauge(
            f"{NS}_executor_busy", "libvirt calls running or queued", registry=r
        )
        self.executor_capacity = Gauge(
            f"{NS}_executor_capacity", "Bound of libvirt calls running or queued", registry=r
        )
        self.commands_refused = Counter(
            f"{NS}_commands_refused",
            "Requests not served: reply_subject, subject, no_reply (never answered); busy "
            "(answered unavailable)",
            ["reason"],
            registry=r,
        )
        self.slow_consumer_drops = Counter(
            f"{NS}_slow_consumer_drops",
            "Messages the NATS client dropped because a subscription's buffer was full",
            registry=r,
        )
        self.commands = Counter(
            f"{NS}_commands",
            "Commands answered, by verb and outcome",
            ["verb", "outcome"],
            registry=r,
        )
        self.executor_rejected = Counter(
            f"{NS}_executor_rejected",
            "libvirt calls refused because the executor was full",
            registry=r,
        )
        self.operations = Counter(
            f"{NS}_operations",
            "Long operations finished, by verb and state",
            ["verb", "state"],
            registry=r,
        )
        self.step_seconds = Histogram(
            f"{NS}_operation_step_seconds",
            "Duration of each step of long operations",
            ["verb", "step"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
            registry=r,
        )
        self.loop_lag = Histogram(
            f"{NS}_loop_lag_seconds",
            "How late the event loop wakes for a 100 ms timer (blocking work shows here)",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.owed_primaries = Gauge(
            f"{NS}_failover_owed_primaries",
            "Running domains on this host whose primary NIC is out, at the last reconcile pass",
            registry=r,
        )
        self.reconcile_checks = Counter(
            f"{NS}_failover_reconcile_checks",
            "Domains the reconcile loop looked at (each costs libvirt calls)",
            registry=r,
        )
        self.replugs = Counter(
            f"{NS}_failover_replugs",
            "Owed primaries settled by the reconcile loop, by outcome",
            ["outcome"],
            registry=r,
        )
        self.primary_outage = Histogram(
            f"{NS}_failover_primary_outage_seconds",
            "Per migrate_with_failover: the primary gone, from DEVICE_REMOVED on the source to "
            "DEVICE_ADDED on the destination (two hosts' clocks)",
            buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120),
            registry=r,
        )
        self.reservations = Gauge(
            f"{NS}_failover_reservations", "Unexpired primary-NIC reservations", registry=r
        )
        self.vfs = Gauge(
            f"{NS}_failover_vfs",
            "VFs of this host's primary pool, by state (in use as of the last scan)",
            ["state"],
            registry=r,
        )

    def _current_state(self, r: CollectorRegistry) -> None:
        """The virt_domains writer's (agent/current_state.py)."""
        self.current_state_pending = Gauge(
            f"{NS}_current_state_pending",
            "Domains whose virt_domains value awaits its write (at most the domains libvirt has, "
            "and those that left)",
            registry=r,
        )
        self.current_state_writes = Counter(
            f"{NS}_current_state_writes",
            "virt_domains writes acknowledged, by kind (put, delete)",
            ["kind"],
            registry=r,
        )
        self.current_state_failures = Counter(
            f"{NS}_current_state_failures",
            "virt_domains write rounds that failed (tried again with back-off)",
            registry=r,
        )

    @staticmethod
    def track(gauge: Gauge, fn: Callable[[], float]) -> None:
        """Read a gauge's value at scrape time instead of updating it on the hot path."""
        gauge.set_function(fn)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


async def measure_loop_lag(metrics: Metrics, period: float = 0.1) -> None:
    """The event loop's lateness: how late a `period` timer fires, observed until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(period)
        metrics.loop_lag.observe(max(0.0, loop.time() - t0 - period))
