"""Authentication of the proxy's own upstream connections with the URI's credentials.

Only used when the upstream URI carries credentials; a client's own SCRAM
conversation is forwarded untouched. The mechanism is pymongo's parsed
`authMechanism`: SCRAM-SHA-256, SCRAM-SHA-1, PLAIN, MONGODB-X509, or DEFAULT, which
picks as drivers do from the hello's `saslSupportedMechs`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

from bson.binary import Binary
from pymongo.saslprep import saslprep

RunCommand = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class AuthError(Exception):
    pass


def _parse(payload: bytes) -> dict[str, str]:
    return dict(item.split("=", 1) for item in payload.decode().split(","))


SUPPORTED = frozenset({"DEFAULT", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN", "MONGODB-X509"})


async def authenticate(run: RunCommand, user: str, password: str | None, source: str,
                       mechanism: str = "DEFAULT", hello: dict[str, Any] | None = None) -> None:
    if mechanism == "MONGODB-X509":
        cmd: dict[str, Any] = {"authenticate": 1, "mechanism": "MONGODB-X509"}
        if user:
            cmd["user"] = user
        reply = await run("$external", cmd)
        if not reply.get("ok"):
            raise AuthError(reply.get("errmsg", "X.509 authentication failed"))
        return
    if password is None:
        raise AuthError(f"{mechanism} needs a password")
    if mechanism == "PLAIN":
        reply = await run(source, {"saslStart": 1, "mechanism": "PLAIN", "autoAuthorize": 1,
                                   "payload": Binary(f"\x00{user}\x00{password}".encode())})
        if not reply.get("ok"):
            raise AuthError(reply.get("errmsg", "PLAIN authentication failed"))
        return
    if mechanism == "DEFAULT":
        offered = (hello or {}).get("saslSupportedMechs")
        mechanism = ("SCRAM-SHA-1" if isinstance(offered, list) and offered
                     and "SCRAM-SHA-256" not in offered else "SCRAM-SHA-256")
    if mechanism not in ("SCRAM-SHA-256", "SCRAM-SHA-1"):
        raise AuthError(f"authMechanism {mechanism} is not supported for the upstream "
                        f"(supported: {', '.join(sorted(SUPPORTED))})")
    await _scram(run, user, password, source, mechanism)


async def _scram(run: RunCommand, user: str, password: str, source: str,
                 mechanism: str) -> None:
    sha1 = mechanism == "SCRAM-SHA-1"
    digest = "sha1" if sha1 else "sha256"
    if sha1:  # SCRAM-SHA-1 salts MONGODB-CR's hex digest, as the server stores it
        secret = hashlib.md5(f"{user}:mongo:{password}".encode()).hexdigest().encode()
    else:
        secret = saslprep(password).encode()
    nonce = base64.b64encode(os.urandom(24)).decode()
    name = user.replace("=", "=3D").replace(",", "=2C")
    first_bare = f"n={name},r={nonce}"
    reply = await run(source, {
        "saslStart": 1,
        "mechanism": mechanism,
        "payload": Binary(f"n,,{first_bare}".encode()),
        "options": {"skipEmptyExchange": True},
    })
    if not reply.get("ok"):
        raise AuthError(reply.get("errmsg", "saslStart failed"))
    server_first = bytes(reply["payload"])
    parsed = _parse(server_first)
    if not parsed["r"].startswith(nonce):
        raise AuthError("server nonce does not extend the client nonce")
    salted = hashlib.pbkdf2_hmac(digest, secret, base64.b64decode(parsed["s"]), int(parsed["i"]))
    client_key = hmac.digest(salted, b"Client Key", digest)
    stored = hashlib.new(digest, client_key).digest()
    final_bare = f"c=biws,r={parsed['r']}"
    auth_message = f"{first_bare},{server_first.decode()},{final_bare}".encode()
    signature = hmac.digest(stored, auth_message, digest)
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    reply = await run(source, {
        "saslContinue": 1,
        "conversationId": reply["conversationId"],
        "payload": Binary(f"{final_bare},p={proof.decode()}".encode()),
    })
    if not reply.get("ok"):
        raise AuthError(reply.get("errmsg", "authentication failed"))
    server_key = hmac.digest(salted, b"Server Key", digest)
    expected = base64.b64encode(hmac.digest(server_key, auth_message, digest)).decode()
    if _parse(bytes(reply["payload"])).get("v") != expected:
        raise AuthError("server signature does not verify")
    while not reply.get("done"):
        reply = await run(source, {
            "saslContinue": 1, "conversationId": reply["conversationId"], "payload": Binary(b""),
        })
        if not reply.get("ok"):
            raise AuthError(reply.get("errmsg", "authentication failed"))
