"""Assembles one running server from a Config: the queue, the agents and every listener.

There is exactly one QueueStore, one Spool and one QueueManager; each listener only chooses a
session class and settings (its profile) and shares them.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger, globalLogPublisher
from twisted.plugin import getPlugins

import mailplat.plugins
from mailplat.config import Config
from mailplat.control import control_service
from mailplat.dns import make_resolver
from mailplat.dsn import Notifier
from mailplat.datafiles import DataFilePool
from mailplat.diskprocess import DiskProcess
from mailplat.groupsync import GroupSyncer
from mailplat.interfaces import AgentContext, IDeliveryAgent, IDeliveryAgentFactory
from mailplat.listeners import build_factory
from mailplat.logwriter import BackgroundWriter, offload_log_files, restore
from mailplat.hooks import PluginService, build_chain, load_plugins, make_context, observers
from mailplat.odmr_hold import odmr_router
from mailplat.policy import DefaultPolicy
from mailplat.privileges import adopt_data_dir
from mailplat.queue import REMOVAL_GATHER, QueueManager
from mailplat.receivers import Receivers
from mailplat.routeconfig import outbound_settings
from mailplat.routing import LocalRouter
from mailplat.spool import Spool
from mailplat.store import QueueStore

log = Logger()


def load_agents(config: Config, context: AgentContext) -> dict[str, IDeliveryAgent]:
    """Every delivery agent plugin found in mailplat.plugins, built with its config section."""
    sections = config.raw.get("agent", {})
    agents: dict[str, IDeliveryAgent] = {}
    for factory in getPlugins(IDeliveryAgentFactory, mailplat.plugins):
        agents[factory.name] = factory.makeAgent(sections.get(factory.name, {}), context)
    return agents


def reception_policy(
    parent: MultiService, config: Config, reactor: Any, router: Any, resolver: Any
) -> tuple[list[Any], Any]:
    """The policy plugins ([plugins] order, after the routing/relay check; see hooks.py) and
    the policy chain the sessions ask; the plugins' service joins ``parent``. Shared by the
    main process and the receivers, so both judge mail alike."""
    context, pool = make_context(config, reactor, resolver)
    plugins = load_plugins(config.raw, context)
    default = DefaultPolicy(router, config.trusted_networks)
    policy = build_chain(default, plugins, context)
    PluginService(plugins, pool).setServiceParent(parent)  # type: ignore[no-untyped-call]
    return plugins, policy


class ReceptionService(MultiService):
    """The parts every process that takes SMTP sessions has, built alike from the config: the
    queue store and a spool into it, the router, the [dns] resolver, the policy chain. The
    main process (MailServer) adds the queue and the agents; a receiver process
    (mailplat.receiver) hands its commits to the main one instead."""

    def __init__(self, config: Config, reactor: Any, on_commit: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        os.makedirs(config.data_dir, exist_ok=True)
        self.syncer = GroupSyncer(reactor)
        self.store = QueueStore(config.queue_dir, syncer=self.syncer,
                                sync_directories=config.sync_directories)
        # ODMR domains ([odmr.domains]) go to the hold; everything else as LocalRouter says.
        self.router = odmr_router(config, LocalRouter(config))
        # Commit fsyncs, Maildir copies and data file creation run in a helper process
        # (diskprocess.py).
        self.disk = DiskProcess(reactor)
        self.disk.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.data_files = DataFilePool(self.store, self.disk.run, reactor)
        self.spool = Spool(self.store, self.syncer, on_commit, reactor,
                           data_files=self.data_files, run_blocking=self.disk.run)
        # One DNS resolver ([dns]) for MX lookups and for the policy plugins alike.
        settings = outbound_settings(config)
        self.resolver = make_resolver(settings.nameservers, reactor, settings.dns_timeout)
        self.plugins, self.policy = reception_policy(self, config, reactor, self.router,
                                                     self.resolver)
        self.listeners: dict[str, Any] = {}


class MailServer(ReceptionService):
    """The top service; keeps references to the shared parts for tests and the CLI."""

    def __init__(self, config: Config, reactor: Any, offload_logs: bool = False) -> None:
        # The spool exists before the queue, so that agents which put mail back into it
        # (list expansion) get the one spool; commits reach the queue once it exists.
        super().__init__(config, reactor, self._submit)
        # Under twistd: log file writes go to a thread (logwriter.py), not the reactor's.
        self.offload_logs = offload_logs
        self._log_writers: list[BackgroundWriter] = []
        agent_context = AgentContext(
            reactor=reactor, hostname=config.hostname, config=config, router=self.router,
            sink=self.spool, resolver=self.resolver, run_blocking=self.disk.run,
        )
        self.agents = load_agents(config, agent_context)
        self.queue = QueueManager(
            self.store, self.router, self.agents, reactor,
            retry_delay=config.retry_delay, max_lifetime=config.max_lifetime,
            schedule=config.retry_schedule, limits=config.concurrency,
            run_blocking=self.disk.run, removal_gather=REMOVAL_GATHER,
        )
        self.queue.data_files = self.data_files  # delivered messages' files are reused
        self.queue.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.queue.observers.extend(observers(self.plugins))
        for listener in config.listeners:
            factory = build_factory(listener, self, reactor)
            service = strports.service(listener.endpoint, factory, reactor=reactor)
            service.setName(listener.name)
            service.setServiceParent(self)
            self.listeners[listener.name] = service
        # The queue sends DSNs through the spool, and obeys `mailplat queue` on its socket.
        self.queue.notifier = Notifier(
            self.spool, config.hostname, self.spool.runInThread, config.bounce_size_limit
        )
        control = control_service(self.queue, config.control_socket, reactor)
        if control is not None:  # `mailplat queue` commands reach the running queue here
            control.setServiceParent(self)
        if config.receivers:  # more processes for the sessions (receivers.py)
            receivers = Receivers(self, config.receivers, reactor)
            receivers.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _submit(self, envelope: Any) -> Any:
        """The spool's on_commit: the queue takes each committed message."""
        return self.queue.submit(envelope)

    def privilegedStartService(self) -> None:
        """Bind (as root, if started so), then hand the data dir's contents to its owner
        before twistd drops privileges."""
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        adopt_data_dir(self.config.data_dir)

    def startService(self) -> None:
        if self.offload_logs:  # twistd has set up its log observer by now
            self._log_writers = offload_log_files(globalLogPublisher)
        super().startService()  # type: ignore[no-untyped-call]
        for listener in self.config.listeners:
            log.info("listener {name} ({profile}) on {endpoint}", name=listener.name,
                     profile=listener.profile, endpoint=listener.endpoint)

    def stopService(self) -> Deferred[Any]:
        """Stop listeners and queue, then agents that keep idle connections say QUIT."""
        stopped: Deferred[Any] = maybeDeferred(super().stopService)

        def close_agents(_: object) -> Deferred[Any]:
            closers = [getattr(agent, "close", None) for agent in self.agents.values()]
            return gatherResults([maybeDeferred(close) for close in closers if callable(close)])

        stopped.addCallback(close_agents)
        stopped.addBoth(_passthrough, self.data_files.close)
        return stopped.addBoth(self._restore_logs)

    def _restore_logs(self, result: object) -> object:
        restore(globalLogPublisher, self._log_writers)
        self._log_writers = []
        return result


def _passthrough(result: object, f: Any) -> object:
    f()
    return result


def build_server(config: Config, reactor: Any, offload_logs: bool = False) -> MailServer:
    return MailServer(config, reactor, offload_logs)
