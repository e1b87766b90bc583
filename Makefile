# Entry points; the README's two commands are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
# Fuzzing in `make test`, in total over the targets (native/fuzz/run.sh shares it out): a
# smoke that every target still runs; fuzz longer by hand.
FUZZ_SECONDS ?= 60
# pytest workers: the long QEMU tests run beside the rest (tests/conftest.py orders them).
TEST_WORKERS ?= 2
BOARD ?= qemu-x86_64
# The firmware signing keys (docs/update.md): firmware-ca.pem for the images' keyring,
# signer.pem and signer.key to sign bundles. A missing folder gets DEVELOPMENT keys.
FIRMWARE_KEYS ?= build/firmware-keys
export FIRMWARE_KEYS
# The images `make test` builds for the system tests (tests/system).
IMAGE_BOARDS := qemu-x86_64 qemu-aarch64

.PHONY: image images image-repro bundle buildroot-check setup demo test lint test-py test-asan fuzz bench bench-setup \
	bench-smoke clean

setup:
	scripts/setup.sh

demo: setup
	$(VENV)/bin/socket-lab demo

# The fuzzers, the sanitizer build and the images do not depend on each other: on two CPUs
# they overlap; each one's output is kept together.
test: setup lint
	$(MAKE) --no-print-directory -j2 --output-sync=target fuzz test-asan images
	$(MAKE) --no-print-directory test-py

lint:
	$(VENV)/bin/ruff check .
	shellcheck flash.sh buildroot/check.sh buildroot/board/*/*.sh

test-py:
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup

# The native tests again, against a build with AddressSanitizer and UBSan.
test-asan:
	scripts/test-asan.sh

fuzz:
	native/fuzz/run.sh $(FUZZ_SECONDS)

# The peer tunnels bench/dataplane compares against (Debian packages); `make test` does not
# install them, its smoke runs measure what is present.
bench-setup:
	scripts/bench-setup.sh

bench: setup bench-setup
	$(PY) bench/dataplane --json bench-dataplane.json
	$(PY) bench/cloud --json bench-cloud.json
	$(PY) bench/mesh --json bench-mesh.json
	$(PY) bench/recovery --json bench-recovery.json
	$(PY) bench/links --json bench-links.json
	$(PY) bench/flood --json bench-flood.json
	$(PY) bench/popd --json bench-popd.json

# Only the benches' smoke runs (test-py runs them too): each bench once, shortest mode.
bench-smoke: setup
	$(PY) -m pytest -q -ra tests/lab/test_bench.py tests/system/test_bench_boot.py

# The appliance disk image of one board: build/images/$(BOARD).img (docs/image.md).
image: setup
	$(PY) board/mkimage.py $(BOARD)

images: setup
	set -e; for b in $(IMAGE_BOARDS); do $(PY) board/mkimage.py $$b; done

# Builds $(BOARD) twice and fails unless both images have the same sha256.
image-repro: setup
	$(PY) board/mkimage.py $(BOARD) --check-repro

# The signed update bundle of $(BOARD) from its slot image: build/images/$(BOARD).raucb
# (docs/update.md). ROOTFS=path to bundle another slot image.
bundle: setup
	$(PY) board/mkbundle.py $(BOARD) --keys "$(FIRMWARE_KEYS)" $(if $(ROOTFS),--rootfs "$(ROOTFS)")

# The Buildroot tree against a Buildroot checkout (docs/buildroot.md): make buildroot-check
# BUILDROOT=../buildroot. Not part of `make test`: CI has no Buildroot.
buildroot-check:
	@test -n "$(BUILDROOT)" || { echo "usage: make buildroot-check BUILDROOT=<checkout>" >&2; exit 2; }
	buildroot/check.sh $(BUILDROOT)

clean:
	rm -rf build native/out .pytest_cache
