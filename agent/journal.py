"""The agent's journal in SQLite (state_dir/operations.db; small writes, done inline, WAL
mode): operations, so they survive restarts; the definitions of devices the agent unplugged;
VF reservations and incoming-migration admissions with their leases; the host's maintenance;
idempotency keys of commands."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agent.envelope import Operation, OpState

log = structlog.get_logger("agent.journal")


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """An incoming migration this host admitted (agent/admission.py), with a lease."""

    id: str
    operation: str
    domain: str
    name: str
    caller: str
    memory_kib: int
    expires: float
    reservation: str = ""  # the VF reservation it holds, if the domain has a primary


_admission = msgspec.json.Decoder(Admission)


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    """A primary NIC held on this host for a domain an operation migrates here."""

    id: str
    operation: str
    domain: str
    # "recorded" | "template:<name>" | "network:<name>" | "pci:<address>"
    resource: str
    expires: float
    # The host that asked for it (contract v1.1); empty: a v1 caller, not authenticated.
    caller: str = ""
    # "reserved" (the lease runs) or "plugging" (libvirt is attaching it: no expiry).
    state: str = "reserved"
    vf: str = ""  # the VF it holds (PCI address), if it holds one
    network: str = ""  # the hostdev network it takes a port of, if any


_operation = msgspec.json.Decoder(Operation)
decode_operation = _operation.decode


class Journal:
    """Operations on disk; small writes, so done inline (SQLite in WAL mode)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS operations (id TEXT PRIMARY KEY, domain TEXT, state TEXT,"
            " created REAL, body TEXT)"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS devices (domain TEXT, alias TEXT, xml TEXT, recorded REAL,"
            " PRIMARY KEY (domain, alias))"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS reservations (id TEXT PRIMARY KEY, operation TEXT,"
            " domain TEXT, resource TEXT, expires REAL, caller TEXT NOT NULL DEFAULT '')"
        )
        # Outcomes of requests that carried a request_id, for the idempotency window.
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS requests (caller TEXT, verb TEXT, request_id TEXT,"
            " digest TEXT, reply BLOB, at REAL, PRIMARY KEY (caller, verb, request_id))"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS quarantine (vf TEXT PRIMARY KEY, reason TEXT, since REAL)"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS admissions (id TEXT PRIMARY KEY, operation TEXT,"
            " expires REAL, body TEXT)"
        )
        # This host's maintenance (host.drain .. host.undrain): one row, or none.
        self.db.execute("CREATE TABLE IF NOT EXISTS maintenance (k INTEGER PRIMARY KEY, body TEXT)")
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(reservations)")}
        # Journals of earlier releases lack the newer columns.
        for column, default in (("caller", "''"), ("state", "'reserved'"), ("vf", "''"),
                                ("network", "''")):  # fmt: skip
            if column not in columns:
                self.db.execute(f"ALTER TABLE reservations ADD COLUMN {column} TEXT NOT NULL"
                                f" DEFAULT {default}")  # fmt: skip
        if "vf" not in columns:  # a pci: reservation of an earlier release holds its address
            self.db.execute("UPDATE reservations SET vf = substr(resource, 5)"
                            " WHERE resource LIKE 'pci:%'")  # fmt: skip

    def size_bytes(self) -> int:
        """The journal's disk use: the database and its write-ahead log."""
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def request_outcome(self, key: tuple[str, str, str], since: float) -> tuple[str, bytes] | None:
        """(digest, reply) of a request answered at or after `since`."""
        row = self.db.execute(
            "SELECT digest, reply FROM requests WHERE caller = ? AND verb = ? AND request_id = ?"
            " AND at >= ?",
            (*key, since),
        ).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def record_outcome(self, key: tuple[str, str, str], digest: str, reply: bytes) -> None:
        now = time.time()
        self.db.execute(
            "INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?, ?, ?)", (*key, digest, reply, now)
        )

    def prune_outcomes(self, before: float, keep: int = 100_000) -> int:
        """Outcomes older than `before`, and beyond the newest `keep` (a flood of request ids
        within one window stays bounded)."""
        n = self.db.execute("DELETE FROM requests WHERE at < ?", (before,)).rowcount
        return (
            n
            + self.db.execute(
                "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests ORDER BY at DESC"
                " LIMIT -1 OFFSET ?)",
                (keep,),
            ).rowcount
        )

    def maintenance(self) -> dict[str, Any] | None:
        row = self.db.execute("SELECT body FROM maintenance WHERE k = 1").fetchone()
        return msgspec.json.decode(row[0]) if row else None

    def set_maintenance(self, body: dict[str, Any] | None) -> None:
        if body is None:
            self.db.execute("DELETE FROM maintenance WHERE k = 1")
        else:
            self.db.execute("INSERT OR REPLACE INTO maintenance VALUES (1, ?)",
                            (msgspec.json.encode(body).decode(),))  # fmt: skip

    # Incoming migrations admitted here (agent/admission.py), with a lease.
    def add_admission(self, a: Admission) -> None:
        body = msgspec.json.encode(a).decode()
        self.db.execute("INSERT OR REPLACE INTO admissions VALUES (?, ?, ?, ?)",
                        (a.id, a.operation, a.expires, body))  # fmt: skip

    def admissions(self, now: float) -> list[Admission]:
        """Every admission whose lease has not ended (the others are deleted on the way)."""
        self.db.execute("DELETE FROM admissions WHERE expires < ?", (now,))
        rows = self.db.execute("SELECT body FROM admissions ORDER BY expires").fetchall()
        return [_admission.decode(r[0]) for r in rows]

    def delete_admission(self, admission_id: str) -> bool:
        return self.db.execute("DELETE FROM admissions WHERE id = ?", (admission_id,)).rowcount > 0

    # Reservations of primary NICs for migrated-in domains (agent/pool.py), with a lease.
    def add_reservation(self, r: Reservation) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO reservations (id, operation, domain, resource, expires, caller,"
            " state, vf, network) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r.id, r.operation, r.domain, r.resource, r.expires, r.caller, r.state, r.vf,
             r.network),
        )  # fmt: skip

    def reservations(self, now: float) -> list[Reservation]:
        """Every live reservation: plugging ones, and reserved ones whose lease has not ended
        (those are deleted on the way)."""
        self.db.execute("DELETE FROM reservations WHERE expires < ? AND state = 'reserved'", (now,))
        rows = self.db.execute(
            "SELECT id, operation, domain, resource, expires, caller, state, vf, network"
            " FROM reservations ORDER BY expires"
        ).fetchall()
        return [Reservation(id=r[0], operation=r[1], domain=r[2], resource=r[3], expires=r[4],
                            caller=r[5], state=r[6], vf=r[7], network=r[8])
                for r in rows]  # fmt: skip

    def set_reservation_state(
        self, reservation_id: str, state: str, expires: float | None = None
    ) -> bool:
        """Move a live reservation (plugging, or reserved with its lease running) to `state`,
        with a new lease end if given; False if it is gone."""
        return (
            self.db.execute(
                "UPDATE reservations SET state = ?, expires = coalesce(?, expires) WHERE id = ?"
                " AND (state != 'reserved' OR expires >= ?)",
                (state, expires, reservation_id, time.time()),
            ).rowcount
            > 0
        )

    def requeue_plugging(self, expires: float) -> None:
        """At start: plugs the previous process did not finish hold their reservation again."""
        self.db.execute(
            "UPDATE reservations SET state = 'reserved', expires = max(expires, ?)"
            " WHERE state = 'plugging'",
            (expires,),
        )

    def quarantine(self, vf: str, reason: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO quarantine VALUES (?, ?, ?)",
                        (vf, reason, time.time()))  # fmt: skip

    def quarantined(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT vf, reason FROM quarantine").fetchall())

    def unquarantine(self, vf: str) -> bool:
        return self.db.execute("DELETE FROM quarantine WHERE vf = ?", (vf,)).rowcount > 0

    def drop_reservation(self, reservation_id: str) -> bool:
        cur = self.db.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
        return cur.rowcount > 0

    def record_device(self, domain_uuid: str, alias: str, xml: str) -> None:
        """What device.detach unplugged, so device.attach can plug the same thing back."""
        self.db.execute(
            "INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?)",
            (domain_uuid, alias, xml, time.time()),
        )

    def recorded_device(self, domain_uuid: str, alias: str) -> str | None:
        row = self.db.execute(
            "SELECT xml FROM devices WHERE domain = ? AND alias = ?", (domain_uuid, alias)
        ).fetchone()
        return str(row[0]) if row else None

    def save(self, op: Operation) -> bytes:
        """Write `op` as it is now; its encoded form (what was written)."""
        body = msgspec.json.encode(op)
        self.db.execute(
            "INSERT OR REPLACE INTO operations VALUES (?, ?, ?, ?, ?)",
            (op.id, op.domain, op.state, op.created, body.decode()),
        )
        return body

    def get(self, op_id: str) -> Operation | None:
        row = self.db.execute("SELECT body FROM operations WHERE id = ?", (op_id,)).fetchone()
        return msgspec.json.decode(row[0], type=Operation) if row else None

    def recent(
        self, limit: int, state: str | None = None, domain: str | None = None
    ) -> list[Operation]:
        sql, args = "SELECT body FROM operations", []
        where = []
        if state:
            where.append("state = ?")
            args.append(state)
        if domain:
            where.append("domain = ?")
            args.append(domain)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC LIMIT ?"
        rows = self.db.execute(sql, (*args, limit)).fetchall()
        return [msgspec.json.decode(r[0], type=Operation) for r in rows]

    def running(self) -> list[Operation]:
        return self.recent(10_000, state=OpState.RUNNING)

    def prune(
        self, max_operations: int, retention_s: float, outcomes_window_s: float
    ) -> dict[str, int]:
        """Bound the journal: finished operations beyond `max_operations` (the oldest) or older
        than `retention_s`, recorded devices older than `retention_s`, idempotency outcomes past
        their window. Running operations and reservations stay. Rows deleted, per table."""
        cutoff = time.time() - retention_s
        ops = self.db.execute(
            "DELETE FROM operations WHERE state != ? AND (created < ? OR id IN (SELECT id FROM"
            " operations WHERE state != ? ORDER BY created DESC LIMIT -1 OFFSET ?))",
            (OpState.RUNNING, cutoff, OpState.RUNNING, max_operations),
        ).rowcount
        devices = self.db.execute("DELETE FROM devices WHERE recorded < ?", (cutoff,)).rowcount
        requests = self.prune_outcomes(time.time() - outcomes_window_s)
        return {"operations": ops, "devices": devices, "requests": requests}

    def sizes(self) -> dict[str, int]:
        return {
            t: self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608 - fixed names
            for t in ("operations", "devices", "reservations", "requests", "quarantine")
        }

    def close(self) -> None:
        self.db.close()
