"""A hostile host stays contained (docs/operations.md, "Threat model"): on a real nats-server
with config/nats-server.conf.example, one host's credentials - and the controller's and the
monitor's - cannot crash, silence, impersonate or run code on another host's agent through
reply subjects, message ids, the registry bucket, streams of their own, forged envelopes,
registry URIs, floods or malformed input."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig

from agent.bus import subscribed
from agent.embedded import NatsServer
from tests.support.agents import RunningAgent
from tests.support.bus import connect_as, registration, secured_url, stream_messages
from tests.support.cli import cli
from tests.support.examples import example

Start = Callable[..., Awaitable[RunningAgent]]


async def host_agent(
    start_agent: Start, secured: NatsServer, host: str, **more: Any
) -> RunningAgent:
    return await start_agent(**{"host_id": host, "nats.urls": [secured_url(secured, host)], **more})


def metric(agent: RunningAgent, name: str, **labels: str) -> float:
    value = agent.agent.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def readyz(agent: RunningAgent) -> dict[str, Any]:
    return agent.agent.readiness()


async def test_replies_go_only_to_the_callers_own_inbox(
    secured: NatsServer, start_agent: Start
) -> None:
    """Item 1: hv02 may call hv01's failover verbs, but a crafted reply subject - hv03's
    registry key, hv03's event subject, a command subject hv01 itself may not publish on - gets
    no reply: nothing is written there, hv03's agent keeps running, and the refusals are
    counted. The caller's own inbox still gets its answer."""
    hv01 = await host_agent(start_agent, secured, "hv01")
    hv03 = await host_agent(start_agent, secured, "hv03", **{"agent.heartbeat_interval_s": 0.3})
    hv02, _ = await connect_as(secured, "hv02")
    controller, _ = await connect_as(secured, "controller")
    try:
        seen: list[str] = []

        async def on_msg(msg: Any) -> None:
            seen.append(msg.subject)

        await controller.subscribe("virt.hv03.>", cb=on_msg)
        await controller.subscribe("$KV.virt_hosts.hv03", cb=on_msg)
        await subscribed(controller)
        body = b'{"reservation_id": "ab12"}'
        crafted = ["$KV.virt_hosts.hv03", "virt.hv03.event.6695eb01-f6a4-8304-79aa-97f2502e193f"
                   ".lifecycle", "virt.hv01.cmd.domain.destroy", "_INBOX_hv03.abc", "_INBOX.x"]  # fmt: skip
        for reply in crafted:
            await hv02.publish("virt.hv01.cmd.failover.release.hv02", body, reply=reply)
        await hv02.flush()
        # A controller verb answered only to the configured operator prefixes.
        await controller.publish("virt.hv01.cmd.ping", b"{}", reply="virt.hv03.host.forged")
        # The caller's own inbox is answered (and shows the others were seen first).
        out = await hv02.request("virt.hv01.cmd.failover.release.hv02", body, timeout=10)
        assert msgspec.json.decode(out.data)["ok"] is True
        assert (await controller.request("virt.hv01.cmd.ping", b"{}", timeout=10)).data
        await asyncio.sleep(1.5)  # several of hv03's heartbeats
        ignored = ("virt.hv03.host.heartbeat", "virt.hv03.host.batch_commit")
        assert [s for s in seen if not s.startswith(ignored)] == [
            s for s in seen if s == "$KV.virt_hosts.hv03"
        ]
        assert not hv03.task.done(), "hv03's agent ended"
        reg = await registration(controller, "hv03")
        assert reg.host == "hv03"
        events = await stream_messages(controller, "VIRT_EVENTS", "virt.hv03.event.>")
        assert events == []
        refused = metric(hv01, "virt_agent_commands_refused_total", reason="reply_subject")
        assert refused == len(crafted) + 1
        assert hv01.agent.commands.handled == 2  # the refused ones did not run
    finally:
        for nc in (hv02, controller):
            with contextlib.suppress(Exception):
                await nc.close()


