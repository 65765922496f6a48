"""
The KoboldFS server as a twistd service: composes the core
(L{koboldfs.node.Node}), its front ends (the binary protocol,
L{koboldfs.binaryserver}; HTTP, L{koboldfs.web}) and its background parts
(replication, scrub, orphan sweep, status poll, transaction sweep,
heartbeat) into one L{KoboldService}.  Nothing here handles a request.
"""

from __future__ import annotations

import socket
from typing import Any, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from koboldfs.auth import Credentials
from koboldfs.binaryserver import ServerFactory
from koboldfs.config import ServerConfig
from koboldfs.connection import ConnectionCache
from koboldfs.events import Listeners
from koboldfs.interfaces import FileInfo, IMetadataStore, ServerInfo
from koboldfs.metadata import store_from_url
from koboldfs.metrics import Metrics
from koboldfs.multipart import UploadSweeper, upload_sweep_interval
from koboldfs.node import Node
from koboldfs.orphans import OrphanSweeper
from koboldfs.periodic import Periodic
from koboldfs.replicator import Replicator, Scrubber
from koboldfs.status import Status
from koboldfs.storage import Storage
from koboldfs.txnhandler import TransactionSweeper, sweep_interval
from koboldfs.s3access import ChainedCredentials, StaticCredentials, read_credentials_file
from koboldfs.s3web import make_s3_site
from koboldfs.web import guarded, make_site

log = Logger()

#: Seconds between looks at the data disk's free space (statvfs, in the
#: thread pool): a filling disk is refused from within about this long.
SPACE_INTERVAL = 1.0


