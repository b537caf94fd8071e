"""SCRAM-SHA-256 client for the proxy's own upstream connections.

Only used when the upstream URI carries credentials; a client's own SCRAM
conversation is forwarded untouched.
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


async def authenticate(run: RunCommand, user: str, password: str, source: str) -> None:
    nonce = base64.b64encode(os.urandom(24)).decode()
    name = user.replace("=", "=3D").replace(",", "=2C")
    first_bare = f"n={name},r={nonce}"
    reply = await run(source, {
        "saslStart": 1,
        "mechanism": "SCRAM-SHA-256",
        "payload": Binary(f"n,,{first_bare}".encode()),
        "options": {"skipEmptyExchange": True},
    })
    if not reply.get("ok"):
        raise AuthError(reply.get("errmsg", "saslStart failed"))
    server_first = bytes(reply["payload"])
    parsed = _parse(server_first)
    if not parsed["r"].startswith(nonce):
        raise AuthError("server nonce does not extend the client nonce")
    salted = hashlib.pbkdf2_hmac(
        "sha256", saslprep(password).encode(), base64.b64decode(parsed["s"]), int(parsed["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored = hashlib.sha256(client_key).digest()
    final_bare = f"c=biws,r={parsed['r']}"
    auth_message = f"{first_bare},{server_first.decode()},{final_bare}".encode()
    signature = hmac.digest(stored, auth_message, "sha256")
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    reply = await run(source, {
        "saslContinue": 1,
        "conversationId": reply["conversationId"],
        "payload": Binary(f"{final_bare},p={proof.decode()}".encode()),
    })
    if not reply.get("ok"):
        raise AuthError(reply.get("errmsg", "authentication failed"))
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    expected = base64.b64encode(hmac.digest(server_key, auth_message, "sha256")).decode()
    if _parse(bytes(reply["payload"])).get("v") != expected:
        raise AuthError("server signature does not verify")
    while not reply.get("done"):
        reply = await run(source, {
            "saslContinue": 1, "conversationId": reply["conversationId"], "payload": Binary(b""),
        })
        if not reply.get("ok"):
            raise AuthError(reply.get("errmsg", "authentication failed"))
