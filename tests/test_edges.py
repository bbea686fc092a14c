"""Lose nothing at the edges: what a fleet meets in its first months, on a real nats-server.

Here the server's `max_payload` is small (16 KiB), so a message JetStream can never accept
and a resync larger than one message are cheap to make."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import nats
import nats.js.errors
import pytest

from agent.embedded import NatsServer
from agent.spool import Record, Spool
from lab.agents import agent_env
from lab.daemon import LibvirtDaemon, free_port
from tests.campaign import cluster_nodes
from tests.support import ROOT
from tests.support.agents import AgentProcess, RunningAgent
from tests.support.bus import call, eventually, stream_messages
from tests.support.domains import Flipper
from tests.support.examples import example as load

MAX_PAYLOAD = 16 * 1024


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server whose max_payload is 16 KiB."""
    conf = tmp_path / "small.conf"
    conf.write_text(f"max_payload: {MAX_PAYLOAD}\n")
    server = NatsServer(tmp_path / "nats", config_file=conf).start()
    yield server
    server.stop()


def previous_process_spool(state: Path, host: str, big_at: int, n: int) -> list[str]:
    """A spool left by an earlier process of `host`: n small records, the one at `big_at`
    larger than the server's max_payload. Returns the ids, in order."""
    spool = Spool(state / "spool", max_bytes=1 << 30)
    ids = []
    for seq in range(1, n + 1):
        msg_id = f"{host}:0ldb00t:{seq}"
        body = {"id": msg_id, "sequence": seq, "pad": "x" * (40_000 if seq == big_at else 10)}
        spool.append(Record(f"virt.{host}.event.{uuid.uuid4()}.lifecycle", msg_id,
                            1_700_000_000_000_000_000 + seq, seq,
                            json.dumps(body).encode()))  # fmt: skip
        ids.append(msg_id)
    spool.close()
    return ids


async def test_a_message_jetstream_can_never_accept_is_set_aside_and_the_rest_flows(
    nats_server: NatsServer,
    start_agent: Callable[..., Awaitable[RunningAgent]],
    tmp_path: Path,
) -> None:
    """A spooled record over the server's max_payload: after a bounded number of attempts it
    goes to the dead-letter file, a host event names it, and everything else in its segment
    is stored once; the segment is deleted, and a flush does not wait on it."""
    host = "dl1"
    state = tmp_path / "dlstate"
    ids = previous_process_spool(state, host, big_at=5, n=12)
    agent = await start_agent(**{"host_id": host, "state_dir": str(state),
                                 "publisher.ack_timeout_s": 1.0})  # fmt: skip
    await agent.settled(timeout=60)
    nc = await nats.connect(nats_server.url)
    try:
        stored = await stream_messages(nc, "VIRT_EVENTS", f"virt.{host}.>")
    finally:
        await nc.close()
    stored_ids = [ev.get("id") for _, ev, _ in stored if ev.get("id", "").startswith(host)]
    kept = [i for i in ids if i != ids[4]]
    assert sorted(i for i in stored_ids if "0ldb00t" in i) == sorted(kept)
    dead = [json.loads(line) for line in (state / "dead-letters.jsonl").read_text().splitlines()]
    assert [d["msg_id"] for d in dead] == [ids[4]]
    assert dead[0]["reason"]
    assert len(dead[0]["payload"]) > MAX_PAYLOAD
    named = [ev["data"] for s, ev, _ in stored if s == f"virt.{host}.host.dead_letter"]
    assert [d["msg_id"] for d in named] == [ids[4]]
    assert list((state / "spool").glob("*.seg")) == []
    assert agent.agent.metrics.registry.get_sample_value("virt_agent_dead_letters_total") == 1


def many_domains_xml(path: Path, n: int) -> str:
    doms = "".join(
        f"<domain type='test'><name>vm-{i:04d}-{'n' * 40}</name><uuid>{uuid.uuid4()}</uuid>"
        "<memory>65536</memory><os><type>hvm</type></os></domain>"
        for i in range(n)
    )
    path.write_text(f"<node>{doms}</node>")
    return f"test://{path}"


