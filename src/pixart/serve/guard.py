"""What a request to ``pixart serve`` must be before the app sees it, and how often a client may ask.

A browser lets any web page send a "simple" request (a form post, ``text/plain``) to 127.0.0.1 without
asking the server first, and a DNS-rebound name reaches the same socket with a foreign ``Host``. So
:class:`Guard` lets a request through only if its ``Host`` is one this server answers to, its ``Origin`` (if
it came from a page) is the server's own page, and, for the API, it is JSON (which a foreign page cannot
send without a CORS preflight, never granted here) carrying the bearer token when one is set. Bodies are
counted as they arrive and cut off at a size and a deadline, chunked or not.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pixart.errors import PixArtError

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ALL_INTERFACES = frozenset({"0.0.0.0", "::", ""})


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the server to this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name in a ``Host`` header or a URL's netloc, without port or brackets: "[::1]:80" → "::1"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":")[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """Who may reach the server and with what: set by the ``pixart serve`` flags."""

    bind_host: str = "127.0.0.1"
    """The address the server listens on; requests may name it in their Host header."""
    allowed_hosts: tuple[str, ...] = ()
    """More names clients may use (a LAN name, a reverse proxy's); loopback names are always allowed."""
    token: str | None = field(default=None, repr=False)
    """The bearer token of the API and the page's login password; None: no authentication."""
    max_body: int = 8 * 2**20
    """Largest request body in bytes; enough for base64 image inputs."""
    body_timeout: float = 30.0
    """Seconds a client has to send a whole request body."""

    def host_allowed(self, name: str) -> bool:
        """Whether a Host header's name is this server's, so not a DNS-rebound stranger's."""
        if name in LOOPBACK_NAMES or name == host_name(self.bind_host) or name in self.allowed_hosts:
            return True
        # Listening everywhere, the machine's own addresses are its names; DNS rebinding needs a domain name.
        return self.bind_host in ALL_INTERFACES and _is_ip(name)

    def token_matches(self, given: str) -> bool:
        """Constant-time comparison, so the time of a refusal says nothing about the token."""
        # surrogatepass: a login form may send any string, and a refusal must not become a 500
        if self.token is None:
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self.token.encode())


class Guard:
    """ASGI middleware enforcing :class:`Access` on every request, before the app reads anything."""

    def __init__(self, app, access: Access, api_prefix: str = "/api/"):
        self.app, self.access, self.api_prefix = app, access, api_prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is not None:
            client = scope["client"][0] if scope.get("client") else "?"
            log.info("%s %s %s %s %d %s", utc_stamp(), client, scope.get("method", "WS"), scope["path"], *refusal[:2])
            if scope["type"] == "websocket":  # 1008: policy violation
                return await send({"type": "websocket.close", "code": 1008, "reason": refusal[1]})
            return await _respond(send, *refusal)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        await self._bounded(scope, receive, send)

    def refusal(self, scope) -> tuple[int, str, dict[str, str]] | None:
        """(status, message, headers) if the request's headers break a rule, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self.access.host_allowed(host_name(host)):
            return 421, f"this server does not answer to the host {host!r}; start it with --allowed-host NAME", {}
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return 403, f"requests from the page {origin!r} are refused; use this server's own page", {}
        length = headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                return 400, f"bad Content-Length {length!r}", {}
            if int(length) > self.access.max_body:
                return 413, f"the body has {length} bytes; this server takes at most {self.access.max_body}", {}
        if not scope["path"].startswith(self.api_prefix):
            return None
        if self.access.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not self.access.token_matches(given.strip()):
                return 401, "send the server's token: Authorization: Bearer TOKEN", {"www-authenticate": "Bearer"}
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return 415, f"the body must be application/json, got {kind or 'no content type'!r}", {}
        return None

    async def _bounded(self, scope, receive, send):
        """Run the app with the body counted as it arrives: refused with 413 or 408 when too long or too slow."""
        access, loop = self.access, asyncio.get_running_loop()
        deadline = loop.time() + access.body_timeout
        state = {"received": 0, "body_done": False, "started": False, "refused": False}

        async def refuse(status: int, message: str) -> dict:
            state["refused"] = True
            if not state["started"]:
                await _respond(send, status, message, {"connection": "close"})
            return {"type": "http.disconnect"}

        async def counted_receive():
            if state["refused"]:
                return {"type": "http.disconnect"}
            if state["body_done"]:  # after the body, receive only reports a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                return await refuse(408, f"the body did not arrive within {access.body_timeout:g} s")
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > access.max_body:
                    return await refuse(413, f"the body is over {access.max_body} bytes, the most this server takes")
                state["body_done"] = not message.get("more_body", False)
            return message

        async def guarded_send(message):
            if state["refused"]:  # the client already has its answer
                return
            state["started"] = True
            await send(message)

        await self.app(scope, counted_receive, guarded_send)


def utc_stamp() -> str:
    """The time for a log line, in UTC so lines from servers anywhere sort together."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def _respond(send, status: int, message: str, headers: dict[str, str]) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RateLimited(PixArtError):
    """A client asked too often; ``retry_after`` is the seconds until its next request is taken."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class RateLimiter:
    """At most ``per_minute`` requests per client, in bursts of up to that many (a token bucket per client)."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute, self.clock = per_minute, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client → (tokens, time of that count)
        self._lock = threading.Lock()

    def admit(self, client: str) -> None:
        """Take one request from the client's allowance, or raise RateLimited."""
        rate = self.per_minute / 60
        with self._lock:
            now = self.clock()
            if len(self._buckets) > 4096:  # forget clients whose allowance is whole again: memory stays bounded
                self._buckets = {
                    c: (n, t) for c, (n, t) in self._buckets.items() if n + (now - t) * rate < self.per_minute
                }
            tokens, then = self._buckets.get(client, (self.per_minute, now))
            tokens = min(self.per_minute, tokens + (now - then) * rate)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                wait = math.ceil((1 - tokens) / rate)
                raise RateLimited(
                    f"too many requests: this server takes {self.per_minute} a minute per client; retry in {wait} s",
                    wait,
                )
            self._buckets[client] = (tokens - 1, now)


def parse_rate(text: str) -> int:
    """Requests per minute from a ``--rate-limit`` value such as "30/min", "30" or "2/s"."""
    count, _, unit = text.strip().partition("/")
    per = {"": 1, "min": 1, "m": 1, "minute": 1, "s": 1 / 60, "sec": 1 / 60, "second": 1 / 60, "h": 60, "hour": 60}
    if not count.strip().isdigit() or unit.strip().lower() not in per or int(count) < 1:
        raise PixArtError(f"--rate-limit {text!r} is not a rate; use N/min (or N/s, N/h) with N ≥ 1, e.g. 30/min")
    per_minute = int(count) / per[unit.strip().lower()]
    if per_minute < 1:
        raise PixArtError(f"--rate-limit {text!r} is under one request a minute; the least is 1/min")
    return round(per_minute)
