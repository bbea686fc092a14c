"""A secured bus: nats-server with config/nats-server.conf.example (per-host users and
permissions). A host's credentials speak only for that host: its agent works, but they cannot
publish another host's events or send it a domain.destroy - only the failover verbs - and
the password never appears in the agent's output."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from agent.bus import subscribed
from agent.embedded import NatsServer
from lab.agents import agent_env
from tests.support import ROOT
from tests.support.agents import RunningAgent
from tests.support.bus import SECURED_CONF, Collector, connect_as, secured_url, stream_messages
from tests.support.cli import check, cli


async def test_a_hosts_credentials_speak_only_for_that_host(
    secured: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    agent = await start_agent(**{"host_id": "hv02", "nats.urls": [secured_url(secured, "hv02")]})
    controller, _ = await connect_as(secured, "controller")
    hv01, hv01_errors = await connect_as(secured, "hv01")
    try:
        # The agent works under its own credentials: streams, registration, commands.
        reply = await controller.request("virt.hv02.cmd.ping", b"{}", timeout=10)
        assert msgspec.json.decode(reply.data)["ok"] is True
        kv = await controller.jetstream().key_value("virt_hosts")
        assert (await kv.get("hv02")).value is not None

        seen = Collector()
        await controller.subscribe("virt.>", cb=seen.on_msg)
        await subscribed(controller)
        # hv01 may publish its own events ...
        await hv01.publish("virt.hv01.event.x.lifecycle", b'{"own": true}')
        # ... not hv02's,
        await hv01.publish("virt.hv02.event.x.lifecycle", b'{"forged": true}')
        await subscribed(hv01)
        await seen.wait_for(lambda e: e.get("own") is True)
        await asyncio.sleep(0.5)
        assert [m[0] for m in seen.messages] == ["virt.hv01.event.x.lifecycle"]
        assert any("permissions violation" in e.lower() for e in hv01_errors), hv01_errors
        # ... cannot send hv02 a domain.destroy (nothing reaches its agent, no reply) ...
        with pytest.raises(TimeoutError):
            await hv01.request("virt.hv02.cmd.domain.destroy", b'{"domain": "test"}', timeout=2)
        assert agent.agent.commands.handled == 1, "only the controller's ping reached the agent"
        # ... but can call its failover verbs under its own id, and gets the answer,
        out = await hv01.request(
            "virt.hv02.cmd.failover.release.hv01", b'{"reservation_id": "ab12"}', timeout=10
        )
        assert msgspec.json.decode(out.data) == {"ok": True, "result": {"released": False}}
        # ... not under another host's id.
        with pytest.raises(TimeoutError):
            await hv01.request(
                "virt.hv02.cmd.failover.release.hv03", b'{"reservation_id": "ab12"}', timeout=2
            )
        # The controller cannot call the agent-to-agent verbs.
        with pytest.raises(TimeoutError):
            await controller.request(
                "virt.hv02.cmd.failover.release.controller",
                b'{"reservation_id": "ab12"}',
                timeout=2,
            )
    finally:
        for nc in (controller, hv01):
            with contextlib.suppress(Exception):
                await nc.close()


async def test_a_host_cannot_read_another_hosts_or_the_controllers_replies(
    secured: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """Replies go to per-host inbox prefixes: hv02 may subscribe to neither the plain
    `_INBOX.>` nor hv01's or the controller's, and sees none of the replies hv01's agent
    sends to the controller."""
    await start_agent(**{"host_id": "hv01", "nats.urls": [secured_url(secured, "hv01")]})
    controller, _ = await connect_as(secured, "controller")
    hv02, hv02_errors = await connect_as(secured, "hv02")
    try:
        seen = Collector()
        for subject in ("_INBOX.>", "_INBOX_controller.>", "_INBOX_hv01.>", ">"):
            await hv02.subscribe(subject, cb=seen.on_msg)
        await subscribed(hv02)
        reply = await controller.request("virt.hv01.cmd.ping", b"{}", timeout=10)
        assert msgspec.json.decode(reply.data)["ok"] is True
        await asyncio.sleep(0.5)
        assert seen.messages == []
        denied = [e for e in hv02_errors if "permissions violation for subscription" in e.lower()]
        assert len(denied) == 4, hv02_errors
    finally:
        for nc in (controller, hv02):
            with contextlib.suppress(Exception):
                await nc.close()


async def test_reservations_belong_to_their_caller_and_are_bounded(
    secured: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]], tmp_path: Path
) -> None:
    """The destination knows who calls from the subject (the server lets hv01 use only its
    own id there): a reservation names its caller; another host can neither release it nor
    replug for it; one caller holds at most `failover.max_reservations_per_caller`; a lease
    beyond `failover.max_lease_s` is refused, naming the setting."""
    await start_agent(**{"host_id": "hv02", "nats.urls": [secured_url(secured, "hv02")],
                         "failover.max_reservations_per_caller": 2,
                         "failover.max_lease_s": 600})  # fmt: skip
    hv01, _ = await connect_as(secured, "hv01")
    hv03, _ = await connect_as(secured, "hv03")

    async def call(nc: Any, verb: str, me: str, body: dict[str, Any]) -> dict[str, Any]:
        msg = await nc.request(f"virt.hv02.cmd.{verb}.{me}", msgspec.json.encode(body), timeout=10)
        out: dict[str, Any] = msgspec.json.decode(msg.data)
        return out

    def reserve(op: str, lease: float = 60, source: str = "hv01") -> dict[str, Any]:
        return {"operation_id": op, "domain": "6695eb01-f6a4-8304-79aa-97f2502e193f",
                "alias": "ua-primary0", "source": source, "lease_s": lease}  # fmt: skip

    try:
        first = await call(hv01, "failover.reserve", "hv01", reserve("a1"))
        assert first["ok"] is True, first
        rid = first["result"]["reservation_id"]
        assert (await call(hv01, "failover.reserve", "hv01", reserve("a2")))["ok"] is True
        over = await call(hv01, "failover.reserve", "hv01", reserve("a3"))
        assert over["error"]["code"] == "conflict", over
        long = await call(hv03, "failover.reserve", "hv03", reserve("b1", 3600, "hv03"))
        assert long["error"]["code"] == "invalid_request", long
        assert "failover.max_lease_s" in long["error"]["message"]
        # hv03 claims hv01's operation and reservation: refused, and the reservation stays.
        stolen = await call(hv03, "failover.reserve", "hv03", reserve("a1", source="hv03"))
        assert stolen["error"]["code"] == "forbidden", stolen
        stolen = await call(hv03, "failover.reserve", "hv03", reserve("a9"))
        assert stolen["error"]["code"] == "forbidden", stolen
        taken = await call(hv03, "failover.release", "hv03", {"reservation_id": rid})
        assert taken["error"]["code"] == "forbidden", taken
        by_op = await call(hv03, "failover.release", "hv03", {"operation_id": "a1"})
        assert by_op["error"]["code"] == "forbidden", by_op
        mine = await call(hv01, "failover.release", "hv01", {"reservation_id": rid})
        assert mine == {"ok": True, "result": {"released": True}}
    finally:
        for nc in (hv01, hv03):
            with contextlib.suppress(Exception):
                await nc.close()


async def test_the_monitoring_identity_reads_the_streams_and_sends_no_command(
    secured: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """`monitor` reads VIRT_EVENTS and VIRT_OPS (an ordered consumer, and a durable one of
    its own) and is refused on every command subject."""
    agent = await start_agent(**{"host_id": "hv01", "nats.urls": [secured_url(secured, "hv01")]})
    await agent.settled()
    monitor, errors = await connect_as(secured, "monitor")
    try:
        started = await stream_messages(monitor, "VIRT_EVENTS", "virt.hv01.host.agent_started")
        assert [ev["data"]["boot_id"] for _, ev, _ in started] == [agent.agent.boot_id]
        js = monitor.jetstream()
        sub = await js.pull_subscribe("virt.*.host.>", durable="monitor", stream="VIRT_EVENTS")
        msgs = await sub.fetch(1, timeout=10)
        await msgs[0].ack()
        assert msgspec.json.decode(msgs[0].data)["source"] == "/virt/hv01"
        assert (await js.stream_info("VIRT_OPS")).config.name == "VIRT_OPS"
        for verb in ("ping", "domain.destroy", "failover.release.monitor"):
            with pytest.raises(TimeoutError):
                await monitor.request(f"virt.hv01.cmd.{verb}", b'{"domain": "test"}', timeout=2)
        assert agent.agent.commands.handled == 0
        assert sum("permissions violation for publish" in e.lower() for e in errors) == 3, errors
    finally:
        await monitor.close()


def test_the_password_never_appears_in_the_agents_output(
    secured: NatsServer, tmp_path: Path
) -> None:
    """A wrong password: the agent keeps retrying and says so, without the password."""
    bad = f"nats://hv01:Wr0ngSecret@127.0.0.1:{secured.port}"
    log = tmp_path / "agent.log"
    env = agent_env()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--libvirt-uri", "test:///default",
             "--nats-url", bad, "--host-id", "hv01", "--state-dir", str(tmp_path / "st"),
             "--http-addr", "", "--log-format", "json"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "NATS not reachable yet" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text(errors="replace")
    assert "NATS not reachable yet" in text, text[-2000:]
    assert "Wr0ngSecret" not in text
    assert "hv01:***@" in text
    code, out_text = check("--offline", "--nats-url", "http://hv01:Wr0ngSecret@host:1")
    assert code == 2
    assert "Wr0ngSecret" not in out_text


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """A CA of the test's own, a server certificate for 127.0.0.1 and a client certificate."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj",
            "/CN=virt-agent test CA", "-days", "1", cwd=d)  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                f"/CN={name}", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile",
                f"{name}.ext", cwd=d)  # fmt: skip


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[NatsServer, Path]]:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    conf = tmp_path / "tls.conf"
    conf.write_text(
        f'tls {{\n  cert_file: "{pki}/server.crt"\n  key_file: "{pki}/server.key"\n'
        f'  ca_file: "{pki}/ca.crt"\n  verify: true\n  timeout: 2\n}}\n'
    )
    server = NatsServer(tmp_path / "nats", config_file=conf).start()
    yield server, pki
    server.stop()


