"""The extension points of mailplat.

The protocol engine, the queue and the delivery agents only talk to each other through these
interfaces, so that each side can be replaced by a plugin (found with ``twisted.plugin`` in the
``mailplat.plugins`` package) without touching the core.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import IO, TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

from mailplat.replies import Reply

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from mailplat.address import Mailbox
    from mailplat.envelope import Envelope, Recipient, SessionInfo, Transaction
    from mailplat.params import MailParams, RcptParams
    from mailplat.routing import MailboxLike


class Action(Enum):
    """What a policy hook wants done; the first non-CONTINUE answer ends the chain."""

    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCONNECT = "disconnect"


@dataclass(frozen=True)
class Verdict:
    """A hook's answer; ``reply`` overrides the default reply for that action.

    ``add_headers`` (data hook only) are header fields ("Name: value", no line ending) that are
    prepended to the message when it is delivered; the body is never rewritten.
    ``recipients`` (rcpt hook, with ACCEPT) replaces the recipient by these addresses in the
    transaction: an alias expanded at RCPT time.
    """

    action: Action
    reply: Reply | None = None
    add_headers: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()


CONTINUE = Verdict(Action.CONTINUE)


@dataclass(frozen=True)
class Route:
    """Where one recipient goes: which delivery agent, to which destination.

    ``destination`` is agent specific: a Maildir path for ``maildir``, a next-hop domain or host
    for ``smtp``, an LMTP endpoint for ``lmtp``. ``relay`` marks a recipient outside our local
    domains, which policy only accepts from authenticated or trusted clients. ``tag`` is the
    subaddress (``tag`` of ``user+tag@``), kept for plugins. ``expansion`` is set for an alias:
    the final addresses it stands for, which the session records instead of the alias.
    """

    agent: str
    destination: str
    mailbox: str
    relay: bool = False
    tag: str | None = None
    expansion: tuple[str, ...] = ()


class IPolicy(Interface):
    """Decisions at each SMTP stage. Every method returns a Deferred firing with a Verdict."""

    def connect(session: SessionInfo) -> Deferred[Verdict]:
        """A client connected (SessionInfo)."""

    def helo(session: SessionInfo, name: str) -> Deferred[Verdict]:
        """The client said HELO/EHLO/LHLO ``name``."""

    def mail(
        session: SessionInfo, sender: Mailbox | None, params: MailParams
    ) -> Deferred[Verdict]:
        """MAIL FROM: sender is a Mailbox or None for <>; params are its ESMTP parameters."""

    def rcpt(
        session: SessionInfo, transaction: Transaction, recipient: Mailbox, params: RcptParams
    ) -> Deferred[Verdict]:
        """RCPT TO: recipient is a Mailbox."""

    def data(session: SessionInfo, transaction: Transaction, headers: bytes) -> Deferred[Verdict]:
        """The message's header section (bytes) arrived completely; called before queueing."""


class IRouter(Interface):
    """Resolves a recipient address to a Route, or refuses it with a Reply."""

    def route(recipient: MailboxLike) -> Deferred[Route | Reply]:
        """Return a Deferred firing with a Route, or with a Reply that refuses the recipient."""


class IIncomingMessage(Interface):
    """A message being received: data is streamed in, never held whole in memory."""

    queue_id = Attribute("The id the message will have in the queue (str).")

    def write(data: bytes) -> None:
        """Append message bytes; raises SpoolError when the spool cannot take them."""

    def finish(transaction: Transaction) -> Deferred[list[Reply]]:
        """End of data. Returns a Deferred firing with a list of Reply: one per recipient
        for LMTP, a single one for SMTP. The Deferred fires only after the message is durable."""

    def abort() -> None:
        """The transaction was abandoned; discard what was written."""

    def open() -> IO[bytes]:
        """A binary file over the bytes written so far (read by the data hook before finish)."""


class IMessageSink(Interface):
    """Where a session hands finished transactions: the queue, or LMTP's direct delivery."""

    def begin(session: SessionInfo, transaction: Transaction) -> IIncomingMessage:
        """Start a message; returns an IIncomingMessage or raises SpoolError."""