async def test_a_malformed_registry_entry_never_ends_an_agent(
    secured: NatsServer, start_agent: Start
) -> None:
    """Item 1: a host writes garbage into its own registry key. Another agent resolving it
    answers not_found; its own agent, meeting it at its next heartbeat, keeps running and
    writes its registration again."""
    hv01 = await host_agent(start_agent, secured, "hv01", **{"agent.heartbeat_interval_s": 0.3})
    hv02_agent = await host_agent(start_agent, secured, "hv02")
    hv01_creds, _ = await connect_as(secured, "hv01")
    controller, _ = await connect_as(secured, "controller")
    try:
        for garbage in (b'{"ok": true, "result": {"released": false}}', b"\xff\x00", b"[]"):
            await hv01_creds.jetstream().publish("$KV.virt_hosts.hv01", garbage)
            with pytest.raises(Exception, match=r"not registered|malformed|not a valid"):
                await hv02_agent.agent.fleet.registry.resolve("hv01")  # type: ignore[union-attr]
            await asyncio.sleep(1.0)
            assert not hv01.task.done(), "hv01's agent ended"
            assert (await registration(controller, "hv01")).boot_id == hv01.agent.boot_id
        assert not hv02_agent.task.done()
    finally:
        for nc in (hv01_creds, controller):
            with contextlib.suppress(Exception):
                await nc.close()


async def test_message_ids_of_a_host_cannot_be_claimed_by_another(
    secured: NatsServer, start_agent: Start
) -> None:
    """Item 2: hv02 reads hv01's boot_id from virt_hosts and publishes on its own subject with
    the message ids hv01's next events would have had. hv01's events are all stored."""
    hv01 = await host_agent(start_agent, secured, "hv01")
    await hv01.settled()
    hv02, _ = await connect_as(secured, "hv02")
    controller, _ = await connect_as(secured, "controller")
    try:
        boot = (await registration(controller, "hv01")).boot_id
        js = hv02.jetstream()
        first = hv01.agent.publisher._sequence + 1
        acks = await asyncio.gather(*(
            js.publish("virt.hv02.event.x.lifecycle", b"{}",
                       headers={"Nats-Msg-Id": f"hv01:{boot}:{n}"})
            for n in range(first, first + 400)
        ))  # fmt: skip
        assert all(not a.duplicate for a in acks)
        for _ in range(10):
            for verb in ("domain.suspend", "domain.resume"):
                r = await controller.request(
                    f"virt.hv01.cmd.{verb}", b'{"domain": "test"}', timeout=10
                )
                assert msgspec.json.decode(r.data)["ok"] is True, r.data
        await hv01.settled()
        stored = await stream_messages(controller, "VIRT_EVENTS", "virt.hv01.event.>")
        lifecycle = [e for _, e, _ in stored if e["type"].endswith("lifecycle")]
        assert len(lifecycle) >= 20, len(lifecycle)
        # What hv01 counts as published was stored.
        every = await stream_messages(controller, "VIRT_EVENTS", "virt.hv01.>")
        assert hv01.agent.publisher.published <= len(every)
        assert metric(hv01, "virt_agent_publish_errors_total", kind="duplicate_first_send") == 0
        # The envelope's id is unchanged for consumers; the header's is not guessable.
        _, env, headers = stored[-1]
        assert env["id"].startswith(f"hv01:{hv01.agent.boot_id}:")
        assert headers["Nats-Msg-Id"].startswith(env["id"] + ":")
        assert len(headers["Nats-Msg-Id"]) >= len(env["id"]) + 17
    finally:
        for nc in (hv02, controller):
            with contextlib.suppress(Exception):
                await nc.close()


async def test_one_header_cannot_wipe_the_registry(secured: NatsServer, start_agent: Start) -> None:
    """Item 3: `Nats-Rollup: all` (or a purge) on a host's own key leaves every other host's
    registration where it is."""
    await host_agent(start_agent, secured, "hv01")
    await host_agent(start_agent, secured, "hv03")
    hv02, _ = await connect_as(secured, "hv02")
    controller, _ = await connect_as(secured, "controller")
    try:
        js = hv02.jetstream()
        for headers in ({"Nats-Rollup": "all"}, {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}):
            with contextlib.suppress(Exception):
                await js.publish("$KV.virt_hosts.hv02", b"{}", headers=headers)
        assert (await registration(controller, "hv01")).host == "hv01"
        assert (await registration(controller, "hv03")).host == "hv03"
        cfg = (await controller.jetstream().stream_info("KV_virt_hosts")).config
        assert cfg.allow_rollup_hdrs is False
        assert cfg.deny_purge is True
    finally:
        for nc in (hv02, controller):
            with contextlib.suppress(Exception):
                await nc.close()


