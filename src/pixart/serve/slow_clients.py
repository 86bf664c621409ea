"""Connections to ``pixart serve`` that are slow to say what they want: closed once their request headers are late.

uvicorn closes a kept-alive connection that stays idle, but not one that sends its request headers slowly: a
client sending one byte a second ("slowloris") cancels the idle timer with its first byte and keeps the
connection as long as it likes, and a fresh connection that sends nothing has no timer at all. Enough of them
hold every file descriptor the process may open. :func:`header_deadline_protocol` gives uvicorn an HTTP
protocol that closes a connection whose request headers are not complete within a deadline, counted from
when it opened or its previous response ended. The body has its own deadline (:class:`pixart.serve.guard.Guard`).
"""

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pixart.serve.guard import utc_stamp

log = logging.getLogger(__name__)


def header_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request headers take longer than ``seconds``.

    A client that sent part of its headers gets a 408 and a line in the request log; one that sent
    nothing is closed silently, as browsers open spare connections they may never use.
    """
    body = json.dumps({"error": f"the request headers did not arrive within {seconds:g} s"}).encode()
    timed_out = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _heard = False  # bytes of the awaited request have arrived

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._heard = True
            super().data_received(data)
            # h11 leaves IDLE once a request's headers are complete (a WebSocket upgrade included).
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Unless the next request's headers were already read (pipelined), they are awaited again.
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._heard = False
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self._heard:
                client = self.client[0] if self.client else "?"
                log.info("%s %s - - 408 request headers not complete within %g s", utc_stamp(), client, seconds)
                self.transport.write(timed_out)
            self.transport.close()

    return HeaderDeadline
