"""The admin endpoint's HTTP/1.1 server: h11 (sans-IO) on trio, over loopback TCP or a
unix socket (mode 0600). GET only; small requests; a slow client is cut off."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable

import h11
import trio

from gateway.admin.metrics import CONTENT_TYPE, exposition, registry_for
from gateway.admin.status import status
from gateway.admin.view import GatewayView
from gateway.config import AdminAddress

log = logging.getLogger("tunnelgate.admin")

MAX_REQUEST = 16 * 1024  # a GET with headers; anything larger is not ours
REQUEST_TIMEOUT = 10.0  # s a connection may take to send a request and read the answer


# Re-read the config and apply it: (applied, one line saying what happened).
Reload = Callable[[], Awaitable[tuple[bool, str]]]


class AdminServer:
    def __init__(self, view: GatewayView, reload: Reload | None = None) -> None:
        self.view = view
        self.reload = reload
        self.registry = registry_for(view)

    async def serve(self, address: AdminAddress, *,
                    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await _listen(address)
        bound: object = address.path if address.path else [
            list(ln.socket.getsockname()[:2]) for ln in listeners]
        log.info("admin endpoint on %s", address if address.path else bound)
        task_status.started(bound)
        try:
            await trio.serve_listeners(self._connection, listeners)
        finally:
            if address.path:
                _unlink_socket(address.path)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(MAX_REQUEST)
                        conn.receive_data(bytes(data))
                        continue
                    if isinstance(event, h11.Request):
                        await self._answer(stream, conn, event)
                    if isinstance(event, h11.ConnectionClosed) or conn.our_state is h11.MUST_CLOSE:
                        break
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(stream, conn, exc.error_status_hint, b"bad request\n", "text/plain")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def _answer(self, stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request) -> None:
        target = request.target.decode("ascii", "replace").split("?", 1)[0]
        if target == "/reload" and request.method == b"POST" and self.reload is not None:
            # (A request body, if any, is not read: the connection closes after the answer.)
            applied, summary = await self.reload()
            await _send(stream, conn, 200 if applied else 400, summary.encode() + b"\n", "text/plain")
        elif request.method not in (b"GET", b"HEAD"):
            await _send(stream, conn, 405, b"only GET\n", "text/plain", [(b"allow", b"GET, HEAD")])
        elif target == "/metrics":
            await _send(stream, conn, 200, exposition(self.registry), CONTENT_TYPE)
        elif target == "/status":
            body = json.dumps(status(self.view), indent=2).encode() + b"\n"
            await _send(stream, conn, 200, body, "application/json")
        elif target == "/healthz":
            view = self.view
            healthy = view.listening and not view.draining
            why = b"ok\n" if healthy else b"draining\n" if view.draining else b"starting\n"
            await _send(stream, conn, 200 if healthy else 503, why, "text/plain")
        else:
            await _send(stream, conn, 404, b"not found: /metrics, /status, /healthz, POST /reload\n",
                        "text/plain")
        # A HEAD answer has headers only: h11 drops the body for us.


async def _send(stream: trio.abc.Stream, conn: h11.Connection, code: int, body: bytes, kind: str,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]
    data = conn.send(h11.Response(status_code=code, headers=headers))
    data = (data or b"") + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(data)


async def _listen(address: AdminAddress) -> list[trio.SocketListener]:
    if not address.path:
        return await trio.open_tcp_listeners(address.port, host=address.host or "127.0.0.1")
    _unlink_socket(address.path)  # a stale socket from a killed run
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600: the admin endpoint is the operator's
    try:
        await sock.bind(address.path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(16)
    return [trio.SocketListener(sock)]


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
