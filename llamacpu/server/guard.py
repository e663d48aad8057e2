"""Who may talk to the server: ASGI middleware in front of the app."""
from __future__ import annotations

import hmac

from .errors import APIError


class _RequireKey:
    """ASGI middleware: /v1 requests need `Authorization: Bearer KEY` (401 otherwise).
    The chat page and /health stay open (the page asks for the key)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = b""
            for k, v in scope.get("headers", []):
                if k == b"authorization":
                    auth = v
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                from starlette.responses import JSONResponse
                err = APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
                await JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)
