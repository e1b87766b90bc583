"""popd on 127.0.0.1, driven by a minimal site client built from sdwan.common.dtls and
sdwan.bindings.fastpath.

popd runs as a real process (it binds no device); the client is a real DTLS client and a real
fast path, so the key hand-over, registration, pushes, relay and bad input go over real UDP.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sdwan.bindings.fastpath import FastPath, FastPathError
from sdwan.common.dtls import DtlsContext
from sdwan.lab.netns import wait_until
from sdwan.pop import pki
from sdwan.pop.popd import DELTA_IN_FLIGHT_S
from sdwan.site.renewal import make_request

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
POP_PEER = 0x80000000 | 1 << 8 | 1  # the PoP session of PoP 1 over link 1 (docs/cloud.md)

ACCOUNT = """
[account]
name = "acme"

[[sites]]
id = 1
name = "branch-1"
subnets = ["10.1.0.0/24"]
offcloud = true
recovery = true

[[sites]]
id = 2
name = "branch-2"
subnets = ["10.2.0.0/24"]

[[rules]]
name = "all"
transport = "cloud"
"""

FIREWALL = """
[firewall]
default = "deny"

[[firewall.rules]]
name = "no-ssh"
action = "deny"
src = ["branch-2"]
dst = ["branch-1"]
protocol = "tcp"
ports = [22, "2200-2299"]

[[firewall.rules]]
name = "rest"
action = "allow"
"""


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ip_packet(src: str, dst: str, payload: bytes = b"x" * 32) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0, s.packed, d.packed
    )
    return hdr + payload


@dataclass
class PopEnv:
    root: Path
    ca_dir: Path
    account: Path
    config: Path
    sock: Path
    port: int
    stun_port: int
    proc: subprocess.Popen[str] | None = None
    log: Path | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def site_files(self, n: int, ca_dir: Path | None = None) -> tuple[Path, Path, Path]:
        ca_dir = ca_dir or self.ca_dir
        out = self.root / f"{ca_dir.name}-out"
        if not (out / f"site-{n}.pem").exists():
            pki.issue_site(ca_dir, n, out)
        return ca_dir / "ca.pem", out / f"site-{n}.pem", out / f"site-{n}.key"

    def popctl(self, *args: str, json_out: bool = True) -> tuple[int, Any]:
        cp = subprocess.run(
            [sys.executable, "-m", "sdwan.pop.popctl", "--socket", str(self.sock), *args,
             *(["--json"] if json_out else [])],
            capture_output=True, text=True, timeout=20, env=_env(),
        )
        if not json_out:
            return cp.returncode, cp.stdout + cp.stderr
        try:
            return cp.returncode, json.loads(cp.stdout)
        except json.JSONDecodeError:
            return cp.returncode, cp.stderr

    def status(self) -> dict[str, Any]:
        rc, out = self.popctl("status")
        assert rc == 0, out
        return out

    def log_text(self) -> str:
        assert self.log is not None
        return self.log.read_text()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(FIRMWARE) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_popd(env: PopEnv) -> None:
    env.log = env.root / "popd.log"
    logf = env.log.open("a")
    env.proc = subprocess.Popen(
        [sys.executable, "-m", "sdwan.pop.popd", "--config", str(env.config),
         "--log-level", "debug"],
        stdout=logf, stderr=subprocess.STDOUT, env=_env(), text=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if env.proc.poll() is not None:
            raise AssertionError(f"popd exited: {env.log_text()}")
        if env.sock.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"popd did not open its control socket: {env.log_text()}")


def stop_popd(env: PopEnv) -> None:
    if env.proc is not None and env.proc.poll() is None:
        env.proc.send_signal(signal.SIGTERM)
        try:
            env.proc.wait(10)
        except subprocess.TimeoutExpired:
            env.proc.kill()
            env.proc.wait()


@pytest.fixture
def pop(tmp_path: Path) -> Iterator[PopEnv]:
    root = tmp_path
    ca_dir = root / "ca"
    pki.create_ca(ca_dir, account="acme")
    pki.issue_pop(ca_dir, 1, root / "pop")
    account = root / "account.toml"
    account.write_text(ACCOUNT)
    port, stun_port = _free_udp_port(), _free_udp_port()
    sock = root / "popd.sock"
    config = root / "pop.toml"
    config.write_text(f"""
[pop]
id = 1
listen = "127.0.0.1"
port = {port}
stun_port = {stun_port}
account = "account.toml"

[paths]
data_dir = "data"
control_socket = "{sock}"