async def test_a_rogue_fleet_stream_is_seen_and_not_trusted(
    secured: NatsServer, start_agent: Start, tmp_path: Any
) -> None:
    """Item 4: hv02 creates KV_virt_hosts first, capturing hv01's inbox and commands. hv01's
    agent reports it: /readyz false with the reason, the mismatch gauge, and it says which
    stream takes its command subjects."""
    hv02, _ = await connect_as(secured, "hv02")
    try:
        await hv02.jetstream().add_stream(StreamConfig(
            name="KV_virt_hosts",
            subjects=["$KV.virt_hosts.>", "_INBOX_hv01.>", "_INBOX_controller.>", "virt.hv01.cmd.>"],
        ))  # fmt: skip
    finally:
        await hv02.close()
    hv01 = await host_agent(start_agent, secured, "hv01")
    ready = readyz(hv01)
    assert ready["ready"] is False
    assert ready["checks"]["fleet_objects"] is False
    assert "KV_virt_hosts" in json.dumps(ready.get("fleet_objects", {}))
    assert metric(hv01, "virt_agent_stream_config_mismatch", stream="KV_virt_hosts") == 1
    assert metric(hv01, "virt_agent_stream_captures_own_subjects", stream="KV_virt_hosts") == 1
    code, out = await asyncio.to_thread(
        cli, "check-config", "--host-id", "hv01", "--nats-url", secured_url(secured, "hv01"),
        "--state-dir", str(tmp_path / "cc"), "--libvirt-uri", "test:///default",
        "--http-addr", "127.0.0.1:0", timeout=60,
    )  # fmt: skip
    assert code != 0, out
    assert "KV_virt_hosts is unsafe" in out, out


async def test_the_registry_bucket_is_made_again_while_running(
    nats_server: NatsServer, start_agent: Start, nc: Any
) -> None:
    """Item 4: virt_hosts deleted under a running agent is created again at its next
    heartbeat, with its registration, and counted."""
    agent = await start_agent(**{"agent.heartbeat_interval_s": 0.3})
    js = nc.jetstream()
    await js.delete_stream("KV_virt_hosts")
    for _ in range(50):
        await asyncio.sleep(0.2)
        with contextlib.suppress(Exception):
            if (await registration(nc, agent.host)).boot_id == agent.agent.boot_id:
                break
    assert (await registration(nc, agent.host)).boot_id == agent.agent.boot_id
    assert metric(agent, "virt_agent_streams_recreated_total", stream="KV_virt_hosts") == 1
    cfg = (await js.stream_info("KV_virt_hosts")).config
    assert cfg.allow_rollup_hdrs is False


async def test_a_push_consumer_cannot_smuggle_a_command(
    secured: NatsServer, start_agent: Start
) -> None:
    """Item 6: the controller may make consumers, but a push consumer delivering into hv01's
    command subjects calls nothing there (the subject's prefix and the reply subject are
    checked), and it cannot make or change a stream to capture a host's inbox or rewrite a
    registration."""
    hv01 = await host_agent(start_agent, secured, "hv01")
    controller, _ = await connect_as(secured, "controller")
    try:
        js = controller.jetstream(timeout=2)
        # A permissions violation: the request is dropped, no reply.
        with pytest.raises(NatsTimeoutError):
            await js.add_stream(StreamConfig(name="CAPTURE", subjects=["_INBOX_hv02.>"]))
        with pytest.raises(NatsTimeoutError):
            await js.update_stream(StreamConfig(name="KV_virt_hosts", subjects=["$KV.virt_hosts.>"],
                                                sources=[]))  # fmt: skip
        with pytest.raises(NatsTimeoutError):
            await js.purge_stream("KV_virt_hosts")
        with pytest.raises(NatsTimeoutError):
            await js.delete_stream("VIRT_EVENTS")
        # A push consumer on the events stream delivering into hv01's command subjects.
        handled = hv01.agent.commands.handled
        with contextlib.suppress(Exception):
            await js.add_consumer("VIRT_EVENTS", deliver_subject="virt.hv01.cmd.zzz", timeout=2)
        await asyncio.sleep(1.5)
        assert hv01.agent.commands.handled == handled
        assert not hv01.task.done()
    finally:
        await controller.close()


