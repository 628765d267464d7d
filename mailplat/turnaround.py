"""Turning an ODMR connection around (RFC 2645 §5.2): after "250 OK now reversing the
connection" we are the SMTP client on the same TCP (or TLS) connection.

The session hands the connection over (``ESMTPSession.hand_over``) and the transport's protocol
becomes an ``SMTPClient`` (mailplat.client, the one client every outbound path uses), which
waits for the site's 220, says EHLO (HELO if refused) and then carries the held messages that
``odmr_hold.release`` gives it, before QUIT. With TLS on, the TLS layer stays where it is and
only the protocol inside it changes, so the reversed session is as private as the first one.

The same release over a fresh connection serves ETRN for sites with a static host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from mailplat.client import SMTPClient, connect
from mailplat.clientstate import ClientError, Timeouts
from mailplat.odmr_hold import HoldAgent, release

if TYPE_CHECKING:
    from mailplat.queue import QueueManager

log = Logger()

# RFC 5321 §4.5.3.2 client timeouts, except that a site may take a while to be ready after the
# turnaround (fetchmail first connects to its own SMTP server): ten minutes for its 220.
ODMR_TIMEOUTS = Timeouts(greeting=600.0)
_WRAPPER_DEPTH = 4  # tcp transport → TLS protocol → session; never more than a few layers


@dataclass(frozen=True)
class Collect:
    """What a release needs: the agent holding the locks, the queue, and who we are."""

    agent: HoldAgent
    queue: QueueManager
    hostname: str
    clock: IReactorTime
    timeouts: Timeouts = ODMR_TIMEOUTS


def swap_protocol(transport: Any, old: Protocol, new: Protocol) -> None:
    """Make ``new`` receive what the connection delivered to ``old`` until now.

    Without TLS the transport's ``protocol`` is the session; after STARTTLS (or on an
    implicit-TLS port) a TLSMemoryBIOProtocol sits in between and its ``wrappedProtocol`` is.
    """
    holder = transport
    for _ in range(_WRAPPER_DEPTH):
        for attribute in ("wrappedProtocol", "protocol"):
            if getattr(holder, attribute, None) is old:
                setattr(holder, attribute, new)
                return
        holder = getattr(holder, "protocol", None) or getattr(holder, "wrappedProtocol", None)
        if holder is None:
            break
    raise RuntimeError(f"cannot find {old!r} behind {transport!r}")


def turn_around(session: Any, collect: Collect, domains: frozenset[str],
                ids: Sequence[str]) -> Deferred[None]:
    """Become the client on ``session``'s connection and release ``ids``; the domains'
    lock (taken by the caller) is given back when done, whatever happened."""
    transport = session.transport
    client = SMTPClient(collect.hostname, collect.clock, timeouts=collect.timeouts)
    session.hand_over()
    try:
        swap_protocol(transport, session, client)
    except RuntimeError:  # a transport we do not know how to take over: nothing is lost
        log.failure("odmr: cannot turn the connection around")
        collect.agent.unlock(domains)
        transport.loseConnection()
        return succeed(None)
    client.makeConnection(transport)  # type: ignore[no-untyped-call]
    log.info("odmr: [{peer}] {user}: connection turned around for {domains}",
             peer=session.info.peer_host, user=session.info.auth_user,
             domains=",".join(sorted(domains)))
    return Deferred.fromCoroutine(_deliver(client, collect, domains, ids))


async def _deliver(client: SMTPClient, collect: Collect, domains: frozenset[str],
                   ids: Sequence[str]) -> None:
    """Greeting and EHLO, the messages, QUIT; a site that went away keeps its mail held."""
    try:
        await client.when_ready()
        await release(collect.queue, collect.agent, domains, ids, client)
        await client.quit()
    except ClientError as error:
        log.info("odmr: {domains}: the site did not take its mail: {reply}",
                 domains=",".join(sorted(domains)), reply=str(error.reply))
        client.close()
    except Exception:
        log.failure("odmr: {domains}: releasing mail failed", domains=",".join(sorted(domains)))
        client.close()
    finally:
        collect.agent.unlock(domains)


Connector = Callable[[str], "Deferred[SMTPClient]"]


def endpoint_connector(reactor: Any, collect: Collect) -> Connector:
    """Connect to a site's static host, given as a client endpoint string (ETRN)."""

    def connect_to(description: str) -> Deferred[SMTPClient]:
        endpoint = clientFromString(reactor, description)
        return connect(endpoint, collect.hostname, collect.clock, timeouts=Timeouts())

    return connect_to


def deliver_to_host(connector: Connector, host: str, collect: Collect,
                    domains: frozenset[str], ids: Sequence[str]) -> Deferred[None]:
    """ETRN: release the domains' mail over a new connection to ``host``; the caller took
    the domains' lock and it is given back when done."""
    return Deferred.fromCoroutine(_to_host(connector, host, collect, domains, ids))


async def _to_host(connector: Connector, host: str, collect: Collect,
                   domains: frozenset[str], ids: Sequence[str]) -> None:
    try:
        client = await connector(host)
    except ClientError as error:
        log.info("etrn: {host} refused us: {reply}", host=host, reply=str(error.reply))
        collect.agent.unlock(domains)
        return
    except Exception as error:
        log.info("etrn: cannot connect to {host}: {error}", host=host, error=error)
        collect.agent.unlock(domains)
        return
    await _deliver(client, collect, domains, ids)


__all__ = ["Collect", "ODMR_TIMEOUTS", "deliver_to_host", "endpoint_connector", "swap_protocol",
           "turn_around"]