[pki]
ca = "ca/ca.pem"
cert = "pop/pop-1.pem"
key = "pop/pop-1.key"

[cloud]
keepalive_ms = 200
dead_after_ms = 600
""")
    env = PopEnv(root, ca_dir, account, config, sock, port, stun_port)
    start_popd(env)
    try:
        yield env
    finally:
        stop_popd(env)
        assert env.proc is not None
        assert env.proc.returncode == 0, env.log_text()[-3000:]
        assert "Traceback" not in env.log_text(), env.log_text()[-3000:]


class Client:
    """The site side of one PoP session, as little of it as the protocol needs."""

    def __init__(
        self, files: tuple[Path, Path, Path], site_id: int, pop_addr: tuple[str, int],
        tun: bool = False, subnets_via_pop: tuple[str, ...] = (),
    ) -> None:
        self.site_id = site_id
        self.pop_addr = pop_addr
        self.ctx = DtlsContext(*files, site_id)
        self.fp = FastPath()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        self.local = sock.getsockname()
        self.fp.link_add(1, sock.fileno())
        sock.close()
        self.tun: socket.socket | None = None
        if tun:
            self.tun, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.fp.tun_attach(theirs.fileno())
            theirs.close()
        self.fp.peer_add(POP_PEER)
        self.fp.set_endpoint(POP_PEER, 1, pop_addr)
        for net in subnets_via_pop:
            self.fp.route_set(net, POP_PEER)
        self.fp.start()
        self.session = self.ctx.client(("pop", 1))
        self.inbox: list[dict[str, Any]] = []
        self.idx = 0
        self.activated = False
        self.key_extra: dict[str, Any] = {}  # added to our `key` (the announced key timers)
        self._stop = threading.Event()
        self._keepalive = threading.Thread(target=self._keepalives, daemon=True)
        self._keepalive.start()

    def close(self) -> None:
        self._stop.set()
        self._keepalive.join()
        self.fp.close()
        if self.tun is not None:
            self.tun.close()

    def _keepalives(self) -> None:
        while not self._stop.wait(0.1):
            if self.activated:
                with contextlib.suppress(FastPathError):
                    self.fp.send_keepalive(POP_PEER)

    def raw(self, data: bytes) -> None:
        self.fp.ctrl_send(1, self.pop_addr, data)

    def pump(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; inbox {self.inbox}, dtls {self.session!r}")
            select.select([self.fp.ctrl_fd], [], [], 0.02)
            while (ev := self.fp.ctrl_recv()) is not None:
                if ev.data and 20 <= ev.data[0] <= 63:
                    for d in self.session.receive(ev.data):
                        self.raw(d)
            due = self.session.timeout()
            if due is not None and due <= 0:
                for d in self.session.on_timeout():
                    self.raw(d)
            if self.session.established and not self.idx:
                # Keys go in before any message is read: the PoP's `key` may share the flight.
                tx, rx = self.session.export_keys()
                self.idx = int.from_bytes(os.urandom(4), "big") or 1
                self.fp.key_install(POP_PEER, self.idx, tx, rx)
                self.send({"t": "key", "idx": self.idx, **self.key_extra})
            for m in self.session.take_messages():
                self._on_message(json.loads(m))

    def _on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("t") == "key":
            self.fp.key_activate(POP_PEER, self.idx, msg["idx"])
            self.activated = True
            self.send({"t": "key-ack", "idx": msg["idx"]})
        self.inbox.append(msg)

    def send(self, msg: dict[str, Any]) -> None:
        for d in self.session.send(json.dumps(msg).encode()):
            self.raw(d)

    def wait_for(self, kind: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for m in self.inbox:
                if m.get("t") == kind and all(m.get(k) == v for k, v in match.items()):
                    return m
            return None

        self.pump(lambda: found() is not None, timeout)
        msg = found()
        assert msg is not None
        self.inbox.remove(msg)
        return msg

    def connect(self) -> None:
        for d in self.session.start():
            self.raw(d)
        self.pump(lambda: self.session.established or self.session.failed is not None)
        assert self.session.established, self.session.failed
        self.wait_for("key-ack", idx=self.idx)
        self.pump(lambda: self.activated)

    def rekey(self) -> None:
        """A fresh handshake from the same socket, as the site's periodic rekey does."""
        self.session = self.ctx.client(("pop", 1))
        self.idx = 0
        self.connect()

    def register(
        self, link: str = "wan1", links: tuple[str, ...] = ("wan1",), precedence: int = 1,
        extra: tuple[dict[str, Any], ...] = (),
    ) -> dict[str, Any]:
        all_links = [
            {"name": n, "precedence": precedence if n == link else 1,
             "local": f"{self.local[0]}:{self.local[1]}", "id": i + 1}
            for i, n in enumerate(links)
        ]
        me = next(x for x in all_links if x["name"] == link)
        all_links += [{**x, "id": len(all_links) + i + 1} for i, x in enumerate(extra)]
        self.send({"t": "register", "site_id": self.site_id, "version": "test",
                   "link": me, "links": all_links})
        return self.wait_for("welcome")


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def new_client(pop: PopEnv, made: list[Client], site_id: int, **kw: Any) -> Client:
    c = Client(pop.site_files(site_id), site_id, pop.addr, **kw)
    made.append(c)
    return c


