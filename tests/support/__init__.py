"""What several test modules share and no test module should import from another: helpers
that are not fixtures (the fixtures are in tests/conftest.py)."""
