"""Connections to the upstream MongoDB server."""