async def test_the_monitor_owns_only_its_own_consumers(
    secured: NatsServer, start_agent: Start
) -> None:
    """Item 6: the monitor reads the streams through consumers of its own; it can neither
    delete another consumer nor pull from someone else's durable."""
    await host_agent(start_agent, secured, "hv01")
    controller, _ = await connect_as(secured, "controller")
    monitor, _ = await connect_as(secured, "monitor")
    try:
        theirs = await controller.jetstream().pull_subscribe("virt.>", durable="controller",
                                                             stream="VIRT_EVENTS")  # fmt: skip
        mine = await monitor.jetstream().pull_subscribe("virt.>", durable="monitor",
                                                        stream="VIRT_EVENTS")  # fmt: skip
        assert len(await mine.fetch(1, timeout=10)) == 1
        mjs = monitor.jetstream(timeout=2)
        with pytest.raises(NatsTimeoutError):
            await mjs.delete_consumer("VIRT_EVENTS", "controller")
        stolen = await mjs.pull_subscribe_bind("controller", stream="VIRT_EVENTS")
        with pytest.raises(NatsTimeoutError):
            await stolen.fetch(1, timeout=2)
        # Nor take over its name through the ephemeral path.
        with pytest.raises(Exception, match=r"durable|ephemeral|permission|timeout"):
            await mjs.add_consumer("VIRT_EVENTS", durable_name="controller", deliver_subject="x.y")
        assert len(await theirs.fetch(1, timeout=10)) == 1
    finally:
        for nc in (controller, monitor):
            with contextlib.suppress(Exception):
                await nc.close()


async def test_a_forged_envelope_is_not_shown_as_anothers(
    secured: NatsServer, start_agent: Start
) -> None:
    """Item 5: hv02 publishes, on its own subject, an envelope naming hv01 (source, data.host)
    with the id hv01's next event gets. `events` and `history` (as the controller) and the
    documented consumer (as the monitor) show hv01's real event, never the forged one."""
    hv01 = await host_agent(start_agent, secured, "hv01")
    await hv01.settled()
    hv02, _ = await connect_as(secured, "hv02")
    controller, _ = await connect_as(secured, "controller")
    try:
        uuid = next(d["uuid"] for d in await call_json(controller, "hv01", "domain.list")
                    if d["name"] == "test")  # fmt: skip
        forged_id = f"hv01:{hv01.agent.boot_id}:{hv01.agent.publisher._sequence + 1}"
        forged = {"specversion": "1.0", "id": forged_id, "source": "/virt/hv01",
                  "type": "virt.domain.lifecycle", "subject": uuid, "time": "2026-12-04T00:00:00Z",
                  "sequence": hv01.agent.publisher._sequence + 1,
                  "data": {"host": "hv01", "domain": {"uuid": uuid, "name": "test"},
                           "event": "stopped", "detail": "forged"}}  # fmt: skip
        await hv02.jetstream().publish(
            f"virt.hv02.event.{uuid}.lifecycle", msgspec.json.encode(forged)
        )
        await call_json(controller, "hv01", "domain.suspend", {"domain": "test"})
        await call_json(controller, "hv01", "domain.resume", {"domain": "test"})
        await hv01.settled()
        total = (await controller.jetstream().stream_info("VIRT_EVENTS")).state.messages
    finally:
        for nc in (hv02, controller):
            with contextlib.suppress(Exception):
                await nc.close()
    url = ["--nats-url", secured_url(secured, "controller"), "--inbox-prefix", "_INBOX_controller"]
    for args in (["events", "--since", "1h", "--json", "--count", str(total - 1), "--reorder-s", "0"],
                 ["history", uuid, "--json"]):  # fmt: skip
        code, out = await asyncio.to_thread(cli, *args, *url, timeout=15)
        shown = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert code == 0, out
        assert not [e for e in shown if e["data"].get("detail") == "forged"], out
        assert [e["source"] for e in shown if e["id"] == forged_id] == ["/virt/hv01"], out
        assert "names another host" in out
    example = load_example()
    said = await asyncio.wait_for(example.consume(secured_url(secured, "monitor"), limit=total,
                                                  inbox="_INBOX_monitor"), 30)  # fmt: skip
    assert any("forged" in s and "virt.hv02" in s for s in said), said


