"""The suite's fixtures are plugins: tests/support/plugin.py (nats-server, agents, the test
driver, the leak guard) and lab/pytest_plugin.py (the QEMU lab), which benchmarks share."""

pytest_plugins = ["tests.support.plugin", "lab.pytest_plugin"]
