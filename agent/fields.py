"""The constrained fields of the contract's requests, each defined once: the handlers decode
with them, and the agent-to-agent client (agent/peers.py) builds its requests with them."""

from __future__ import annotations

import re
from typing import Annotated

from msgspec import Meta

UUID_PATTERN = r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$"
UUID_RE = re.compile(UUID_PATTERN)

# No control characters: libvirt's names cannot hold a NUL, and none is a name in a log line.
DomainName = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
DomainUUID = Annotated[str, Meta(pattern=UUID_PATTERN)]
RequestId = Annotated[str, Meta(min_length=1, max_length=128)]
HostId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+$", max_length=128)]
OpId = Annotated[str, Meta(pattern=r"^[0-9a-f]{1,64}$")]
Alias = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=128)]
TemplateName = Alias

# The longest lease a source may ask a destination to hold a primary for (a day); the
# destination caps it further (failover.max_lease_s).
MAX_LEASE_S = 86_400
Mac = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]
# A device definition one agent recorded and another reads (never plugged as it is on
# another host: agent/pool.py keeps only what is not the source host's).
DeviceXml = Annotated[str, Meta(min_length=1, max_length=65_536)]
