"""Who may call the API, and how many at once: an optional API key, a request limit, slow clients.

Three ASGI middlewares and one uvicorn protocol, so that every refusal is the same JSON
``{"error": message, "detail": ...}`` as the API's own errors:

* :class:`ApiKeyMiddleware`: when the server has a key, every ``/api/`` route needs it
  (``X-API-Key: KEY``, ``Authorization: Bearer KEY``, or the ``deepfeat_key`` cookie that
  the web page sets when the user types the key; ``<img>`` requests carry the cookie).
  Else 401. The page and its static files stay open: they hold no data. Keys are compared
  as SHA-256 digests with :func:`hmac.compare_digest`: constant time, length included;
* :class:`ConcurrencyLimitMiddleware`: at most ``limit`` requests in progress; more get
  503 with ``Retry-After`` (uvicorn's own ``limit_concurrency`` answers plain text, so the
  server leaves it off and uses this). A request body that stalls longer than
  ``body_timeout`` seconds between two chunks gets 408, so a slow client holds a request
  slot for a bounded time;
* :class:`JsonH11Protocol`: uvicorn's HTTP/1.1 protocol, answering a request it cannot
  parse (bad request line, headers over h11's 16 KiB limit) with a JSON 400, not text.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote

from deepfeat.serve.uploads import ApiError, _send_json

#: environment variable read by ``deepfeat serve`` when ``--api-key`` is not given
API_KEY_ENV = "DEEPFEAT_API_KEY"
API_KEY_HEADER = b"x-api-key"
API_KEY_COOKIE = "deepfeat_key"
#: the shortest key accepted (a guessable key is no protection)
MIN_KEY_LENGTH = 8


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


def presented_key(headers) -> bytes | None:
    """The key a request presents (header, bearer token, or cookie), or None."""
    cookie = None
    for name, value in headers:
        if name == API_KEY_HEADER:
            return value
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        if name == b"cookie":
            cookie = value
    if cookie is not None:
        try:
            jar = SimpleCookie(cookie.decode("latin-1"))
        except CookieError:
            return None
        if API_KEY_COOKIE in jar:
            return unquote(jar[API_KEY_COOKIE].value).encode("utf-8")
    return None


def key_matches(expected_digest: bytes, presented: bytes | None) -> bool:
    """Constant-time check of a presented key against the digest of the server's key."""
    return hmac.compare_digest(expected_digest, _digest(presented if presented is not None else b"\0missing"))


def check_api_key(key: str | None) -> str | None:
    """The server's key, checked (None: no key)."""
    if key is None:
        return None
    if len(key) < MIN_KEY_LENGTH or key != key.strip() or any(ord(c) < 33 or ord(c) > 126 for c in key):
        from deepfeat.errors import UsageError

        raise UsageError(f"the API key must be at least {MIN_KEY_LENGTH} printable ASCII characters without "
                         "spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
    return key


class ApiKeyMiddleware:
    """401 JSON for ``/api/`` requests without the right key (see the module docstring)."""

    def __init__(self, app, key: str, prefix: str = "/api/"):
        self.app = app
        self.digest = _digest(key)
        self.prefix = prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope.get("path", "") + "/").startswith(self.prefix):
            if not key_matches(self.digest, presented_key(scope.get("headers", ()))):
                return await _send_json(send, ApiError(
                    401, "this server needs an API key: send it as the X-API-Key header (or Authorization: "
                         "Bearer KEY)", None, headers={"WWW-Authenticate": 'Bearer realm="deepfeat"'}))
        return await self.app(scope, receive, send)


class ConcurrencyLimitMiddleware:
    """At most *limit* HTTP requests in progress (503 + Retry-After beyond); stalled bodies get 408."""

    def __init__(self, app, limit: int, body_timeout: float | None = 30.0, retry_after: int = 1):
        self.app = app
        self.limit = int(limit)
        self.body_timeout = body_timeout
        self.retry_after = str(int(retry_after))
        self.active = 0
        self.refused = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:  # one event loop: the check and the increment cannot interleave
            self.refused += 1
            return await _send_json(send, ApiError(
                503, f"busy: {self.limit} requests are already in progress; retry shortly",
                {"limit": self.limit}, headers={"Retry-After": self.retry_after}))
        self.active += 1
        try:
            return await self.app(scope, self._timed(receive) if self.body_timeout else receive, send)
        finally:
            self.active -= 1

    def _timed(self, receive):
        timeout = self.body_timeout

        async def timed_receive():
            try:
                return await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body stalled for more than {timeout:g} s",
                               {"body_timeout_seconds": timeout}, headers={"Connection": "close"}) from None

        return timed_receive


def _json_400(msg: str) -> bytes:
    return json.dumps({"error": f"malformed HTTP request: {msg}", "detail": None}, separators=(",", ":")).encode()


try:  # uvicorn is part of the [serve] extra; the middlewares above do not need it
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # pragma: no cover - exercised only without the extra
    JsonH11Protocol = None  # type: ignore[assignment,misc]
else:
    class JsonH11Protocol(H11Protocol):
        """uvicorn's h11 protocol with a JSON body on its own 400 (requests it cannot parse)."""

        def send_400_response(self, msg: str) -> None:
            body = _json_400(msg.rstrip("."))
            event = h11.Response(status_code=400, reason=b"Bad Request", headers=[
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")])
            for ev in (event, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(ev))
            self.transport.close()


__all__ = ["API_KEY_ENV", "ApiKeyMiddleware", "ConcurrencyLimitMiddleware", "JsonH11Protocol", "check_api_key",
           "key_matches", "presented_key"]
