"""cffi build of the C fast path (API mode, out-of-line) as the module `sdwan.bindings._fastpath`.

Owns how native/src/*.c are compiled and linked against the system libcrypto, and the
cdef derived from native/include/fastpath.h. setup.py picks up `ffibuilder` through
`cffi_modules`; as a script it builds the module into a folder for development:

    python native/build_fastpath.py [--sanitize] [--inplace DIR]

DIR (default: firmware/) is the folder on sys.path; the module lands in DIR/sdwan/bindings/.
--sanitize builds with AddressSanitizer and UBSan; run Python with libasan preloaded.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEADER = HERE / "include" / "fastpath.h"
MODULE = "sdwan.bindings._fastpath"

WARNINGS = ["-std=c11", "-Wall", "-Wextra", "-Werror"]
# -fno-sanitize-recover turns any UBSan finding into a crash, i.e. a failing test.
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
_INT_DEFINE = re.compile(r"^\s*#\s*define\s+\w+\s+-?(0x[0-9a-fA-F]+|\d+)\s*$")


def cdef_from_header(text: str) -> str:
    """The header minus preprocessor lines, keeping integer #defines (cffi reads those)."""
    kept = [
        line
        for line in text.splitlines()
        if not line.lstrip().startswith("#") or _INT_DEFINE.match(line)
    ]
    return "\n".join(kept) + "\n"


def make_builder(sanitize: bool = False, absolute: bool = False) -> FFI:
    """absolute: for ffi.compile(), which runs the compiler from its own tmpdir;
    setuptools instead wants paths relative to the project folder it runs from."""

    def _rel(path: Path) -> str:
        return str(path) if absolute else os.path.relpath(path, os.getcwd())

    ffi = FFI()
    ffi.cdef(cdef_from_header(HEADER.read_text()))
    opt = ["-O1", "-g", "-fno-omit-frame-pointer", *SANITIZE] if sanitize else ["-O2"]
    ffi.set_source(
        MODULE,
        '#include "fastpath.h"\n',
        sources=[_rel(p) for p in sorted((HERE / "src").glob("*.c"))],
        include_dirs=[_rel(HERE / "include"), _rel(HERE / "src")],
        libraries=["crypto", "pthread", "m"],
        extra_compile_args=[*WARNINGS, *opt],
        extra_link_args=SANITIZE if sanitize else [],
    )
    return ffi


ffibuilder = make_builder()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build sdwan.bindings._fastpath into a folder")
    ap.add_argument("--sanitize", action="store_true", help="ASan + UBSan build")
    ap.add_argument(
        "--inplace",
        metavar="DIR",
        type=Path,
        default=ROOT / "firmware",
        help="folder on sys.path that gets sdwan/bindings/_fastpath*.so (default: firmware/)",
    )
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    out = "build-asan" if args.sanitize else "build"
    print(build_into(make_builder(args.sanitize, absolute=True), out, args.inplace))
    return 0


def build_into(ffi: FFI, work: str, inplace: Path) -> Path:
    """Compile ``ffi`` in native/out/``work`` and copy the module into its package under
    ``inplace`` (sdwan/bindings/)."""
    built = Path(ffi.compile(tmpdir=str(ROOT / "native" / "out" / work), verbose=False))
    dest = inplace.resolve() / Path(*MODULE.split(".")[:-1])
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / built.name
    shutil.copy2(built, target)
    return target


if __name__ == "__main__":
    sys.exit(main())
