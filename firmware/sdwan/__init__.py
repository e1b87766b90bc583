"""Firmware of a Socket-class SD-WAN edge appliance.

Modules, one concern each: config (bootstrap TOML), fastpath (wrapper over the C
fast path), links (WAN link sockets), netcfg (kernel routes, MTU, MSS clamp),
dtls (DTLS sessions), pki (account CA and site certificates), tunnel (one peer
tunnel), control (control socket), socketd (the supervisor), socketctl (the
operator CLI), lab (network-namespace lab for tests, benchmarks and the demo).
"""

__version__ = "0.1.0"