async def call_json(nc: Any, host: str, verb: str, body: dict[str, Any] | None = None) -> Any:
    msg = await nc.request(f"virt.{host}.cmd.{verb}", msgspec.json.encode(body or {}), timeout=10)
    reply = msgspec.json.decode(msg.data)
    assert reply["ok"] is True, reply
    return reply["result"]


def load_example() -> Any:
    return example("ordered_consumer")


async def test_registry_uris_and_keys_are_not_trusted(
    secured: NatsServer, start_agent: Start, tmp_path: Any
) -> None:
    """Item 7: hv02 registers a libvirt URI that runs a program (`test+ext://...?command=`),
    and under its own key an entry naming hv03. hv01 refuses a migration to hv02 before
    opening anything - the program never runs - and lists neither entry as a host."""
    hv01 = await host_agent(start_agent, secured, "hv01")
    hv02, _ = await connect_as(secured, "hv02")
    controller, _ = await connect_as(secured, "controller")
    marker = tmp_path / "ran"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    try:
        own = await registration(controller, "hv01")
        for uri, mig in ((f"test+ext:///default?command={script}", ""),
                         (f"test+ssh://x/default?command={script}", ""),
                         ("test:///default", "exec:/bin/sh -c id")):  # fmt: skip
            evil = msgspec.structs.replace(own, host="hv02", libvirt_uri=uri, migration_uri=mig)
            await hv02.jetstream().publish("$KV.virt_hosts.hv02", msgspec.json.encode(evil))
            msg = await controller.request("virt.hv01.cmd.migrate", msgspec.json.encode(
                {"domain": "test", "destination": "hv02"}), timeout=20)  # fmt: skip
            reply = msgspec.json.decode(msg.data)
            assert reply["ok"] is False, reply
            assert reply["error"]["code"] == "not_found", reply
            assert "peer_" in reply["error"]["message"], reply
            assert not marker.exists()
        impostor = msgspec.structs.replace(own, host="hv03")
        await hv02.jetstream().publish("$KV.virt_hosts.hv02", msgspec.json.encode(impostor))
        hosts = await hv01.agent.fleet.registry.hosts()  # type: ignore[union-attr]
        assert [r.host for r in hosts] == ["hv01"]
        code, out = await asyncio.to_thread(cli, "hosts", "--json", "--nats-url",
                                            secured_url(secured, "controller"), "--inbox-prefix",
                                            "_INBOX_controller")  # fmt: skip
        assert code == 0, out
        assert "names another host ('hv03')" in out
        assert [r["host"] for r in json.loads(out[out.index("\n[") :])] == ["hv01"], out
    finally:
        for nc in (hv02, controller):
            with contextlib.suppress(Exception):
                await nc.close()