async def test_mutual_tls_with_a_ca_of_our_own(
    tls_server: tuple[NatsServer, Path], start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """The agent connects with its client certificate and works; without one it is refused."""
    server, pki = tls_server
    tls = {"nats.tls_ca_file": str(pki / "ca.crt"), "nats.tls_cert_file": str(pki / "client.crt"),
           "nats.tls_key_file": str(pki / "client.key")}  # fmt: skip
    agent = await start_agent(**{"nats.urls": [f"tls://127.0.0.1:{server.port}"], **tls})
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    nc = await nats.connect(f"tls://127.0.0.1:{server.port}", tls=ctx)
    try:
        reply = await nc.request(f"virt.{agent.host}.cmd.ping", b"{}", timeout=10)
        assert msgspec.json.decode(reply.data)["ok"] is True
    finally:
        await nc.close()
    args = ["--libvirt-uri", "test:///default", "--nats-url", f"tls://127.0.0.1:{server.port}",
            "--state-dir", str(pki / "st"), "--http-addr", ""]  # fmt: skip
    env = {"VIRT_AGENT_NATS_CONNECT_TIMEOUT_S": "2",
           "VIRT_AGENT_NATS_TLS_CA_FILE": str(pki / "ca.crt")}  # fmt: skip
    assert check(*args, **env)[0] == 5, "no client certificate: refused"
    env |= {"VIRT_AGENT_NATS_TLS_CERT_FILE": str(pki / "client.crt"),
            "VIRT_AGENT_NATS_TLS_KEY_FILE": str(pki / "client.key")}  # fmt: skip
    code, out = check(*args, **env)
    assert code == 0, out
    # The operator's tools read the same settings: `call`, `hosts` and `events` work over it.
    url = f"tls://127.0.0.1:{server.port}"
    code, out = await asyncio.to_thread(cli, "call", agent.host, "ping", "--nats-url", url, **env)
    assert code == 0, out
    assert '"ok": true' in out
    code, out = await asyncio.to_thread(cli, "hosts", "--nats-url", url, **env)
    assert code == 0, out
    assert agent.host in out
    code, out = await asyncio.to_thread(
        cli, "events", "--nats-url", url, "--host", agent.host, "--count", "1", "--reorder-s", "0",
        timeout=5, **env,
    )  # fmt: skip
    assert "listening on" in out, out
    no_cert = {k: v for k, v in env.items() if "CERT" not in k and "KEY" not in k}
    code, out = await asyncio.to_thread(cli, "call", agent.host, "ping", "--nats-url", url,
                                        **no_cert)  # fmt: skip
    assert code != 0, out


async def test_token_authentication_from_a_file(
    tmp_path: Path, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    conf = tmp_path / "token.conf"
    conf.write_text('authorization { token: "t0ken-S3cret" }\n')
    server = NatsServer(tmp_path / "nats", config_file=conf).start()
    try:
        token = tmp_path / "token"
        token.write_text("t0ken-S3cret\n")
        agent = await start_agent(**{"nats.urls": [server.url], "nats.token_file": str(token)})
        nc = await nats.connect(server.url, token="t0ken-S3cret")
        try:
            reply = await nc.request(f"virt.{agent.host}.cmd.ping", b"{}", timeout=10)
            assert msgspec.json.decode(reply.data)["ok"] is True
        finally:
            await nc.close()
        wrong = tmp_path / "wrong"
        wrong.write_text("nope\n")
        args = ["--libvirt-uri", "test:///default", "--nats-url", server.url,
                "--state-dir", str(tmp_path / "st"), "--http-addr", ""]  # fmt: skip
        code, out = check(*args, VIRT_AGENT_NATS_TOKEN_FILE=str(wrong),
                                 VIRT_AGENT_NATS_CONNECT_TIMEOUT_S="2")  # fmt: skip
        assert code == 5, out
        code, out = check(*args, VIRT_AGENT_NATS_TOKEN_FILE=str(token))
        assert code == 0, out
        assert "t0ken-S3cret" not in out
    finally:
        server.stop()


async def test_nkey_authentication_from_a_seed_file(
    tmp_path: Path, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    import nkeys  # noqa: PLC0415

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(seed).public_key.decode()
    conf = tmp_path / "nkey.conf"
    conf.write_text(f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}\n')
    server = NatsServer(tmp_path / "nats", config_file=conf).start()
    try:
        seed_file = tmp_path / "agent.nk"
        seed_file.write_bytes(seed + b"\n")
        agent = await start_agent(
            **{"nats.urls": [server.url], "nats.nkey_seed_file": str(seed_file)}
        )
        nc = await nats.connect(server.url, nkeys_seed=str(seed_file))
        try:
            reply = await nc.request(f"virt.{agent.host}.cmd.ping", b"{}", timeout=10)
            assert msgspec.json.decode(reply.data)["ok"] is True
        finally:
            await nc.close()
        args = ["--libvirt-uri", "test:///default", "--nats-url", server.url,
                "--state-dir", str(tmp_path / "st"), "--http-addr", ""]  # fmt: skip
        assert check(*args, VIRT_AGENT_NATS_CONNECT_TIMEOUT_S="2")[0] == 5, "no key: refused"
        code, out = check(*args, VIRT_AGENT_NATS_NKEY_SEED_FILE=str(seed_file))
        assert code == 0, out
        assert seed.decode() not in out
    finally:
        server.stop()


# Decentralized (JWT) authentication: the test is its own operator. It mints an operator, a
# system account, a fleet account with JetStream and users whose permissions are the example
# configuration's, as nsc would, and runs nats-server in operator mode with those accounts.


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key(prefix: int) -> tuple[bytes, Any]:
    import nkeys  # noqa: PLC0415

    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(seed)


def mint(signer: Any, subject: Any, name: str, nats_claims: dict[str, Any]) -> str:
    """A JWT as the nats-io/jwt library encodes it: ed25519-nkey signature, jti the claims' hash."""
    claims = {"jti": "", "iat": int(time.time()), "iss": signer.public_key.decode(),
              "name": name, "sub": subject.public_key.decode(),
              "nats": {**nats_claims, "version": 2}}  # fmt: skip
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


def example_permissions(role: str) -> dict[str, Any]:
    """A role's permissions from config/nats-server.conf.example, as user JWT claims."""
    text = "\n".join(line.split("#")[0] for line in SECURED_CONF.read_text().splitlines())
    block = re.search(rf"{role} = {{(.*?)\n  }}", text, re.S)
    assert block, role

    def subjects(section: str, kind: str) -> list[str]:
        part = re.search(rf"{section}: {{(.*?)}}", block[1], re.S)
        found = re.search(rf"{kind}: \[(.*?)\]", part[1], re.S) if part else None
        return re.findall(r'"([^"]+)"', found[1]) if found else []

    claims: dict[str, Any] = {
        "pub": {"allow": subjects("publish", "allow"), "deny": subjects("publish", "deny")},
        "sub": {"allow": subjects("subscribe", "allow")},
    }
    if "allow_responses: true" in block[1]:
        claims["resp"] = {"max": 1, "ttl": 0}
    return claims


def creds(user_jwt: str, seed: bytes) -> str:
    return (f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n")  # fmt: skip


@pytest.fixture
def operator_mode(tmp_path: Path) -> Iterator[tuple[NatsServer, dict[str, Path]]]:
    """nats-server trusting an operator of the test's own; creds files for hv01 and the
    controller (the example's permissions), and one for hv01 signed by an untrusted account."""
    import nkeys  # noqa: PLC0415

    _, operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    _, system = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    _, fleet = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    _, stranger = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
              "wildcards": True, "conn": -1, "leaf": -1}  # fmt: skip
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    sys_pub, fleet_pub = system.public_key.decode(), fleet.public_key.decode()
    conf = tmp_path / "operator.conf"
    conf.write_text(
        f'operator: "{mint(operator, operator, "test", {"type": "operator", "system_account": sys_pub})}"\n'
        f'system_account: "{sys_pub}"\nresolver: MEMORY\nresolver_preload: {{\n'
        f'  {sys_pub}: "{mint(operator, system, "SYS", {"type": "account", "limits": limits})}"\n'
        f'  {fleet_pub}: "{mint(operator, fleet, "FLEET", {"type": "account", "limits": limits | jetstream})}"\n}}\n'
    )  # fmt: skip
    files: dict[str, Path] = {}
    for name, role, account in (("hv01", "HOST_HV01", fleet), ("controller", "CONTROLLER", fleet),
                                ("untrusted", "HOST_HV01", stranger)):  # fmt: skip
        seed, user = new_key(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "subs": -1, "data": -1, "payload": -1} | example_permissions(role)
        files[name] = tmp_path / f"{name}.creds"
        files[name].write_text(creds(mint(account, user, name, claims), seed))
        files[name].chmod(0o600)
        files[f"{name}.seed"] = Path(seed.decode())
    server = NatsServer(tmp_path / "nats", config_file=conf).start()
    yield server, files
    server.stop()


async def test_creds_file_authentication_with_the_examples_permissions(
    operator_mode: tuple[NatsServer, dict[str, Path]],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    tmp_path: Path,
) -> None:
    """A creds file (user JWT + nkey seed) carrying hv01's permissions from the example: the
    agent works under it, it cannot speak for hv02, an untrusted signer is refused, and the
    seed appears nowhere in check-config's output."""
    server, files = operator_mode
    agent = await start_agent(
        **{"host_id": "hv01", "nats.urls": [server.url], "nats.creds_file": str(files["hv01"])}
    )
    controller = await nats.connect(server.url, user_credentials=str(files["controller"]),
                                    inbox_prefix="_INBOX_controller")  # fmt: skip
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    hv01 = await nats.connect(server.url, user_credentials=str(files["hv01"]), error_cb=on_error,
                              inbox_prefix="_INBOX_hv01")  # fmt: skip
    try:
        reply = await controller.request("virt.hv01.cmd.ping", b"{}", timeout=10)
        assert msgspec.json.decode(reply.data)["ok"] is True
        kv = await controller.jetstream().key_value("virt_hosts")
        assert (await kv.get("hv01")).value is not None
        # The agent's events are stored in the fleet account's JetStream.
        js = controller.jetstream()
        events = Collector()
        await controller.subscribe("virt.hv01.event.>", cb=events.on_msg)
        await subscribed(controller)
        done = await controller.request(
            "virt.hv01.cmd.domain.suspend", b'{"domain": "test"}', timeout=10
        )
        assert msgspec.json.decode(done.data)["ok"] is True
        event = await events.wait_for(lambda e: e["data"].get("event") == "suspended")
        subject = next(m[0] for m in events.messages if m[1] is event)
        stored = await js.get_last_msg("VIRT_EVENTS", subject)
        assert msgspec.json.decode(stored.data)["data"]["event"] == "suspended"
        # hv01's credentials cannot publish hv02's events.
        seen = Collector()
        await controller.subscribe("virt.hv02.>", cb=seen.on_msg)
        await subscribed(controller)
        await hv01.publish("virt.hv02.event.x.lifecycle", b'{"forged": true}')
        await subscribed(hv01)
        await asyncio.sleep(0.5)
        assert seen.messages == []
        assert any("permissions violation" in e.lower() for e in errors), errors
    finally:
        for nc in (controller, hv01):
            with contextlib.suppress(Exception):
                await nc.close()
    assert agent.agent.commands.handled == 2
    args = ["--libvirt-uri", "test:///default", "--nats-url", server.url, "--host-id", "hv01",
            "--state-dir", str(tmp_path / "st"), "--http-addr", ""]  # fmt: skip
    code, out = check(*args, VIRT_AGENT_NATS_CREDS_FILE=str(files["untrusted"]),
                      VIRT_AGENT_NATS_CONNECT_TIMEOUT_S="2")  # fmt: skip
    assert code == 5, out
    code, out = check(*args, VIRT_AGENT_NATS_CREDS_FILE=str(files["hv01"]))
    assert code == 0, out
    # The operator's CLI with the controller's creds and inbox prefix.
    controller_env = {"VIRT_AGENT_NATS_CREDS_FILE": str(files["controller"]),
                      "VIRT_AGENT_NATS_INBOX_PREFIX": "_INBOX_controller"}  # fmt: skip
    code, out = await asyncio.to_thread(cli, "call", "hv01", "ping", "--nats-url", server.url,
                                        **controller_env)  # fmt: skip
    assert code == 0, out
    code, out = await asyncio.to_thread(cli, "call", "hv01", "ping", "--nats-url", server.url,
                                        "--timeout", "3",
                                        VIRT_AGENT_NATS_CREDS_FILE=str(files["controller"]))  # fmt: skip
    assert code != 0, "the default inbox is not the controller's: no reply can come"
    assert str(files["hv01.seed"]) not in out
