"""The seeded adversarial campaign: from hv02's credentials (config/nats-server.conf.example), a
random sequence of everything a stolen host identity may do - permitted requests with crafted
reply subjects and headers, claimed message ids, registry writes, forged envelopes, stream and
consumer API calls, floods - while hv01 and hv03 run and the controller keeps acting on them.
The checker: neither agent stopped; every event each of them published is stored, once, as
theirs; their registry entries are their own; every request either took in got exactly one
reply, and every request hv02 sent to its own inbox was answered once.

A few fixed seeds, and one fresh seed per run (printed: `-k <seed>` replays it).
docs/operations.md, "Threat model"."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from nats.js.api import StreamConfig

from agent.embedded import NatsServer
from tests.support.agents import RunningAgent
from tests.support.bus import connect_as, registration, secured_url, stream_messages

pytestmark = [pytest.mark.timeout(600)]

FIXED = [1, 2]
FRESH = random.SystemRandom().randrange(1 << 31)
STEPS = 300
VICTIMS = ("hv01", "hv03")
UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # test:///default's domain


class Attacker:
    """hv02's connection and what it may try."""

    def __init__(self, nc: Any, rng: random.Random, boots: dict[str, str], seq: dict[str, int]):
        self.nc = nc
        self.rng = rng
        self.boots = boots
        self.seq = seq
        self.sent = 0  # requests to its own inbox
        self.replies: Counter[str] = Counter()
        self.tried: Counter[str] = Counter()

    async def on_reply(self, msg: Any) -> None:
        self.replies[msg.subject] += 1

    def victim(self) -> str:
        return self.rng.choice(VICTIMS)

    def reply_subject(self) -> str:
        v = self.victim()
        return self.rng.choice([
            f"$KV.virt_hosts.{v}", f"virt.{v}.event.{UUID}.lifecycle", f"virt.{v}.host.heartbeat",
            "_INBOX_controller.x.1", f"_INBOX_{v}.x", "_INBOX.x", "$JS.API.STREAM.DELETE.VIRT_EVENTS",
            f"virt.{v}.cmd.domain.destroy", "$JS.ACK.VIRT_EVENTS.x.1.1.1.1.1.1",
        ])  # fmt: skip

    async def step(self) -> None:
        kind = self.rng.choice(["reply", "own_request", "msg_id", "registry", "forged", "js_api",
                                "flood", "subject"])  # fmt: skip
        self.tried[kind] += 1
        nc, v = self.nc, self.victim()
        body = self.rng.choice([b'{"reservation_id": "ab12"}', b"{}", b"[" * 5000,
                                b'{"reservation_id": "' + b"x" * 5000 + b'"}'])  # fmt: skip
        if kind == "reply":
            await nc.publish(
                f"virt.{v}.cmd.failover.release.hv02", body, reply=self.reply_subject()
            )
        elif kind == "own_request":
            self.sent += 1
            await nc.publish(f"virt.{v}.cmd.failover.release.hv02", body,
                             reply=f"_INBOX_hv02.adv.{self.sent}")  # fmt: skip
        elif kind == "flood":
            for _ in range(self.rng.randrange(50, 400)):
                self.sent += 1
                await nc.publish(f"virt.{v}.cmd.failover.release.hv02", body,
                                 reply=f"_INBOX_hv02.adv.{self.sent}")  # fmt: skip
        elif kind == "msg_id":
            start = self.seq[v] + 1
            for n in range(start, start + self.rng.randrange(1, 50)):
                await nc.publish("virt.hv02.event.x.lifecycle", b"{}",
                                 headers={"Nats-Msg-Id": f"{v}:{self.boots[v]}:{n}"})  # fmt: skip
        elif kind == "registry":
            headers = self.rng.choice([None, {"Nats-Rollup": "all"}, {"Nats-Rollup": "sub"},
                                       {"KV-Operation": "PURGE", "Nats-Rollup": "sub"},
                                       {"KV-Operation": "DEL"}])  # fmt: skip
            value = self.rng.choice([b"garbage", b'{"host": "' + v.encode() + b'"}', b"{}"])
            await nc.publish("$KV.virt_hosts.hv02", value, headers=headers)
        elif kind == "forged":
            ev = {"specversion": "1.0", "id": f"{v}:{self.boots[v]}:{self.seq[v] + 1}",
                  "source": f"/virt/{v}", "type": "virt.domain.lifecycle", "subject": UUID,
                  "time": "2026-12-04T00:00:00Z", "sequence": self.seq[v] + 1,
                  "data": {"host": v, "event": "stopped", "detail": "forged"}}  # fmt: skip
            await nc.publish(f"virt.hv02.event.{UUID}.lifecycle", msgspec.json.encode(ev),
                             headers={"Nats-Msg-Id": ev["id"]})  # fmt: skip
        elif kind == "js_api":
            api = self.rng.choice([
                ("STREAM.CREATE.KV_virt_hosts", StreamConfig(
                    name="KV_virt_hosts", subjects=[f"_INBOX_{v}.>", f"virt.{v}.cmd.>"])),
                ("STREAM.CREATE.VIRT_EVENTS", StreamConfig(name="VIRT_EVENTS", subjects=["virt.>"])),
                ("STREAM.UPDATE.KV_virt_hosts", StreamConfig(name="KV_virt_hosts",
                                                             subjects=["$KV.virt_hosts.>"])),
                ("STREAM.DELETE.VIRT_EVENTS", None), ("STREAM.PURGE.KV_virt_hosts", None),
                ("CONSUMER.DELETE.VIRT_EVENTS.controller", None),
                ("CONSUMER.CREATE.VIRT_EVENTS", None),
            ])  # fmt: skip
            data = msgspec.json.encode(api[1].as_dict()) if api[1] is not None else b"{}"
            await nc.publish(f"$JS.API.{api[0]}", data, reply="_INBOX_hv02.api.1")
        elif kind == "subject":
            # Publishing on subjects it may not: each a permissions violation, nothing more.
            await nc.publish(self.rng.choice([f"virt.{v}.event.{UUID}.lifecycle",
                                              f"virt.{v}.cmd.ping", f"$KV.virt_hosts.{v}",
                                              "virt.hv02.cmd.ping"]), b"{}")  # fmt: skip