def test_register_welcome_ping_and_directory(pop: PopEnv, clients: list[Client]) -> None:
    a = new_client(pop, clients, 1)
    a.connect()
    welcome = a.register()
    assert welcome["pop_id"] == 1
    assert welcome["config"] == {
        "name": "branch-1", "subnets": ["10.1.0.0/24"], "offcloud": True, "recovery": True,
        "rules": [{"name": "all", "transport": "cloud", "secondary": None, "src": None,
                   "dst": None, "src_subnets": None, "dst_subnets": None, "protocol": "any",
                   "ports": [], "complex": []}],
        # An account without [firewall]: allow everything.
        "firewall": {"default": "allow", "rules": []},
        # Nothing revoked: every certificate of the account CA naming a site of it is good.
        "revoked": [],
    }
    assert welcome["directory"] == [{
        "site_id": 2, "name": "branch-2", "subnets": ["10.2.0.0/24"], "links": [],
        "offcloud": False, "recovery": False, "online": False,
    }]
    a.send({"t": "ping", "id": 42})
    assert a.wait_for("pong")["id"] == 42

    # Site 2 appears: site 1 gets only that difference, with 2's public endpoint as the PoP
    # sees it, on top of the directory it was welcomed with.
    b = new_client(pop, clients, 2)
    b.connect()
    wb = b.register()
    assert [e["site_id"] for e in wb["directory"]] == [1]
    assert wb["directory"][0]["links"] == [
        {"name": "wan1", "precedence": 1, "public": f"127.0.0.1:{a.local[1]}"}
    ]
    push = a.wait_for("directory-delta")
    assert push["base"] == welcome["rev"] and push["rev"] > welcome["rev"]
    assert push["removed"] == [] and [e["site_id"] for e in push["changed"]] == [2]
    assert push["changed"][0]["online"] is True
    assert push["changed"][0]["links"][0]["public"] == f"127.0.0.1:{b.local[1]}"
    # A ping sent before the push arrived (it crossed it in flight) is answered, nothing more.
    a.send({"t": "ping", "id": 42, "rev": welcome["rev"]})
    assert a.wait_for("pong", id=42)
    assert not [m for m in a.inbox if m["t"] == "directory"]
    # A site whose ping still shows another directory well after (a lost push) gets the whole
    # one again.
    time.sleep(DELTA_IN_FLIGHT_S)
    a.send({"t": "ping", "id": 43, "rev": welcome["rev"]})
    whole = a.wait_for("directory")
    assert whole["rev"] == push["rev"] and whole["directory"][0]["online"] is True
    a.send({"t": "ping", "id": 44, "rev": whole["rev"]})
    assert a.wait_for("pong", id=44)
    assert not [m for m in a.inbox if m["t"] == "directory"]

    rc, sites = pop.popctl("sites")
    assert rc == 0
    by_id = {s["site_id"]: s for s in sites["sites"]}
    assert by_id[1]["online"] and by_id[2]["online"]
    assert by_id[1]["sessions"][0]["peer_id"] == 1 << 8 | 1
    assert by_id[1]["sessions"][0]["routed"] is True

    # Site 2 goes silent: after dead_after_ms the PoP drops it and tells site 1.
    b.close()
    clients.remove(b)
    gone = a.wait_for("directory-delta", timeout=5)
    assert gone["changed"][0]["online"] is False
    rc, events = pop.popctl("events", "--site", "2")
    kinds = [e["kind"] for e in events["events"]]
    assert kinds[:2] == ["popd.session.down", "popd.session.up"]  # newest first