async def test_every_request_is_answered_under_a_flood(
    secured: NatsServer, start_agent: Start
) -> None:
    """Item 8: 2,000 concurrent domain.get from the controller are each answered once, and
    10,000 failover.release from hv02 do not keep the controller's pings from their answers:
    a request waiting too long behind one caller is answered `unavailable` (busy), counted."""
    hv01 = await host_agent(start_agent, secured, "hv01")
    controller, _ = await connect_as(secured, "controller")
    hv02, _ = await connect_as(secured, "hv02")
    try:
        gets = await asyncio.gather(*(
            controller.request("virt.hv01.cmd.domain.get", b'{"domain": "test"}', timeout=60)
            for _ in range(2000)
        ))  # fmt: skip
        codes = [msgspec.json.decode(m.data) for m in gets]
        assert all(r["ok"] or r["error"]["code"] == "unavailable" for r in codes)
        assert sum(r["ok"] for r in codes) >= 64

        answered: list[bytes] = []

        async def on_reply(msg: Any) -> None:
            answered.append(msg.data)

        await hv02.subscribe("_INBOX_hv02.flood.*", cb=on_reply)
        await subscribed(hv02)
        body = b'{"reservation_id": "ab12"}'
        pings = []
        for i in range(10_000):
            await hv02.publish("virt.hv01.cmd.failover.release.hv02", body,
                               reply=f"_INBOX_hv02.flood.{i}")  # fmt: skip
            if i % 1000 == 500:
                pings.append(asyncio.create_task(
                    controller.request("virt.hv01.cmd.ping", b"{}", timeout=60)))  # fmt: skip
        pongs = [msgspec.json.decode(m.data) for m in await asyncio.gather(*pings)]
        assert all(p["ok"] or p["error"]["code"] == "unavailable" for p in pongs), pongs
        assert sum(p["ok"] for p in pongs) >= len(pongs) // 2, pongs
        for _ in range(300):
            if len(answered) >= 10_000:
                break
            await asyncio.sleep(0.1)
        assert len(answered) == 10_000
        busy = metric(hv01, "virt_agent_commands_refused_total", reason="busy")
        assert busy == sum(b'"unavailable"' in a for a in answered) + sum(
            not r["ok"] for r in codes + pongs
        )
        assert metric(hv01, "virt_agent_slow_consumer_drops_total") == 0
    finally:
        for nc in (hv02, controller):
            with contextlib.suppress(Exception):
                await nc.close()


def test_every_identifier_of_every_verb_is_bounded() -> None:
    """Item 9: no string, list or map in any verb's request is unbounded."""
    import msgspec.inspect as mi  # noqa: PLC0415

    from handlers import all_verbs  # noqa: PLC0415

    def walk(t: Any, path: str, out: list[str]) -> None:
        if isinstance(t, mi.StrType) and t.max_length is None and t.pattern is None:
            out.append(path)
        elif isinstance(t, mi.UnionType):
            for x in t.types:
                walk(x, path, out)
        elif isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
            if t.max_length is None:
                out.append(path + "[]")
            walk(t.item_type, path + "[]", out)
        elif isinstance(t, mi.DictType):
            if t.max_length is None:
                out.append(path + "{}")
            walk(t.key_type, path + "{key}", out)
            walk(t.value_type, path + "{value}", out)
        elif isinstance(t, mi.StructType):
            for f in t.fields:
                walk(f.type, f"{path}.{f.name}", out)

    unbounded: list[str] = []
    for name, verb in all_verbs().items():
        walk(mi.type_info(verb.request), name, unbounded)
    assert unbounded == []


async def test_long_request_ids_cost_nothing(secured: NatsServer, start_agent: Start) -> None:
    """Item 9: 500 pings with 60 KB request ids are refused, the journal stays as it was, and
    its disk use is a metric."""
    hv01 = await host_agent(start_agent, secured, "hv01")
    controller, _ = await connect_as(secured, "controller")
    try:
        before = metric(hv01, "virt_agent_journal_bytes")
        assert before > 0
        big = msgspec.json.encode({"request_id": "x" * 60_000})
        replies = await asyncio.gather(*(
            controller.request("virt.hv01.cmd.ping", big, timeout=30) for _ in range(500)
        ))  # fmt: skip
        codes = {msgspec.json.decode(m.data)["error"]["code"] for m in replies}
        assert codes == {"invalid_request"}
        assert metric(hv01, "virt_agent_journal_bytes") < before + 1_000_000
    finally:
        await controller.close()