class IStoredMessage(Interface):
    """A queued message as delivery agents see it."""

    envelope = Attribute("The Envelope.")

    def open() -> IO[bytes]:
        """A binary file object over the stored message bytes (trace header included)."""


class IDeliveryAgent(Interface):
    """Delivers a stored message to some recipients and reports per-recipient outcomes."""

    name = Attribute("The agent's name as used in routes and config, e.g. 'maildir'.")

    def deliver(
        message: IStoredMessage, recipients: list[tuple[Recipient, Route]]
    ) -> Deferred[dict[str, Reply]]:
        """recipients: a list of (Recipient, Route). Returns a Deferred firing with a dict
        mapping each recipient address to the Reply that describes its outcome
        (2xx delivered, 4xx retry later, 5xx bounce)."""


class IDeliveryAgentFactory(Interface):
    """A plugin that builds a delivery agent from its config section."""

    name = Attribute("The agent name this factory provides.")

    def makeAgent(config: dict[str, Any], context: AgentContext) -> IDeliveryAgent:
        """Return an IDeliveryAgent for this config (a dict) and context (mailplat.context)."""


class IPolicyPluginFactory(Interface):
    """A plugin that builds a policy (an IPolicy) from its ``[plugin.NAME]`` config section.

    The policy may also provide IQueueObserver and IDisconnectHook; see docs/plugins.rst.
    """

    name = Attribute("The plugin's name, as used in [plugins] order and [plugin.NAME].")

    def makePolicy(config: dict[str, Any], context: PluginContext) -> IPolicy:
        """Return the policy for this config (a dict) and context (a PluginContext)."""

    def checkConfig(config: dict[str, Any]) -> Iterable[tuple[str, str]]:
        """Yield (key, message) for each problem in this plugin's config section (a dict)."""


class IQueueObserver(Interface):
    """Told about queue events; the return value (None or a Deferred) is not waited for."""

    def queued(envelope: Envelope) -> Deferred[Any] | None:
        """A message was committed to the queue."""

    def delivered(envelope: Envelope, recipient: Recipient, reply: Reply) -> Deferred[Any] | None:
        """A recipient (envelope.Recipient) was delivered; reply is the agent's Reply."""

    def deferred(envelope: Envelope, recipient: Recipient, reply: Reply) -> Deferred[Any] | None:
        """A delivery attempt to a recipient failed temporarily and will be retried."""

    def bounced(envelope: Envelope, recipient: Recipient, reply: Reply) -> Deferred[Any] | None:
        """A recipient failed permanently (or expired in the queue)."""


class IDisconnectHook(Interface):
    """A policy that wants to know when a session ends (to free per-connection state)."""

    def disconnect(session: SessionInfo) -> Deferred[Any] | None:
        """The client's connection is gone (SessionInfo); the return value is ignored."""


@dataclass(frozen=True)
class PluginContext:
    """What every policy plugin may need from the server around it.

    ``resolver`` is a twisted.names IResolver; ``run_in_thread(f, *args)`` returns a Deferred
    and runs ``f`` on a bounded thread pool, for library calls that block or burn CPU.
    """

    reactor: Any
    hostname: str
    data_dir: str
    resolver: Any
    run_in_thread: Any
    trusted_networks: tuple[str, ...] = ()


class SpoolError(Exception):
    """The spool cannot accept the message now; ``reply`` is 451 4.3.0 or 452 4.3.1."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class AgentContext:
    """What every delivery agent may need from the server around it.

    ``config`` is the whole Config (agents with settings outside [agent.NAME]), ``router`` the
    server's IRouter and ``sink`` its spool (an IMessageSink), for agents that put a message
    back into the queue (list expansion); all three are None in a bare context. ``resolver``
    is the server's one twisted.names resolver (``[dns]``), shared with the policy plugins.
    """

    reactor: object
    hostname: str
    config: Any = None
    router: Any = None
    sink: Any = None
    resolver: Any = None
    run_blocking: Any = None  # runs f(*args) off the reactor (the disk helper), or None
