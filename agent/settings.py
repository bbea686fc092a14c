"""Typed settings: every section and key with its type, bound and default. Where they come
from - the shipped TOML file, then VIRT_AGENT_* environment, then command-line flags - and
their validation: agent/settings_load.py.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

PCI_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")
SUBJECT_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
REPLY_PREFIX_RE = re.compile(r"^([A-Za-z0-9_$-]+\.)+$")
NATS_URL_RE = re.compile(r"^(nats|tls|ws|wss)://[^\s/]+(:\d+)?/?$")

PosInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PosFloat = Annotated[float, Meta(gt=0)]


class _Section(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class LibvirtSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    uri: str = "qemu:///system"
    # libvirt keepalive: a dead daemon is noticed after interval * (count + 1) seconds.
    keepalive_interval_s: NonNegInt = 5
    keepalive_count: PosInt = 5
    # Threads for libvirt calls that may block (snapshots, and later migrations, detaches).
    executor_workers: Annotated[int, Meta(ge=1, le=256)] = 8
    # Calls allowed to wait for a thread; one more is refused with `unavailable`.
    executor_queue: NonNegInt = 256
    # Advertised in virt_hosts for migrations to this host; empty: libvirt peer-to-peer via uri.
    migration_uri: str = ""
    # Another host's registration names its libvirt URI and migration URI, which this agent
    # opens and migrates to. Only these libvirt transports ("" - none - is a local driver
    # such as test:///default) and URI parameters are accepted; `ext` (runs the URI's
    # `command=`) and parameters naming local programs (`command`, `netcat`) are not by
    # default. The migration URI's scheme must be one of `peer_migration_schemes`.
    peer_uri_transports: list[str] = msgspec.field(
        default_factory=lambda: ["", "tls", "tcp", "ssh", "libssh", "libssh2"]
    )
    peer_uri_params: list[str] = msgspec.field(
        default_factory=lambda: ["no_verify", "pkipath", "keyfile", "known_hosts",
                                 "known_hosts_verify", "sshauth", "no_tty", "mode", "name"]
    )  # fmt: skip
    peer_migration_schemes: list[str] = msgspec.field(default_factory=lambda: ["tcp", "rdma"])
    reconnect_min_s: PosFloat = 0.5
    reconnect_max_s: PosFloat = 30.0


class NatsSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    urls: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    connect_timeout_s: PosFloat = 5.0
    # Replies to this agent's requests come to `<inbox_prefix>.<id>`; the example permissions
    # let each host subscribe only to its own (contract v1.1). Empty: `_INBOX_<host_id>`.
    inbox_prefix: str = ""
    # A silent partition (no FIN, no RST) is found when this many pings, one per interval,
    # go unanswered: about ping_interval_s * (max_outstanding_pings + 1). nats-py's own
    # default is two minutes.
    ping_interval_s: PosFloat = 3.0
    max_outstanding_pings: Annotated[int, Meta(ge=1, le=10)] = 2
    # Replicas of the JetStream streams this agent creates (3 on a 3-node cluster).
    stream_replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    events_max_age_s: PosInt = 7 * 24 * 3600
    events_max_bytes: int = -1
    # JetStream drops a re-published Nats-Msg-Id within this window.
    duplicate_window_s: PosInt = 120
    # Create VIRT_EVENTS and VIRT_OPS when they are missing (at start, and again if one
    # disappears). false: the operator manages them; the agent only checks they exist. An
    # existing stream is never changed by an agent either way (agent/streams.py).
    manage_streams: bool = True
    # Port of the nats-server started by --embedded.
    embedded_port: Annotated[int, Meta(ge=0, le=65535)] = 4222
    # Leaf-node mode (docs/operations.md): the JetStream domain of the fleet's hub. Set, this
    # agent's streams are its own (they take only this host's subjects, in the JetStream
    # domain of the server it connects to, which the hub's streams source from: virt-agent
    # hub-sync), and its virt_hosts registration is written into the hub's domain.
    hub_domain: str = ""
    # The hub's leaf-node URLs (nats-leaf://hub:7422): the bundled server (--embedded) runs
    # as a leaf node of the hub, with this host's id as its JetStream domain.
    leaf_remotes: list[str] = msgspec.field(default_factory=list)
    leaf_creds_file: str = ""  # credentials of the leaf-node connection to the hub
    # Authentication and TLS. Secrets are read from files (never written in this file, never
    # logged); a user and password may also be given in the URLs (nats://user:pass@host).
    tls_ca_file: str = ""  # verify the servers with this CA (tls:// URLs, or any with this)
    tls_cert_file: str = ""  # client certificate for mutual TLS, with tls_key_file
    tls_key_file: str = ""
    user: str = ""
    password_file: str = ""
    token_file: str = ""
    nkey_seed_file: str = ""  # an nkey user seed (needs the `nkeys` package)
    creds_file: str = ""  # a JWT user credentials file (decentralized auth)


class PublisherSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Events waiting between the libvirt callbacks and the publisher.
    queue_size: PosInt = 20000
    # JetStream publishes whose acknowledgement is still outstanding.
    max_inflight: PosInt = 2048
    # An unacknowledged publish is sent again (same Nats-Msg-Id) after this long.
    ack_timeout_s: PosFloat = 5.0
    # At most one socket write to NATS per interval: under load, events share a write; when
    # idle, an event goes out at once. Adds at most this much latency.
    min_write_interval_ms: Annotated[float, Meta(ge=0, le=100)] = 1.0
    # After an overflow, the resync snapshot is taken once the queue is below this fraction.
    resync_low_watermark: Annotated[float, Meta(gt=0, lt=1)] = 0.5
    # The on-disk spool (state_dir/spool): new messages go there once NATS is disconnected
    # or this many (at most half of queue_size) wait in memory, and are sent from there in
    # order. 0 bytes disables it (then a full queue drops events, counted, and a resync names
    # the gap).
    spool_after: PosInt = 5000
    spool_max_bytes: NonNegInt = 1024 * 1024 * 1024
    # A message JetStream answers with an error (or the client refuses, e.g. over the
    # server's max_payload) this many times is set aside in state_dir/dead-letters.jsonl,
    # counted, and named by a `dead_letter` host event; the messages after it go on.
    max_rejections: Annotated[int, Meta(ge=1, le=100)] = 3
    # The dead-letter file keeps payloads up to this size in total; beyond it, only the ids.
    dead_letter_max_bytes: NonNegInt = 64 * 1024 * 1024
    # JetStream fast-ingest batches (nats-server 2.14+, a VIRT_EVENTS stream with
    # allow_batched; agent/batching.py): while events come faster than one per
    # batch_commit_idle_ms, they share one open batch, which the server acknowledges every
    # batch_flow messages instead of each one. Against older servers, or such a stream
    # without allow_batched, every message is acknowledged as before.
    batch: bool = True
    batch_flow: Annotated[int, Meta(ge=1, le=500)] = 100
    # A batch with nothing new for this long is committed (its last messages acknowledged).
    batch_commit_idle_ms: Annotated[float, Meta(ge=1, le=5000)] = 20.0


class CommandSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Requests larger than this are refused with invalid_request.
    max_payload_bytes: Annotated[int, Meta(ge=256, le=8 * 1024 * 1024)] = 65536
    # Empty: every verb. Otherwise only these (denied_verbs still applies).
    allowed_verbs: list[str] = msgspec.field(default_factory=list)
    denied_verbs: list[str] = msgspec.field(default_factory=list)
    # Commands executing at once; more wait (bounded by max_pending) for a slot.
    max_concurrent: PosInt = 64
    max_pending: PosInt = 1024
    # Of those, one caller (a host, or an operator prefix below) at most this many; waiting
    # requests are served callers in turn, and one more is answered `unavailable` (busy).
    max_pending_per_caller: PosInt = 256
    # Commands of one caller executing at once: a flood from one host leaves the other slots,
    # and the event loop's turns, to the others.
    max_concurrent_per_caller: PosInt = 16
    # Replies to operator verbs go only to subjects under these prefixes (agent-to-agent verbs
    # only to `_INBOX_<caller>.`); a request with another reply subject is not answered, and
    # counted (`virt_agent_commands_refused_total{reason="reply_subject"}`).
    reply_prefixes: list[str] = msgspec.field(
        default_factory=lambda: ["_INBOX.", "_INBOX_controller.", "_INBOX_monitor."]
    )
    # A repeated request_id within this window gets the first reply, without acting again.
    idempotency_window_s: PosFloat = 600.0
    # The journal keeps finished operations (operation.get/list) and devices recorded at
    # unplug up to this long and this many; pruned at start and every 10 minutes.
    operations_retention_s: PosFloat = 7 * 24 * 3600.0
    operations_max: PosInt = 10_000
    # Long operations (migrations) running at once on this host; one more gets `unavailable`.
    max_operations: Annotated[int, Meta(ge=1, le=1000)] = 4
    # A command still running after this long is answered with `timeout`.
    timeout_s: PosFloat = 60.0
    # Contract v1.1 names the calling host in an agent-to-agent verb's subject
    # (`failover.reserve.<caller>`). During a rolling upgrade from v1, calls without it are
    # still served (their reservations name no caller); set false once every host runs v1.1.
    accept_v1_peer_calls: bool = True


class DeviceSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Devices `device.attach` may plug by name: name -> file with the device's libvirt XML.
    # No XML is ever taken from the bus.
    templates: dict[str, str] = msgspec.field(default_factory=dict)
    # How long device.detach waits for DEVICE_REMOVED (the guest must release the device).
    detach_timeout_s: PosFloat = 30.0


class FailoverSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Where this host finds a primary NIC for a migrated-in domain (failover.reserve). At most
    # one of the three; none: plug the definition recorded at unplug (right for emulated NICs
    # and for type='network' interfaces on a hostdev network, where libvirt picks a free VF).
    pool_template: str = ""  # a name in [devices.templates]; MAC and alias become the domain's
    pool_network: str = ""  # a libvirt network with <forward mode='hostdev'>
    pool_pci: list[str] = msgspec.field(default_factory=list)  # VF addresses, 0000:3b:02.0
    # A reservation not consumed within this long is released.
    lease_s: PosFloat = 300.0
    # How often every running domain is checked for an owed primary (also at start).
    reconcile_interval_s: PosFloat = 5.0
    # How long the source waits for the destination to plug the primary back.
    replug_timeout_s: PosFloat = 120.0
    # One agent-to-agent request (failover.reserve / release / replug).
    peer_timeout_s: PosFloat = 10.0
    # The longest lease a caller may ask for in failover.reserve (its migration timeout and
    # replug window), and how many reservations one calling host may hold here at once.
    max_lease_s: Annotated[float, Meta(gt=0, le=86400)] = 3600.0
    # Admission of incoming migrations (failover.admit, contract v1.2): at most this many at
    # once (libvirt's own incoming migrations that nobody admitted count too), and at most
    # this much memory for domains here (KiB; 0: what libvirt says the host has).
    max_inbound_migrations: Annotated[int, Meta(ge=1, le=64)] = 2
    admit_memory_kib: Annotated[int, Meta(ge=0)] = 0
    # The memory admission counts: the host's (or admit_memory_kib) times this - above 1 on
    # a host whose domains' maximum memory may exceed its RAM (ballooning, KSM).
    memory_overcommit: Annotated[float, Meta(ge=0.1, le=100)] = 1.0
    max_reservations_per_caller: Annotated[int, Meta(ge=1, le=1000)] = 8
    # An unplug the guest never finished: the record is dropped after this long if the primary
    # is still attached (until then it is kept, in case the guest releases the device late).
    unplug_grace_s: PosFloat = 300.0
    # Before unplugging, ask QEMU whether the guest negotiated the failover feature on the
    # standby, and refuse if it did not (unless forced): `monitor` uses libvirt's QEMU monitor
    # passthrough, which marks the domain tainted `custom-monitor`; `off` does not look.
    guest_check: Literal["monitor", "off"] = "monitor"

    def __post_init__(self) -> None:
        # One spelling of a VF address everywhere (libvirt's definitions are read lower case):
        # 0000:3B:02.1 and 0000:3b:02.1 are one VF, listed once.
        msgspec.structs.force_setattr(
            self, "pool_pci", list(dict.fromkeys(a.strip().lower() for a in self.pool_pci))
        )


class HttpSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # host:port for /healthz, /readyz and /metrics; empty disables the server.
    listen: str = "127.0.0.1:9178"


class LogSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    level: str = "info"
    # auto: readable on a terminal, JSON otherwise.
    format: Literal["auto", "json", "console"] = "auto"


class AgentSettings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Longest an orderly shutdown may take before the agent exits anyway.
    shutdown_grace_s: PosFloat = 15.0
    heartbeat_interval_s: PosFloat = 30.0
    # The virt_hosts entry expires this many heartbeats after the agent's last one.
    registration_ttl_heartbeats: Annotated[int, Meta(ge=2, le=100)] = 3

    @property
    def registration_ttl_s(self) -> float:
        """How long a registration outlives the agent's last heartbeat (the bucket's TTL)."""
        return self.heartbeat_interval_s * self.registration_ttl_heartbeats


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/virt-agent"
    return str(Path.home() / ".local" / "state" / "virt-agent")


class Settings(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # One subject token; empty means the hostname with dots turned into "_".
    host_id: str = ""
    subject_prefix: str = "virt"
    state_dir: str = msgspec.field(default_factory=default_state_dir)
    # Start a bundled nats-server and default to libvirt's test driver.
    embedded: bool = False
    libvirt: LibvirtSettings = msgspec.field(default_factory=LibvirtSettings)
    nats: NatsSettings = msgspec.field(default_factory=NatsSettings)
    publisher: PublisherSettings = msgspec.field(default_factory=PublisherSettings)
    commands: CommandSettings = msgspec.field(default_factory=CommandSettings)
    devices: DeviceSettings = msgspec.field(default_factory=DeviceSettings)
    failover: FailoverSettings = msgspec.field(default_factory=FailoverSettings)
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    agent: AgentSettings = msgspec.field(default_factory=AgentSettings)


def host_id_from_hostname(hostname: str | None = None) -> str:
    name = hostname if hostname is not None else socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_-]", "_", name.replace(".", "_")) or "localhost"
