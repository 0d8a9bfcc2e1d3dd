# The two commands of the README are `make run` and `make test`; both set everything up first.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup run test test-fast test-rig lint bench clean

setup:
	bash setup/install.sh

# Main job: a handful of tiny guests under the QEMU port, managed in the foreground with a live table.
run: setup
	$(VENV)/bin/xenswap demo

# The whole suite: lint, the fast tier, then the rig tier (real QEMU guests and the nested Xen rig).
test: setup
	$(VENV)/bin/ruff check xenswap tests bench
	$(PYTEST) -m "not rig" tests
	$(PYTEST) -m rig -v -rA --durations=15 tests

test-fast: setup
	$(PYTEST) -m "not rig" tests

test-rig: setup
	$(PYTEST) -m rig tests

lint: setup
	$(VENV)/bin/ruff check xenswap tests bench

bench: setup
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
	find xenswap -name '*.so' -delete
