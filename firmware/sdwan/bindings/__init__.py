"""Thin typed wrappers over the cffi modules: `fastpath` (the C fast path, native/include/
fastpath.h) and `tls` (the system libssl's DTLS). Nothing above this package touches cffi."""
