"""Only here because setuptools reads `cffi_modules` from setup(); the rest is in pyproject.toml."""

from setuptools import setup

setup(
    cffi_modules=[
        "native/build_fastpath.py:ffibuilder",
        "native/build_tls.py:ffibuilder",
    ]
)
