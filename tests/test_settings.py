"""Settings: precedence, validation, and exit status 2 with a message naming key and value."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import SettingsError
from agent.settings import host_id_from_hostname
from agent.settings_load import load
from tests.support import ROOT
from tests.support.agents import AgentProcess


def test_shipped_config_file_loads_and_matches_defaults() -> None:
    """config/agent.toml is valid and states the defaults."""
    shipped = load(ROOT / "config" / "agent.toml", env={}).settings
    default = load(None, env={}).settings
    assert shipped == default
    assert default.libvirt.uri == "qemu:///system"
    assert default.nats.urls == ["nats://127.0.0.1:4222"]


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    """A flag beats the environment, which beats the file."""
    f = tmp_path / "a.toml"
    f.write_text(
        'host_id = "fromfile"\n[libvirt]\nuri = "test:///file"\n[publisher]\nqueue_size = 7\n'
    )
    loaded = load(
        f,
        env={"VIRT_AGENT_LIBVIRT_URI": "test:///env", "VIRT_AGENT_PUBLISHER_QUEUE_SIZE": "9",
             "VIRT_AGENT_NATS_URLS": "nats://a:1, nats://b:2"},
        overrides={"libvirt.uri": "test:///flag"},
    )  # fmt: skip
    s = loaded.settings
    assert s.host_id == "fromfile"
    assert s.libvirt.uri == "test:///flag"
    assert s.publisher.queue_size == 9
    assert s.nats.urls == ["nats://a:1", "nats://b:2"]
    assert loaded.sources["libvirt.uri"] == "--libvirt-uri"
    assert loaded.sources["publisher.queue_size"] == "VIRT_AGENT_PUBLISHER_QUEUE_SIZE"


def test_host_id_defaults_to_hostname_with_dots_replaced() -> None:
    """Dots in the hostname become underscores: one subject token."""
    assert host_id_from_hostname("hv01.dc1.example.org") == "hv01_dc1_example_org"


@pytest.mark.parametrize(
    ("env", "key", "value"),
    [
        ({"VIRT_AGENT_PUBLISHER_QUEUE_SIZE": "-5"}, "publisher.queue_size", "-5"),
        ({"VIRT_AGENT_PUBLISHER_QUEUE_SIZE": "many"}, "publisher.queue_size", "many"),
        ({"VIRT_AGENT_HOST_ID": "hv.01"}, "host_id", "hv.01"),
        ({"VIRT_AGENT_NATS_URLS": "http://x:1"}, "nats.urls", "http://x:1"),
        ({"VIRT_AGENT_HTTP_LISTEN": "nope"}, "http.listen", "nope"),
        ({"VIRT_AGENT_LOG_LEVEL": "loud"}, "log.level", "loud"),
        ({"VIRT_AGENT_NO_SUCH_THING": "1"}, "VIRT_AGENT_NO_SUCH_THING", "1"),
    ],
)
def test_bad_setting_names_key_value_and_source(env: dict[str, str], key: str, value: str) -> None:
    """Each bad value is refused with the key, the value and where it came from."""
    with pytest.raises(SettingsError) as info:
        load(None, env=env)
    assert info.value.key == key
    assert repr(value) in info.value.message
    assert key in info.value.message


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    """A typo in the file is an error, not silently ignored."""
    f = tmp_path / "bad.toml"
    f.write_text("[publisher]\nqueue_sise = 5\n")
    with pytest.raises(SettingsError, match=r"publisher\.queue_sise = 5 .*unknown setting"):
        load(f, env={})


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--host-id", "a.b"], {}, "host_id = 'a.b' (from --host-id)"),
        ([], {"VIRT_AGENT_PUBLISHER_MAX_INFLIGHT": "0"}, "publisher.max_inflight = '0'"),
        (["--nats-url", "localhost"], {}, "nats.urls = 'localhost'"),
        (["--config", "/nonexistent/agent.toml"], {}, "config = '/nonexistent/agent.toml'"),
    ],
)
def test_bad_configuration_exits_with_status_2(
    agent_process: Callable[..., AgentProcess], args: list[str], env: dict[str, str], needle: str
) -> None:
    """`virt-agent run` with a bad setting exits 2 and says which key and value."""
    p = agent_process(*args, env=env)
    assert p.wait(30) == 2
    out = p.output()
    assert needle in out
    assert "Traceback" not in out


def test_http_port_in_use_exits_1_with_the_reason(
    agent_process: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """A valid but unusable setting (port taken) fails at start with exit 1 and the OS reason, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = agent_process(
            "--http-addr", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "st"),
            "--nats-url", "nats://127.0.0.1:1",
        )  # fmt: skip
        assert p.wait(30) == 1
    out = p.output()
    assert "agent failed" in out
    assert "address already in use" in out.lower()
    assert "Traceback" not in out


def test_each_key_is_validated_against_its_own_type() -> None:
    """A bad value inside a section is named by its own key, whatever msgspec's wording (the
    key once came from a regex over msgspec's message text)."""
    for key, value in (("commands.reply_prefixes", [1]), ("failover.pool_pci", "x"),
                       ("devices.templates", {"nic": 3}), ("agent.heartbeat_interval_s", -1)):  # fmt: skip
        with pytest.raises(SettingsError) as info:
            load(None, env={}, overrides={key: value})
        assert info.value.key == key, info.value.message


def test_dict_settings_come_from_the_environment_as_json(tmp_path: Path) -> None:
    """devices.templates (a table in the file) can be set from the environment as a JSON
    object; anything else is refused naming the variable."""
    nic = tmp_path / "nic.xml"
    nic.write_text("<interface type='network'><source network='default'/></interface>")
    s = load(None, env={"VIRT_AGENT_DEVICES_TEMPLATES": f'{{"nic": "{nic}"}}'}).settings
    assert s.devices.templates == {"nic": str(nic)}
    with pytest.raises(SettingsError) as info:
        load(None, env={"VIRT_AGENT_DEVICES_TEMPLATES": "nic=/x"})
    assert info.value.key == "devices.templates"
    assert "JSON object" in info.value.message
