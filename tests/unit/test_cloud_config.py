"""[[pops]] and [cloud] in the bootstrap config, and socketctl's pop/events tables."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from sdwan.site.config import Cloud, ConfigError, Pop, load_config
from sdwan.site.socketctl import format_events, format_peers, format_pop, format_status

BASE = """\
[site]
id = 1

[pki]
ca = "ca.pem"
cert = "site-1.pem"
key = "site-1.key"

[lan]
subnets = ["10.1.0.0/24"]

[[links]]
name = "wan1"
interface = "eth0"
port = 4800
"""

POPS = """
[[pops]]
id = 1
endpoint = "203.0.113.10:4800"
stun = "203.0.113.10:3478"

[[pops]]
id = 2
endpoint = "[2001:db8::11]:4800"
"""


def write(folder: Path, text: str) -> Path:
    for pem in ("ca.pem", "site-1.pem", "site-1.key"):
        (folder / pem).write_text("-----BEGIN PLACEHOLDER-----\n")
    path = folder / "socketd.toml"
    path.write_text(text)
    return path


def test_without_pops_there_is_no_cloud(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.pops == () and cfg.cloud == Cloud()


def test_pops_in_order_and_cloud_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE + POPS))
    assert cfg.pops == (
        Pop(1, ("203.0.113.10", 4800), ("203.0.113.10", 3478)),
        Pop(2, ("2001:db8::11", 4800), None),
    )
    assert cfg.cloud == Cloud(keepalive_ms=200, dead_after_ms=600, return_hold_s=30, ping_s=1)


def test_dead_after_defaults_to_three_keepalives(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE + POPS + "\n[cloud]\nkeepalive_ms = 100\n"))
    assert cfg.cloud.dead_after_ms == 300


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("\n[[pops]]\nendpoint = \"203.0.113.10:4800\"\n", "pops[0].id: missing required field"),
        ("\n[[pops]]\nid = 0\nendpoint = \"203.0.113.10:4800\"\n",
         "pops[0].id: expected an integer 1..65535, got 0"),
        ("\n[[pops]]\nid = 1\nendpoint = \"pop.example:4800\"\n",
         "pops[0].endpoint: expected \"IPv4:port\""),
        ("\n[[pops]]\nid = 1\nendpoint = \"203.0.113.10:4800\"\nstun = 3478\n",
         "pops[0].stun: expected \"IPv4:port\""),
        ("\n[[pops]]\nid = 1\nendpoint = \"203.0.113.10:4800\"\nport = 1\n",
         "pops[0].port: unknown key"),
        (POPS + "\n[[pops]]\nid = 1\nendpoint = \"203.0.113.12:4800\"\n",
         "pops[2].id: duplicate PoP id 1 (also pops[0])"),
        (POPS + "\n[[pops]]\nid = 3\nendpoint = \"203.0.113.10:4800\"\n",
         "pops[2].endpoint: duplicate PoP endpoint"),
        ("\n[cloud]\nkeepalive_ms = 10\n", "cloud.keepalive_ms: expected an integer 50..5000"),
        ("\n[cloud]\nkeepalive_ms = 200\ndead_after_ms = 300\n",
         "cloud.dead_after_ms: expected an integer 400..60000, got 300"),
        ("\n[cloud]\nreturn_hold_s = -1\n", "cloud.return_hold_s: expected an integer 0..3600"),
        ("\n[cloud]\nping_s = \"1\"\n", "cloud.ping_s: expected an integer 1..60, got \"1\""),
        ("\n[cloud]\nkeepalive = 1\n", "cloud.keepalive: unknown key (did you mean"),
    ],
)
def test_wrong_cloud_field_is_located(tmp_path: Path, extra: str, expected: str) -> None:
    path = write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    text = str(exc.value)
    assert f"{path}: {expected}" in text, text
    assert "(line " in text


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ("pops = 3\n", "pops: expected an array of tables [[pops]], got 3"),
        ("cloud = 1\n", "cloud: expected a table [cloud], got 1"),
    ],
)
def test_wrong_cloud_table_type(tmp_path: Path, top: str, expected: str) -> None:
    path = write(tmp_path, top + BASE)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert f"{path}: {expected}" in str(exc.value)


POP_RESULT = {
    "state": "up", "active_pop": 2, "primary_pop": 1, "on_secondary": True, "stale": False,
    "config_rev": 4, "directory_rev": 7, "sites": 2,
    "sessions": [
        {"pop_id": 1, "role": "primary", "active": False, "endpoint": "203.0.113.10:4800",
         "link": "wan1", "state": "down", "rtt_ms": None, "last_seen_s": 3.2,
         "reason": "no packets from the PoP for 612 ms"},
        {"pop_id": 2, "role": "secondary", "active": True, "endpoint": "203.0.113.11:4800",
         "link": "wan1", "state": "connected", "rtt_ms": 1.4, "last_seen_s": 0.1,
         "reason": None},
    ],
}


def test_socketctl_pop_table() -> None:
    out = io.StringIO()
    format_pop(POP_RESULT, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "cloud    up, active PoP 2 (secondary)"
    assert lines[-2].split()[:5] == ["1", "primary", "203.0.113.10:4800", "wan1", "down"]
    assert lines[-2].endswith("no packets from the PoP for 612 ms")
    assert "1.4 ms" in lines[-1] and "secondary*" in lines[-1]


def test_socketctl_events_status_and_cloud_peers() -> None:
    out = io.StringIO()
    format_events({"events": [{"seq": 2, "ts": 0, "kind": "pop.switched", "text": "b"},
                              {"seq": 1, "ts": 0, "kind": "pop.connected", "text": "a"}]}, out)
    assert [ln.split()[2] for ln in out.getvalue().splitlines()] == ["pop.switched",
                                                                     "pop.connected"]
    out = io.StringIO()
    format_status({"site_id": 1, "cloud": {"state": "down", "active_pop": 1, "stale": True}}, out)
    assert "cloud    down, PoP 1, stale configuration" in out.getvalue()
    out = io.StringIO()
    format_peers({"peers": [{"site_id": 3, "transport": "cloud", "state": "up",
                             "endpoint": "203.0.113.10:4800", "link": "wan1"}]}, out)
    assert out.getvalue().splitlines()[1].split()[:5] == [
        "3", "up", "203.0.113.10:4800", "wan1", "cloud"]
