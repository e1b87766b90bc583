"""One site of test_offload_netns: a FastPath on a real TUN and a UDP link socket in the
current network namespace, wired to the other site with fixed keys.

    python tunsite.py SITE_ID LOCAL_IP PEER_IP

Prints "ready <tun features>" once running, then runs until stdin closes and prints the
global counters as JSON on the way out.
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import asdict

from sdwan.bindings.fastpath import FastPath

PORT = 4800


def main() -> int:
    site, local, peer = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    other = 3 - site
    k1, k2 = bytes([1]) * 32, bytes([2]) * 32
    with FastPath() as fp:
        fp.tun_open("fp0")
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        udp.bind((local, PORT))
        fp.link_add(1, udp.fileno())
        udp.close()
        fp.peer_add(other)
        fp.route_set(f"10.{other}.0.0/24", other)
        fp.route_set(f"fd00:{other}::/64", other)
        fp.set_endpoint(other, 1, (peer, PORT))
        tx, rx = (k1, k2) if site == 1 else (k2, k1)
        fp.key_install(other, 100 + site, tx, rx)
        fp.key_activate(other, 100 + site, 100 + other)
        fp.start()
        print(f"ready {fp.tun_features}", flush=True)
        sys.stdin.read()
        print(json.dumps(asdict(fp.global_counters())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