def test_an_alt_wan_endpoint_another_site_lists_is_refused(
    pop: PopEnv, clients: list[Client]
) -> None:
    # Site 2 claiming site 1's Alt-WAN address would aim every site's handshakes for site 2
    # at site 1: the PoP lists it for site 1 only.
    mpls = {"name": "mpls", "precedence": 1, "local": "10.200.0.1:4800", "altwan": True}
    a = new_client(pop, clients, 1)
    a.connect()
    a.register(extra=(mpls,))
    b = new_client(pop, clients, 2)
    b.connect()
    b.register(extra=(mpls,))
    a.wait_for("directory-delta")
    rc, sites = pop.popctl("sites")
    assert {s["site_id"]: s["altwan"] for s in sites["sites"]} == {1: ["10.200.0.1:4800"], 2: []}


def test_the_directory_lists_alt_wan_endpoints_also_while_a_site_is_offline(
    pop: PopEnv, clients: list[Client]
) -> None:
    a = new_client(pop, clients, 1)
    a.connect()
    a.register()
    b = new_client(pop, clients, 2)
    b.connect()
    mpls = {"name": "mpls", "precedence": 1, "local": "10.200.0.2:4800", "altwan": True}
    # Site 2 registers over its Internet link only; its Alt-WAN link travels in `links`.
    b.register(extra=(mpls,))
    push = a.wait_for("directory-delta")
    (entry,) = push["changed"]
    assert entry["altwan"] == ["10.200.0.2:4800"]
    assert [x["name"] for x in entry["links"]] == ["wan1"]  # no session over the Alt-WAN link
    rc, sites = pop.popctl("sites")
    assert {s["site_id"]: s["altwan"] for s in sites["sites"]} == {1: [], 2: ["10.200.0.2:4800"]}
    # Offline, it stays reachable there: the other sites need it most when the cloud is gone.
    b.close()
    clients.remove(b)
    gone = a.wait_for("directory-delta", timeout=5)
    assert gone["changed"][0]["online"] is False
    assert gone["changed"][0]["altwan"] == ["10.200.0.2:4800"]
    # An Alt-WAN link without an address right now (a DHCP renewal, a flap) keeps the last
    # endpoint listed, so the other sites keep their tunnels; a malformed flag is refused.
    c = new_client(pop, clients, 2)
    c.connect()
    c.register(extra=({**mpls, "local": "0.0.0.0:4800"},))
    back = a.wait_for("directory-delta", timeout=5)
    assert back["changed"][0]["online"] is True
    assert back["changed"][0]["altwan"] == ["10.200.0.2:4800"]
    c.send({"t": "register", "site_id": 2, "version": "test",
            "link": {"name": "wan1", "precedence": 1, "local": "", "id": 1},
            "links": [{"name": "wan1", "precedence": 1, "local": "", "id": 1},
                      {**mpls, "id": 2, "altwan": "yes"}]})
    assert "altwan: expected true or false" in c.wait_for("error")["reason"]


def test_relay_between_two_sites(pop: PopEnv, clients: list[Client]) -> None:
    a = new_client(pop, clients, 1, tun=True, subnets_via_pop=("10.2.0.0/24",))
    b = new_client(pop, clients, 2, tun=True, subnets_via_pop=("10.1.0.0/24",))
    for c in (a, b):
        c.connect()
        c.register()
    a.pump(lambda: bool([m for m in a.inbox if m["t"] == "directory-delta"]))
    assert a.tun is not None and b.tun is not None
    pkt = ip_packet("10.1.0.2", "10.2.0.2", b"through the pop")
    a.tun.send(pkt)
    b.tun.settimeout(3)
    assert b.tun.recv(4096) == pkt
    back = ip_packet("10.2.0.2", "10.1.0.2", b"and back")
    b.tun.send(back)
    a.tun.settimeout(3)
    assert a.tun.recv(4096) == back


def test_rekey_keeps_the_session_and_its_peer(pop: PopEnv, clients: list[Client]) -> None:
    a = new_client(pop, clients, 1)
    a.connect()
    a.register()
    old_idx = a.idx
    a.rekey()
    assert a.idx != old_idx
    a.send({"t": "ping", "id": 7})
    assert a.wait_for("pong")["id"] == 7
    # A fixed sleep on purpose: a period longer than dead_after_ms, which only keepalives
    # under the new keys can bridge.
    time.sleep(0.8)
    rc, sites = pop.popctl("sites")
    (session,) = sites["sites"][0]["sessions"]
    assert session["peer_id"] == 1 << 8 | 1 and session["up"]
    st = pop.status()["control"]
    assert st["sessions_opened"] == 1 and st["sessions_closed"] == 0


