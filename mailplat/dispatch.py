"""Routing a recipient and calling a delivery agent: the two steps every delivery shares.

The queue manager (retries, limits) and LMTP (deliver now, answer each) both route recipients
and hand them to agents; what can go wrong there — a router error, a missing agent, an agent
that raises or forgets a recipient — is answered the same way here, always with a 4xx so a
fault of ours never bounces mail.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

from mailplat.interfaces import IDeliveryAgent, IRouter, IStoredMessage, Route
from mailplat.replies import LOCAL_ERROR, Reply

log = Logger()

NO_AGENT = Reply(451, "4.3.5", "Mail system configuration error: no such delivery agent")
NO_OUTCOME = Reply(451, "4.3.0", "Delivery agent gave no outcome for this recipient")


def mailbox_of(address: str) -> Any:
    """A stored address ("local@domain", or "postmaster") as the Mailbox routers take."""
    from mailplat.address import Mailbox

    local, at, domain = address.rpartition("@")
    return Mailbox(local, domain) if at else Mailbox(address, "")


async def route_address(router: IRouter, address: str, qid: str = "") -> Route | Reply:
    """The router's Route, or the Reply refusing the address; a router fault is 451."""
    try:
        answer = await maybeDeferred(router.route, mailbox_of(address))
        if not isinstance(answer, (Route, Reply)):
            raise TypeError(f"router answered {answer!r}")
        return answer
    except Exception:
        log.failure("{qid}: routing <{addr}> failed", qid=qid, addr=address)
        return LOCAL_ERROR


async def call_agent(
    agent: IDeliveryAgent | None, message: IStoredMessage, pairs: Sequence[tuple[Any, Route]]
) -> dict[str, Reply]:
    """One agent call for ``pairs`` of (Recipient, Route): a Reply for every address."""
    if agent is None:
        return {r.address: NO_AGENT for r, _ in pairs}
    try:
        replies = await maybeDeferred(agent.deliver, message, list(pairs))
    except Exception:
        log.failure("{qid}: agent {agent} failed", qid=message.envelope.queue_id,
                    agent=getattr(agent, "name", "?"))
        return {r.address: LOCAL_ERROR for r, _ in pairs}
    return {r.address: replies.get(r.address, NO_OUTCOME) for r, _ in pairs}
