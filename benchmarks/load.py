"""Load generators: Postfix's smtp-source for the bulk scenarios, and an asyncio client that
holds many idle connections (smtp-source cannot) for scenario (f).

Everything connects to 127.0.0.1 only, and every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate

SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER = "sender@bench.example"


def find_smtp_source() -> str:
    """The smtp-source binary, or a SystemExit telling how to install it."""
    path = shutil.which("smtp-source") or (SMTP_SOURCE if os.path.exists(SMTP_SOURCE) else None)
    if path is None:
        raise SystemExit(
            "smtp-source not found: it comes with Postfix. Install it with\n"
            "    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y postfix\n"
            "(the harness never uses the system's Postfix instance; it may stay stopped)."
        )
    return path


def smtp_source_command(
    binary: str, port: int, sessions: int, messages: int, size: int, recipient: str
) -> list[str]:
    """smtp-source keeping each session open (-d) for its share of the messages."""
    return [
        binary, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
        "-M", "bench-client.localdomain", "-f", SENDER, "-t", recipient,
        f"127.0.0.1:{port}",
    ]


@dataclass
class LoadResult:
    """How a load run went; ``error`` is None when every message was accepted."""

    seconds: float
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


def run_smtp_source(command: list[str], timeout: float) -> LoadResult:
    start = time.monotonic()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return LoadResult(time.monotonic() - start, f"smtp-source still running after {timeout:.0f}s")
    seconds = time.monotonic() - start
    if done.returncode != 0:
        return LoadResult(seconds, f"smtp-source exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return LoadResult(seconds)


# ------------------------------------------------------------------ many idle connections (f)

def message_bytes(size: int, serial: int) -> bytes:
    """A message whose body is ``size`` bytes (give or take one) in 80-column lines, no dots."""
    header = (
        f"From: <{SENDER}>\r\nTo: <bench@bench.example>\r\nSubject: idle {serial}\r\n"
        f"Date: {formatdate()}\r\nMessage-ID: <idle.{serial}@bench-client.localdomain>\r\n\r\n"
    ).encode()
    lines = (b"X" * 78 + b"\r\n") * (size // 80 + 1)
    body = lines[: max(size - 2, 0)].rstrip(b"\r") + b"\r\n"  # never a bare CR at the cut
    return header + body + b".\r\n"


class SMTPError(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One (possibly multi-line) reply; its last line."""
    for _ in range(100):
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed")
        if line[3:4] != b"-":
            return line
    raise SMTPError("reply longer than 100 lines")


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    line = await read_reply(reader)
    if not line.startswith(code):
        raise SMTPError(f"expected {code.decode()}, got {line.decode(errors='replace').strip()}")


class IdleClient:
    """One connection: greeted and EHLO'd, then idle until asked to send one message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "IdleClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        await expect(reader, b"220")
        await client.command(b"EHLO bench-client.localdomain", b"250")
        return client

    async def command(self, line: bytes, code: bytes) -> None:
        self.writer.write(line + b"\r\n")
        await expect(self.reader, code)

    async def send(self, recipient: str, message: bytes) -> None:
        await self.command(f"MAIL FROM:<{SENDER}>".encode(), b"250")
        await self.command(f"RCPT TO:<{recipient}>".encode(), b"250")
        await self.command(b"DATA", b"354")
        self.writer.write(message)
        await expect(self.reader, b"250")

    async def quit(self) -> None:
        try:
            await asyncio.wait_for(self.command(b"QUIT", b"221"), 10)
        except (OSError, SMTPError, asyncio.TimeoutError):
            pass
        self.writer.close()


async def _open_all(port: int, count: int, parallel: int = 50) -> list[IdleClient]:
    """Open ``count`` connections, at most ``parallel`` handshakes at a time (a connect storm
    would only measure the listen backlog)."""
    gate = asyncio.Semaphore(parallel)

    async def one() -> IdleClient:
        async with gate:
            return await IdleClient.open(port)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def probe(port: int, recipient: str, size: int) -> tuple[float, float]:
    """A fresh client's view of the server: (seconds to the greeting, seconds for one
    whole transaction including QUIT)."""
    start = time.monotonic()
    client = await IdleClient.open(port)
    greeted = time.monotonic() - start
    await client.send(recipient, message_bytes(size, 0))
    await client.quit()
    return greeted, time.monotonic() - start


async def idle_scenario(
    port: int, count: int, size: int, recipient: str, hold: float, timeout: float,
    on_idle: Callable[[], None] | None = None,
) -> LoadResult:
    """Connect ``count`` clients, hold them idle for ``hold`` seconds while probing the server
    with one more client, then send one message on each idle connection at once.

    ``seconds`` covers the sending only; the probe's message is extra and counted separately.
    """
    start = time.monotonic()
    clients = await asyncio.wait_for(_open_all(port, count), timeout)
    connected = time.monotonic() - start
    try:
        await asyncio.sleep(hold / 2)
        if on_idle is not None:
            on_idle()
        greeted, transaction = await asyncio.wait_for(probe(port, recipient, size), 60)
        await asyncio.sleep(hold / 2)
        send_start = time.monotonic()
        await asyncio.wait_for(
            asyncio.gather(*(c.send(recipient, message_bytes(size, i + 1)) for i, c in enumerate(clients))),
            timeout,
        )
        seconds = time.monotonic() - send_start
    finally:
        await asyncio.gather(*(c.quit() for c in clients), return_exceptions=True)
    return LoadResult(seconds, extra={
        "connect_seconds": connected,
        "probe_greeting_ms": greeted * 1000,
        "probe_transaction_ms": transaction * 1000,
    })


def run_idle(port: int, count: int, size: int, recipient: str, hold: float, timeout: float,
             on_idle: Callable[[], None] | None = None) -> LoadResult:
    """Synchronous wrapper: failures become ``LoadResult.error``."""
    start = time.monotonic()
    try:
        return asyncio.run(idle_scenario(port, count, size, recipient, hold, timeout, on_idle))
    except (OSError, SMTPError, asyncio.TimeoutError) as e:
        return LoadResult(time.monotonic() - start, f"idle clients failed: {e!r}")