async def test_a_resync_larger_than_the_servers_max_payload_is_published_in_parts(
    nats_server: NatsServer,
    start_agent: Callable[..., Awaitable[RunningAgent]],
    tmp_path: Path,
) -> None:
    """300 domains make a snapshot of about 45 KiB: it goes out in parts, each within the
    server's max_payload, that together name every domain once."""
    uri = many_domains_xml(tmp_path / "node.xml", 300)
    agent = await start_agent(**{"libvirt.uri": uri})
    await agent.settled(timeout=60)
    nc = await nats.connect(nats_server.url)
    try:
        stored = await stream_messages(nc, "VIRT_EVENTS", f"virt.{agent.host}.host.resync")
        sizes = []
        for subject, ev, _ in stored:
            assert subject.endswith(".resync")
            sizes.append(len(msgspec.json.encode(ev)))
    finally:
        await nc.close()
    parts = [ev["data"] for _, ev, _ in stored]
    assert len(parts) > 1, "one message cannot carry it"
    assert [p["part"] for p in parts] == list(range(1, len(parts) + 1))
    assert {p["parts"] for p in parts} == {len(parts)}
    assert max(sizes) <= MAX_PAYLOAD
    names = [d["name"] for p in parts for d in p["domains"]]
    assert len(names) == 300
    assert len(set(names)) == 300


async def flip(nc: nats.NATS, host: str, times: int) -> None:
    """Suspend and resume the test driver's domain `test`: two lifecycle events per time."""
    for _ in range(times):
        for verb in ("domain.suspend", "domain.resume"):
            reply = await call(nc, host, verb, {"domain": "test"})
            assert reply["ok"] is True, reply


async def lifecycle_events(nc: nats.NATS, host: str) -> list[str]:
    """The host's stored domain events in `sequence` order (stream order may differ after a
    re-send), each once."""
    stored = await stream_messages(nc, "VIRT_EVENTS", f"virt.{host}.event.>")
    ids = [ev["id"] for _, ev, _ in stored]
    assert len(ids) == len(set(ids)), "stored twice"
    return [ev["data"]["event"] for _, ev, _ in sorted(stored, key=lambda m: m[1]["sequence"])]


