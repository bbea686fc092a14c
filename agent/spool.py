"""The on-disk spool: rendered messages waiting for JetStream, in order, in the state directory.

The publisher spools when NATS is unreachable or too slow (its in-memory queue reaches
`publisher.spool_after`): from then on every new message is appended here - already
rendered, with its Nats-Msg-Id - and the publisher sends from the spool once its memory queue
is empty, until the spool is drained. Messages keep their order and their ids, also across an
agent restart (a new process publishes the old process's spool first; JetStream's duplicate
window drops any that had been stored already).

Files: `<state_dir>/spool/<index>.seg`, records `[4-byte big-endian length][msgpack]`. A segment
is deleted once every record in it has been acknowledged. How far a segment is acknowledged
from its start is kept beside it (`<index>.ack`, saved every second and at close), so a new
process after a crash sends from there, not the whole segment again. When the spool exceeds
`publisher.spool_max_bytes`, the oldest segment not being sent is dropped and counted.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import msgspec
import structlog

log = structlog.get_logger("agent.spool")

_LEN = struct.Struct(">I")
_PROGRESS = struct.Struct(">QQ")  # records acknowledged from the start, and their bytes
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


class Ref(NamedTuple):
    """Where a record read from the spool lives, for `acked`."""

    segment: int
    ordinal: int  # its position in the segment
    end: int  # the byte offset just after it


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
    # Acknowledged from the start: records and bytes; acknowledged beyond: ordinal -> end.
    acked: int = 0
    acked_offset: int = 0
    early: dict[int, int] = field(default_factory=dict)
    progress_saved: int = 0  # `acked` as last written to the .ack file

    @property
    def progress_path(self) -> Path:
        return self.path.with_suffix(".ack")


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
            if seg.records > seg.acked:
                self._segments.append(seg)
            else:
                self._delete(seg)  # nothing readable in it, or all of it acknowledged
        for stray in [
            *self.dir.glob("*.ack"),
            *self.dir.glob("*.tmp"),
            *self.dir.glob("*.ack-tmp"),
        ]:
            if stray.suffix != ".ack" or not stray.with_suffix(".seg").exists():
                stray.unlink(missing_ok=True)  # left by a crash, or of a deleted segment
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

    def empty(self) -> bool:
        """Nothing left to send and nothing awaiting an acknowledgement."""
        return not self._segments

    def _scan(self, path: Path) -> _Segment:
        seg = _Segment(int(path.stem), path, sealed=True)
        data = path.read_bytes()
        progress = (0, 0)
        with contextlib.suppress(OSError, struct.error):
            progress = _PROGRESS.unpack(seg.progress_path.read_bytes())
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
            if (seg.records, off) == progress:
                # Acknowledged up to here by the process that wrote it: sent from after it.
                seg.acked = seg.read_records = seg.progress_saved = seg.records
                seg.acked_offset = seg.read_offset = off
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

    def merge(self, records: list[Record]) -> None:
        """Records only memory held at a shutdown, put where their sequence numbers belong
        among what this process spooled: each joins the first of its segments that ends after
        it (that segment is rewritten from its acknowledged start, in order, and replaces the
        old file in one rename), or goes at the end. Whatever happens, nothing already spooled
        is lost: a failed write leaves the old segment."""
        if not records:
            return
        records = sorted(records, key=lambda r: r.sequence)
        own = [s for s in self._segments if s.index not in self._inherited]
        ends = [s.last_sequence for s in own]
        into: dict[int, list[Record]] = {}
        tail: list[Record] = []
        for rec in records:
            i = bisect.bisect_right(ends, rec.sequence)
            if i < len(own):
                into.setdefault(i, []).append(rec)
            else:
                tail.append(rec)
        for i, extra in into.items():
            self._rewrite(own[i], extra)
        for rec in tail:
            dropped = self.append(rec)
            if dropped is not None:
                log.error("spool over its bound at shutdown", dropped=dropped.count,
                          first_sequence=dropped.first_sequence)  # fmt: skip

    def _rewrite(self, seg: _Segment, extra: list[Record]) -> None:
        self._seal(seg)
        with open(seg.path, "rb") as f:
            f.seek(seg.acked_offset)
            data = f.read()
        kept = []
        off = 0
        while off + 4 <= len(data):
            (n,) = _LEN.unpack_from(data, off)
            kept.append(_dec.decode(data[off + 4 : off + 4 + n]))
            off += 4 + n
        merged = sorted(kept + extra, key=lambda r: r.sequence)
        tmp = seg.path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                for rec in merged:
                    body = _enc.encode(rec)
                    f.write(_LEN.pack(len(body)) + body)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        seg.progress_path.unlink(missing_ok=True)
        os.replace(tmp, seg.path)
        fresh = self._scan(seg.path)
        self._segments[self._segments.index(seg)] = fresh

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
                (s for s in self._segments[:-1]
                 if not s.outstanding and s.read_records == s.acked), None
            )  # fmt: skip
            if victim is None:
                break
            self._segments.remove(victim)
            self._delete(victim)
            lost = victim.records - victim.acked
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

    def read(self, limit: int) -> list[tuple[Ref, Record]]:
        """Up to `limit` records in order, each with where it lives (for `acked`)."""
        out: list[tuple[Ref, Record]] = []
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
                off += 4 + n
                ref = Ref(seg.index, seg.read_records, seg.read_offset + off)
                out.append((ref, _dec.decode(data[off - n : off])))
                seg.read_records += 1
                seg.outstanding += 1
            seg.read_offset += off
            if seg.read_records < seg.records:
                break  # keep order: the rest of this segment before the next one
        return out

    def acked(self, ref: Ref) -> None:
        """The record at `ref` is stored in JetStream; a segment fully sent and acknowledged
        is deleted (the one being written is closed first)."""
        for i, seg in enumerate(self._segments):
            if seg.index == ref.segment:
                seg.outstanding -= 1
                seg.early[ref.ordinal] = ref.end
                while seg.acked in seg.early:
                    seg.acked_offset = seg.early.pop(seg.acked)
                    seg.acked += 1
                if seg.outstanding == 0 and seg.read_records >= seg.records:
                    self._seal(seg)
                    self._segments.pop(i)
                    self._delete(seg)
                return

    def save_progress(self) -> None:
        """Write how far each segment is acknowledged, where it changed (one small file each,
        replaced whole): after a crash, the next process sends from there."""
        for seg in self._segments:
            if seg.acked == seg.progress_saved:
                continue
            tmp = seg.progress_path.with_suffix(".ack-tmp")
            try:
                tmp.write_bytes(_PROGRESS.pack(seg.acked, seg.acked_offset))
                os.replace(tmp, seg.progress_path)
            except OSError as exc:
                log.warning("could not save the spool's progress", segment=seg.path.name,
                            error=str(exc))  # fmt: skip
                return
            seg.progress_saved = seg.acked

    def _delete(self, seg: _Segment) -> None:
        seg.path.unlink(missing_ok=True)
        seg.progress_path.unlink(missing_ok=True)

    def close(self) -> None:
        self.save_progress()
        if self._out is not None:
            self._out.close()
            self._out = None
