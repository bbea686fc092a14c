"""Settings from the shipped TOML file, then VIRT_AGENT_* environment, then command-line flags
(agent/settings.py defines them).

Every value is validated once, at start; a bad one raises SettingsError naming the key, the
value and the source it came from (the CLI turns that into exit status 2).
"""

from __future__ import annotations

import os
import re
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct

from agent.errors import SettingsError
from agent.nicxml import check_template
from agent.settings import (
    NATS_URL_RE,
    PCI_RE,
    REPLY_PREFIX_RE,
    SUBJECT_PREFIX_RE,
    TOKEN_RE,
    Settings,
    host_id_from_hostname,
)

ENV_PREFIX = "VIRT_AGENT_"
# Environment variables that are about finding the settings, not settings themselves.
ENV_META = {"VIRT_AGENT_CONFIG"}
# Not settings, and never accepted: a name whose value would change what the agent does.
ENV_REFUSED = {
    "VIRT_AGENT_TEST_EXIT_AT": "crash points are armed only by the test harness "
    "(tests/crashing_agent.py), never from the environment; unset it",
}


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
