"""The lab: real libvirt daemons (and later QEMU guests) on one machine, for tests, benchmarks
and demos. The agent never imports it."""
