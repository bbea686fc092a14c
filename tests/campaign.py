"""A seeded, randomized fault campaign against a real agent process.

While a generator suspends and resumes several test-driver domains on a libvirtd of the
campaign's own, a schedule drawn from a seed applies faults one after another with random
hold and gap times: a NATS node SIGKILLed and restarted, the whole cluster SIGKILLed, frozen
(SIGSTOP, a silent partition), the event stream deleted, libvirtd restarted, the agent
SIGKILLed or SIGTERMed and started again, the state directory's disk full while NATS is away.
An independent bare libvirt listener (a process of its own) records the ground truth. The
checker then reads what JetStream stored and asserts:

- every lifecycle event the listener saw on the generator's domains is stored exactly once,
  in the order libvirt gave it;
- within each boot_id, sequence numbers have no gap that no `resync` (`missed`),
  `spool_overflow` or `dead_letter` names;
- after each libvirtd restart, inferred events exactly for the domains that changed while
  libvirt was away (the test driver forgets what the generator made);
- the agent is ready again within a bound after each fault.

The same seed gives the same schedule (`python -m tests.campaign run --seed N`). The faults
that lose the agent's or the listener's view of libvirt on purpose (the agent down, libvirtd
restarted, the stream deleted) are applied with the generator paused and the agent settled:
what happens while no agent runs is a resync's business, not an event's.

python -m tests.campaign ground URI OUT   the ground-truth listener (used by the campaign)
python -m tests.campaign run [--seed N] [--faults K] [--workdir D]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import msgspec
import nats
from nats.errors import Error as NatsError

from agent.embedded import NatsServer
from agent.streams import read_stream
from lab.agents import agent_env
from lab.daemon import LibvirtDaemon, free_port
from tests.current_view import bucket_view, differences, libvirt_view

ROOT = Path(__file__).resolve().parent.parent
FAULTS = (
    "nats_node_kill", "nats_all_kill", "nats_freeze", "stream_delete",
    "libvirtd_restart", "agent_kill", "agent_term", "disk_full",
)  # fmt: skip
# Applied with the generator paused and the agent settled (see the module's docstring).
QUIET = {"stream_delete", "libvirtd_restart", "agent_kill", "agent_term"}
READY_BOUND_S = 60.0
LIFECYCLE = {0: "defined", 1: "undefined", 2: "started", 3: "suspended", 4: "resumed",
             5: "stopped", 6: "shutdown", 7: "pmsuspended", 8: "crashed"}  # fmt: skip
DOMAIN_XML = """<domain type='test'><name>{name}</name><memory>65536</memory><vcpu>1</vcpu>
<os><type>hvm</type></os></domain>"""


@dataclass(frozen=True)
class Step:
    fault: str
    gap_s: float  # before the fault
    hold_s: float  # how long the fault lasts


def schedule(seed: int, faults: int, allowed: tuple[str, ...] = FAULTS) -> list[Step]:
    rng = random.Random(seed)
    return [
        Step(rng.choice(allowed), round(rng.uniform(0.3, 2.0), 2), round(rng.uniform(0.3, 3.0), 2))
        for _ in range(faults)
    ]


@dataclass
class Report:
    seed: int
    faults: list[str] = field(default_factory=list)
    events: int = 0  # lifecycle events the ground-truth listener saw on the generator's domains
    stored: int = 0  # of those, stored (once or more)
    lost: int = 0
    duplicated: int = 0
    ready_s: list[float] = field(default_factory=list)  # per fault: heal -> /readyz 200
    # virt_domains equal to libvirt's listing at the end (seconds it took; -1: never)
    current_state_s: float = -1.0
    problems: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["faults"] = len(self.faults)
        d["max_ready_s"] = round(max(self.ready_s, default=0.0), 2)
        del d["ready_s"]
        return d


# ---------------------------------------------------------------- the ground truth


async def ground(uri: str, out: str) -> None:
    """Record every lifecycle event of `uri` as a JSON line; reconnect when libvirtd goes.
    Each (re)connection writes {"listening": n} once its callback is registered."""
    import libvirtaio  # noqa: PLC0415

    libvirtaio.virEventRegisterAsyncIOImpl()
    loop = asyncio.get_running_loop()
    n = 0
    with open(out, "a", buffering=1) as f:  # noqa: ASYNC230 - a line per event, the record

        def on_event(_c: Any, dom: Any, event: int, detail: int, _o: Any) -> None:
            f.write(json.dumps({"uuid": dom.UUIDString(), "event": event, "detail": detail}) + "\n")

        while True:
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError:
                await asyncio.sleep(0.1)
                continue
            closed = asyncio.Event()
            conn.registerCloseCallback(lambda *_, c=closed: loop.call_soon(c.set), None)
            conn.setKeepAlive(1, 3)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)
            n += 1
            f.write(json.dumps({"listening": n}) + "\n")
            await closed.wait()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()


def read_ground(path: Path) -> tuple[list[dict[str, Any]], int]:
    events, listening = [], 0
    if not path.exists():
        return events, listening
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "listening" in rec:
            listening = rec["listening"]
        else:
            events.append(rec)
    return events, listening


# ---------------------------------------------------------------- the generator


class Generator:
    """Suspend/resume `domains` test-driver domains at about `rate` events/s in a thread;
    re-creates them after libvirtd forgot them. `pause()` returns once no call is under way."""

    def __init__(self, uri: str, domains: int, rate: float, seed: int) -> None:
        self.uri = uri
        self.domains = domains
        self.interval = 2.0 / rate
        self.rng = random.Random(seed)
        self.uuids: set[str] = set()
        self._run = threading.Event()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="campaign-generator", daemon=True)

    def start(self) -> Generator:
        self._run.set()
        self._thread.start()
        return self

    def pause(self) -> None:
        self._run.clear()
        self._idle.wait(30)

    def resume(self) -> None:
        self._idle.clear()
        self._run.set()

    def stop(self) -> None:
        self._stop.set()
        self._run.set()
        self._thread.join(30)

    def _loop(self) -> None:
        conn: Any = None
        doms: list[Any] = []
        while not self._stop.is_set():
            if not self._run.is_set():
                self._idle.set()
                self._run.wait()
                continue
            try:
                if conn is None:
                    conn = libvirt.open(self.uri)
                    doms = []
                    for _ in range(self.domains):
                        d = conn.defineXML(DOMAIN_XML.format(name=f"camp-{uuid.uuid4().hex[:8]}"))
                        self.uuids.add(d.UUIDString())
                        d.create()
                        doms.append(d)
                d = self.rng.choice(doms)
                d.suspend()
                d.resume()
            except libvirt.libvirtError:
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None  # libvirtd went away: its domains with it (test driver)
                time.sleep(0.2)
                continue
            time.sleep(self.interval)
        with contextlib.suppress(Exception):
            if conn is not None:
                conn.close()


# ---------------------------------------------------------------- the bus


def cluster_nodes(workdir: Path) -> list[NatsServer]:
    """Three nats-servers that route into one cluster, JetStream on each; not started."""
    cports = [free_port() for _ in range(3)]
    nodes = []
    for i, cport in enumerate(cports):
        routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(cports) if j != i)
        nodes.append(NatsServer(workdir / f"n{i}", extra_args=[
            "--server_name", f"n{i}", "--cluster_name", "virt-test",
            "--cluster", f"nats://127.0.0.1:{cport}", "--routes", routes,
        ]))  # fmt: skip
    return nodes


def start_cluster(workdir: Path) -> list[NatsServer]:
    """Three nats-servers routed into one cluster, JetStream on each."""
    nodes = cluster_nodes(workdir)
    try:
        for n in nodes:
            n.start()
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    return nodes


def restart(server: NatsServer) -> None:
    """The same nats-server again: same port, same JetStream store."""
    server.requested_port = server.port
    server.start()


async def stored(urls: list[str], stream: str, subject: str) -> list[dict[str, Any]]:
    """Everything `stream` holds on `subject`, in stream order."""
    import nats  # noqa: PLC0415

    nc = await nats.connect(servers=urls)
    try:
        return [msgspec.json.decode(m.data) for m in await read_stream(nc, stream, subject)]
    finally:
        await nc.close()


# ---------------------------------------------------------------- the campaign


class Campaign:
    def __init__(self, workdir: Path, seed: int, faults: int, rate: float = 300.0) -> None:
        self.workdir = workdir
        self.seed = seed
        self.steps = schedule(seed, faults, self._allowed())
        self.rate = rate
        self.host = f"camp{seed % 100000}"
        self.http = f"127.0.0.1:{free_port()}"
        self.state = workdir / "state"
        self.report = Report(seed)
        self.nodes: list[NatsServer] = []
        self.daemon = LibvirtDaemon(workdir, "camp")
        self.agent: subprocess.Popen[bytes] | None = None
        self.listener: subprocess.Popen[bytes] | None = None
        self.ground_file = workdir / "ground.jsonl"
        self.kept: list[dict[str, Any]] = []  # stored events read before a stream delete
        self.restarts: list[tuple[dict[str, str], dict[str, str]]] = []  # libvirtd snapshots
        self._tmpfs = False

    def _allowed(self) -> tuple[str, ...]:
        return FAULTS if os.geteuid() == 0 else tuple(f for f in FAULTS if f != "disk_full")

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    # ------------------------------------------------------------ processes

    def _start_agent(self) -> None:
        env = agent_env(
            VIRT_AGENT_LOG_FORMAT="json",
            VIRT_AGENT_NATS_STREAM_REPLICAS="3",
            VIRT_AGENT_NATS_PING_INTERVAL_S="1",
            VIRT_AGENT_PUBLISHER_ACK_TIMEOUT_S="1",
            VIRT_AGENT_LIBVIRT_RECONNECT_MIN_S="0.1",
            VIRT_AGENT_LIBVIRT_RECONNECT_MAX_S="0.5",
            VIRT_AGENT_AGENT_HEARTBEAT_INTERVAL_S="3600",
        )
        with open(self.workdir / "agent.log", "ab") as out:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--libvirt-uri", self.daemon.test_uri,
                 *[a for u in self.urls for a in ("--nats-url", u)], "--host-id", self.host,
                 "--state-dir", str(self.state), "--http-addr", self.http],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def _stop_agent(self, sig: int) -> None:
        proc, self.agent = self.agent, None
        if proc is None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.report.problems.append(f"the agent did not exit within 60 s of {sig}")

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.http}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def _metric(self, name: str) -> float:
        _, text = self._get("/metrics")
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith((name + "{", name + " ")))  # fmt: skip

    async def _until(self, what: str, cond: Any, bound: float = READY_BOUND_S) -> float:
        t0 = time.monotonic()
        while not await asyncio.to_thread(cond):
            if time.monotonic() - t0 > bound:
                self.report.problems.append(f"not within {bound:.0f} s: {what}")
                return bound
            await asyncio.sleep(0.1)
        return time.monotonic() - t0

    def _ready(self) -> bool:
        return self._get("/readyz")[0] == 200

    def _settled(self) -> bool:
        return self._ready() and all(
            self._metric(m) == 0
            for m in (
                "virt_agent_queue_depth",
                "virt_agent_inflight_acks",
                "virt_agent_spool_depth",
            )
        )

    def _listening(self) -> int:
        return read_ground(self.ground_file)[1]

    def _snapshot(self) -> dict[str, str]:
        conn = libvirt.open(self.daemon.test_uri)
        try:
            return {d.UUIDString(): str(d.state()[0]) for d in conn.listAllDomains()}
        finally:
            conn.close()

    # ------------------------------------------------------------ faults

    async def _apply(self, step: Step, gen: Generator) -> None:
        quiet = step.fault in QUIET
        if quiet:
            await asyncio.to_thread(gen.pause)
            await self._until("settled before the fault", self._settled)
        listening = self._listening()
        before = await asyncio.to_thread(self._snapshot)
        await getattr(self, f"_{step.fault}")(step)
        self.report.faults.append(step.fault)
        ready = await self._until(f"ready after {step.fault}", self._ready)
        self.report.ready_s.append(round(ready, 2))
        if step.fault == "libvirtd_restart":
            await self._until("the listener back", lambda: self._listening() > listening)
            # The agent's reconnect resync is published before it is ready again.
            self.restarts.append((before, await asyncio.to_thread(self._snapshot)))
        if quiet:
            gen.resume()

    async def _nats_node_kill(self, step: Step) -> None:
        victim = random.Random(self.seed + len(self.report.faults)).choice(self.nodes)
        victim.signal(signal.SIGKILL)
        await asyncio.to_thread(victim.stop)
        await asyncio.sleep(step.hold_s)
        await asyncio.to_thread(restart, victim)

    async def _nats_all_kill(self, step: Step) -> None:
        for n in self.nodes:
            n.signal(signal.SIGKILL)
        for n in self.nodes:
            await asyncio.to_thread(n.stop)
        await asyncio.sleep(step.hold_s)
        for n in self.nodes:
            await asyncio.to_thread(restart, n)

    async def _disk_full(self, step: Step) -> None:
        """The state directory's disk full while NATS is away: the spool cannot take what
        comes, which waits in memory behind it."""
        filler = self.state / "filler"
        await asyncio.to_thread(fill, filler)
        try:
            await self._nats_all_kill(step)
        finally:
            filler.unlink(missing_ok=True)

    async def _nats_freeze(self, step: Step) -> None:
        for n in self.nodes:
            n.signal(signal.SIGSTOP)
        await asyncio.sleep(step.hold_s)
        for n in self.nodes:
            n.signal(signal.SIGCONT)

    async def _stream_delete(self, step: Step) -> None:
        import nats  # noqa: PLC0415

        self.kept += await stored(self.urls, "VIRT_EVENTS", f"virt.{self.host}.>")
        nc = await nats.connect(servers=self.urls)
        try:
            await nc.jetstream().delete_stream("VIRT_EVENTS")
        finally:
            await nc.close()
        await asyncio.sleep(step.hold_s)

    async def _libvirtd_restart(self, step: Step) -> None:
        await asyncio.to_thread(self.daemon.stop)
        await asyncio.sleep(step.hold_s)
        await asyncio.to_thread(self.daemon.start)

    async def _agent_kill(self, step: Step) -> None:
        await asyncio.to_thread(self._stop_agent, signal.SIGKILL)
        await asyncio.sleep(step.hold_s)
        await asyncio.to_thread(self._start_agent)

    async def _agent_term(self, step: Step) -> None:
        await asyncio.to_thread(self._stop_agent, signal.SIGTERM)
        await asyncio.sleep(step.hold_s)
        await asyncio.to_thread(self._start_agent)

    # ------------------------------------------------------------ run and check

    async def run(self) -> Report:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            await asyncio.to_thread(self._mount)
        gen: Generator | None = None
        try:
            self.nodes = await asyncio.to_thread(start_cluster, self.workdir)
            await asyncio.to_thread(self.daemon.start)
            await asyncio.to_thread(self._start_listener)
            await self._until("the listener", lambda: self._listening() >= 1)
            await asyncio.to_thread(self._start_agent)
            await self._until("the agent ready", self._ready)
            gen = Generator(self.daemon.test_uri, 4, self.rate, self.seed).start()
            for step in self.steps:
                await asyncio.sleep(step.gap_s)
                await self._apply(step, gen)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(gen.pause)
            await self._until("settled at the end", self._settled)
            await self.check(gen)
        finally:
            if gen is not None:
                await asyncio.to_thread(gen.stop)
            await asyncio.to_thread(self._stop_agent, signal.SIGTERM)
            await asyncio.to_thread(self._stop_rest)
        return self.report

    def _mount(self) -> None:
        """The state directory on a tmpfs of its own: a disk that can be filled."""
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(self.state)],
                       check=True)  # fmt: skip
        self._tmpfs = True

    def _start_listener(self) -> None:
        self.listener = subprocess.Popen(
            [sys.executable, "-m", "tests.campaign", "ground", self.daemon.test_uri,
             str(self.ground_file)], cwd=ROOT,
        )  # fmt: skip

    def _stop_rest(self) -> None:
        if self.listener is not None:
            self.listener.kill()
            self.listener.wait()
        self.daemon.stop()
        for n in self.nodes:
            n.signal(signal.SIGCONT)
            n.stop()
        if self._tmpfs:
            subprocess.run(["umount", "-l", str(self.state)], check=False)

    async def check(self, gen: Generator) -> None:
        r = self.report
        events = self.kept + await stored(self.urls, "VIRT_EVENTS", f"virt.{self.host}.>")
        events += await stored(self.urls, "VIRT_OPS", f"virt.{self.host}.>")
        ids = Counter(e["id"] for e in events)
        r.duplicated = sum(c - 1 for c in ids.values())
        if r.duplicated:
            r.problems.append(f"{r.duplicated} stored more than once")
        unique = list({e["id"]: e for e in events}.values())
        boots = _boot_order(unique)
        key = {e["id"]: (boots[_boot(e)], e["sequence"]) for e in unique}
        unique.sort(key=lambda e: key[e["id"]])

        self._check_ground_truth(unique, gen)
        self._check_gaps(unique)
        self._check_inferred(unique)
        await self._check_current_state()

    async def _check_current_state(self, bound: float = READY_BOUND_S) -> None:
        """virt_domains holds for this host what libvirt lists, within a bound."""
        r = self.report
        t0 = time.monotonic()
        nc = await nats.connect(self.urls)
        try:
            while True:
                want = await asyncio.to_thread(libvirt_view, self.daemon.test_uri)
                try:
                    diff = differences(want, await bucket_view(nc, self.host))
                except NatsError as exc:
                    # The cluster may still be electing after the last fault (a node killed).
                    diff = {"bucket unreadable": repr(exc)}
                if not diff:
                    r.current_state_s = round(time.monotonic() - t0, 2)
                    return
                if time.monotonic() - t0 > bound:
                    r.problems.append(f"virt_domains differs from libvirt: {diff}")
                    return
                await asyncio.sleep(0.5)
        finally:
            await nc.close()

    def _check_ground_truth(self, unique: list[dict[str, Any]], gen: Generator) -> None:
        """Every ground-truth event once, in libvirt's order, per domain."""
        r = self.report
        truth, _ = read_ground(self.ground_file)
        want: dict[str, list[str]] = defaultdict(list)
        for t in truth:
            if t["uuid"] in gen.uuids:
                want[t["uuid"]].append(LIFECYCLE.get(t["event"], str(t["event"])))
        got: dict[str, list[str]] = defaultdict(list)
        for e in unique:
            d = e.get("data") or {}
            lifecycle = e["type"] == "virt.domain.lifecycle" and not d.get("inferred")
            if lifecycle and e.get("subject") in gen.uuids:
                got[e["subject"]].append(d["event"])
        r.events = sum(len(v) for v in want.values())
        for u in set(want) | set(got):
            w, g = Counter(want[u]), Counter(got[u])
            r.lost += sum((w - g).values())
            r.stored += sum((w & g).values())
            if w - g:
                at = next((i for i, (x, y) in enumerate(zip(want[u], got[u], strict=False))
                           if x != y), min(len(want[u]), len(got[u])))  # fmt: skip
                r.problems.append(f"{u}: {sum((w - g).values())} lost, first at {at} of "
                                  f"{len(want[u])}")  # fmt: skip
            if want[u] != got[u] and not (w - g) and not (g - w):
                r.problems.append(f"{u}: stored out of libvirt's order")
            extra = sum((g - w).values())
            if extra:
                r.problems.append(f"{u}: {extra} stored events libvirt never gave")
        if r.lost:
            r.problems.append(f"{r.lost} of {r.events} ground-truth events not stored")

    def _check_gaps(self, unique: list[dict[str, Any]]) -> None:
        """No gap in a boot's sequence that nothing names."""
        r = self.report
        seqs: dict[str, set[int]] = defaultdict(set)
        for e in unique:
            b = _boot(e)
            seqs[b].add(e["sequence"])
            d = e.get("data") or {}
            named = d.get("missed") if e["type"] == "virt.host.resync" else (
                d if e["type"] == "virt.host.spool_overflow" else None)  # fmt: skip
            if named:
                seqs[b].update(range(named["first_sequence"], named["last_sequence"] + 1))
            if e["type"] == "virt.host.dead_letter":
                seqs[b].add(d["sequence"])
        for b, s in seqs.items():
            missing = sorted(set(range(1, max(s) + 1)) - s)
            if missing:
                r.problems.append(f"boot {b}: sequences {missing[:10]} neither stored nor named")

    def _check_inferred(self, unique: list[dict[str, Any]]) -> None:
        """Inferred events exactly for what changed while libvirt was away."""
        r = self.report
        inferred = {e["subject"] for e in unique if e["type"] == "virt.domain.lifecycle"
                    and (e.get("data") or {}).get("inferred")}  # fmt: skip
        changed: set[str] = set()
        for before, after in self.restarts:
            changed |= {u for u in set(before) | set(after) if before.get(u) != after.get(u)}
        if inferred != changed:
            r.problems.append(f"inferred for {sorted(inferred - changed)} without a change; "
                              f"not for {sorted(changed - inferred)} that changed")  # fmt: skip


def _boot(e: dict[str, Any]) -> str:
    return str(e["id"]).rpartition(":")[0]


def _boot_order(events: list[dict[str, Any]]) -> dict[str, int]:
    """Boots in the order they started (their agent_started's time)."""
    first: dict[str, str] = {}
    for e in events:
        b = _boot(e)
        if b not in first or e["time"] < first[b]:
            first[b] = e["time"]
    return {b: i for i, b in enumerate(sorted(first, key=lambda b: first[b]))}


def fill(path: Path) -> None:
    """Take every free byte of the file system `path` is on."""
    st = os.statvfs(path.parent)
    with open(path, "wb") as f:
        with contextlib.suppress(OSError):
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.campaign")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("ground")
    g.add_argument("uri")
    g.add_argument("out")
    r = sub.add_parser("run")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--faults", type=int, default=8)
    r.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    if args.cmd == "ground":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(ground(args.uri, args.out))
        return 0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    import tempfile  # noqa: PLC0415

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"virt-agent-campaign-{seed}-"))
    print(f"seed {seed}: {[s.fault for s in schedule(seed, args.faults)]}", flush=True)
    report = asyncio.run(Campaign(workdir, seed, args.faults).run())
    print(json.dumps(report.row()), flush=True)
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
