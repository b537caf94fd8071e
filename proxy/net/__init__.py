"""Listeners and client connections. Knows the wire protocol, not branches."""
