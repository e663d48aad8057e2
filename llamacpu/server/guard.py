"""Who may talk to the server: one ASGI middleware in front of the app, checking in order

1. Host: the name the client connected to must be this server's (loopback names, IP
   addresses, --host, --allowed-host). A web page can point a name it owns at
   127.0.0.1 (DNS rebinding) and then read the answers as its own origin; its
   requests still say `Host: evil.example`, and get 403.
2. Origin: a browser says which page sent a request. The page served here (same
   origin) and the --cors-origin list are answered, with CORS headers for the
   latter (preflight included); any other page gets 403, before the body is read.
3. The API key (--api-key): /v1 needs `Authorization: Bearer KEY` (401 otherwise);
   the chat page and /health stay open, and `scope["state"]["authorized"]` tells
   /health whether to show more than liveness.
4. Content-Type: a POST must say application/json. A page may send text/plain to any
   address without a preflight; JSON needs one, so step 2 sees it.
"""
from __future__ import annotations

import hmac
import ipaddress
import json

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")   # --host values that name every address, no one name
CORS_MAX_AGE_S = 600                     # browsers cache a preflight this long (Chrome caps it at 7200)
CORS_METHODS = "GET, POST"
CORS_HEADERS = "Authorization, Content-Type"


def host_name(header: str) -> str:
    """The name part of a Host header ("[::1]:8080" -> "::1", "Example.com." -> "example.com")."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":")[0]
    return h.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware: the four checks of this module, then the app.

    host: the --host value; allowed_hosts: --allowed-host names; cors_origins: origins
    (scheme://name[:port]) whose pages may call the API, "*" for any; api_key: None or
    the key /v1 requires."""

    def __init__(self, app, *, host: str = "127.0.0.1", allowed_hosts=(), cors_origins=(),
                 api_key: str | None = None):
        self.app = app
        self.names = set(LOOPBACK_NAMES) | {host_name(h) for h in allowed_hosts}
        if host not in WILDCARD_HOSTS:
            self.names.add(host_name(host))
        self.origins = {o.strip().rstrip("/").lower() for o in cors_origins}
        self.key = api_key.encode() if api_key else None

    def host_allowed(self, header: str) -> bool:
        # An IP address cannot be rebound (no DNS is involved): a request that names one
        # reached it on purpose. So --host 0.0.0.0 answers at every address of the machine.
        name = host_name(header)
        return name in self.names or _is_ip(name)

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/").lower() in self.origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        host = headers.get("host", "")
        if not self.host_allowed(host):
            return await _refuse(send, 403, f"this server does not answer to the host name {host!r} (a page "
                                            f"using DNS rebinding would); if you mean it, start it with "
                                            f"--allowed-host {host_name(host) or 'NAME'}", "host_not_allowed")
        origin = headers.get("origin")
        cors = None
        if origin is not None and origin.lower() != f"{scope.get('scheme', 'http')}://{host}".lower():
            if not self.origin_allowed(origin):
                return await _refuse(send, 403, f"cross-origin requests from {origin!r} are refused; start the "
                                                f"server with --cors-origin {origin} to allow that page",
                                     "origin_not_allowed")
            cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                    (b"access-control-expose-headers", b"Retry-After")]
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                return await _preflight(send, cors)
        if cors is not None:
            send = _with_headers(send, cors)
        authorized = self.key is None or _bearer_matches(headers.get("authorization", ""), self.key)
        scope.setdefault("state", {})["authorized"] = authorized
        if not authorized and scope["path"].startswith("/v1"):
            return await _refuse(send, 401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                                 "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return await _refuse(send, 415, f"the request body must be JSON, sent with 'Content-Type: "
                                                f"application/json' (got {kind or 'no Content-Type'!r})",
                                     "unsupported_media_type")
        await self.app(scope, receive, send)


def _bearer_matches(auth: str, key: bytes) -> bool:
    scheme, _, token = auth.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), key)


def _with_headers(send, extra):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", [])) + extra}
        await send(message)
    return wrapped


async def _preflight(send, cors):
    await send({"type": "http.response.start", "status": 204, "headers": cors + [
        (b"access-control-allow-methods", CORS_METHODS.encode()),
        (b"access-control-allow-headers", CORS_HEADERS.encode()),
        (b"access-control-max-age", str(CORS_MAX_AGE_S).encode())]})
    await send({"type": "http.response.body", "body": b""})


async def _refuse(send, status: int, message: str, code: str, headers=()):
    # (the request body is left unread: the server discards it, or closes the connection)
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
