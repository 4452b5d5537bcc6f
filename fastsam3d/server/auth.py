"""Bearer-token authentication and the bind-address rule.

Loopback servers may run without a token. Any other bind address needs one, and the server
refuses to start without it. When a token is set every request needs
``Authorization: Bearer <token>``: a missing header is 401, a wrong token is 403. Both
``/v1/...`` and the nnInteractive-compatible routes use this header (the nnInteractive client
sends its ``api_key`` the same way).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets

from fastsam3d.errors import FastSAM3DError

TOKEN_ENV = "FASTSAM3D_TOKEN"


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The token to enforce: ``token``, else ``$FASTSAM3D_TOKEN``, else None on loopback.

    Raises FastSAM3DError when binding a non-loopback address without a token.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        raise FastSAM3DError(
            f"refusing to serve on {host} without a token: anyone who can reach this address "
            f"could use the server. Pass --token or set {TOKEN_ENV} (or bind 127.0.0.1)"
        )
    return token


class TokenAuthMiddleware:
    """ASGI middleware rejecting HTTP requests without the right bearer token."""

    def __init__(self, app, token: str):
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization")
        if given is None:
            return await _reject(send, 401, "missing 'Authorization: Bearer <token>' header")
        if not secrets.compare_digest(given, self._expected):
            return await _reject(send, 403, "wrong token")
        return await self.app(scope, receive, send)


async def _reject(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
