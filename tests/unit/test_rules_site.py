"""rules.py: the cloud config's rules compiled for the fast path (a real one, read back
through its own lookup), what is refused, and the `rules` status: hits and the transport each
rule's traffic takes now, from the routes paths.py chose."""

from __future__ import annotations

import io
import ipaddress
import struct
from collections.abc import Iterator

import pytest

from sdwan.bindings.fastpath import FastPath, Verdict
from sdwan.site.paths import Candidate, Paths, Policy, Transport
from sdwan.site.rules import Rules, compile_rules
from sdwan.site.socketctl import format_rules

POP = 0x80000101
MESH2 = 2  # the mesh tunnel's fast-path peer is the site id
LOCAL = "10.1.0.0/24"
DIRECTORY = [
    {"site_id": 2, "name": "branch-2", "subnets": ["10.2.0.0/24"]},
    {"site_id": 3, "name": "branch-3", "subnets": ["10.3.0.0/24"]},
]


def rule(name: str, **kw: object) -> dict:
    r = {"name": name, "transport": "offcloud", "secondary": "automatic", "src": None,
         "dst": None, "src_subnets": None, "dst_subnets": None, "protocol": "any", "ports": [],
         "complex": []}
    r.update(kw)
    return r


def tcp(dst: str, dport: int, src: str = "10.1.0.5", sport: int = 40000) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    l4 = struct.pack("!HH", sport, dport) + bytes(16)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, s.packed, d.packed) + l4


def sent_to(fp: FastPath, pkt: bytes) -> int | str:
    r = fp.process_outbound(pkt)
    assert r.verdict == Verdict.DROP, r
    return r.peer_id if r.drop_reason == "no_key" else str(r.drop_reason)


@pytest.fixture
def site() -> Iterator[tuple[FastPath, Paths, Rules]]:
    with FastPath() as fp:
        for pid in (MESH2, 3, POP):
            fp.peer_add(pid)
        paths = Paths(fp, local=[LOCAL])
        paths.submit("cloud", [Candidate(ipaddress.ip_network(n), POP, Transport.CLOUD)
                               for n in ("10.2.0.0/24", "10.3.0.0/24")])
        paths.submit("mesh", [Candidate(ipaddress.ip_network("10.2.0.0/24"), MESH2,
                                        Transport.MESH)])
        yield fp, paths, Rules(fp, paths, local=[LOCAL], directory=lambda: DIRECTORY)


def test_compiled_rules_steer_the_fast_path(site: tuple[FastPath, Paths, Rules]) -> None:
    fp, paths, rules = site
    rules.load({"rules": [
        rule("smb", protocol="tcp", ports=[[445, 445]], secondary="none",
             dst=["branch-2", "branch-3"], dst_subnets=["10.2.0.0/24", "10.3.0.0/24"]),
        rule("video", transport="cloud", secondary=None, complex=["applications"]),
        rule("web", protocol="tcp", ports=[[80, 80]]),
    ]})
    assert rules.error is None
    assert sent_to(fp, tcp("10.2.0.7", 445)) == MESH2
    assert sent_to(fp, tcp("10.3.0.7", 445)) == "offcloud_down"  # no mesh to site 3
    # The complex rule matches everything on its simple fields: to the PoP, whatever is below.
    assert sent_to(fp, tcp("10.2.0.7", 80)) == POP
    st = rules.status()
    smb, video, web = st["rules"]
    assert smb["hits"] == 2 and video["hits"] == 1 and web["hits"] == 0
    assert st["drops"] == 1
    assert smb["now"] == "mixed"
    assert [(d["site"], d["transport"]) for d in smb["destinations"]] == [
        ("branch-2", "offcloud"), ("branch-3", "dropped")]
    assert smb["by_transport"] == {"offcloud": 1, "dropped": 1}
    assert smb["destinations_total"] == 2
    assert video["evaluated"] is False and video["now"] == "cloud"
    assert web["now"] == "mixed"  # site 3 follows its route (the cloud): automatic
    # The mesh tunnel to site 2 goes: its prefix has no off-cloud path any more.
    paths.withdraw("mesh")
    assert sent_to(fp, tcp("10.2.0.7", 445)) == "offcloud_down"
    assert rules.status()["rules"][0]["now"] == "dropped"


