"""The branch engine: registry, WAL, copy-on-write overlays and command handlers.

Knows nothing of sockets: it runs commands through a `Runner` it is handed.
"""
