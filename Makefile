# Entry points; the README's two commands are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
FUZZ_SECONDS ?= 60

.PHONY: setup demo test lint test-py test-asan fuzz bench clean

setup:
	scripts/setup.sh

demo: setup
	$(VENV)/bin/socket-lab demo

test: setup lint fuzz test-asan test-py

lint:
	$(VENV)/bin/ruff check .
	shellcheck flash.sh

test-py:
	$(PY) -m pytest -q -ra

# The native tests again, against a build with AddressSanitizer and UBSan.
test-asan:
	scripts/test-asan.sh

fuzz:
	native/fuzz/run.sh $(FUZZ_SECONDS)

bench: setup
	$(PY) bench/dataplane --json bench-dataplane.json
	$(PY) bench/cloud --json bench-cloud.json

clean:
	rm -rf build native/out .pytest_cache
