"""The on-disk spool: rendered messages waiting for JetStream, in order, in the state directory.

The publisher spools when NATS is unreachable or too slow (its in-memory queue reaches
`publisher.spool_after`): from then on every new message is appended here - already
rendered, with its Nats-Msg-Id - and the publisher sends from the spool once its memory queue
is empty, until the spool is drained. Messages keep their order and their ids, also across an
agent restart (a new process publishes the old process's spool first; JetStream's duplicate
window drops any that had been stored already).

Files: `<state_dir>/spool/<index>.seg`, records `[4-byte big-endian length][msgpack]`. A segment
is deleted once every record in it has been acknowledged. When the spool exceeds
`publisher.spool_max_bytes`, the oldest segment not being sent is dropped and counted.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec
import structlog

log = structlog.get_logger("agent.spool")

_LEN = struct.Struct(">I")
SEGMENT_BYTES = 8 * 1024 * 1024
READ_BYTES = 4 * 1024 * 1024  # one read of a segment (a larger record is read whole)


class Record(msgspec.Struct, array_like=True, frozen=True):
    subject: str
    msg_id: str
    time_ns: int
    sequence: int
    payload: bytes


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Record)


@dataclass
class _Segment:
    index: int
    path: Path
    size: int = 0
    records: int = 0
    first_sequence: int = 0
    last_sequence: int = 0
    # Records handed to the publisher and not yet acknowledged.
    outstanding: int = 0
    read_offset: int = 0
    read_records: int = 0
    sealed: bool = False  # no more appends (a newer segment exists)


@dataclass(frozen=True)
class Dropped:
    count: int
    first_sequence: int
    last_sequence: int


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._segments: list[_Segment] = []
        self._out: BinaryIO | None = None  # the segment being written, unbuffered
        for path in sorted(self.dir.glob("*.seg"), key=lambda p: int(p.stem)):
            seg = self._scan(path)
            if seg.records:
                self._segments.append(seg)
            else:
                path.unlink(missing_ok=True)  # nothing readable in it
        # Written by an earlier process: its sequence numbers are not this process's.
        self._inherited = {s.index for s in self._segments}
        if self._segments:
            log.info("spool found", segments=len(self._segments), records=self.depth)

    # ------------------------------------------------------------ state

    @property
    def depth(self) -> int:
        """Records not yet handed to the publisher."""
        return sum(s.records - s.read_records for s in self._segments)

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def first_sequence_written(self) -> int | None:
        """The first sequence number this process spooled that is still here (None if none):
        messages kept in memory with a lower one are older than everything it spooled."""
        seqs = [s.first_sequence for s in self._segments
                if s.records and s.index not in self._inherited]  # fmt: skip
        return min(seqs) if seqs else None

    def empty(self) -> bool:
        """Nothing left to send and nothing awaiting an acknowledgement."""
        return not self._segments

    def _scan(self, path: Path) -> _Segment:
        seg = _Segment(int(path.stem), path, sealed=True)
        data = path.read_bytes()
        off = 0
        while off + 4 <= len(data):
            (n,) = _LEN.unpack_from(data, off)
            if off + 4 + n > len(data):
                break  # a record cut short by a crash: ignored
            try:
                rec = _dec.decode(data[off + 4 : off + 4 + n])
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("spool record damaged, segment cut there", segment=path.name,
                            offset=off)  # fmt: skip
                break  # e.g. a zero-filled tail after a power loss: what follows is unreadable
            seg.first_sequence = seg.first_sequence or rec.sequence
            seg.last_sequence = rec.sequence
            seg.records += 1
            off += 4 + n
        seg.size = off
        if off != len(data):
            with open(path, "r+b") as f:
                f.truncate(off)
        return seg

    # ------------------------------------------------------------ writing

    def append(self, rec: Record) -> Dropped | None:
        """Add one record at the end; the oldest segment may be dropped to respect the bound."""
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.sealed or seg.size >= SEGMENT_BYTES:
            if seg is not None:
                self._seal(seg)
            seg = self._open((seg.index + 1) if seg else 0)
        body = _enc.encode(rec)
        assert self._out is not None
        # One unbuffered write: once append returns, the record survives the agent's death.
        data = _LEN.pack(len(body)) + body
        try:
            written = self._out.write(data)
            if written != len(data):  # a full disk can take part of it and say so
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)})")  # noqa: TRY301
        except OSError:
            self._out.truncate(seg.size)  # no partial record left behind
            if seg.records == 0:  # a segment that never held a record is not kept
                self._seal(seg)
                self._segments.remove(seg)
                seg.path.unlink(missing_ok=True)
            raise
        seg.size += 4 + len(body)
        seg.records += 1
        seg.first_sequence = seg.first_sequence or rec.sequence
        seg.last_sequence = rec.sequence
        return self._enforce_bound()

    def prepend(self, records: list[Record]) -> None:
        """Records older than everything spooled (what was in memory at a shutdown without
        NATS): a new segment before the first one."""
        if not records:
            return
        index = self._segments[0].index - 1 if self._segments else 0
        path = self.dir / f"{index}.seg"
        try:
            with open(path, "wb") as f:
                for rec in records:
                    body = _enc.encode(rec)
                    f.write(_LEN.pack(len(body)))
                    f.write(body)
        except OSError:
            path.unlink(missing_ok=True)  # all or nothing: a partial copy would be sent twice
            raise
        self._segments.insert(0, self._scan(path))

    def _open(self, index: int) -> _Segment:
        path = self.dir / f"{index}.seg"
        seg = _Segment(index, path)
        self._out = open(path, "ab", buffering=0)  # noqa: SIM115 - open while it is written
        self._segments.append(seg)
        return seg

    def _seal(self, seg: _Segment) -> None:
        if not seg.sealed:
            seg.sealed = True
            if self._out is not None:
                self._out.close()
                self._out = None

    def _enforce_bound(self) -> Dropped | None:
        dropped = None
        while self.bytes > self.max_bytes:
            # The oldest segment nobody has started sending: one being sent may already be on
            # the wire (during an outage, in the client's reconnect buffer) and the last one
            # is being written.
            victim = next(
                (s for s in self._segments[:-1] if not s.outstanding and not s.read_records), None
            )
            if victim is None:
                break
            self._segments.remove(victim)
            victim.path.unlink(missing_ok=True)
            lost = victim.records
            if not lost:
                continue
            d = Dropped(lost, victim.first_sequence, victim.last_sequence)
            dropped = (
                d
                if dropped is None
                else Dropped(dropped.count + lost, dropped.first_sequence, victim.last_sequence)
            )
            log.warning("spool over its bound, oldest segment dropped", records=lost,
                        first_sequence=victim.first_sequence, max_bytes=self.max_bytes)  # fmt: skip
        return dropped

    # ------------------------------------------------------------ reading

    def read(self, limit: int) -> list[tuple[int, Record]]:
        """Up to `limit` records in order, each with its segment index (for `acked`)."""
        out: list[tuple[int, Record]] = []
        for seg in self._segments:
            if len(out) >= limit:
                break
            if seg.read_records >= seg.records:
                continue
            with open(seg.path, "rb") as f:
                f.seek(seg.read_offset)
                data = f.read(min(seg.size - seg.read_offset, READ_BYTES))
                if len(data) >= _LEN.size:
                    (n,) = _LEN.unpack_from(data, 0)
                    if _LEN.size + n > len(data):
                        # One record larger than a read (a big resync): read it whole, or it
                        # and everything after it would never be read.
                        data += f.read(_LEN.size + n - len(data))
            off = 0
            while len(out) < limit and off + 4 <= len(data):
                (n,) = _LEN.unpack_from(data, off)
                if off + 4 + n > len(data):
                    break
                out.append((seg.index, _dec.decode(data[off + 4 : off + 4 + n])))
                off += 4 + n
                seg.read_records += 1
                seg.outstanding += 1
            seg.read_offset += off
            if seg.read_records < seg.records:
                break  # keep order: the rest of this segment before the next one
        return out

    def acked(self, index: int) -> None:
        """One record of segment `index` is stored in JetStream; a segment fully sent and
        acknowledged is deleted (the one being written is closed first)."""
        for i, seg in enumerate(self._segments):
            if seg.index == index:
                seg.outstanding -= 1
                if seg.outstanding == 0 and seg.read_records >= seg.records:
                    self._seal(seg)
                    self._segments.pop(i)
                    seg.path.unlink(missing_ok=True)
                return

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
