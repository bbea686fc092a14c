"""Test-driver domains and event generators for the suite."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import libvirt

DOMAIN_XML = """<domain type='test'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os>
</domain>"""


def define(conn: Any, name: str | None = None) -> Any:
    name = name or f"t-{uuid.uuid4().hex[:8]}"
    return conn.defineXML(DOMAIN_XML.format(name=name, uuid=uuid.uuid4()))


class Flipper:
    """Suspend/resume one domain in a thread of its own, on a connection of its own."""

    def __init__(self, uri: str) -> None:
        self.conn = libvirt.open(uri)
        self.dom = define(self.conn)
        self.dom.create()
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.dom.suspend()
            self.dom.resume()
            self.count += 2

    def start(self) -> Flipper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.dom.destroy()
        self.dom.undefine()
        self.conn.close()