def test_the_far_sites_view_of_a_rule(site: tuple[FastPath, Paths, Rules]) -> None:
    """At the rule's destination site the answers match: the rule's src are its
    destinations there."""
    _, _, rules = site
    rules.load({"rules": [
        rule("to-us", src=["branch-2"], src_subnets=["10.2.0.0/24"], dst=["us"],
             dst_subnets=[LOCAL]),
        rule("elsewhere", src=["branch-2"], src_subnets=["10.2.0.0/24"], dst=["branch-3"],
             dst_subnets=["10.3.0.0/24"]),
    ]})
    to_us, elsewhere = rules.status()["rules"]
    assert [d["prefix"] for d in to_us["destinations"]] == ["10.2.0.0/24"]
    assert to_us["now"] == "offcloud"
    # Neither from nor to this site: nothing here can match it.
    assert elsewhere["destinations"] == [] and elsewhere["now"] is None


def test_secondaries_and_the_cloud_lost(site: tuple[FastPath, Paths, Rules]) -> None:
    _, paths, rules = site
    rules.load({"rules": [rule("a", secondary="automatic"), rule("b", secondary="cloud"),
                          rule("c", secondary="none"), rule("d", transport="cloud",
                                                           secondary=None)]})
    now = {r["name"]: {d["prefix"]: d["transport"] for d in r["destinations"]}
           for r in rules.status()["rules"]}
    three = "10.3.0.0/24"
    assert {n: now[n][three] for n in "abcd"} == {"a": "cloud", "b": "cloud", "c": "dropped",
                                                   "d": "cloud"}
    assert {n: now[n]["10.2.0.0/24"] for n in "abcd"} == {
        "a": "offcloud", "b": "offcloud", "c": "offcloud", "d": "cloud"}
    paths.set_policy(Policy.CLOUD_LOST)
    now = {r["name"]: {d["prefix"]: d["transport"] for d in r["destinations"]}
           for r in rules.status()["rules"]}
    # The cloud is what is missing: a cloud secondary has nothing left; a cloud rule follows
    # the routes (WAN recovery over the mesh to site 2, the cloud's last resort to site 3).
    assert {n: now[n][three] for n in "abcd"} == {"a": "cloud", "b": "dropped", "c": "dropped",
                                                   "d": "cloud"}
    assert now["d"]["10.2.0.0/24"] == "mesh"


def test_alt_wan_is_never_an_off_cloud_rules_path(site: tuple[FastPath, Paths, Rules]) -> None:
    # Alt-WAN tunnels to both sites (their own fast-path ids, site/altwan.py): with the cloud
    # lost they carry the routes, but an off-cloud rule takes the mesh, and with no mesh path
    # its `automatic` secondary does not fall back onto Alt-WAN (docs/recovery.md).
    fp, paths, rules = site
    alt = {2: 0x40000002, 3: 0x40000003}
    for pid in alt.values():
        fp.peer_add(pid)
    paths.submit("alt-wan", [Candidate(ipaddress.ip_network(f"10.{s}.0.0/24"), pid,
                                       Transport.ALT_WAN, site=s) for s, pid in alt.items()])
    rules.load({"rules": [rule("a", protocol="tcp", ports=[[445, 445]]),
                          rule("d", transport="cloud", secondary=None, protocol="tcp",
                               ports=[[80, 80]])]})

    def now() -> dict[str, dict[str, str]]:
        return {r["name"]: {d["prefix"]: d["transport"] for d in r["destinations"]}
                for r in rules.status()["rules"]}

    paths.set_policy(Policy.CLOUD_LOST)
    assert sent_to(fp, tcp("10.2.0.7", 22)) == alt[2]  # no rule: the route
    assert sent_to(fp, tcp("10.2.0.7", 445)) == MESH2
    assert sent_to(fp, tcp("10.3.0.7", 445)) == "offcloud_down"
    assert sent_to(fp, tcp("10.3.0.7", 80)) == alt[3]  # a cloud rule follows the route
    assert now() == {"a": {"10.2.0.0/24": "offcloud", "10.3.0.0/24": "dropped"},
                     "d": {"10.2.0.0/24": "alt-wan", "10.3.0.0/24": "alt-wan"}}
    # The cloud is back but cannot reach site 3: the same there; site 2 is back on the cloud.
    paths.set_policy(Policy.NORMAL, lost_peers=[3])
    assert sent_to(fp, tcp("10.3.0.7", 22)) == alt[3]
    assert sent_to(fp, tcp("10.3.0.7", 445)) == "offcloud_down"
    assert now()["a"] == {"10.2.0.0/24": "offcloud", "10.3.0.0/24": "dropped"}
    paths.set_policy(Policy.NORMAL, lost_peers=[])
    assert sent_to(fp, tcp("10.3.0.7", 445)) == POP
    assert now()["a"] == {"10.2.0.0/24": "offcloud", "10.3.0.0/24": "cloud"}


