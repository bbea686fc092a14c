"""Shared fixtures: a real nats-server per test, agents in-process or as processes, and a
libvirtd serving the test driver over TCP (an event source outside the agent's process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent.bus import subscribed
from agent.embedded import NatsServer
from agent.registry import Registration
from agent.settings import Settings
from agent.settings_load import load
from agent.streams import read_stream
from agent.supervisor import Agent
from lab.agents import agent_env
from lab.daemon import LibvirtDaemon
from lab.lab import remove_domain
from lab.prereqs import LabUnavailable

ROOT = Path(__file__).resolve().parent.parent
# The contract's error codes (../shared/CONTRACT.md).
ERROR_CODES = frozenset({
    "invalid_request", "not_found", "conflict", "unsupported", "forbidden",
    "libvirt_error", "timeout", "unavailable", "internal",
})  # fmt: skip
# How long a test's threads and processes may take to end after it, before they count as leaked.
LEAK_GRACE_S = 10.0
# An agent that notices a libvirtd going away within seconds and reconnects at once.
FAST_RECONNECT = {
    "libvirt.keepalive_interval_s": 1,
    "libvirt.keepalive_count": 2,
    "libvirt.reconnect_min_s": 0.2,
    "libvirt.reconnect_max_s": 1.0,
}


def descendants() -> dict[int, str]:
    """Live processes below this one (pid -> command line), from /proc; zombies are gone."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid = int(stat.parent.name)
        fields = text[text.rfind(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(pid)
        names[pid] = text[text.find("(") + 1 : text.rfind(")")]
    out: dict[int, str] = {}
    todo = [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = names[child]
            todo.append(child)
    return out


def _stray_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    # The session loop's default executor keeps its idle workers (asyncio_N) between tests.
    return [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.name.startswith("asyncio_")
    ]


@pytest.fixture(autouse=True)
def nothing_outlives_the_test() -> Iterator[None]:
    """Threads and processes a test starts are gone at its end, also when it failed: a leak
    is an error of the test that leaked, and leaked processes are killed here, so that they
    cannot disturb the tests after it."""
    threads = set(threading.enumerate())
    procs = set(descendants())
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        stray_threads = _stray_threads(threads)
        stray_procs = {p: n for p, n in descendants().items() if p not in procs}
        if (not stray_threads and not stray_procs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in stray_procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if stray_threads or stray_procs:
        pytest.fail(
            f"the test left running: threads {[t.name for t in stray_threads]}, "
            f"processes {sorted(stray_procs.items())} (processes killed)",
            pytrace=False,
        )


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a random port, its store in the test's tmp dir."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


SECURED_CONF = ROOT / "config" / "nats-server.conf.example"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with config/nats-server.conf.example: per-host users hv01..hv03, a
    controller and a monitor, each with the password `change-me-<user>`."""
    server = NatsServer(tmp_path / "nats", config_file=SECURED_CONF).start()
    yield server
    server.stop()


def secured_url(server: NatsServer, user: str) -> str:
    return f"nats://{user}:change-me-{user}@127.0.0.1:{server.port}"


async def connect_as(
    server: NatsServer, user: str, inbox: str | None = None
) -> tuple[Any, list[str]]:
    """A connection as `user`, with its own inbox prefix (`_INBOX_<user>`) unless told."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(secured_url(server, user), error_cb=on_error,
                            inbox_prefix=inbox or f"_INBOX_{user}")  # fmt: skip
    return nc, errors


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A plain NATS client on the test's server."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


def agent_settings(tmp_path: Path, nats_url: str, **overrides: Any) -> Settings:
    base = {
        "host_id": f"h{uuid.uuid4().hex[:8]}",
        "state_dir": str(tmp_path / "state"),
        "nats.urls": [nats_url],
        "libvirt.uri": "test:///default",
        "http.listen": "127.0.0.1:0",
        "agent.heartbeat_interval_s": 3600.0,
        # test:///default's host has 3 GiB and its `test` domain 8: admission (failover.admit)
        # would refuse every migration there for memory (tests/test_admission.py sets its own).
        "failover.memory_overcommit": 16.0,
    }
    base.update(overrides)
    return load(None, env={}, overrides=base).settings


class RunningAgent:
    def __init__(self, agent: Agent, task: asyncio.Task[None]) -> None:
        self.agent = agent
        self.task = task

    @property
    def host(self) -> str:
        return self.agent.host

    async def stop(self) -> None:
        self.agent.request_stop("test")
        await asyncio.wait_for(self.task, 30)

    async def settled(self, timeout: float = 60.0) -> None:
        """Wait until libvirt has gone quiet and JetStream acknowledged everything queued."""
        deadline = time.monotonic() + timeout
        pub = self.agent.publisher
        while True:
            received = pub.received
            await asyncio.sleep(0.05)
            if pub.received == received and pub.idle():
                return
            if time.monotonic() > deadline:
                spool = pub.spool
                raise AssertionError(
                    f"agent not settled: depth {pub.depth}, in flight {len(pub._inflight)}, "
                    f"spool {'-' if spool is None else (spool.depth, spool.bytes, spool.empty())}"
                )


@pytest.fixture
async def start_agent(
    tmp_path: Path, nats_server: NatsServer
) -> AsyncIterator[Callable[..., Awaitable[RunningAgent]]]:
    """Start in-process agents on the test's nats-server; each is stopped at teardown."""
    running: list[RunningAgent] = []

    async def start(**overrides: Any) -> RunningAgent:
        settings = agent_settings(tmp_path / f"a{len(running)}", nats_server.url, **overrides)
        agent = Agent(settings)
        task = asyncio.create_task(agent.run())
        ready = asyncio.create_task(agent.ready.wait())
        done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            if task.done():
                task.result()
            raise AssertionError("agent did not become ready")
        r = RunningAgent(agent, task)
        running.append(r)
        return r

    yield start
    for r in running:
        if not r.task.done():
            await r.stop()


@pytest.fixture(scope="session")
def test_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtDaemon]:
    """A libvirtd (own mount namespace, own TCP port) serving the shared test driver."""
    daemon = LibvirtDaemon(tmp_path_factory.mktemp("lab"), "events")
    try:
        daemon.start()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    yield daemon
    daemon.stop()


PEER_VERBS = frozenset(
    {"failover.reserve", "failover.release", "failover.replug", "failover.admit"}
)


async def request_as(nc: NATS, caller: str, subject: str, data: bytes, timeout: float) -> Msg:
    """A request whose reply comes to `_INBOX_<caller>.`, as a host's agent sends it."""
    inbox = f"_INBOX_{caller}.{uuid.uuid4().hex}"
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(subject, data, reply=inbox)
        return await sub.next_msg(timeout=timeout)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def call(
    nc: NATS,
    host: str,
    verb: str,
    payload: Any = None,
    raw: bytes | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """One command over NATS request/reply; the reply, checked to be a contract reply."""
    data = raw if raw is not None else msgspec.json.encode(payload if payload is not None else {})
    subject = f"virt.{host}.cmd.{verb}"
    head, _, caller = verb.rpartition(".")
    if head in PEER_VERBS:
        # An agent-to-agent verb is answered only on the caller's own inbox prefix.
        msg = await request_as(nc, caller, subject, data, timeout)
    else:
        msg = await nc.request(subject, data, timeout=timeout)
    reply = msgspec.json.decode(msg.data)
    assert isinstance(reply, dict)
    assert isinstance(reply["ok"], bool)
    return reply


def where(host: Any, uuid: str, alias: str = "ua-primary0") -> dict[str, Any]:
    """What one lab host's libvirt says about a domain: running, and if so whether the device
    `alias` is attached and whether a failover record is in its metadata."""
    import libvirt  # noqa: PLC0415

    from agent.failover import NS  # noqa: PLC0415

    conn = host.connect()
    try:
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            return {"running": False}
        if not dom.isActive():
            return {"running": False}
        xml = dom.XMLDesc(0)
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            record = True
        except libvirt.libvirtError:
            record = False
        return {"running": True, "primary": f"<alias name='{alias}'/>" in xml, "record": record}
    finally:
        conn.close()


async def eventually(
    condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.2
) -> None:
    """Until `condition()` holds (checked in a thread: it may read files or call libvirt),
    within a bound generous against what it waits for; the assertion names what never came."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(condition):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(poll)


class Collector:
    """Every message on a subject pattern, decoded; wait for one matching a predicate."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.messages.append((msg.subject, msgspec.json.decode(msg.data), dict(msg.headers or {})))
        self._changed.set()

    def events(self) -> list[dict[str, Any]]:
        return [m[1] for m in self.messages]

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for _, ev, _ in self.messages[seen:]:
                if predicate(ev):
                    return ev
            seen = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no matching event within {timeout}s; got {self.events()[-5:]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_count(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.messages)} messages, wanted {n}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def collect(nc: NATS) -> Callable[[str], Awaitable[Collector]]:
    """Subscribe a Collector to a subject pattern on the test's server."""

    async def sub(subject: str) -> Collector:
        c = Collector()
        await nc.subscribe(subject, cb=c.on_msg)
        await subscribed(nc)
        return c

    return sub


async def registration(nc: NATS, host: str) -> Registration:
    """`host`'s entry in virt_hosts, as a reader sees it."""
    kv = await nc.jetstream().key_value("virt_hosts")
    return msgspec.json.decode((await kv.get(host)).value, type=Registration)


async def stream_messages(
    nc: NATS, stream: str, subject: str = ">"
) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """Everything a JetStream stream holds on a subject filter, in stream order."""
    return [(m.subject, msgspec.json.decode(m.data), dict(m.headers or {}))
            for m in await read_stream(nc, stream, subject)]  # fmt: skip


class AgentProcess:
    """`virt-agent run` as a real process (for signals and exit statuses)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, crash_at: str = "") -> None:
        self.log = log
        # With a crash point: the test harness's entry, which arms it (agent/crashpoints.py).
        entry = ["tests.crashing_agent", crash_at] if crash_at else ["agent"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *entry, "run", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start `virt-agent run` processes; any still running are killed at teardown."""
    procs: list[AgentProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, crash_at: str = "") -> AgentProcess:
        full_env = agent_env(VIRT_AGENT_LOG_FORMAT="json", **(env or {}))
        p = AgentProcess(list(args), full_env, tmp_path / f"agent{len(procs)}.log", crash_at)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


# ---------------------------------------------------------------- the QEMU lab


@pytest.fixture(scope="session")
def lab() -> Iterator[Any]:
    """The three-host QEMU lab (lab/lab.py; host c for drains), up for the session and torn
    down after it."""
    from lab.lab import Lab  # noqa: PLC0415 - only lab tests pay for importing it

    the_lab = Lab(hosts=3)
    try:
        the_lab.up()
    except LabUnavailable as exc:
        the_lab.down()
        pytest.skip(str(exc))
    except BaseException:
        the_lab.down()
        raise
    yield the_lab
    the_lab.down()


@pytest.fixture
def host_a(lab: Any) -> Any:
    """Lab host a (its libvirtd: host_a.uri)."""
    return lab.host("a")


@pytest.fixture
def host_b(lab: Any) -> Any:
    """Lab host b (its libvirtd: host_b.uri)."""
    return lab.host("b")


@pytest.fixture
def guest(lab: Any) -> Iterator[Callable[..., Any]]:
    """Boot lab guests (failover pair or virtio only); each is destroyed and undefined after,
    and no guest may be left on a lab host then (none keeps burning CPU under other tests)."""
    booted: list[str] = []

    def boot(
        host: str = "a", kind: str = "failover", variant: str = "stock", dirty_mib: int = 0
    ) -> Any:
        name = f"g{uuid.uuid4().hex[:6]}"
        booted.append(name)
        return lab.boot(
            host, name, kind, index=len(booted) - 1, variant=variant, dirty_mib=dirty_mib
        )

    yield boot
    left = []
    for h in lab.hosts:
        conn = h.connect()
        try:
            for name in booted:
                with contextlib.suppress(Exception):
                    remove_domain(conn.lookupByName(name))
            for dom in conn.listAllDomains(0):
                left.append(f"{h.name}:{dom.name()}")
                remove_domain(dom)
        finally:
            conn.close()
    if left:
        pytest.fail(f"guests left on the lab hosts (removed now): {left}", pytrace=False)


@pytest.fixture
async def testdrv() -> AsyncIterator[Any]:
    """A connection of the test's own to test:///default; domains named t-* are removed after."""
    import libvirt  # noqa: PLC0415

    from agent import libvirt_loop  # noqa: PLC0415

    # The driver dispatches events through the event loop registered before it first opens.
    libvirt_loop.ensure_registered(asyncio.get_running_loop())
    conn = libvirt.open("test:///default")
    yield conn
    for dom in conn.listAllDomains(0):
        if dom.name().startswith("t-"):
            remove_domain(dom)
    conn.close()
