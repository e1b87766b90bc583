"""A site's supervisor, `socketd`, and the parts it wires together: the site configuration,
WAN link sockets, peer tunnels, the PoP sessions (cloud) and the operator CLI `socketctl`."""
