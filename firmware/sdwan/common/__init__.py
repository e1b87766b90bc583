"""What socketd, popd and the tools share: the TOML config engine, the SQLite store, the
control socket, control messages, certificate identities, DTLS sessions, STUN, kernel
network configuration and the service frame."""
