"""TLS on the listening side: the main port, branch ports and the admin API."""

from __future__ import annotations

import ssl


class TlsError(ValueError):
    """The certificate, key or CA file cannot be used."""


def server_context(cert: str, key: str | None = None, ca: str | None = None) -> ssl.SSLContext:
    """A server context for `cert`/`key`; with `ca`, clients must present a certificate
    that CA signed (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the TLS certificate {cert}"
                       f"{f' with key {key}' if key else ''}: {exc}") from exc
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load the TLS CA file {ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