def test_hits_survive_a_config_that_keeps_the_rule(site: tuple[FastPath, Paths, Rules]) -> None:
    fp, _, rules = site
    web = rule("web", protocol="tcp", ports=[[80, 80]])
    rules.load({"rules": [web]})
    sent_to(fp, tcp("10.2.0.7", 80))
    rules.load({"rules": [rule("new", protocol="udp"), web]})
    assert [r["hits"] for r in rules.status()["rules"]] == [0, 1]
    rules.load({"name": "x"})  # a config without rules (an older PoP): none
    assert rules.status()["rules"] == [] and fp.rules_counters().hits == []


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (rule("x", transport="mpls"), "rule 0 (x): transport 'mpls' is not one of"),
        (rule("x", secondary="alt-wan"), "rule 0 (x): secondary 'alt-wan' is not one of"),
        (rule("x", transport="cloud"), "rule 0 (x): a cloud rule with a secondary"),
        (rule("x", ports=[[90, 80]]), "rule 0 (x): port range [90, 80] is not [low, high]"),
        (rule("x", protocol="icmp", ports=[[1, 2]]), "rule 0 (x): ports with protocol icmp"),
        (rule("x", dst_subnets=["10.2.0.1/24"]), "rule 0 (x): 10.2.0.1/24 has host bits set"),
        (rule("x", dst_subnets=[]), "rule 0 (x): dst_subnets is empty"),
        (rule("x", complex="apps"), "rule 0 (x): complex is not a list of strings"),
        ("nope", "rule 0: not an object"),
        ({**rule("x"), "dscp": 46}, "rule 0 (x): unknown field(s) dscp"),
    ],
)
def test_a_rule_that_cannot_be_read_keeps_the_rules_in_force(
    site: tuple[FastPath, Paths, Rules], bad: object, why: str
) -> None:
    fp, _, rules = site
    rules.load({"rules": [rule("keep", protocol="tcp")]})
    rules.load({"rules": [bad, rule("other")]})
    assert rules.error is not None and why in rules.error, rules.error
    assert [r["name"] for r in rules.status()["rules"]] == ["keep"]
    assert sent_to(fp, tcp("10.3.0.7", 1)) == POP  # "keep": automatic, no mesh to site 3
    assert fp.rules_counters().hits == [1]


def test_compile_reads_what_popd_sends() -> None:
    (r,) = compile_rules([rule("smb", protocol="tcp", ports=[[445, 445], [8000, 8100]],
                               src=["branch-1"], src_subnets=["10.1.0.0/24", "fd00:1::/64"])])
    assert r.fp_rule.protocol == 6 and r.fp_rule.ports == ((445, 445), (8000, 8100))
    assert [str(n) for n in r.fp_rule.src] == ["10.1.0.0/24", "fd00:1::/64"]
    assert r.fp_rule.dst == () and r.fp_rule.transport == "offcloud"
    assert compile_rules(None) == []


def test_socketctl_rules_table(site: tuple[FastPath, Paths, Rules]) -> None:
    _, _, rules = site
    rules.load({"rules": [
        rule("smb", protocol="tcp", ports=[[445, 445], [8000, 8100]], secondary="none",
             dst=["branch-2"], dst_subnets=["10.2.0.0/24"]),
        rule("video", transport="cloud", secondary=None, complex=["applications"]),
    ]})
    out = io.StringIO()
    format_rules(rules.status(), out)
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].split() == ["#", "NAME", "TRANSPORT", "MATCH", "FROM", "TO", "HITS", "NOW"]
    assert lines[1].split() == ["0", "smb", "offcloud", "(else", "none)", "tcp",
                                "445,8000-8100", "any", "branch-2", "0", "offcloud"]
    assert "video *" in lines[2]
    assert "video: uses applications: not evaluated on the socket" in text