class _ThreadPoolService(Service):
    """
    Runs a thread pool for as long as the server runs.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.setName("threads")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class _DataService(Service):
    """
    The data directory and the metadata store: L{started} fires once both
    are ready (the store connected, its schema made); stopping closes the
    store.
    """

    def __init__(self, storage: Storage, store: Any) -> None:
        self.storage = storage
        self.store = store
        self.setName("data")
        self.started: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        defer.ensureDeferred(self._start()).chainDeferred(self.started)

    async def _start(self) -> None:
        await self.storage.start()
        await self.store.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.maybeDeferred(self.store.stop)


class _PeersService(Service):
    """
    The connection cache to other servers: stopping closes every
    connection, which ends the replicator's copies in progress.
    """

    def __init__(self, peers: ConnectionCache) -> None:
        self.peers = peers
        self.setName("peers")

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.maybeDeferred(self.peers.close)


@implementer(IStreamServerEndpoint)
class _Listening:
    """
    An endpoint that says when it listens, with its port: the server must
    know its addresses to register them.  The port accepts no connection
    until the server adds it back to the reactor's readers, once registered and knowing its
    peers (L{KoboldService}); until then connections wait in the kernel's
    backlog.
    """

    def __init__(self, reactor: Any, endpoint: IStreamServerEndpoint) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self.port: defer.Deferred[Any] = defer.Deferred()

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        d = self._endpoint.listen(factory)

        def listened(port: Any) -> Any:
            # A port is a reader of the reactor (it reads new connections).
            self._reactor.removeReader(port)
            self.port.callback(port)
            return port

        def failed(failure: Any) -> Any:
            self.port.errback(failure)
            return failure

        return d.addCallbacks(listened, failed)


def with_backlog(description: str, backlog: int) -> str:
    """
    An endpoint description with a listen queue of C{backlog}, unless it
    sets one (Twisted's default is 50, which a burst of connections fills).
    """
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "ssl", "unix") or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def _listener(name: str, reactor: Any, description: str, factory: Any) -> _Listener:
    endpoint = _Listening(reactor, serverFromString(reactor, description))
    service = _Listener(endpoint, factory)
    service.listening = endpoint.port
    service.setName(name)
    return service


class _Listener(StreamServerEndpointService):
    """
    A listener whose L{listening} fires with its port (which accepts no
    connection until its C{startReading}: see L{_Listening}).
    """

    listening: defer.Deferred[Any]
    # A failure to listen is raised by startService, which the server
    # reports as its failure to start, rather than logged here too.
    _raiseSynchronously = True


def advertised_address(port: Any) -> str:
    """
    The C{host:port} peers should use to reach a listening port.
    """
    addr = port.getHost()
    host = addr.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"[{host}]:{addr.port}" if ":" in host else f"{host}:{addr.port}"


class KoboldService(MultiService):
    """
    A whole server, as a tree of services: its children are the thread
    pool, the data (storage and metadata store), the peer connections, the
    listeners (binary protocol, HTTP), the heartbeat and the background
    parts (replicator, scrubber, orphan sweep, status poll, transaction
    sweep), each with its own C{startService} and C{stopService}.

    They start in an order, not all at once: the data first, since
    starting needs the database, so it is asynchronous; then the
    listeners, then the server registers and reads who else is
    registered, and only then do the listeners accept connections (a
    server that answers is known to its peers and knows them); then the
    heartbeat and the background parts.  L{ready}
    fires once all that is done.  If start fails, the failure is logged and
    C{reactor.stop} is called, since a server that cannot reach its
    metadata or data directory cannot serve.  Stopping goes back through
    the same stages.
    """

    def __init__(
        self,
        config: ServerConfig,
        reactor: Any,
        store: IMetadataStore | None = None,
        threadpool: Any = None,
    ) -> None:
        """
        @param store: the metadata store; by default, the one C{config.db}
            names.
        @param threadpool: the threads storage blocks in; by default, a
            pool of its own.
        """
        super().__init__()
        self.config = config
        self.reactor = reactor
        io_pool = threadpool or ThreadPool(minthreads=2, maxthreads=8, name="koboldfs-io")
        self.storage = Storage(config.data, reactor, io_pool)
        db = config.db or f"sqlite:///{config.data}/metadata.sqlite"
        self.store = store if store is not None else store_from_url(db, reactor)
        self.peers = ConnectionCache(
            reactor,
            timeout=config.peer_timeout,
            connect_timeout=config.peer_connect_timeout,
            reply_timeout=config.peer_reply_timeout,
            credentials=Credentials(cluster_secret=config.cluster_secrets[0], name=config.name)
            if config.cluster_secrets
            else None,
            tls=config.tls_ca is not None,
            ca=config.tls_ca,
        )
        self.replica_lost: Listeners[FileInfo] = Listeners()
        self.node = Node(config, self.storage, self.store, reactor, self.peers, self.replica_lost)
        self.replicator = Replicator(self.node, reactor, config.replicate_interval)
        self.scrubber = Scrubber(
            self.node, reactor, config.scrub_rate, rest=config.replicate_interval
        )
        self.orphans = OrphanSweeper(self.node, reactor)
        self.status = Status(self.node, self.replicator, self.scrubber, reactor)
        self.metrics = Metrics(config.name, reactor, self.status.snapshot)
        self.txn_sweeper = TransactionSweeper(
            self.node.txns, reactor, sweep_interval(config.pending_timeout)
        )
        self.upload_sweeper = UploadSweeper(
            self.node.multipart, reactor, upload_sweep_interval(config.s3_upload_timeout)
        )
        self.heartbeat = Periodic(
            f"heartbeat of {config.name}", self._heartbeat, config.heartbeat, reactor, now=False
        )
        #: Looks at the disk's free space more often than heartbeats.
        self.space = Periodic(
            f"disk space of {config.name}",
            self.storage.refresh_space,
            SPACE_INTERVAL,
            reactor,
            now=False,
        )
        self.connections = ServerFactory(self.node, self.metrics)
        self.binary = _listener(
            "binary", reactor, with_backlog(config.listen, config.backlog), self.connections
        )
        self.key_check = Periodic(
            f"key check of {config.name}",
            self.connections.check_keys,
            config.key_check_interval,
            reactor,
            now=False,
        )
        self.http = _listener(
            "http",
            reactor,
            with_backlog(config.http, config.backlog),
            guarded(self.node, make_site(self.node, self.status, self.metrics)),
        )
        self._listeners: list[_Listener] = [self.binary, self.http]
        self.s3: _Listener | None = None
        if config.s3 != "none":
            credentials = ChainedCredentials(
                read_credentials_file(config.s3_credentials)
                if config.s3_credentials
                else StaticCredentials(),
                self.node.s3_credentials,
            )
            site = make_s3_site(
                self.node, credentials, config.s3_region, config.s3_domain, self.metrics
            )
            self.s3 = _listener("s3", reactor, config.s3, guarded(self.node, site))
            self._listeners.append(self.s3)
        self._data = _DataService(self.storage, self.store)
        #: The stages of start, in order; stop goes back through them.
        self._base: list[Service] = [
            _ThreadPoolService(io_pool),
            self._data,
            _PeersService(self.peers),
        ]
        self._background: list[Service] = [
            self.heartbeat,
            self.space,
            self.replicator,
            self.scrubber,
            self.orphans,
            self.status,
            self.txn_sweeper,
            self.upload_sweeper,
            self.key_check,
        ]
        names = (
            "heartbeat",
            "space",
            "replicator",
            "scrubber",
            "orphans",
            "status",
            "transactions",
            "uploads",
            "key check",
        )
        for service, name in zip(self._background, names, strict=True):
            service.setName(name)
        for service in [*self._base, *self._listeners, *self._background]:
            service.setServiceParent(self)
        self.ready: defer.Deferred[None] = defer.Deferred()

    def privilegedStartService(self) -> None:
        # Not the children's: a listener must not listen before the data
        # is ready (see startService).
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._startFailed)
        d.chainDeferred(self.ready)

    def _startFailed(self, failure: Any) -> Any:
        log.failure("KoboldFS server {name} could not start", failure, name=self.config.name)
        if self.reactor.running:
            self.reactor.stop()
        return failure

    async def _start(self) -> None:
        config = self.config
        for service in self._base:
            service.startService()
        await self._data.started
        for service in self._listeners:
            try:
                service.startService()
            except BaseException:
                # It cannot listen: said by the raise, not again by the ports.
                for listener in self._listeners:
                    listener.listening.addErrback(lambda _: None)
                raise
        port = await self.binary.listening
        http = await self.http.listening
        scheme = "https" if config.http.startswith("ssl:") else "http"
        public_url = config.public_url or f"{scheme}://{advertised_address(http)}"
        self.storage.set_reserve(config.reserve)
        await self.storage.refresh_space()
        free, total = self._space()
        await self.store.register_server(
            ServerInfo(
                name=config.name,
                host=config.host,
                address=advertised_address(port),
                public_url=public_url,
                heartbeat=self.reactor.seconds(),
                disk_free=free,
                disk_total=total,
            )
        )
        await self.node.refresh_servers()
        if not self.running:
            return  # stopped while starting
        # Only now: a server that answers is registered, so the others'
        # puts can find it, and knows its peers, so its own puts find them.
        for listener in self._listeners:
            self.reactor.addReader(await listener.listening)
        for service in self._background:
            service.startService()
        if not self.node.open and not config.cluster_secrets:
            log.warn(
                "{name} requires keys but has no --secret-file: peers cannot copy from it",
                name=config.name,
            )
        log.info(
            "KoboldFS server {name} on {address} ({auth}), HTTP {url}, data {data}, metadata {db}",
            auth="open: no authentication" if self.node.open else "keys required",
            name=config.name,
            address=advertised_address(port),
            url=public_url,
            data=config.data,
            db=self.store.url,
        )

    async def _heartbeat(self) -> None:
        """
        Tell the cluster we are alive, and learn who else is.
        """
        await self.storage.refresh_space()
        free, total = self._space()
        await self.store.heartbeat(self.config.name, self.reactor.seconds(), free, total)
        await self.node.refresh_servers()

    def _space(self) -> tuple[int, int]:
        """
        What the heartbeat reports: the bytes we still take above our
        reserve (0: full, which placement reads), and the disk's size.
        """
        return max(0, self.storage.room or 0), self.storage.total

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """
        Stop the background parts (waiting for the transaction sweep), stop
        listening, close the peer connections (which ends the copies in
        progress), wait for the background parts, then close the store
        and the thread pool.
        """
        Service.stopService(self)
        stopping = {s: defer.maybeDeferred(s.stopService) for s in _running(self._background)}
        if self.txn_sweeper in stopping:
            yield stopping.pop(self.txn_sweeper)
        for service in _running(self._listeners):
            yield service.stopService()
        base = _running(self._base)
        threads, data, peers = self._base
        if peers in base:
            yield peers.stopService()
        for d in stopping.values():
            yield d
        if data in base:
            yield data.stopService()
        if threads in base:
            yield threads.stopService()


def _running(services: Sequence[Service]) -> list[Service]:
    return [s for s in services if s.running]