async def test_bad_input_is_a_structured_error(secured: NatsServer, start_agent: Start) -> None:
    """Item 10: JSON nested 30,000 deep and a NUL in a domain name are `invalid_request`,
    never `internal`; migrate on a driver without migrateGetMaxDowntime is a structured error (the test driver cannot migrate)."""
    hv01 = await host_agent(start_agent, secured, "hv01")
    await host_agent(start_agent, secured, "hv02")
    controller, _ = await connect_as(secured, "controller")
    try:
        deep = b'{"domain": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
        for verb, raw in (("domain.get", deep), ("domain.get", b'{"domain": "te\\u0000st"}'),
                          ("domain.suspend", b'{"domain": "a\\nb"}')):  # fmt: skip
            reply = msgspec.json.decode((await controller.request(
                f"virt.hv01.cmd.{verb}", raw, timeout=10)).data)  # fmt: skip
            assert reply["error"]["code"] == "invalid_request", reply
        reply = msgspec.json.decode((await controller.request("virt.hv01.cmd.migrate",
            b'{"domain": "test", "destination": "hv02", "max_downtime_ms": 100}', timeout=30)).data)  # fmt: skip
        assert reply["ok"] is True, reply  # a long operation: accepted, then it fails
        op = reply["result"]["operation_id"]
        for _ in range(100):
            got = msgspec.json.decode((await controller.request("virt.hv01.cmd.operation.get",
                msgspec.json.encode({"operation_id": op}), timeout=10)).data)["result"]  # fmt: skip
            if got["state"] not in ("pending", "running"):
                break
            await asyncio.sleep(0.1)
        assert got["state"] == "failed", got
        assert got["error"]["code"] in ("unsupported", "libvirt_error"), got
        assert metric(hv01, "virt_agent_commands_total", verb="domain.get", outcome="error") == 2
    finally:
        await controller.close()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["events", "--since", "99999999999h"], "a duration"),
        (["events", "--host", "hv01.>"], "not a host id"),
        (["events", "--reorder-s", "nan"], "seconds from 0"),
        (["events", "--count", "-1"], "at least 1"),
        (["call", "hv01.*", "ping"], "not a host id"),
    ],
)
def test_bad_command_lines_are_refused_at_once(args: list[str], says: str) -> None:
    """Item 10: the CLI refuses these with exit status 2 and a reason, at once."""
    code, out = cli(*args, "--nats-url", "nats://127.0.0.1:1", timeout=20)
    assert code == 2, out
    assert says in out
    assert "Traceback" not in out


def test_bad_settings_are_refused(tmp_path: Any) -> None:
    """Item 10: a config file that is not UTF-8, a misspelt verb in a deny list, an inbox
    prefix with a wildcard: exit status 2, naming the setting."""
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'host_id = "h\xff"\n')
    for args, says in (
        (["--config", str(bad)], "unreadable"),
        (["--config", str(tmp_path / "deny.toml")], "commands.denied_verbs"),
        (["--config", str(tmp_path / "inbox.toml")], "nats.inbox_prefix"),
    ):
        (tmp_path / "deny.toml").write_text('[commands]\ndenied_verbs = ["domain.destroyy"]\n')
        (tmp_path / "inbox.toml").write_text('[nats]\ninbox_prefix = "_INBOX.>"\n')
        code, out = cli("check-config", *args, timeout=30)
        assert code == 2, out
        assert says in out, out
        assert "Traceback" not in out


async def test_a_request_id_is_one_request_whatever_the_verb(
    secured: NatsServer, start_agent: Start
) -> None:
    """Item 11: suspend A, then resume A and destroy A with the same request_id: the later
    two are `conflict`, and the domain stays paused."""
    await host_agent(start_agent, secured, "hv01")
    controller, _ = await connect_as(secured, "controller")
    try:
        out = []
        for verb in ("domain.suspend", "domain.resume", "domain.destroy", "domain.suspend"):
            msg = await controller.request(f"virt.hv01.cmd.{verb}", msgspec.json.encode(
                {"domain": "test", "request_id": "A"}), timeout=10)  # fmt: skip
            out.append(msgspec.json.decode(msg.data))
        assert out[0]["ok"] is True
        assert [r["error"]["code"] for r in out[1:3]] == ["conflict", "conflict"]
        assert out[3] == out[0]  # the same request: its first outcome
        got = await call_json(controller, "hv01", "domain.get", {"domain": "test"})
        assert got["state"] == "paused", got
    finally:
        await controller.close()


