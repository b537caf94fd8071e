"""Errors raised while decoding client frames."""


class ProtocolError(Exception):
    """A frame the proxy cannot accept; the connection that sent it is closed."""
