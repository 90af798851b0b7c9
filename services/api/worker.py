"""gunicorn's sync worker, which takes a request only once it has all arrived.

gunicorn's sync worker accepts a connection and reads it at once, blocking, with no time limit of
its own: two connections that sent nothing (a browser's speculative pre-connects do exactly that)
or half a request held both of the API's workers until gunicorn's 30 s worker timeout killed them
(its log then blames memory: "Perhaps out of memory?"), and /health/live went unanswered
meanwhile. gunicorn's answer is a buffering proxy in front, which `qf up` and a plain
`docker compose up` do not have; its gthread and async workers would share one SQLite connection
and the control layer's state between threads or greenlets, and sync measured as fast or faster
(services/api/service.py).

So this worker keeps the sync worker's request handling and changes only how a connection reaches
it. Accepted connections wait in a selector (epoll: no FD_SETSIZE limit) until the whole request
(its head, and as many body bytes as its Content-Length says) is in the kernel's buffer, seen
with MSG_PEEK without reading it; only then is it handed, blocking, to gunicorn's `handle`. One
that stays idle for IDLE_S is closed; one whose request is still incomplete after REQUEST_S is
answered 408 (the API's JSON error) and closed. At most MAX_WAITING connections wait per worker;
past that the oldest is dropped. A request bigger than PEEK_BYTES (which gunicorn's limits or
the API's body limit then refuse) is handed over as soon as that much has arrived. gunicorn has
no such setting for its sync worker, hence this (~100 lines)."""
from __future__ import annotations

import errno
import json
import os
import re
import select
import socket
import sys
import time
from collections import OrderedDict

from gunicorn import util
from gunicorn.workers.sync import SyncWorker

from services.api.errors import error_body

IDLE_S = 30.0  # a connection that has sent nothing for this long is closed (a browser's pre-connect)
REQUEST_S = 10.0  # a request not whole this long after its first byte: 408
HANDLE_TIMEOUT_S = 10.0  # the socket's timeout while gunicorn reads and answers (a client that stops reading)
PEEK_BYTES = 64 * 1024  # more than any request the API takes (the largest body is 4 KiB), less than a socket buffer
MAX_WAITING = 1024  # connections waiting per worker
ACCEPT_BATCH = 32  # connections accepted per turn of the loop before the waiting ones are looked at
_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([0-9]{1,12})[ \t]*\r\n", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r\n]*chunked", re.IGNORECASE)


def request_complete(data: bytes) -> bool:
    """Whether `data` (the start of a connection's bytes) holds a whole HTTP/1.x request: its head,
    and its Content-Length's worth of body. A chunked body counts as whole once the head is
    (gunicorn reads it under HANDLE_TIMEOUT_S); so does anything PEEK_BYTES long."""
    if len(data) >= PEEK_BYTES:
        return True
    end = data.find(b"\r\n\r\n")
    if end < 0:
        # a head ended by bare newlines: gunicorn's parser says what it makes of it, not this
        return b"\n\n" in data or b"\n\r\n" in data
    head = data[:end + 2]
    if _CHUNKED.search(head):
        return True
    m = _LENGTH.search(head)
    return m is None or len(data) - (end + 4) >= int(m.group(1))


class ApiWorker(SyncWorker):
    """The sync worker, handed only connections whose request has arrived (module docstring).
    Linux's epoll: each waiting connection edge-triggered, so one that has sent part of its
    request wakes the worker again only when more arrives, never in a busy loop."""

    def run(self) -> None:
        self.log = _QuietTimeouts(self.log)
        self.waiting: OrderedDict[int, list] = OrderedDict()  # fd -> [sock, listener, addr, since, first byte at]
        self.epoll = select.epoll()
        listeners = {}
        for listener in self.sockets:
            listener.setblocking(False)
            listeners[listener.fileno()] = listener
            self.epoll.register(listener.fileno(), select.EPOLLIN)
        self.epoll.register(self.PIPE[0], select.EPOLLIN)
        try:
            while self.alive:
                self.notify()
                for fd, events in self.epoll.poll(self._wait_s()):
                    if fd == self.PIPE[0]:
                        os.read(self.PIPE[0], 1)
                    elif fd in listeners:
                        self._accept_all(listeners[fd])
                    elif fd in self.waiting:
                        self._readable(fd, bool(events & (select.EPOLLRDHUP | select.EPOLLHUP)))
                    if not self.alive:
                        break
                self._expire(time.monotonic())
                if not self.is_parent_alive():
                    return
        finally:
            for fd in list(self.waiting):
                self._drop(fd)
            self.epoll.close()

    def _wait_s(self) -> float:
        timeout = self.timeout or 0.5  # gunicorn's own: the worker must notify the arbiter in time
        if self.waiting:
            _, _, _, since, first = next(iter(self.waiting.values()))
            due = since + IDLE_S if first is None else first + REQUEST_S
            timeout = min(timeout, max(0.0, due - time.monotonic()))
        return timeout

    def _accept_all(self, listener: socket.socket) -> None:
        """Accept what waits on `listener`, at most ACCEPT_BATCH (then the waiting ones get their
        turn, and the other workers theirs)."""
        for _ in range(ACCEPT_BATCH):
            try:
                client, addr = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED):
                    return
                raise
            util.close_on_exec(client)
            client.setblocking(False)
            if len(self.waiting) >= MAX_WAITING:
                self._drop(next(iter(self.waiting)))
            fd = client.fileno()
            self.waiting[fd] = [client, listener, addr, time.monotonic(), None]
            # edge-triggered: reported once now if bytes are already there, then once per arrival
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)

    def _readable(self, fd: int, ended: bool = False) -> None:
        """`fd` has bytes (or its peer closed): handed to gunicorn once its request is whole, or
        once the peer has shut its sending side (`ended`: nothing more will come; gunicorn then
        answers what it has, a short body with the API's 400)."""
        entry = self.waiting[fd]
        client, listener, addr = entry[0], entry[1], entry[2]
        try:
            data = client.recv(PEEK_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the peer
            self._drop(fd)
            return
        if not data:  # closed before a request: nothing to answer
            self._drop(fd)
            return
        if not ended and not request_complete(data):
            if entry[4] is None:
                entry[4] = time.monotonic()  # REQUEST_S from its first byte
            return
        del self.waiting[fd]
        self.epoll.unregister(fd)
        client.setblocking(True)
        client.settimeout(HANDLE_TIMEOUT_S)
        self.handle(listener, client, addr)

    def _expire(self, now: float) -> None:
        for fd, (client, _, _, since, first) in list(self.waiting.items()):
            if first is None and now - since >= IDLE_S:
                self._drop(fd)
            elif first is not None and now - first >= REQUEST_S:
                try:
                    client.send(_TIMEOUT_ANSWER)
                except OSError:
                    pass
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        entry = self.waiting.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass
        if entry is not None:
            try:
                entry[0].close()
            except OSError:
                pass


_BODY = json.dumps(error_body("request_timeout", f"the request did not arrive whole within {REQUEST_S:.0f} s")).encode()
_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class _QuietTimeouts:
    """gunicorn's logger, but a socket that timed out under HANDLE_TIMEOUT_S (a client that stopped
    reading its answer, or sending its chunked body) is one warning line, not the traceback
    gunicorn's `handle` logs for any OSError it does not know."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def exception(self, msg, *args, **kwargs) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, TimeoutError):
            self._inner.warning("client timed out after %.0f s; connection closed", HANDLE_TIMEOUT_S)
            return
        self._inner.exception(msg, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)
