"""What several test modules share and no test module should import from another: helpers
(bus.py, agents.py, domains.py, guests.py, operations.py, cli.py, examples.py) and the suite's
fixtures (plugin.py, with lab/pytest_plugin.py the lab's; tests/conftest.py names both)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
