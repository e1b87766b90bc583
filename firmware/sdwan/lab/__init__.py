"""The namespace lab: a small Internet (bridge, NAT routers, sites, LAN hosts) for tests,
benchmarks and the demo. `netns` wraps the iproute2/nft commands, `topology` builds and
tears down labs, `impair` is the impairment element an uplink's cable may hold, `demo` is the
`socket-lab demo` command."""

from sdwan.lab.topology import Lab, PeerSpec, Router, Site, WanUplink, cleanup_stale

__all__ = ["Lab", "PeerSpec", "Router", "Site", "WanUplink", "cleanup_stale"]
