"""The spool on real files: its bound holds while the oldest segment is being sent (during an
outage the client's reconnect buffer holds what was read), a damaged tail does not stop the
agent from starting, and a full disk is an OSError the publisher can act on."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

import agent.spool
from agent.envelope import LibvirtDisconnected, Subjects
from agent.metrics import Metrics
from agent.publisher import Publisher
from agent.settings_load import load
from agent.spool import Record, Spool


def record(seq: int, size: int = 1000) -> Record:
    return Record(f"virt.h.event.x.{seq}", f"id-{seq}", seq, seq, b"x" * size)


def test_the_bound_holds_while_the_oldest_segment_is_being_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent.spool, "SEGMENT_BYTES", 10_000)
    spool = Spool(tmp_path, max_bytes=50_000)
    spool.append(record(1))
    assert [r.sequence for _, r in spool.read(1)] == [1]  # sent, never acknowledged
    dropped = []
    for seq in range(2, 1002):
        d = spool.append(record(seq))
        if d is not None:
            dropped.append(d)
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.seg"))
    assert on_disk <= 50_000 + 11_000, on_disk
    assert spool.bytes == on_disk
    # The segment being sent stays; what was given up is counted, in order, none twice.
    assert sum(d.count for d in dropped) + spool.depth + 1 == 1001
    assert dropped[0].first_sequence > 1
    assert all(a.last_sequence < b.first_sequence for a, b in itertools.pairwise(dropped))
    rest = [r.sequence for _, r in spool.read(10_000)]
    assert rest == sorted(rest)
    assert rest[-1] == 1001
    spool.close()


def test_a_damaged_tail_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30)
    for seq in range(1, 11):
        spool.append(record(seq, 100))
    spool.close()
    seg = next(tmp_path.glob("*.seg"))
    good = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"\x00\x00\x00\x05" + b"\x00" * 4096)  # a power loss's zero-filled tail
    again = Spool(tmp_path, max_bytes=1 << 30)
    assert [r.sequence for _, r in again.read(100)] == list(range(1, 11))
    assert seg.stat().st_size == good
    again.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_raises_oserror(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        spool = Spool(mnt, max_bytes=1 << 30)

        def fill() -> None:
            for seq in range(1, 1000):
                spool.append(record(seq))

        try:
            with pytest.raises(OSError, match=r"No space left|short write") as err:
                fill()
            assert err.value.errno == errno.ENOSPC
            # What was written is whole: a new reader gets every record the spool counted.
            kept = spool.depth
        finally:
            spool.close()
        again = Spool(mnt, max_bytes=1 << 30)
        assert [r.sequence for _, r in again.read(10_000)] == list(range(1, kept + 1))
        again.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_record_larger_than_a_read_is_read_whole_and_the_rest_after_it(tmp_path: Path) -> None:
    """One spooled record over the 4 MiB read size (a big resync) is returned, and the records after it follow in order; the spool then reads as drained."""
    spool = Spool(tmp_path, max_bytes=64 * 1024 * 1024)
    spool.append(record(1, 5 * 1024 * 1024))
    spool.append(record(2))
    got = []
    for _ in range(3):
        got += spool.read(10)
    assert [(r.sequence, len(r.payload)) for _, r in got] == [(1, 5 * 1024 * 1024), (2, 1000)]
    for index, _ in got:
        spool.acked(index)
    assert spool.empty()


def test_acknowledgement_progress_survives_a_crash(tmp_path: Path) -> None:
    """100 records sent, the first 60 acknowledged (one beyond them too), then the process
    dies: the next one sends from record 61, not the whole segment again (past JetStream's
    duplicate window, a re-sent record would be stored twice)."""
    spool = Spool(tmp_path, max_bytes=1 << 30)
    for seq in range(1, 101):
        spool.append(record(seq, 100))
    sent = spool.read(100)
    for ref, rec in sent:
        if rec.sequence <= 60 or rec.sequence == 62:
            spool.acked(ref)
    spool.save_progress()  # what the publisher does every second; no close(): a SIGKILL
    again = Spool(tmp_path, max_bytes=1 << 30)
    assert [r.sequence for _, r in again.read(1000)][:3] == [61, 62, 63]
    assert again.depth == 0
    again.close()
    spool.close()


def test_a_fully_acknowledged_segment_is_gone_after_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30)
    for seq in range(1, 11):
        spool.append(record(seq, 100))
    for ref, _ in spool.read(10):
        spool.acked(ref)
    assert spool.empty()
    assert list(tmp_path.iterdir()) == []
    spool.close()


def test_a_shutdown_spill_keeps_sequence_order(tmp_path: Path) -> None:
    """Spooled 1-30 (being sent), then 31-40 in memory, then spooled again 41-50 into the same
    segment; the shutdown spills 31-40: the next process reads 1-50 in order."""
    settings = load(None, env={}, overrides={}).settings.publisher
    spool = Spool(tmp_path / "spool", max_bytes=1 << 30)
    pub = Publisher(settings, Subjects("virt", "h"), "b00t", Metrics(), spool)

    def submit(n: int) -> None:
        for _ in range(n):
            pub.submit_host_event(LibvirtDisconnected(host="h", uri="test:///default", reason="x"))

    pub._nc = SimpleNamespace(is_connected=True)  # type: ignore[assignment] - no messages sent
    pub.delivery.spooling = True
    submit(30)
    assert [r.sequence for _, r in spool.read(30)] == list(range(1, 31))  # in flight
    pub.delivery.spooling = False  # the spool drained: back to the memory queue
    submit(10)
    pub.delivery.spooling = True  # NATS went away again
    submit(10)
    pub.spill()
    spool.close()
    again = Spool(tmp_path / "spool", max_bytes=1 << 30)
    assert [r.sequence for _, r in again.read(1000)] == list(range(1, 51))
    again.close()
