"""Replies straight onto the socket when nothing is queued before them.

Twisted's ``transport.write`` only buffers: the bytes leave at the reactor's next turn, after
an ``epoll_ctl`` that adds the socket to the writers and another that removes it once sent.
For a session's short replies that is two system calls and one more reactor turn per reply,
and the client waits for that turn. ``write_now`` sends at once when the transport is a
plain TCP connection with an empty buffer (the usual case: replies are small and the client
reads them), and leaves everything else to ``transport.write``: TLS, a backlog, a closing
connection, a kernel buffer that takes only part of the bytes (the rest is buffered, in
order, behind what went out).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    if (
        type(transport) in _PLAIN_TCP
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
        # Nothing sent (a full buffer) or the connection broke: the reactor's own write
        # path buffers the rest, or finds the error and closes as it always does.
    transport.write(data)