def test_key_timers_are_agreed_and_bad_ones_refused(pop: PopEnv, clients: list[Client]) -> None:
    # popd announces its own (the defaults, 600 s and twice that plus 60 s) in every `key`.
    a = new_client(pop, clients, 1)
    a.key_extra = {"rekey_s": 1800, "key_max_age_s": 3660}
    a.connect()
    (pop_key,) = [m for m in a.inbox if m.get("t") == "key"]
    assert (pop_key["rekey_s"], pop_key["key_max_age_s"]) == (600, 1260)
    a.register()
    rc, sites = pop.popctl("sites")
    (session,) = sites["sites"][0]["sessions"]
    # The smaller of each: a site with a long interval rekeys within the PoP's key age.
    assert session["timers"] == {
        "rekey_s": 600, "key_max_age_s": 1260,
        "site": {"rekey_s": 1800, "key_max_age_s": 3660, "announced": True},
    }
    assert pop.status()["key_timers"] == {"rekey_s": 600, "key_max_age_s": 1260}

    # Timers that are not numbers are counted and logged, but the key is acknowledged and
    # used on the timers in force: the site is not pushed into handshaking again and again.
    b = new_client(pop, clients, 2)
    b.key_extra = {"rekey_s": "soon", "key_max_age_s": 600}
    b.connect()  # key-ack received, keys active
    assert pop.status()["control"]["keys_refused"] == 1
    refusal = next(x for x in pop.log_text().splitlines() if "key timers refused" in x)
    assert "site 2" in refusal and "rekey_s: expected a positive number" in refusal, refusal
    b.register()
    rc, sites = pop.popctl("sites")
    (session,) = next(s for s in sites["sites"] if s["site_id"] == 2)["sessions"]
    # Nothing agreed before: the values of an end that announces none.
    assert session["timers"] == {
        "rekey_s": 600, "key_max_age_s": 900,
        "site": {"rekey_s": 600, "key_max_age_s": 900, "announced": False},
    }


def test_a_site_that_announces_no_timers_gets_the_old_fixed_ones(
    pop: PopEnv, clients: list[Client]
) -> None:
    # A site from before the agreement sends a bare `key` and rekeys at 600 s whatever it is
    # told: popd takes it for 600 s / 900 s and keeps its keys until 900 s.
    a = new_client(pop, clients, 1)
    a.connect()
    a.register()
    rc, sites = pop.popctl("sites")
    (session,) = sites["sites"][0]["sessions"]
    assert session["timers"] == {
        "rekey_s": 600, "key_max_age_s": 900,
        "site": {"rekey_s": 600, "key_max_age_s": 900, "announced": False},
    }
    rc, text = pop.popctl("sites", json_out=False)
    assert "rekey 600s/900s (announced none)" in text, text


