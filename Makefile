# Developer and CI entry points. `make test` is what .ci/run runs.
#
#   make setup      Debian packages (apt, only if missing) and .venv, exactly as
#                   requirements.lock pins (uv, only if the lock changed); scripts/setup.sh
#   make lock       refresh requirements.lock to the newest releases the ranges allow
#   make test-latest  the suite in a throwaway venv of the newest releases (not the lock)
#   make libvirtd   start this checkout's private libvirtd; prints its URI
#   make ceph       start this checkout's one-node Ceph cluster; prints its ceph.conf
#   make lint       ruff check, ruff format --check, mypy
#   make test       setup, libvirtd, lint, the Ceph cluster, then pytest in two phases
#                   (scripts/pytest-phases.sh: 3 parallel workers, then the `serial`
#                   tests alone), each given $(PYTEST_ARGS); PYTEST_ARGS="-n 0 ..." runs
#                   in one process; each phase is stopped, stacks printed, past
#                   $RECONCILER_PYTEST_TIMEOUT s (2400; serial: ..._SERIAL_TIMEOUT, 1200)
#   make demo       setup, libvirtd, then scripts/demo.sh (pools, config, reconcile)
#   make stop       stop the private libvirtd and the Ceph cluster
#   make clean      stop, then remove .run
#
# Environment: RECONCILER_LIBVIRT_DIR (the daemon's directory; default from
# scripts/libvirt-dir.sh: .run/libvirt, or /tmp/reconciler-libvirt-HASH when the repo path
# would make the socket path too long) and RECONCILER_CEPH_DIR (the cluster's directory;
# default from scripts/ceph-dir.sh: .run/ceph, or /tmp/reconciler-ceph-HASH) are exported to
# every recipe, and pytest also gets RECONCILER_LIBVIRT_URI and RECONCILER_CEPH_CONF.
# RECONCILER_WITH_CEPH=0 makes setup leave Ceph out (the Ceph tests then skip, saying why).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
# Prerequisites run in the order written (setup before lint, daemon before tests).
.NOTPARALLEL:
.DEFAULT_GOAL := test

VENV := .venv
PYTEST_ARGS ?=

# One private daemon per checkout; tests/conftest_libvirtd.py asks the same script.
RECONCILER_LIBVIRT_DIR := $(shell bash scripts/libvirt-dir.sh)
export RECONCILER_LIBVIRT_DIR
# One Ceph cluster per checkout; tests/conftest_ceph.py asks the same script.
RECONCILER_CEPH_DIR := $(shell bash scripts/ceph-dir.sh)
export RECONCILER_CEPH_DIR

# For the pytest recipes: start the Ceph cluster and set $$ceph_conf to its ceph.conf, or
# leave it empty where Ceph is not installed (the Ceph tests then skip, saying why). A
# cluster that fails to start fails the recipe.
START_CEPH = ceph_conf=; \
	if command -v ceph-mon >/dev/null; then \
		ceph_conf=$$(bash scripts/ceph.sh start "$$RECONCILER_CEPH_DIR"); \
	else echo "make: Ceph is not installed (scripts/setup.sh installs it): the Ceph tests skip"; fi

.PHONY: setup lock libvirtd ceph lint test test-latest demo stop clean

setup:
	bash scripts/setup.sh

lock:
	bash scripts/lock.sh

libvirtd:
	bash scripts/libvirtd.sh start "$$RECONCILER_LIBVIRT_DIR"

ceph:
	bash scripts/ceph.sh start "$$RECONCILER_CEPH_DIR"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup libvirtd lint
	$(START_CEPH); \
	RECONCILER_LIBVIRT_URI="$$(bash scripts/libvirtd.sh uri "$$RECONCILER_LIBVIRT_DIR")" \
	RECONCILER_CEPH_CONF="$$ceph_conf" \
		bash scripts/pytest-phases.sh $(PYTEST_ARGS)

test-latest: setup libvirtd
	$(START_CEPH); \
	RECONCILER_LIBVIRT_URI="$$(bash scripts/libvirtd.sh uri "$$RECONCILER_LIBVIRT_DIR")" \
	RECONCILER_CEPH_CONF="$$ceph_conf" \
		bash scripts/test-latest.sh $(PYTEST_ARGS)

demo: setup libvirtd
	bash scripts/demo.sh

stop:
	bash scripts/ceph.sh stop "$$RECONCILER_CEPH_DIR"
	bash scripts/libvirtd.sh stop "$$RECONCILER_LIBVIRT_DIR"

# The /tmp fallback directory is this checkout's own too (named by its path's hash).
clean: stop
	rm -rf --one-file-system .run .tools
	case "$$RECONCILER_LIBVIRT_DIR" in /tmp/reconciler-libvirt-*) rm -rf --one-file-system "$$RECONCILER_LIBVIRT_DIR" ;; esac
	case "$$RECONCILER_CEPH_DIR" in /tmp/reconciler-ceph-*) rm -rf --one-file-system "$$RECONCILER_CEPH_DIR" ;; esac