async def test_a_deleted_stream_is_recreated_loudly_and_nothing_is_lost(
    nats_server: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """An operator deletes VIRT_EVENTS (or NATS comes back with an empty store): the agent
    sees JetStream's no-responders answers, creates the stream again, says so, and every
    event from then on is stored."""
    agent = await start_agent(**{"publisher.ack_timeout_s": 1.0})
    nc = await nats.connect(nats_server.url)
    try:
        await agent.settled()
        await nc.jetstream().delete_stream("VIRT_EVENTS")
        await flip(nc, agent.host, 5)
        await agent.settled(timeout=30)
        assert await lifecycle_events(nc, agent.host) == ["suspended", "resumed"] * 5
        metric = agent.agent.metrics.registry.get_sample_value
        assert metric("virt_agent_streams_recreated_total", {"stream": "VIRT_EVENTS"}) == 1
        assert agent.agent.readiness()["checks"]["streams"] is True
    finally:
        await nc.close()


async def test_an_agent_never_shrinks_or_rewrites_the_fleets_streams(
    nats_server: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """The streams are fleet objects: an agent whose limits drifted leaves them as they are
    (nothing stored is cut) and reports the difference."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        first = await start_agent()
        await first.settled()
        await flip(nc, first.host, 50)
        await first.settled()
        before = await js.stream_info("VIRT_EVENTS")
        drifted = await start_agent(**{"nats.events_max_bytes": 20_000,
                                       "nats.duplicate_window_s": 30})  # fmt: skip
        await drifted.settled()
        after = await js.stream_info("VIRT_EVENTS")
        assert after.config.max_bytes == before.config.max_bytes
        assert after.config.duplicate_window == before.config.duplicate_window
        assert after.state.messages >= before.state.messages
        metric = drifted.agent.metrics.registry.get_sample_value
        assert metric("virt_agent_stream_config_mismatch", {"stream": "VIRT_EVENTS"}) == 1
        assert metric("virt_agent_stream_config_mismatch", {"stream": "VIRT_OPS"}) == 1
        assert first.agent.metrics.registry.get_sample_value(
            "virt_agent_stream_config_mismatch", {"stream": "VIRT_EVENTS"}
        ) in (None, 0)
    finally:
        await nc.close()


async def test_operator_managed_streams_are_never_created_and_their_absence_is_not_ready(
    nats_server: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """nats.manage_streams false: the agent creates no stream; while the operator's are
    missing it is not ready and keeps what it has; once they exist, it goes on."""
    agent = await start_agent(**{"nats.manage_streams": False, "publisher.ack_timeout_s": 1.0})
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        assert [s.config.name for s in await js.streams_info()] == ["KV_virt_hosts"]
        assert agent.agent.readiness()["checks"]["streams"] is False
        await flip(nc, agent.host, 2)
        await js.add_stream(name="VIRT_EVENTS", subjects=["virt.*.event.>", "virt.*.host.>"])
        await js.add_stream(name="VIRT_OPS", subjects=["virt.*.op.>"])
        await agent.settled(timeout=30)
        assert await lifecycle_events(nc, agent.host) == ["suspended", "resumed"] * 2
        await eventually(lambda: agent.agent.readiness()["checks"]["streams"], 10, "streams ready")
    finally:
        await nc.close()


async def test_a_second_agent_on_the_same_state_directory_is_refused(
    nats_server: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]], tmp_path: Path
) -> None:
    """Two agents on one state directory would write the same spool segment and delete each
    other's unsent records: the second exits at once, with its own status, saying who holds
    the directory; the first goes on untouched."""
    state = tmp_path / "shared"
    first = await start_agent(state_dir=str(state))
    second = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent", "run", "--libvirt-uri", "test:///default",
         "--nats-url", nats_server.url, "--host-id", "other", "--state-dir", str(state),
         "--http-addr", "", "--log-format", "json"],
        cwd=ROOT, env=agent_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    out = second.stdout + second.stderr
    assert second.returncode == 3, out
    assert "state directory" in out
    assert f"pid {os.getpid()}" in out
    nc = await nats.connect(nats_server.url)
    try:
        assert (await call(nc, first.host, "ping"))["ok"] is True
    finally:
        await nc.close()


async def test_two_live_agents_with_one_host_id_both_say_so_until_one_stops(
    start_agent: Callable[..., Awaitable[RunningAgent]],
) -> None:
    """Same host_id on two machines (a cloned image): each sees the other overwrite its
    registration, says so (log, metric, readiness false), and is well again once alone."""
    fast = {"host_id": "twin", "agent.heartbeat_interval_s": 0.5}
    a = await start_agent(**fast)
    b = await start_agent(**fast)

    def unique(r: RunningAgent) -> bool:
        return bool(r.agent.readiness()["checks"]["unique_host_id"])

    await eventually(lambda: not unique(a) and not unique(b), 30, "both see their twin")
    for r in (a, b):
        assert r.agent.metrics.registry.get_sample_value("virt_agent_duplicate_host_id") == 1
    await b.stop()
    await eventually(lambda: unique(a), 30, "the survivor alone again")
    assert a.agent.metrics.registry.get_sample_value("virt_agent_duplicate_host_id") == 0


def metric(http: str, name: str) -> float | None:
    """A sample of the agent's /metrics (summed over labels); None if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))  # fmt: skip


@pytest.mark.daemon
async def test_a_host_that_boots_during_a_nats_outage_records_its_events_from_the_first(
    test_daemon: LibvirtDaemon, agent_process: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """NATS is unreachable when the agent starts: it connects to libvirt anyway and spools
    what happens; once NATS is there, every event is stored, the first included."""
    port = free_port()
    http = f"127.0.0.1:{free_port()}"
    host = "bootdark"
    agent_process("--libvirt-uri", test_daemon.test_uri, "--nats-url", f"nats://127.0.0.1:{port}",
                  "--host-id", host, "--http-addr", http, "--state-dir", str(tmp_path / "st"))  # fmt: skip

    async def until_metric(name: str, value: float, what: str) -> None:
        await eventually(lambda: (metric(http, name) or 0) >= value, 60, what)

    await until_metric("virt_agent_libvirt_connected", 1, "libvirt connected without NATS")
    flipper = await asyncio.to_thread(lambda: Flipper(test_daemon.test_uri).start())
    try:
        await eventually(lambda: flipper.count >= 200, 60, "200 flips")
    finally:
        await asyncio.to_thread(flipper.stop)
    await until_metric("virt_agent_spooled_total", flipper.count, "every flip spooled")
    server = NatsServer(tmp_path / "nats", port=port).start()
    try:
        uuid_ = flipper.dom.UUIDString()

        async def stored() -> list[str]:
            nc = await nats.connect(server.url)
            try:
                msgs = await stream_messages(nc, "VIRT_EVENTS", f"virt.{host}.event.{uuid_}.>")
            except nats.js.errors.NotFoundError:
                return []  # the agent has not made the stream yet
            finally:
                await nc.close()
            return [
                ev["data"]["event"] for _, ev, _ in sorted(msgs, key=lambda m: m[1]["sequence"])
            ]

        deadline = asyncio.get_running_loop().time() + 60
        while (events := await stored()).count("resumed") < flipper.count // 2:
            assert asyncio.get_running_loop().time() < deadline, events[-5:]
            await asyncio.sleep(0.5)
        flips = [e for e in events if e in ("suspended", "resumed")]
        assert flips == ["suspended", "resumed"] * (flipper.count // 2)
        assert events[:2] == ["defined", "started"]
    finally:
        server.stop()


async def test_a_silent_partition_makes_the_agent_not_ready_within_seconds(
    nats_server: NatsServer,
    test_daemon: LibvirtDaemon,
    start_agent: Callable[..., Awaitable[RunningAgent]],
) -> None:
    """nats-server frozen (SIGSTOP: no FIN, no RST - a partition as the agent sees it). With
    events to publish, /readyz turns false once the oldest unacknowledged publish is older
    than the ack timeout; with none, once NATS's pings go unanswered (default settings:
    seconds, not nats-py's two minutes). Both come back when the server does."""
    assert nats_server.proc is not None
    agent = await start_agent(**{"libvirt.uri": test_daemon.test_uri})
    await agent.settled()

    def ready() -> bool:
        return bool(agent.agent.readiness()["ready"])

    def check(name: str) -> bool:
        return bool(agent.agent.readiness()["checks"][name])

    t0 = time.monotonic()
    nats_server.proc.send_signal(signal.SIGSTOP)
    try:
        flipper = await asyncio.to_thread(lambda: Flipper(test_daemon.test_uri).start())
        try:
            await eventually(lambda: not check("publishing"), 15, "publishing check false")
        finally:
            await asyncio.to_thread(flipper.stop)
        assert time.monotonic() - t0 < 15
        await eventually(lambda: not check("nats"), 25, "nats check false (pings)")
        assert not ready()
    finally:
        nats_server.proc.send_signal(signal.SIGCONT)
    await eventually(ready, 60, "ready again")
    await agent.settled()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def embedded_agent(state: Path, http: str, log: Path, port: int = 0) -> subprocess.Popen[bytes]:
    """`virt-agent run --embedded` on `state`, its output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--embedded", "--state-dir", str(state),
             "--http-addr", http, "--host-id", "emb", "--log-format", "json"],
            cwd=ROOT, env=agent_env(VIRT_AGENT_NATS_EMBEDDED_PORT=str(port)),
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def piped_agent(nats_url: str, state: Path, http: str) -> subprocess.Popen[bytes]:
    """An agent whose stdout and stderr are a pipe to this process."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--libvirt-uri", "test:///default",
         "--nats-url", nats_url, "--host-id", "piped", "--state-dir", str(state),
         "--http-addr", http, "--log-format", "json"],
        cwd=ROOT, env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def server_pid(state: Path) -> int:
    return int((state / "nats" / "nats-server.pid").read_text().strip())


async def test_the_bundled_nats_server_dies_with_its_agent(tmp_path: Path) -> None:
    """`--embedded` and the agent SIGKILLed: its nats-server goes too (the next `make run`
    would otherwise find the port taken)."""
    state, http = tmp_path / "st", f"127.0.0.1:{free_port()}"
    agent = embedded_agent(state, http, tmp_path / "agent.log")
    try:
        await eventually(lambda: (metric(http, "virt_agent_nats_connected") or 0) == 1, 60,
                         "the embedded agent connected")  # fmt: skip
        pid = server_pid(state)
        assert alive(pid)
        agent.kill()
        agent.wait(10)
        await eventually(lambda: not alive(pid), 10, "the bundled nats-server gone")
    finally:
        agent.kill()
        agent.wait(10)


async def test_a_stale_bundled_server_of_the_state_directory_is_stopped_at_start(
    tmp_path: Path,
) -> None:
    """A nats-server left running on this state directory (its agent died before it could
    stop it): the next `--embedded` start stops it and runs, instead of failing on the port."""
    state, http = tmp_path / "st", f"127.0.0.1:{free_port()}"
    port = free_port()
    stale = NatsServer(state / "nats", port=port).start()
    try:
        assert stale.proc is not None
        agent = embedded_agent(state, http, tmp_path / "agent.log", port)
        try:
            await eventually(lambda: (metric(http, "virt_agent_nats_connected") or 0) == 1
                             or agent.poll() is not None, 60, "the agent up or gone")  # fmt: skip
            log = (tmp_path / "agent.log").read_text()
            assert agent.poll() is None, log
            assert "stale" in log
            assert stale.proc.poll() is not None, "the stale server was stopped"
            agent.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(agent.wait, 30) == 0
        finally:
            agent.kill()
            agent.wait(10)
    finally:
        stale.stop()


async def test_a_closed_log_pipe_does_not_stop_the_agent_before_its_orderly_shutdown(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The agent's stdout and stderr are a pipe whose reader went away: it runs on, and a
    SIGTERM still ends it in order (exit 0, agent_stopping published)."""
    http = f"127.0.0.1:{free_port()}"
    agent = piped_agent(nats_server.url, tmp_path / "st", http)
    try:
        assert agent.stdout is not None
        agent.stdout.close()  # the reader is gone: every write now fails with EPIPE
        await eventually(lambda: (metric(http, "virt_agent_nats_connected") or 0) == 1
                         or agent.poll() is not None, 60, "the agent up or gone")  # fmt: skip
        assert agent.poll() is None, f"the agent died: {agent.returncode}"
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.wait, 30) == 0
        nc = await nats.connect(nats_server.url)
        try:
            stored = await stream_messages(nc, "VIRT_EVENTS", "virt.piped.host.agent_stopping")
        finally:
            await nc.close()
        assert len(stored) == 1
    finally:
        agent.kill()
        agent.wait(10)


async def test_virt_agent_events_prints_each_event_once_in_sequence_order(
    nats_server: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """A live tail sees every publish attempt: after the stream vanished, the re-sent events
    come again, later than what followed them. `virt-agent events` prints each event once,
    in `sequence` order within its boot."""
    agent = await start_agent(**{"publisher.ack_timeout_s": 1.0})
    await agent.settled()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "events", "--nats-url", nats_server.url,
        "--host", agent.host, "--type", "lifecycle", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    nc = await nats.connect(nats_server.url)
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line.startswith(b"# listening on "), line
        await nc.jetstream().delete_stream("VIRT_EVENTS")
        await flip(nc, agent.host, 5)
        await agent.settled(timeout=30)
        await asyncio.sleep(3)  # the tail's reorder window, and then some
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await nc.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = [json.loads(ln) for ln in out.decode().splitlines()]
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), ids
    seqs = [e["sequence"] for e in events]
    assert seqs == sorted(seqs), seqs
    assert [e["data"]["event"] for e in events] == ["suspended", "resumed"] * 5


async def test_the_readmes_example_consumer_names_an_unexplained_gap_and_nothing_else(
    nats_server: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """docs/examples/ordered_consumer.py over a real stream: silent on a whole one; one stored
    event removed, it names exactly that sequence."""
    example = load("ordered_consumer")
    agent = await start_agent()
    nc = await nats.connect(nats_server.url)
    try:
        await flip(nc, agent.host, 5)
        await agent.settled()
        js = nc.jetstream()
        count = (await js.stream_info("VIRT_EVENTS")).state.messages
        assert await example.consume(nats_server.url, "whole", limit=count) == []
        last = await js.get_last_msg("VIRT_EVENTS", f"virt.{agent.host}.event.*.lifecycle")
        gone = json.loads(last.data)["sequence"]
        await js.delete_msg("VIRT_EVENTS", last.seq)
        await flip(nc, agent.host, 1)
        await agent.settled()
        count = (await js.stream_info("VIRT_EVENTS")).state.messages
        said = await example.consume(nats_server.url, "holed", limit=count)
        assert said == [f"{agent.host}:{agent.agent.boot_id}: not (yet) seen {gone}..{gone}"]
    finally:
        await nc.close()


async def test_a_subject_no_stream_takes_is_set_aside_and_the_rest_flows(
    nats_server: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]], tmp_path: Path
) -> None:
    """Operator-managed streams that do not take host events: after JetStream says no stream
    takes their subject, each is refused for good and set aside; domain events are stored."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="VIRT_EVENTS", subjects=["virt.*.event.>"])
        await js.add_stream(name="VIRT_OPS", subjects=["virt.*.op.>"])
        state = tmp_path / "unbound"
        agent = await start_agent(**{"nats.manage_streams": False, "state_dir": str(state),
                                     "publisher.ack_timeout_s": 1.0})  # fmt: skip
        await flip(nc, agent.host, 2)
        await agent.settled(timeout=60)
        assert await lifecycle_events(nc, agent.host) == ["suspended", "resumed"] * 2
        dead = [json.loads(x) for x in (state / "dead-letters.jsonl").read_text().splitlines()]
        assert {d["subject"].rsplit(".", 1)[1] for d in dead} >= {"agent_started", "resync"}
        assert all(d["reason"] == "no stream takes this subject" for d in dead)
    finally:
        await nc.close()


async def test_virt_agent_events_replays_history_and_follows_without_a_seam(
    nats_server: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """`--since` and `--last` replay VIRT_EVENTS, in sequence order, and exit once caught up;
    with `--follow` the live events come after the stored ones, none twice, none missing."""
    agent = await start_agent()
    nc = await nats.connect(nats_server.url)

    def run(*extra: str) -> list[str]:
        p = subprocess.run(
            [sys.executable, "-m", "agent", "events", "--nats-url", nats_server.url,
             "--host", agent.host, "--type", "lifecycle", "--json", *extra],
            cwd=ROOT, env=agent_env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        return [json.loads(line)["data"]["event"] for line in p.stdout.splitlines()]

    try:
        await flip(nc, agent.host, 3)
        await agent.settled()
        assert await asyncio.to_thread(run, "--since", "1h") == ["suspended", "resumed"] * 3
        assert await asyncio.to_thread(run, "--last", "3") == ["resumed", "suspended", "resumed"]
        assert await asyncio.to_thread(run, "--since", "2026-01-01T00:00Z", "--last", "1") == [
            "resumed"
        ]
        follow = asyncio.create_task(asyncio.to_thread(run, "--since", "1h", "--follow",
                                                       "--count", "10", "--reorder-s", "0.2"))  # fmt: skip
        await asyncio.sleep(2)
        await flip(nc, agent.host, 2)
        assert await asyncio.wait_for(follow, 60) == ["suspended", "resumed"] * 5
    finally:
        await nc.close()


async def test_virt_agent_history_shows_one_domains_timeline_across_hosts(
    nats_server: NatsServer, start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """Two hosts' agents see the same domain (one in-process test driver): `virt-agent
    history test` prints its events from both hosts, in time order, and nothing of others."""
    a = await start_agent()
    b = await start_agent()
    nc = await nats.connect(nats_server.url)
    try:
        await flip(nc, a.host, 2)
        for r in (a, b):
            await r.settled()
        p = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agent", "history", "test", "--nats-url", nats_server.url,
             "--json"],
            cwd=ROOT, env=agent_env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        await nc.close()
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines()]
    assert {e["data"]["domain"]["name"] for e in events} == {"test"}
    assert {e["data"]["host"] for e in events} == {a.host, b.host}
    for r in (a, b):
        mine = [e["data"]["event"] for e in events if e["data"]["host"] == r.host]
        assert mine == ["suspended", "resumed"] * 2
    times = [e["time"] for e in events]
    assert times == sorted(times)


async def test_a_resync_taken_before_nats_said_its_max_payload_is_taken_again_in_parts(
    start_agent: Callable[..., Awaitable[RunningAgent]], tmp_path: Path
) -> None:
    """The agent starts while NATS is away: its startup snapshot (45 KiB) is spooled before the
    server can say its max_payload is 16 KiB. That one is never stored; a new resync in parts
    follows at once and names its sequence number as missed: nothing is set aside."""
    uri = many_domains_xml(tmp_path / "node.xml", 300)
    port = free_port()
    conf = tmp_path / "late.conf"
    conf.write_text(f"max_payload: {MAX_PAYLOAD}\n")
    server = NatsServer(tmp_path / "late", port=port, config_file=conf)
    starting = asyncio.create_task(start_agent(**{
        "libvirt.uri": uri, "nats.urls": [f"nats://127.0.0.1:{port}"],
        "publisher.ack_timeout_s": 1.0, "state_dir": str(tmp_path / "late-state"),
    }))  # fmt: skip
    try:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(server.start)
        agent = await starting
        await agent.settled(timeout=60)
        nc = await nats.connect(server.url)
        try:
            stored = await stream_messages(nc, "VIRT_EVENTS", f"virt.{agent.host}.host.resync")
        finally:
            await nc.close()
        parts = [ev for _, ev, _ in stored]
        assert [p["data"]["reason"] for p in parts] == ["oversized"] * len(parts)
        assert len(parts) > 1
        first = parts[0]["data"]["missed"]
        assert first["first_sequence"] < parts[0]["sequence"], "the snapshot not sent is named"
        names = [d["name"] for p in parts for d in p["data"]["domains"]]
        assert len(set(names)) == 300
        assert not (tmp_path / "late-state" / "dead-letters.jsonl").exists()
    finally:
        if not starting.done():
            starting.cancel()
        await asyncio.to_thread(server.stop)


@pytest.mark.daemon
async def test_an_agent_started_while_jetstream_cannot_answer_waits_for_it_and_loses_nothing(
    test_daemon: LibvirtDaemon, agent_process: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """One node of a three-node cluster is up, so NATS accepts the connection but JetStream
    has no quorum and answers nothing (as after a node restart, while leaders are elected):
    the agent keeps running, spooling libvirt's events and not ready, and once the cluster is
    whole every event is stored. It used to exit on the first JetStream timeout (found by the
    fault campaign, seed 1962951971: an agent restarted right after a node was killed)."""
    nodes = cluster_nodes(tmp_path / "cluster")
    http = f"127.0.0.1:{free_port()}"
    host = "noquorum"
    try:
        nodes[0].start()
        agent = agent_process(
            "--libvirt-uri", test_daemon.test_uri, "--nats-url", nodes[0].url, "--host-id", host,
            "--http-addr", http, "--state-dir", str(tmp_path / "st"),
        )  # fmt: skip
        await eventually(lambda: metric(http, "virt_agent_nats_connected") == 1, 60, "connected")
        flipper = await asyncio.to_thread(lambda: Flipper(test_daemon.test_uri).start())
        try:
            await eventually(lambda: flipper.count >= 100, 60, "100 flips")
        finally:
            await asyncio.to_thread(flipper.stop)
        # Past two JetStream request timeouts: still running, not ready, everything spooled.
        await asyncio.sleep(12)
        assert agent.proc.poll() is None, agent.output()[-2000:]
        assert "JetStream not answering" in agent.output()
        assert readyz(http)["ready"] is False
        assert (metric(http, "virt_agent_spooled_total") or 0) >= flipper.count
        for n in nodes[1:]:
            n.start()
        await eventually(lambda: readyz(http).get("ready") is True, 90, "ready once whole")
        uuid_ = flipper.dom.UUIDString()
        nc = await nats.connect(nodes[0].url)
        try:
            msgs = await stream_messages(nc, "VIRT_EVENTS", f"virt.{host}.event.{uuid_}.>")
        finally:
            await nc.close()
        events = [ev["data"]["event"] for _, ev, _ in sorted(msgs, key=lambda m: m[1]["sequence"])]
        assert [e for e in events if e in ("suspended", "resumed")] == (
            ["suspended", "resumed"] * (flipper.count // 2)
        )
        assert events[:2] == ["defined", "started"]
    finally:
        for n in nodes:
            n.stop()


def readyz(http: str) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://{http}/readyz", timeout=10) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))
    except OSError:
        return {}