def test_two_links_route_by_precedence_and_fail_over(
    pop: PopEnv, clients: list[Client]
) -> None:
    links = ("wan1", "wan2")
    w1 = new_client(pop, clients, 1)
    w2 = new_client(pop, clients, 1)
    w1.connect()
    w1.register("wan1", links, precedence=1)
    w2.connect()
    w2.register("wan2", links, precedence=2)

    def sessions() -> dict[str, dict[str, Any]]:
        rc, out = pop.popctl("sites")
        assert rc == 0
        return {x["link"]: x for x in out["sites"][0]["sessions"]}

    s = sessions()
    assert s["wan1"]["peer_id"] == 1 << 8 | 1 and s["wan2"]["peer_id"] == 1 << 8 | 2
    assert s["wan1"]["routed"] and not s["wan2"]["routed"]
    w1.close()
    clients.remove(w1)
    deadline = time.monotonic() + 5
    while "wan1" in (s := sessions()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(s) == ["wan2"] and s["wan2"]["routed"]


def test_events_upload_is_stored_deduplicated_and_acked(
    pop: PopEnv, clients: list[Client]
) -> None:
    a = new_client(pop, clients, 1)
    a.connect()
    a.register()
    evs = [
        {"seq": 1, "at": 1700000000.0, "kind": "pop.connected", "text": "up", "data": None},
        {"seq": 2, "at": 1700000001.0, "kind": "tunnel.up", "text": "to 2", "data": {"x": 1}},
    ]
    a.send({"t": "events", "events": evs})
    assert a.wait_for("events-ack")["up_to"] == 2
    # A resend (the ack was lost) plus one new event: only the new one is stored.
    a.send({"t": "events", "events": [*evs, {"seq": 3, "at": 1700000002.0,
                                              "kind": "config.updated", "text": "rev 5"}]})
    assert a.wait_for("events-ack")["up_to"] == 3
    rc, out = pop.popctl("events", "--site", "1")
    assert rc == 0
    site_events = [e for e in out["events"] if e["source"] == "site"]
    assert [e["kind"] for e in site_events] == ["config.updated", "tunnel.up", "pop.connected"]
    assert site_events[1]["data"]["data"] == {"x": 1}
    assert site_events[1]["data"]["site_seq"] == 2
    st = pop.status()["control"]
    assert st["events_stored"] == 3 and st["events_duplicate"] == 2


def test_a_site_cannot_forge_the_pops_own_events_and_a_new_instance_restarts_seq(
    pop: PopEnv, clients: list[Client]
) -> None:
    a = new_client(pop, clients, 1)
    a.connect()
    a.register()
    forged = {"seq": 1, "at": 1700000000.0, "kind": "popd.session.down", "text": "fake"}
    real = {"seq": 2, "at": 1700000001.0, "kind": "tunnel.up", "text": "to 2"}
    a.send({"t": "events", "events": [forged, real], "instance": "db-1"})
    assert a.wait_for("events-ack")["up_to"] == 2
    # The site's database was reset: its sequence starts again under a new instance.
    again = {"seq": 1, "at": 1700000002.0, "kind": "config.updated", "text": "rev 1"}
    a.send({"t": "events", "events": [again], "instance": "db-2"})
    assert a.wait_for("events-ack")["up_to"] == 1
    rc, out = pop.popctl("events", "--site", "1")
    assert rc == 0
    kinds = [e["kind"] for e in out["events"]]
    assert "popd.session.down" not in [e["kind"] for e in out["events"] if e["text"] == "fake"]
    assert kinds[:2] == ["config.updated", "tunnel.up"]
    assert pop.status()["control"]["events_malformed"] >= 1


def test_reload_pushes_config_and_directory_and_bad_file_keeps_old(
    pop: PopEnv, clients: list[Client]
) -> None:
    a = new_client(pop, clients, 1)
    a.connect()
    first = a.register()

    rules = """
[[rules]]
name = "smb-direct"
transport = "offcloud"
secondary = "none"
dst = ["branch-two", "10.99.0.0/16"]
protocol = "tcp"
ports = [445, "8000-8010"]

[[rules]]
name = "video"
transport = "offcloud"
applications = ["zoom"]
"""
    pop.account.write_text(ACCOUNT.replace('"10.1.0.0/24"]', '"10.1.0.0/24", "10.11.0.0/24"]')
                           .replace('name = "branch-2"', 'name = "branch-two"') + rules)
    rc, out = pop.popctl("reload")
    assert rc == 0, out
    assert out["changed"] == [1, 2]
    # The account check says which rules the sockets do not evaluate.
    assert out["notes"] == ["rules video: uses applications: not evaluated on the socket: its"
                            " traffic goes to the PoP"]
    assert "rules video: uses applications: not evaluated" in pop.log_text()
    video = pop.status()["account"]["rules"][2]
    assert video["complex"] is True and "goes to the PoP" in video["note"]
    cfg = a.wait_for("config")
    assert cfg["config"]["subnets"] == ["10.1.0.0/24", "10.11.0.0/24"]
    # Site names resolved at the PoP: the site gets subnets.
    smb, complex_rule = cfg["config"]["rules"][1:]
    assert smb["dst"] == ["branch-two", "10.99.0.0/16"]
    assert smb["dst_subnets"] == ["10.2.0.0/24", "10.99.0.0/16"] and smb["src_subnets"] is None
    assert (smb["protocol"], smb["ports"], smb["secondary"]) == ("tcp", [[445, 445], [8000, 8010]],
                                                                "none")
    assert complex_rule["complex"] == ["applications"]
    # Another site's subnets change: the rules naming it change site 1's config.
    pop.account.write_text(ACCOUNT.replace('"10.1.0.0/24"]', '"10.1.0.0/24", "10.11.0.0/24"]')
                           .replace('name = "branch-2"', 'name = "branch-two"')
                           .replace('"10.2.0.0/24"', '"10.2.0.0/23"') + rules)
    rc, out = pop.popctl("reload")
    assert rc == 0 and out["changed"] == [1, 2], out
    assert a.wait_for("config")["config"]["rules"][1]["dst_subnets"][0] == "10.2.0.0/23"
    d = a.wait_for("directory-delta")
    assert d["rev"] > first["rev"] and d["changed"][0]["name"] == "branch-two"

    # An account file with an error is refused with a located message; the old one stays.
    pop.account.write_text(ACCOUNT.replace("id = 2", 'id = "two"'))
    rc, err = pop.popctl("reload", json_out=False)
    assert rc == 1
    assert "account.toml: sites[1].id: expected an integer 1..65535" in err
    st = pop.status()
    assert st["account"]["sites"] == 2 and "sites[1].id" in st["account"]["error"]
    rc, sites = pop.popctl("sites")
    assert [s["name"] for s in sites["sites"]] == ["branch-1", "branch-two"]
    rc, events = pop.popctl("events")
    assert events["events"][0]["kind"] == "popd.account.refused"
    assert "sites[1].id" in pop.log_text()

    # SIGHUP reloads too (the file is fixed again).
    pop.account.write_text(ACCOUNT)
    assert pop.proc is not None
    pop.proc.send_signal(signal.SIGHUP)
    assert a.wait_for("config")["config"]["subnets"] == ["10.1.0.0/24"]
    assert pop.status()["account"]["error"] is None

    # A firewall change is every site's: each gets its config again, site names resolved.
    pop.account.write_text(ACCOUNT + FIREWALL)
    rc, out = pop.popctl("reload")
    assert rc == 0 and out["changed"] == [1, 2], out
    fw = a.wait_for("config")["config"]["firewall"]
    assert fw == {"default": "deny", "rules": [
        {"name": "no-ssh", "action": "deny", "src": ["10.2.0.0/24"], "dst": ["10.1.0.0/24"],
         "protocol": "tcp", "ports": [22, "2200-2299"]},
        {"name": "rest", "action": "allow", "src": None, "dst": None, "protocol": "any",
         "ports": None},
    ]}
    assert pop.status()["account"]["firewall"] == {"default": "deny", "rules": 2}


def test_refused_registrations_and_unknown_sites(pop: PopEnv, clients: list[Client]) -> None:
    # A site of the CA but not of the account never completes the handshake.
    c3 = new_client(pop, clients, 3)
    for d in c3.session.start():
        c3.raw(d)
    c3.pump(lambda: c3.session.failed is not None)
    assert not c3.session.established

    # A register naming another site id is refused with an error, then the session closes.
    a = new_client(pop, clients, 1)
    a.connect()
    a.send({"t": "register", "site_id": 2, "version": "x",
            "link": {"name": "wan1", "precedence": 1, "local": ""},
            "links": [{"name": "wan1", "precedence": 1, "local": ""}]})
    err = a.wait_for("error")
    assert "not the site of the certificate" in err["reason"]

    b = new_client(pop, clients, 2)
    b.connect()
    b.send({"t": "register", "site_id": 2, "link": "wan1"})
    assert "link" in b.wait_for("error")["reason"]

    # Malformed and unknown messages on a good session: dropped, counted, session stays.
    c = new_client(pop, clients, 1)
    c.connect()
    c.register()
    for raw in (b"{not json", b"[1,2]", b'{"t": 5}', json.dumps({"t": "future-kind"}).encode()):
        for d in c.session.send(raw):
            c.raw(d)
    c.send({"t": "ping", "id": 1})
    c.wait_for("pong")
    st = pop.status()["control"]
    assert st["unknown_site"] == 1
    assert st["registrations_refused"] == 2
    assert st["messages_malformed"] == 3 and st["messages_unknown"] == 1


def test_garbage_on_both_ports_is_dropped_and_counted(pop: PopEnv) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        for payload in (b"\x00", b"hello", os.urandom(300), b"\x16\xfe\xfd" + os.urandom(40),
                        b"\x17\xfe\xfd" + bytes(10) + b"\x00\x05abcde", os.urandom(6000)):
            s.sendto(payload, pop.addr)
            s.sendto(payload, ("127.0.0.1", pop.stun_port))
        # A well-formed STUN request still gets an answer from both ports.
        from sdwan.common.stun import StunTransaction

        for port in (pop.stun_port, pop.port):
            tx = StunTransaction(("127.0.0.1", port))
            s.sendto(tx.start(), ("127.0.0.1", port))
            s.settimeout(3)
            data, src = s.recvfrom(2048)
            ep = tx.handle(data, src)
            assert ep is not None and (ep.ip, ep.port) == s.getsockname()

    def counted() -> bool:
        st = pop.status()
        c = st["control"]
        return (c["garbage"] + c["dtls_no_session"] + c["oversized"] + c["dtls_rejected"] >= 4
                and sum(st["stun_server"]["dropped"].values()) >= 5)

    assert wait_until(counted, timeout=10), pop.status()
    st = pop.status()
    c = st["control"]
    assert c["garbage"] + c["dtls_no_session"] + c["oversized"] + c["dtls_rejected"] >= 4
    assert sum(st["stun_server"]["dropped"].values()) >= 5
    assert st["stun_main_port"]["answers"] == 1 and st["stun_server"]["answers"] == 1
    assert pop.proc is not None and pop.proc.poll() is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
def test_openssl_s_client_interop(pop: PopEnv, tmp_path: Path) -> None:
    ca, cert, key = pop.site_files(1)

    def s_client(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{pop.port}",
             "-CAfile", str(ca), "-verify_return_error", *extra],
            input="", capture_output=True, text=True, timeout=30,
        )

    ok = s_client("-cert", str(cert), "-key", str(key))
    assert "Verify return code: 0 (ok)" in ok.stdout, ok.stdout + ok.stderr
    assert "ECDHE-ECDSA-AES256-GCM-SHA384" in ok.stdout
    assert "pop-1" in ok.stdout

    none = s_client()
    assert "Verify return code: 0" in none.stdout  # it trusted us; we refused it
    other = tmp_path / "other"
    pki.create_ca(other, account="intruder")
    _, ocert, okey = pop.site_files(1, ca_dir=other)
    foreign = s_client("-cert", str(ocert), "-key", str(okey))
    assert foreign.returncode != 0 or "alert" in (foreign.stdout + foreign.stderr)

    refusals = ("peer did not present a certificate",
                "peer certificate not signed by the account CA")
    assert wait_until(
        lambda: set(refusals) <= {r["reason"] for r in pop.status()["rejections"]}, timeout=10
    ), pop.status()["rejections"]
    reasons = [r["reason"] for r in pop.status()["rejections"]]
    assert "peer did not present a certificate" in reasons
    assert "peer certificate not signed by the account CA" in reasons
    log = pop.log_text()
    assert "refused: peer did not present a certificate" in log
    assert "refused: peer certificate not signed by the account CA" in log


