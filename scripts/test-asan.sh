#!/usr/bin/env bash
# The native tests again, against the fast path built with AddressSanitizer and
# UBSan. The sanitized module is built into native/out/asan and selected with
# SDWAN_FASTPATH_MODULE, so the normal build in .venv is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" native/build_fastpath.py --sanitize --inplace native/out/asan
mod=$(ls native/out/asan/sdwan/bindings/_fastpath*.so | head -n 1)
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
SDWAN_FASTPATH_MODULE="$mod" \
  "$PY" -m pytest -q -p no:cacheprovider tests/native
