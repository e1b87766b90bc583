"""WAN recovery: when the cloud cannot carry traffic to a site, Alt-WAN or the mesh does
(docs/recovery.md).

Owns whether recovery is active and why: for the whole site when no PoP session is live (the
cloud is lost), and per remote site when the PoP's directory shows that site offline (the
cloud cannot reach it, so its traffic goes over the mesh from here too, whatever our own
sessions say). It turns that into the policy of paths.py (`cloud_lost`, and the sets of
sites that are lost or have recovery disabled; paths.py puts a site's Alt-WAN tunnel before
its mesh tunnel) in one call, so that every prefix moves in
one batch; it leaves recovery only after the cloud (or the site) has been back for the
hold time; it records the *Off-Cloud Recovery Activated* and *Stopped* events and explains,
per remote site, where its traffic goes during recovery and why.

It reads the cloud's state, this site's and the directory's `recovery` flags and whether the
Alt-WAN and mesh tunnels to a site carry traffic through callables the supervisor wires; like the
other parts it does no I/O and is driven by `tick()`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdwan.site.paths import Paths, Policy

log = logging.getLogger("sdwan.site.recovery")

# A box that starts while its PoP does not answer enters recovery this long after a link
# first has an address (a DHCP lease may take seconds), not sooner: a PoP that answers within
# it (a normal boot, a handshake retried once) never puts the box in recovery. The cloud's
# own wait before it tries the secondary PoP is as long (cloud.BOOT_GRACE_S). A restart in
# the middle of recovery does not wait at all (`was_active`).
BOOT_WAIT_S = 3.0
# With no link getting an address at all (an Internet uplink down since the boot while the
# Alt-WAN link works), the wait runs from the start instead, this long.
BOOT_MAX_WAIT_S = 15.0
# Stored "recovery was active" older than this is not trusted at start: a box that was off
# for a long time starts like any other.
STORED_MAX_AGE_S = 3600.0
# Events list at most this many sites by id (the rest are counted): an event's data is small.
EVENT_SITES = 50

EVENT_ACTIVATED = "offcloud.recovery.activated"
EVENT_STOPPED = "offcloud.recovery.stopped"


@dataclass
class Reach:
    """What the mesh (or Alt-WAN) says of one remote site: whether its tunnel carries traffic
    now, and if not, why."""

    up: bool
    why: str | None = None


@dataclass
class _Lost:
    """A remote site the cloud cannot reach (offline in the directory)."""

    since: float
    back_since: float | None = None  # online again since; leaves recovery after the hold
    gone: bool = False  # left the directory or no longer a recovery site: leaves at once


def _sites_text(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:EVENT_SITES]))
    more = f" and {len(ids) - EVENT_SITES} more" if len(ids) > EVENT_SITES else ""
    return f"site{'s' if len(ids) > 1 else ''} {shown}{more}"


def _sites_data(ids: list[int]) -> dict[str, Any]:
    return {"sites": ids[:EVENT_SITES], "count": len(ids)}


def _carriable(entry: dict[str, Any]) -> bool:
    """Whether recovery may carry a site of the directory at all: its recovery flag is on
    and it is off-cloud (a mesh tunnel) or has an Alt-WAN endpoint."""
    return entry.get("recovery") is True and bool(entry.get("offcloud") or entry.get("altwan"))


def _ways_text(reached: list[int], via_altwan: set[int]) -> str:
    """"traffic to site 2 goes over Alt-WAN, to sites 3, 4 over the mesh"."""
    alt = [s for s in reached if s in via_altwan]
    mesh = [s for s in reached if s not in via_altwan]
    parts = [f"to {_sites_text(ids)} {{}}over {how}"
             for ids, how in ((alt, "Alt-WAN"), (mesh, "the mesh")) if ids]
    return "traffic " + parts[0].format("goes ") + "".join(", " + p.format("") for p in parts[1:])


@dataclass
class Recovery:
    paths: Paths
    cloud_up: Callable[[], bool]  # a PoP session is live
    cloud_enabled: Callable[[], bool]  # the site has PoPs at all
    own_recovery: Callable[[], bool | None]  # this site's flag in the account; None: unknown
    directory: Callable[[], list[dict[str, Any]]]  # the other sites, as the PoP sent them
    links_ready: Callable[[], bool]  # a WAN link has an address: the PoP can be tried
    mesh_reach: Callable[[int], Reach]
    on_event: Callable[[str, str, dict[str, Any], int | None], None]
    clock: Callable[[], float]
    hold_s: float = 10.0
    # Whether the Alt-WAN tunnel to a site carries traffic (site/altwan.py); none by default.
    altwan_reach: Callable[[int], Reach] = lambda _site: Reach(False, "no Alt-WAN tunnel")
    boot_wait_s: float = BOOT_WAIT_S
    # Whether recovery was active when socketd last stopped (kept in the store), and where to
    # keep it: a box restarted in the middle of an outage starts in recovery at once.
    was_active: bool = False
    remember: Callable[[bool], None] = lambda _active: None

    active: bool = False
    since: float | None = None
    reason: str | None = None
    activations: int = 0
    started: float = field(init=False)
    _ready_at: float | None = field(default=None, init=False)  # a link first had an address
    _seen_up: bool = field(default=False, init=False)
    _up_since: float | None = field(default=None, init=False)
    _lost: dict[int, _Lost] = field(default_factory=dict, init=False)
    # The directory (a list replaced whenever a new one arrives, kept here so that its
    # identity means something) and the flags last read: an idle tick with nothing new does
    # not walk every site.
    _read: tuple[list[dict[str, Any]], bool, bool] | None = field(default=None, init=False)
    _no_recovery: frozenset[int] = field(default=frozenset(), init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    # ---------------------------------------------------------------- the decision

    @property
    def enabled(self) -> bool:
        return self.cloud_enabled() and self.own_recovery() is True

    def _sites(self) -> list[dict[str, Any]]:
        return [e for e in self.directory() if isinstance(e.get("site_id"), int)]

    def tick(self) -> None:
        now = self.clock()
        up = self.cloud_up()
        if up:
            self._seen_up = True
            if self._up_since is None:
                self._up_since = now
        else:
            self._up_since = None
        enabled = self.enabled
        if self._ready_at is None and self.links_ready():
            self._ready_at = now
        waited = (self._ready_at is not None and now - self._ready_at >= self.boot_wait_s) or (
            now - self.started >= BOOT_MAX_WAIT_S)
        if self.active:
            if not enabled:
                self._stop("WAN recovery was disabled for this site in the account", now)
            elif up and now - (self._up_since or now) >= self.hold_s:
                self._stop(f"the cloud is back (stable for {self.hold_s:g} s)", now)
        elif enabled and not up and (self._seen_up or self.was_active or waited):
            if self._seen_up:
                why = "the cloud is lost: no PoP session is live"
            elif self.was_active:
                why = "no PoP answered yet, and recovery was active when socketd stopped"
            elif self._ready_at is not None:
                why = (f"no PoP answered in the {self.boot_wait_s:g} s since a link had an "
                       "address")
            else:
                why = f"no Internet link had an address {BOOT_MAX_WAIT_S:g} s after the start"
            self._activate(why, now)
        directory = self.directory()
        read = self._read
        if read is None or read[0] is not directory or read[1:] != (enabled, up):
            self._read = (directory, enabled, up)
            self._track_sites(now, up, enabled)
            self._no_recovery = frozenset(
                e["site_id"] for e in self._sites()
                # A site with recovery disabled moves nothing onto the mesh for recovery.
                if not enabled or e.get("recovery") is not True
            )
        self._expire_lost(now)
        self.paths.set_policy(
            Policy.CLOUD_LOST if self.active else Policy.NORMAL,
            lost_peers=self._lost.keys(),
            no_recovery=self._no_recovery,
            cloud_down=not up,
        )

    def _track_sites(self, now: float, up: bool, enabled: bool) -> None:
        """Sites the cloud cannot reach while our own sessions are up: the directory shows
        them offline (each PoP lists as online the sites with a session to it). While our
        cloud is lost the directory is stale and every site is in recovery anyway, so
        nothing changes then."""
        if not up:
            return
        entries = {e["site_id"]: e for e in self._sites()} if enabled else {}
        for site_id, lost in self._lost.items():
            if site_id not in entries:
                lost.back_since, lost.gone = -math.inf, True  # leaves at the next expiry
        newly: list[int] = []
        for site_id, entry in entries.items():
            offline = entry.get("online") is False and _carriable(entry)
            lost = self._lost.get(site_id)
            if offline and lost is None:
                self._lost[site_id] = _Lost(since=now)
                newly.append(site_id)
            elif offline and lost is not None:
                lost.back_since, lost.gone = None, False
            elif lost is not None and lost.back_since is None:
                lost.back_since = now
                if not _carriable(entry):
                    lost.back_since, lost.gone = -math.inf, True
        if newly and not self.active:
            # One event per directory, and only for what moves: a site offline for a month
            # (or after a restart of the PoP, every site not yet back) is no news by itself.
            ways = {s: self._way(entries[s]) for s in newly}
            moved = [s for s in newly if ways[s] is not None]
            if moved:
                via_altwan = {s for s in moved if ways[s] == "alt-wan"}
                self._event(
                    EVENT_ACTIVATED, moved[0] if len(moved) == 1 else None,
                    f"Off-Cloud Recovery Activated for {_sites_text(moved)}: the PoP cannot "
                    f"reach them; {_ways_text(moved, via_altwan)}",
                    {"reason": "offline in the PoP's directory", **_sites_data(moved),
                     "altwan_sites": sorted(via_altwan)[:EVENT_SITES]},
                )

    def _expire_lost(self, now: float) -> None:
        back: list[tuple[int, float]] = []
        gone: list[int] = []
        for site_id in list(self._lost):
            lost = self._lost[site_id]
            if lost.back_since is None or now - lost.back_since < self.hold_s:
                continue
            del self._lost[site_id]
            if lost.gone:
                gone.append(site_id)
            else:
                back.append((site_id, now - lost.since))
        if back and not self.active:
            ids = [s for s, _ in back]
            self._event(
                EVENT_STOPPED, ids[0] if len(ids) == 1 else None,
                f"Off-Cloud Recovery Stopped for {_sites_text(ids)}: the PoP reaches them "
                f"again (for {self.hold_s:g} s)",
                {"reason": "online in the PoP's directory again", **_sites_data(ids),
                 "lasted_s": round(max(t for _, t in back), 1)},
            )
        if gone:
            log.info("recovery: %s no longer in recovery (left the directory, or recovery "
                     "or off-cloud turned off)", _sites_text(gone))

    def _activate(self, why: str, now: float) -> None:
        self.active, self.since, self.reason = True, now, why
        self.activations += 1
        self._remember(True)
        reached, cut, via_altwan = self._reached()
        text = f"Off-Cloud Recovery Activated: {why}; " + (
            _ways_text(reached, via_altwan) if reached else "no Alt-WAN or mesh tunnel is up yet"
        )
        if cut:
            shown = list(cut.items())[:EVENT_SITES // 5]
            text += "; unreachable: " + "; ".join(f"site {s} ({w})" for s, w in shown)
            if len(cut) > len(shown):
                text += f"; and {len(cut) - len(shown)} more (socketctl recovery)"
        log.warning("%s", text)
        unreachable = {str(k): v for k, v in list(cut.items())[:EVENT_SITES]}
        self._event(EVENT_ACTIVATED, None, text,
                    {"reason": why, **_sites_data(reached), "unreachable": unreachable,
                     "unreachable_count": len(cut),
                     "altwan_sites": sorted(via_altwan)[:EVENT_SITES]})

    def _stop(self, why: str, now: float) -> None:
        took = now - (self.since or now)
        self.active, self.since, self.reason = False, None, None
        self.was_active = False
        self._remember(False)
        text = f"Off-Cloud Recovery Stopped: {why}; traffic returns through the PoP"
        log.warning("%s (recovery lasted %.1f s)", text, took)
        self._event(EVENT_STOPPED, None, text, {"reason": why, "lasted_s": round(took, 1)})

    def _remember(self, active: bool) -> None:
        try:
            self.remember(active)
        except Exception:
            log.exception("recovery state not stored")

    def _event(self, kind: str, site_id: int | None, text: str, data: dict[str, Any]) -> None:
        try:
            self.on_event(kind, text, data, site_id)
        except Exception:
            log.exception("recovery event not recorded")

    # ---------------------------------------------------------------- clocks

    def next_due(self) -> float:
        """When a hold runs out or the boot wait ends; anything else arrives with the cloud's
        or the directory's own news (a tick follows those)."""
        due = math.inf
        if self.active and self._up_since is not None:
            due = self._up_since + self.hold_s
        elif not self.active and not self._seen_up and self.enabled:
            if self.was_active:
                due = self.started
            else:
                due = self.started + BOOT_MAX_WAIT_S
                if self._ready_at is not None:
                    due = min(due, self._ready_at + self.boot_wait_s)
        for lost in self._lost.values():
            if lost.back_since is not None:
                due = min(due, lost.back_since + self.hold_s)
        return due

    # ---------------------------------------------------------------- status

    def _reached(self) -> tuple[list[int], dict[int, str], set[int]]:
        """Sites recovery carries right now, the others with the reason, and the ones of the
        first that go over Alt-WAN."""
        reached: list[int] = []
        cut: dict[int, str] = {}
        via_altwan: set[int] = set()
        for e in sorted(self._sites(), key=lambda e: e["site_id"]):
            site_id = e["site_id"]
            way, why = self._site_state(e)
            if way is None:
                cut[site_id] = why or "unreachable"
                continue
            reached.append(site_id)
            if way == "alt-wan":
                via_altwan.add(site_id)
        return reached, cut, via_altwan

    def _way(self, e: dict[str, Any]) -> str | None:
        return self._site_state(e)[0]

    def _site_state(self, e: dict[str, Any]) -> tuple[str | None, str | None]:
        """How recovery would carry the site of directory entry e now (`alt-wan` first, then
        `mesh`) and, when it could not, why (None, the reason)."""
        site_id = e["site_id"]
        if self.own_recovery() is not True:
            return None, "WAN recovery is disabled for this site in the account"
        if e.get("recovery") is not True:
            return None, f"WAN recovery is disabled for site {site_id} in the account"
        alt = self.altwan_reach(site_id)
        if alt.up:
            return "alt-wan", None
        # An Alt-WAN tunnel that is expected but down is worth a word; none at all is not.
        alt_why = f"; no Alt-WAN tunnel: {alt.why}" if e.get("altwan") and alt.why else ""
        if not e.get("offcloud"):
            return None, f"site {site_id} is not an off-cloud site{alt_why}"
        reach = self.mesh_reach(site_id)
        if reach.up:
            return "mesh", None
        return None, f"no mesh tunnel: {reach.why or 'down'}{alt_why}"

    def summary(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "enabled": self.enabled,
            "active": self.active,
            "reason": self.reason,
            "since_s": round(now - self.since, 1) if self.since is not None else None,
            "returning_in_s": (
                round(max(0.0, self._up_since + self.hold_s - now), 1)
                if self.active and self._up_since is not None else None
            ),
            "hold_s": self.hold_s,
            "activations": self.activations,
            "lost_sites": sorted(self._lost),
        }

    def sites(self) -> list[dict[str, Any]]:
        """Per remote site: where its traffic goes now (as paths.py routes its first subnet)
        and, when it is unreachable or recovery could not carry it, why."""
        out = []
        chosen = self.paths.chosen()
        cloud_up = self.cloud_up()
        for e in self._sites():
            site_id = e["site_id"]
            way, ready_why = self._site_state(e)
            transport = None
            for net in e.get("subnets") or []:
                with contextlib.suppress(ValueError):
                    choice = chosen.get(ipaddress.ip_network(net))
                    if choice is not None:
                        transport = str(choice.candidate.transport)
                        break
            why = None
            if transport not in (None, "cloud"):
                state = transport
            elif self.active or site_id in self._lost:
                state, why = "unreachable", ready_why or "its direct tunnel is not in use"
            elif not cloud_up and self._seen_up:
                state, why = "unreachable", "the cloud is lost and " + (
                    ready_why or "recovery is not active")
            elif e.get("online") is False:
                state = "unreachable"
                why = "offline in the PoP's directory" + (f"; {ready_why}" if ready_why else "")
            else:
                state = "cloud"
            out.append({
                "site_id": site_id,
                "name": e.get("name"),
                "state": state,
                "site_lost": site_id in self._lost,
                "why": why,
                "ready": way is not None,  # recovery would carry it now...
                "ready_via": way,  # ...over "alt-wan" or the "mesh"
                "ready_why": ready_why,
            })
        return out