def test_restart_with_a_bad_account_file_uses_the_stored_account(pop: PopEnv) -> None:
    stop_popd(pop)
    pop.account.write_text(ACCOUNT.replace('subnets = ["10.2.0.0/24"]', "subnets = 3"))
    start_popd(pop)
    st = pop.status()
    assert st["account"]["sites"] == 2
    assert "sites[1].subnets: expected an array of at least 1 network" in st["account"]["error"]
    rc, events = pop.popctl("events")
    assert events["events"][0]["kind"] == "popd.account.refused"

    # Without a stored account there is nothing to fall back on: popd refuses to start.
    stop_popd(pop)
    for f in (pop.root / "data").iterdir():
        f.unlink()
    cp = subprocess.run(
        [sys.executable, "-m", "sdwan.pop.popd", "--config", str(pop.config)],
        capture_output=True, text=True, timeout=30, env=_env(),
    )
    assert cp.returncode == 1
    assert "no earlier account is stored" in cp.stderr
    assert "sites[1].subnets" in cp.stderr
    pop.account.write_text(ACCOUNT)
    start_popd(pop)


def test_renewal_only_for_a_certificate_near_its_expiry_and_popd_watches_its_own(
    pop: PopEnv, clients: list[Client],
) -> None:
    stop_popd(pop)
    with pop.config.open("a") as f:
        f.write('\n[renewal]\nca_key = "ca/ca.key"\n')
    start_popd(pop)
    # Site 2's certificate runs out in 20 days: renewed. Site 1's has 825: refused, with why.
    pki.issue_site(pop.ca_dir, 2, pop.root / f"{pop.ca_dir.name}-out", days=20)
    far, near = new_client(pop, clients, 1), new_client(pop, clients, 2)
    for c in (far, near):
        c.connect()
        c.register()
        c.send({"t": "renew", "csr": make_request(c.site_id)[1].decode()})
    refused = far.wait_for("renew-refused")
    assert "renewed only within 60 days of its expiry" in refused["reason"], refused
    assert "socket-pki" in refused["reason"], refused
    assert "BEGIN CERTIFICATE" in near.wait_for("renewed")["cert"]
    rc, st = pop.popctl("status")
    assert rc == 0
    assert st["renewal"]["signed"] == 1 and st["renewal"]["refused"] == 1, st["renewal"]
    assert st["certificates"]["cert"]["state"] == "valid", st["certificates"]
    assert st["certificates"]["ca"]["state"] == "valid", st["certificates"]
    rc, text = pop.popctl("status", json_out=False)
    assert "\ncert: valid, until " in text and "\nca cert: valid, until " in text, text
