# Developer and CI entry points. `make test` is what .ci/run runs.
#
#   make setup      Debian packages (apt, only if missing) and .venv, exactly as
#                   requirements.lock pins (uv, only if the lock changed); scripts/setup.sh
#   make lock       refresh requirements.lock to the newest releases the ranges allow
#   make test-latest  the suite in a throwaway venv of the newest releases (not the lock)
#   make libvirtd   start this checkout's private libvirtd; prints its URI
#   make lint       ruff check, ruff format --check, mypy
#   make test       setup, libvirtd, lint, then pytest $(PYTEST_ARGS)
#   make demo       setup, libvirtd, then scripts/demo.sh (pools, config, reconcile)
#   make stop       stop the private libvirtd
#   make clean      stop, then remove .run
#
# Environment: RECONCILER_LIBVIRT_DIR (the daemon's directory; default from
# scripts/libvirt-dir.sh: .run/libvirt, or /tmp/reconciler-libvirt-HASH when the repo path
# would make the socket path too long) is exported to every recipe, and pytest also gets
# RECONCILER_LIBVIRT_URI. RECONCILER_WITH_CEPH=1 makes setup install Ceph too.

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

.PHONY: setup lock libvirtd lint test test-latest demo stop clean

setup:
	bash scripts/setup.sh

lock:
	bash scripts/lock.sh

libvirtd:
	bash scripts/libvirtd.sh start "$$RECONCILER_LIBVIRT_DIR"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup libvirtd lint
	RECONCILER_LIBVIRT_URI="$$(bash scripts/libvirtd.sh uri "$$RECONCILER_LIBVIRT_DIR")" \
		$(VENV)/bin/pytest $(PYTEST_ARGS)

test-latest: setup libvirtd
	RECONCILER_LIBVIRT_URI="$$(bash scripts/libvirtd.sh uri "$$RECONCILER_LIBVIRT_DIR")" \
		bash scripts/test-latest.sh $(PYTEST_ARGS)

demo: setup libvirtd
	bash scripts/demo.sh

stop:
	bash scripts/libvirtd.sh stop "$$RECONCILER_LIBVIRT_DIR"

# The /tmp fallback directory is this checkout's own too (named by its path's hash).
clean: stop
	rm -rf --one-file-system .run .tools
	case "$$RECONCILER_LIBVIRT_DIR" in /tmp/reconciler-libvirt-*) rm -rf --one-file-system "$$RECONCILER_LIBVIRT_DIR" ;; esac
