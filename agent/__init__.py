"""virt-agent: libvirt domain events to NATS JetStream, commands from NATS."""

__version__ = "0.1.0"