async def test_a_kill_between_acting_and_recording_never_acts_twice(
    test_daemon: Any, nats_server: NatsServer, agent_process: Callable[..., Any], tmp_path: Any
) -> None:
    """Item 12: the agent dies (like kill -9) after libvirt suspended the domain and before
    the outcome was written. The repeated request is `conflict` with the outcome unknown -
    libvirt is not asked again (the domain, resumed meanwhile, stays running)."""
    import libvirt  # noqa: PLC0415

    from lab.agents import answering  # noqa: PLC0415
    from tests.support.bus import call  # noqa: PLC0415
    from tests.support.domains import define  # noqa: PLC0415

    host = "idem"
    args = ("--libvirt-uri", test_daemon.test_uri, "--nats-url", nats_server.url,
            "--host-id", host, "--http-addr", "", "--state-dir", str(tmp_path / "st"))  # fmt: skip
    first = agent_process(*args, crash_at="command.acted")
    nc = await nats.connect(nats_server.url)
    conn = await asyncio.to_thread(libvirt.open, test_daemon.test_uri)
    dom = await asyncio.to_thread(define, conn)
    try:
        await asyncio.to_thread(dom.create)
        await answering(nc, [host])
        payload = {"domain": dom.name(), "request_id": "suspend-1"}
        with pytest.raises(NatsTimeoutError):
            await call(nc, host, "domain.suspend", payload, timeout=5)
        assert await asyncio.to_thread(first.wait, 10) == 86
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED, "it acted before dying"
        await asyncio.to_thread(dom.resume)
        agent_process(*args)
        await answering(nc, [host])
        again = await call(nc, host, "domain.suspend", payload)
        assert again["ok"] is False, again
        assert again["error"]["code"] == "conflict", again
        assert again["error"]["details"]["outcome"] == "unknown", again
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, "not acted on twice"
    finally:
        await nc.close()
        await asyncio.to_thread(dom.destroy)
        await asyncio.to_thread(dom.undefine)
        conn.close()


async def test_no_identity_no_connection(secured: NatsServer) -> None:
    """Unauthenticated: the example has no anonymous user; a wrong password is refused too
    (the protocol spoken directly: nats-py leaves the refused socket open)."""
    for creds in ({}, {"user": "hv01", "pass": "wrong"}):
        reader, writer = await asyncio.open_connection("127.0.0.1", secured.port)
        try:
            assert (await reader.readline()).startswith(b"INFO ")
            writer.write(
                b"CONNECT " + msgspec.json.encode({"verbose": False, **creds}) + b"\r\nPING\r\n"
            )
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), 10)
            assert b"Authorization Violation" in answer, answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def test_a_refused_reply_subject_is_logged_with_who_asked(
    secured: NatsServer, start_agent: Start
) -> None:
    """The refusal is logged loudly (a warning naming the verb, the caller and the reply
    subject), and a served command's log lines carry its verb, caller and request_id."""
    import structlog  # noqa: PLC0415
    from structlog.testing import capture_logs  # noqa: PLC0415

    await host_agent(start_agent, secured, "hv01", **{"log.level": "debug"})
    hv02, _ = await connect_as(secured, "hv02")
    try:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            await hv02.publish("virt.hv01.cmd.failover.release.hv02", b'{"reservation_id": "ab12"}',
                               reply="$KV.virt_hosts.hv03")  # fmt: skip
            body = b'{"reservation_id": "ab12", "request_id": "r-1"}'
            await hv02.request("virt.hv01.cmd.failover.release.hv02", body, timeout=10)
        refused = [e for e in logs if e["event"].startswith("request refused")]
        assert refused, logs
        assert refused[0]["log_level"] == "warning"
        assert (refused[0]["verb"], refused[0]["caller"]) == ("failover.release", "hv02")
        assert refused[0]["reply"] == "$KV.virt_hosts.hv03"
        served = [e for e in logs if e["event"] == "command"]
        assert served, logs
        assert (served[0]["verb"], served[0]["caller"], served[0]["request_id"]) == (
            "failover.release", "hv02", "r-1")  # fmt: skip
    finally:
        await hv02.close()
