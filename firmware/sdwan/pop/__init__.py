"""The reference PoP: `popd` (sessions of the sites, relay, directory, STUN), `popctl`, the
account file and PoP configuration, and `socket-pki` (the account CA and certificates)."""
