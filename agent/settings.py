"""Typed settings: shipped TOML file, then VIRT_AGENT_* environment, then command-line flags.

Every value is validated once, at start; a bad one raises SettingsError naming the key, the
value and the source it came from (the CLI turns that into exit status 2).
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from agent.errors import SettingsError
from agent.nicxml import check_template

ENV_PREFIX = "VIRT_AGENT_"
# Environment variables that are about finding the settings, not settings themselves.
ENV_META = {"VIRT_AGENT_CONFIG"}
# Not settings, and never accepted: a name whose value would change what the agent does.
ENV_REFUSED = {
    "VIRT_AGENT_TEST_EXIT_AT": "crash points are armed only by the test harness "
    "(tests/crashing_agent.py), never from the environment; unset it",
}
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


def _leaf_fields(cls: type[Struct], prefix: str = "") -> dict[str, type[Any] | Any]:
    """Dotted path -> annotation for every leaf setting."""
    out: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        path = f"{prefix}{field.name}"
        if isinstance(field.type, type) and issubclass(field.type, Struct):
            out.update(_leaf_fields(field.type, path + "."))
        else:
            out[path] = field.type
    return out


LEAVES = _leaf_fields(Settings)


def env_name(path: str) -> str:
    return ENV_PREFIX + path.replace(".", "_").upper()


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: Mapping[str, Any], parts: list[str]) -> Any:
    node: Any = tree
    for p in parts:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and f"{prefix}{k}" not in LEAVES:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class LoadedSettings(Struct, frozen=True):
    settings: Settings
    # Dotted key -> where its value came from ("config/agent.toml", "VIRT_AGENT_X", "--flag").
    sources: dict[str, str]

    def explicit(self, key: str) -> bool:
        return key in self.sources


# Command-line flags of `virt-agent run`, by the setting they override.
# The settings the agent's own commands (`run`, `check-config`, `health`) take as flags:
# key -> (flag, help). agent/cli/base.py builds the options from this table.
FLAGS = {
    "libvirt.uri": ("--libvirt-uri", "libvirt connection URI"),
    "nats.urls": ("--nats-url", "NATS server URL (repeatable)"),
    "host_id": ("--host-id", "this host's id: one subject token"),
    "state_dir": ("--state-dir", "directory for the agent's state"),
    "http.listen": ("--http-addr", "host:port for health and metrics ('' disables)"),
    "log.level": ("--log-level", "debug, info, warning, error"),
    "log.format": ("--log-format", "auto, json or console"),
    "embedded": ("--embedded", "start a bundled nats-server; use test:///default unless a "
                 "libvirt URI is given"),
}  # fmt: skip


def _from_file(path: Path, tree: dict[str, Any], sources: dict[str, str]) -> None:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError("config", str(path), "file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError("config", str(path), f"unreadable: {exc}") from None
    for key, value in _flatten(raw).items():
        if key not in LEAVES:
            raise SettingsError(key, value, "unknown setting", str(path))
        _set(tree, key, value)
        sources[key] = str(path)


def _from_env(env: Mapping[str, str], tree: dict[str, Any], sources: dict[str, str]) -> None:
    by_name = {env_name(k): k for k in LEAVES}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_META:
            continue
        if name in ENV_REFUSED:
            raise SettingsError(name, value, ENV_REFUSED[name], "environment")
        key = by_name.get(name)
        if key is None:
            raise SettingsError(name, value, "unknown environment setting", "environment")
        parsed: Any = value
        if LEAVES[key] == list[str]:
            parsed = [u.strip() for u in value.split(",") if u.strip()]
        elif getattr(LEAVES[key], "__origin__", None) is dict:
            try:
                parsed = msgspec.json.decode(value)
            except msgspec.DecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                raise SettingsError(key, value, 'expected a JSON object, e.g. {"name": "value"}',
                                    name)  # fmt: skip
        _set(tree, key, parsed)
        sources[key] = name


def _from_flags(
    overrides: Mapping[str, Any], tree: dict[str, Any], sources: dict[str, str]
) -> None:
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in LEAVES:
            raise SettingsError(key, value, "unknown setting", "command line")
        _set(tree, key, value)
        sources[key] = FLAGS[key][0] if key in FLAGS else "--" + key.replace(".", "-")


def _convert(tree: dict[str, Any], sources: Mapping[str, str]) -> Settings:
    # Each key against its own type first: the error names that key, whatever the section.
    for key, value in _flatten(tree).items():
        try:
            msgspec.convert(value, LEAVES[key], strict=False)
        except msgspec.ValidationError as exc:
            reason = str(exc).split(" - at `$", 1)[0]
            raise SettingsError(key, value, reason, sources.get(key)) from None
    try:
        return msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = re.search(r" - at `\$\.([^`]+)`$", text)
        key = re.sub(r"\[\d+\]$", "", m.group(1)) if m else "?"
        reason = text[: m.start()] if m else text
        raise SettingsError(key, _get(tree, key.split(".")), reason, sources.get(key)) from None


def load(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedSettings:
    """Merge file, environment and flag overrides (dotted keys) into validated Settings."""
    env = os.environ if env is None else env
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = config_file or env.get("VIRT_AGENT_CONFIG")
    if path:
        _from_file(Path(path), tree, sources)
    _from_env(env, tree, sources)
    _from_flags(overrides or {}, tree, sources)
    settings = _convert(tree, sources)
    if not settings.host_id:
        settings = msgspec.structs.replace(settings, host_id=host_id_from_hostname())
    _validate(settings, sources)
    return LoadedSettings(settings, sources)


def _validate_leaf(s: Settings, bad: Callable[[str, Any, str], SettingsError]) -> None:
    if s.nats.hub_domain and not TOKEN_RE.match(s.nats.hub_domain):
        raise bad("nats.hub_domain", s.nats.hub_domain, "must be one token [A-Za-z0-9_-]+")
    if s.nats.leaf_remotes and not s.nats.hub_domain:
        raise bad("nats.leaf_remotes", s.nats.leaf_remotes,
                  "leaf-node mode needs nats.hub_domain (the hub's JetStream domain)")  # fmt: skip
    for url in s.nats.leaf_remotes:
        if not re.match(r"^(nats-leaf|tls|nats|ws|wss)://\S+:\d+$", url):
            raise bad("nats.leaf_remotes", url, "expected nats-leaf://host:port")


def _validate(s: Settings, sources: Mapping[str, str]) -> None:
    def bad(key: str, value: Any, reason: str) -> SettingsError:
        return SettingsError(key, value, reason, sources.get(key))

    if not TOKEN_RE.match(s.host_id):
        raise bad("host_id", s.host_id, "must be one subject token [A-Za-z0-9_-]+")
    if not SUBJECT_PREFIX_RE.match(s.subject_prefix):
        raise bad("subject_prefix", s.subject_prefix, "must be dot-separated tokens [A-Za-z0-9_-]+")
    if not s.libvirt.uri or " " in s.libvirt.uri:
        raise bad("libvirt.uri", s.libvirt.uri, "must be a libvirt connection URI")
    if s.libvirt.reconnect_max_s < s.libvirt.reconnect_min_s:
        raise bad("libvirt.reconnect_max_s", s.libvirt.reconnect_max_s, "below reconnect_min_s")
    if not s.nats.urls:
        raise bad("nats.urls", s.nats.urls, "at least one server URL is needed")
    for url in s.nats.urls:
        if not NATS_URL_RE.match(url):
            raise bad("nats.urls", url, "expected nats://host:port (or tls://, ws://, wss://)")
    if s.http.listen:
        host, _, port = s.http.listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise bad("http.listen", s.http.listen, "expected host:port, or empty to disable")
    if s.log.level.lower() not in {"debug", "info", "warning", "error", "critical"}:
        raise bad("log.level", s.log.level, "one of debug, info, warning, error, critical")
    _validate_nats_auth(s, bad)
    _validate_leaf(s, bad)
    _validate_failover(s, bad)
    _validate_commands(s, bad)
    if not s.state_dir:
        raise bad("state_dir", s.state_dir, "must be a directory path")


def _validate_commands(s: Settings, bad: Callable[[str, Any, str], SettingsError]) -> None:
    """A verb named in allowed_verbs/denied_verbs must exist: a typo in a deny list would
    leave the verb it meant allowed."""
    from handlers import all_verbs  # noqa: PLC0415 - handlers import the settings

    if s.nats.inbox_prefix and not SUBJECT_PREFIX_RE.match(s.nats.inbox_prefix):
        raise bad("nats.inbox_prefix", s.nats.inbox_prefix,
                  "must be dot-separated tokens [A-Za-z0-9_-]+ (no wildcards)")  # fmt: skip
    for prefix in s.commands.reply_prefixes:
        if not REPLY_PREFIX_RE.match(prefix):
            raise bad("commands.reply_prefixes", prefix, "expected tokens ending in '.', such "
                      "as _INBOX_controller. (no wildcards)")  # fmt: skip
    known = all_verbs()
    for key in ("allowed_verbs", "denied_verbs"):
        for name in getattr(s.commands, key):
            if name not in known:
                raise bad(
                    f"commands.{key}", name, f"unknown verb; known: {', '.join(sorted(known))}"
                )


def _validate_nats_auth(s: Settings, bad: Callable[[str, Any, str], SettingsError]) -> None:
    n = s.nats
    if bool(n.tls_cert_file) != bool(n.tls_key_file):
        raise bad(
            "nats.tls_cert_file", n.tls_cert_file, "tls_cert_file and tls_key_file go together"
        )
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file", "password_file", "token_file",
                "nkey_seed_file", "creds_file"):  # fmt: skip
        path = getattr(n, key)
        if path and not os.path.isfile(path):
            raise bad(f"nats.{key}", path, "no such file")
    if n.password_file and not n.user:
        raise bad("nats.password_file", n.password_file, "needs nats.user")


def _validate_failover(s: Settings, bad: Callable[[str, Any, str], SettingsError]) -> None:
    pools = [k for k in ("pool_template", "pool_network", "pool_pci") if getattr(s.failover, k)]
    if len(pools) > 1:
        key = "failover." + pools[1]
        raise bad(key, getattr(s.failover, pools[1]), f"only one pool; {pools[0]} is set too")
    if s.failover.pool_template and s.failover.pool_template not in s.devices.templates:
        raise bad(
            "failover.pool_template", s.failover.pool_template, "not a name in devices.templates"
        )
    for addr in s.failover.pool_pci:
        if not PCI_RE.match(addr):
            raise bad("failover.pool_pci", addr, "expected a PCI address like 0000:3b:02.0")
    if s.failover.pool_template:
        path = s.devices.templates[s.failover.pool_template]
        try:
            why = check_template(Path(path).read_text())
        except (OSError, ET.ParseError) as exc:
            why = f"its file {path} cannot be read as XML ({exc})"
        if why:
            raise bad("failover.pool_template", s.failover.pool_template, why)