@pytest.mark.parametrize("seed", [*FIXED, FRESH])
async def test_a_seeded_adversary_is_contained(
    seed: int, secured: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    print(f"adversarial campaign seed {seed}")
    rng = random.Random(seed)
    agents = {
        h: await start_agent(
            **{
                "host_id": h,
                "nats.urls": [secured_url(secured, h)],
                "agent.heartbeat_interval_s": 0.5,
            }
        )
        for h in VICTIMS
    }
    for a in agents.values():
        await a.settled()
    controller, _ = await connect_as(secured, "controller")
    hv02, _ = await connect_as(secured, "hv02")
    try:
        boots = {h: a.agent.boot_id for h, a in agents.items()}
        seq = {h: a.agent.publisher._sequence for h, a in agents.items()}
        attacker = Attacker(hv02, rng, boots, seq)
        await hv02.subscribe("_INBOX_hv02.adv.*", cb=attacker.on_reply)

        async def legitimate() -> int:
            """The controller acts on the victims meanwhile: events, and pings answered."""
            pings = 0
            for i in range(STEPS // 4):
                v = VICTIMS[i % 2]
                for verb in ("domain.suspend", "domain.resume"):
                    msg = await controller.request(f"virt.{v}.cmd.{verb}",
                                                   b'{"domain": "test"}', timeout=60)  # fmt: skip
                    assert msgspec.json.decode(msg.data)["ok"] in (True, False)
                msg = await controller.request(f"virt.{v}.cmd.ping", b"{}", timeout=60)
                pings += 1
                await asyncio.sleep(0.02)
            return pings

        legit = asyncio.create_task(legitimate())
        for _ in range(STEPS):
            for h, a in agents.items():
                seq[h] = a.agent.publisher._sequence
            await attacker.step()
            await asyncio.sleep(rng.choice([0, 0, 0.01, 0.05]))
        await hv02.flush()
        await legit
        print(f"tried: {dict(attacker.tried)}")

        # Quiescence: every request taken in was answered; hv02's own got theirs.
        for _ in range(300):
            if all(a.agent.commands.taken == a.agent.commands.replied for a in agents.values()) \
                    and sum(attacker.replies.values()) >= attacker.sent:  # fmt: skip
                break
            await asyncio.sleep(0.1)
        for h, a in agents.items():
            assert not a.task.done(), f"{h}'s agent stopped"
            assert a.agent.commands.taken == a.agent.commands.replied, h
            await a.settled()
        assert sum(attacker.replies.values()) == attacker.sent
        assert all(n == 1 for n in attacker.replies.values())

        for h, a in agents.items():
            # Every event this process published is stored once, as its own.
            stored = await stream_messages(controller, "VIRT_EVENTS", f"virt.{h}.>")
            mine = [e for _, e, _ in stored if e["id"].startswith(f"{h}:{a.agent.boot_id}:")]
            seqs = [e["sequence"] for e in mine]
            assert sorted(seqs) == list(range(1, a.agent.publisher._sequence + 1)), h
            assert all(e["source"] == f"/virt/{h}" for _, e, _ in stored), h
            assert a.agent.publisher.published >= len(mine)
            # Its registration is its own.
            reg = await registration(controller, h)
            assert (reg.host, reg.boot_id) == (h, a.agent.boot_id)
            assert a.agent.readiness()["ready"] is True, a.agent.readiness()
    finally:
        for nc in (controller, hv02):
            with contextlib.suppress(Exception):
                await nc.close()
