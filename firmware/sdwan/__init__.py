"""Firmware of a Socket-class SD-WAN edge appliance, one subpackage per role:

* `bindings`: the typed wrappers over the C modules (the fast path, the system libssl's DTLS).
* `common`: what every daemon shares: the TOML config engine, the store, the control socket,
  control messages, identities, DTLS sessions, STUN, kernel network configuration, the
  service frame.
* `site`: a site's supervisor (`socketd`) and its parts: configuration schema, link sockets,
  peer tunnels, the cloud (PoP sessions), and the operator CLI `socketctl`.
* `appliance`: the box itself: serial console, LEDs, watchdog, WAN addressing.
* `pop`: the reference PoP (`popd`, `popctl`), its account file and the account PKI.
* `lab`: network-namespace and QEMU labs for the tests, the benchmarks and the demo.

docs/architecture.md walks a packet and a control message through them.
"""

__version__ = "0.1.0"
