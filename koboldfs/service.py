"""
The KoboldFS server: request handling, listeners and heartbeats.

L{Node} is what a server knows and does (its storage, the shared metadata,
its peers), with no wire in sight; L{ServerProtocol} is the thin adapter
that turns frames into calls on it; L{KoboldService} composes both with the
listeners, the HTTP site and the heartbeat into the twistd service.
"""

from __future__ import annotations

import math
import random
import socket
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.threadpool import ThreadPool

from koboldfs.client import ConnectionPool
from koboldfs.errors import (
    ConnectionFailed,
    ErrorCode,
    KoboldError,
    NotFound,
    ProtocolError,
    ServerError,
)
from koboldfs.interfaces import FileInfo, IMetadataStore, NamespaceInfo, ServerInfo
from koboldfs.metadata import store_from_url
from koboldfs.names import check_key, check_namespace
from koboldfs.protocol import (
    CHUNK_SIZE,
    MAX_PAYLOAD,
    REQUESTS,
    VERSION,
    Data,
    Frame,
    FrameProtocol,
    Message,
    Op,
    encode_data,
    encode_message,
)
from koboldfs.replicator import Replicator, Scrubber
from koboldfs.storage import Storage, Upload, new_fid, relpath_for
from koboldfs.urls import DEFAULT_EXPIRES, MAX_EXPIRES, fill_template, signed_url

log = Logger()

#: Most keys one LIST reply carries, whatever the client asks.
MAX_LIST = 1000


@dataclass
class ServerConfig:
    """
    Everything a server is told at start; see docs/server.md.
    """

    name: str
    host: str
    data: str
    listen: str = "tcp:9876:interface=127.0.0.1"
    http: str = "tcp:9877:interface=127.0.0.1"
    public_url: str | None = None
    db: str | None = None
    heartbeat: float = 5.0
    down_after: float = 30.0
    idle_timeout: float = 300.0
    max_file_size: int | None = None
    replicate_interval: float = 10.0
    scrub_rate: float = 10 * 1024 * 1024


def stat_fields(info: FileInfo) -> dict[str, Any]:
    """
    A file's metadata as the fields of an OK reply to STAT and PUT.
    """
    return {
        "key": info.key,
        "size": info.size,
        "sha256": info.sha256,
        "created": info.created,
        "servers": list(info.replicas),
    }


class Node:
    """
    One server's view of the cluster and the requests it can answer.

    Methods raise L{KoboldError}s whose codes become ERROR frames.
    """

    def __init__(
        self,
        config: ServerConfig,
        storage: Storage,
        store: IMetadataStore,
        clock: Any,
        peers: ConnectionPool,
    ) -> None:
        self.config = config
        self.name = config.name
        self.storage = storage
        self.store = store
        self.clock = clock
        self.peers = peers
        self._servers: dict[str, ServerInfo] = {}
        #: Called with a file whose copy here was found bad or missing and
        #: set aside, so that it is made again (the replicator sets it).
        self.on_replica_lost: Callable[[FileInfo], None] | None = None

    # -- the cluster

    async def refresh_servers(self) -> None:
        self._servers = {s.name: s for s in await self.store.servers()}

    @property
    def servers(self) -> dict[str, ServerInfo]:
        """
        Every registered server by name, as last refreshed.
        """
        return self._servers

    def up(self, name: str) -> ServerInfo | None:
        """
        The server C{name} if it is registered and heard from recently.
        """
        server = self._servers.get(name)
        if server is None or not server.is_up(self.clock.seconds(), self.config.down_after):
            return None
        return server

    @property
    def readonly(self) -> bool:
        me = self._servers.get(self.name)
        return me is not None and me.state != "alive"

    # -- requests

    async def lookup(self, ns: str, key: str) -> FileInfo:
        info = await self.store.lookup(check_namespace(ns), check_key(key))
        if info is None:
            raise NotFound(ErrorCode.NOT_FOUND, f"no key {key!r} in namespace {ns!r}")
        return info

    async def delete(self, ns: str, key: str) -> None:
        """
        Mark the file deleted, then remove our copy of its bytes at once, so
        that a web server serving our data directory stops serving it too.
        Other servers' copies wait for the replicator.
        """
        info = await self.lookup(ns, key)
        if not await self.store.delete(info.namespace, info.key, self.clock.seconds()):
            raise NotFound(ErrorCode.NOT_FOUND, f"no key {key!r} in namespace {ns!r}")
        if self.name in info.replicas:
            await self.storage.remove(info.path)

    async def list_keys(self, ns: str, prefix: str, after: str | None, limit: int) -> list[str]:
        return await self.store.list_keys(check_namespace(ns), prefix, after, min(limit, MAX_LIST))

    async def get_url(self, ns: str, key: str, expires: int | None = None) -> str:
        """
        The URL of a copy on a live server, picked at random to spread the
        load.  A private namespace's URL is signed, valid for C{expires}
        seconds (default L{DEFAULT_EXPIRES}); a public one's never expires.
        """
        if expires is not None and not 0 < expires <= MAX_EXPIRES:
            raise ServerError(
                ErrorCode.BAD_REQUEST, f"expires must be 1 to {MAX_EXPIRES} seconds, not {expires}"
            )
        info = await self.lookup(ns, key)
        live = [s for s in map(self.up, info.replicas) if s is not None]
        namespace = await self.store.namespace(info.namespace)
        if not live or namespace is None:
            raise ServerError(ErrorCode.UNAVAILABLE, f"no live server holds {key!r}")
        expires_at = math.ceil(self.clock.seconds()) + (expires or DEFAULT_EXPIRES)
        return self.url_for(info, namespace, random.choice(live), expires_at)

    def url_for(
        self, info: FileInfo, namespace: NamespaceInfo, server: ServerInfo, expires_at: int
    ) -> str:
        """
        The URL of C{server}'s copy of a file; signed until C{expires_at}
        if its namespace is private.
        """
        url = fill_template(
            namespace.url_template,
            public_url=server.public_url,
            server=server.name,
            namespace=info.namespace,
            path=info.path,
            key=info.key,
            fid=info.fid,
        )
        if namespace.private and namespace.secret is not None:
            url = signed_url(url, namespace.secret, info.path, expires_at)
        return url

    def begin_upload(self, ns: str, key: str, size: int | None) -> PendingPut:
        check_namespace(ns)
        check_key(key)
        if self.readonly:
            raise ServerError(ErrorCode.READONLY, f"server {self.name} takes no new files")
        limit = self.config.max_file_size
        if limit is not None and size is not None and size > limit:
            raise ServerError(
                ErrorCode.TOO_LARGE, f"{size} bytes is over this server's limit of {limit}"
            )
        fid = new_fid()
        path = relpath_for(fid, key)
        return PendingPut(ns, key, fid, path, size, self.storage.open_upload(path, limit))

    async def finish_upload(self, put: PendingPut, sha256: str | None) -> FileInfo:
        """
        Make an upload durable, then publish it: only then is it visible.
        A private namespace's files are published apart (docs/storage.md).
        """
        try:
            namespace = await self.store.namespace(put.ns)
            if namespace is not None and namespace.private:
                put.path = relpath_for(put.fid, put.key, private=namespace.name)
        except BaseException:
            await put.upload.abort()
            raise
        size, digest = await put.upload.finish(sha256, put.size, put.path)
        try:
            return await self.store.add_file(
                put.ns, put.key, put.fid, put.path, size, digest, self.clock.seconds(), self.name
            )
        except Exception as error:
            # The commit may have happened with only its answer lost (the
            # database went away): look before removing the bytes.  If even
            # that fails, keep them: an orphan file costs disk space, a
            # removed published one would be a lost file.
            try:
                published = await self.store.lookup(put.ns, put.key)
            except Exception:
                raise error from None
            if published is not None and published.fid == put.fid:
                return published
            await self.storage.remove(put.path)
            raise

    def peers_holding(self, info: FileInfo) -> list[ServerInfo]:
        """
        Live servers other than this one with a copy, in random order.
        """
        peers = [s for s in map(self.up, info.replicas) if s is not None and s.name != self.name]
        random.shuffle(peers)
        return peers

    async def replica_failed(self, info: FileInfo, reason: str) -> None:
        """
        Our copy is missing or corrupt: set it aside and stop offering it.
        """
        log.warn(
            "replica {fid} of {key!r} is bad: {reason}", fid=info.fid, key=info.key, reason=reason
        )
        await self.storage.quarantine(info.path)
        await self.store.remove_replica(info.id, self.name)
        if self.on_replica_lost is not None:
            self.on_replica_lost(info)


@dataclass
class PendingPut:
    ns: str
    key: str
    fid: str
    path: str
    size: int | None
    upload: Upload


class _State(Enum):
    HANDSHAKE = "handshake"
    IDLE = "idle"
    BUSY = "busy"  # answering a request; the client must wait
    RECEIVING = "receiving"  # a PUT body is arriving
    DISCARDING = "discarding"  # a refused PUT body: dropped until END


class ServerProtocol(FrameProtocol, TimeoutMixin):
    """
    The server end of a connection: a state machine over frames.

    A request-level error (a bad key, no such file) is answered with an
    ERROR frame and the connection goes on; a protocol error closes it.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.callLater = node.clock.callLater
        self._state = _State.HANDSHAKE
        self._put: PendingPut | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(self.node.config.idle_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.setTimeout(None)
        self._abort_put()

    def timeoutConnection(self) -> None:
        self.sendError(ErrorCode.TIMEOUT, "idle for too long")
        self.transport.abortConnection()

    def frameReceived(self, frame: Frame) -> None:
        self.resetTimeout()
        state = self._state
        if state is _State.RECEIVING:
            self._bodyFrame(frame)
        elif state is _State.DISCARDING:
            if frame.op is Op.END:
                self._idle()
            elif frame.op is not Op.DATA:
                raise ProtocolError(f"{frame.op.name} inside a PUT body", ErrorCode.BAD_REQUEST)
        elif state is _State.IDLE and frame.op in REQUESTS:
            assert isinstance(frame, Message)
            self._request(frame)
        elif state is _State.HANDSHAKE and frame.op is Op.HELLO:
            assert isinstance(frame, Message)
            self._hello(frame)
        elif state is _State.BUSY:
            raise ProtocolError(
                f"{frame.op.name} sent before the previous request was answered",
                ErrorCode.BAD_REQUEST,
            )
        else:
            raise ProtocolError(f"unexpected {frame.op.name} frame", ErrorCode.BAD_REQUEST)

    def _hello(self, hello: Message) -> None:
        if VERSION not in hello["versions"]:
            raise ProtocolError(
                f"this server speaks protocol version {VERSION} only", ErrorCode.BAD_VERSION
            )
        self.sendMessage(
            Op.WELCOME, {"version": VERSION, "server": self.node.name, "max_payload": MAX_PAYLOAD}
        )
        self._idle()

    def _idle(self) -> None:
        self._state = _State.IDLE
        self._put = None

    # -- requests

    def _request(self, msg: Message) -> None:
        if msg.op is Op.PUT:
            self._begin_put(msg)
            return
        self._state = _State.BUSY
        handler = {
            Op.PING: self._ping,
            Op.GET: self._get,
            Op.GET_URL: self._get_url,
            Op.DELETE: self._delete,
            Op.STAT: self._stat,
            Op.LIST: self._list,
        }[msg.op]
        defer.ensureDeferred(handler(msg)).addErrback(self._requestFailed, msg.op)

    def _reply(self, fields: dict[str, Any]) -> None:
        if not self.closing:
            self.sendMessage(Op.OK, fields)
            self._idle()

    def _requestFailed(self, failure: Any, op: Op) -> None:
        error = failure.value
        if isinstance(error, ProtocolError):
            self.protocolViolation(error)
            return
        if isinstance(error, KoboldError):
            code, message = error.code, str(error.args[0] if error.args else error)
        else:
            log.failure("{op} failed", failure, op=op.name)
            code, message = ErrorCode.INTERNAL, f"internal error: {error!r}"
        if not self.closing:
            self.sendError(code, message)
            self._idle()

    async def _ping(self, msg: Message) -> None:
        self._reply({})

    async def _stat(self, msg: Message) -> None:
        self._reply(stat_fields(await self.node.lookup(msg["ns"], msg["key"])))

    async def _delete(self, msg: Message) -> None:
        await self.node.delete(msg["ns"], msg["key"])
        self._reply({})

    async def _get_url(self, msg: Message) -> None:
        self._reply({"url": await self.node.get_url(msg["ns"], msg["key"], msg.get("expires"))})

    async def _list(self, msg: Message) -> None:
        keys = await self.node.list_keys(
            msg["ns"], msg.get("prefix", ""), msg.get("after"), msg.get("limit", MAX_LIST)
        )
        # Keep the reply inside a frame: stop early and say so.
        budget, size, page = MAX_PAYLOAD // 2, 0, []
        for key in keys:
            size += len(key.encode("utf-8")) * 6 + 3
            if size > budget:
                break
            page.append(key)
        self._reply({"keys": page, "truncated": len(page) < len(keys)})

    # -- GET: stream the file from our disk, or through from a peer

    async def _get(self, msg: Message) -> None:
        node = self.node
        info = await node.lookup(msg["ns"], msg["key"])
        if node.name in info.replicas and await self._send_local(info):
            return
        if msg.get("local"):
            raise NotFound(ErrorCode.NOT_FOUND, f"{node.name} holds no copy of {info.key!r}")
        await self._send_from_peer(info)

    async def _send_local(self, info: FileInfo) -> bool:
        """
        Stream our copy, verifying it as it is read.  False when it turned
        out to be missing or bad before anything was sent.
        """
        if info.size <= CHUNK_SIZE:
            return await self._send_small(info)
        reader = self.node.storage.open_read(info.path, expect_sha256=info.sha256)
        try:
            try:
                size = await reader.open()
            except NotFound:
                await self.node.replica_failed(info, "missing from disk")
                return False
            if size != info.size:
                await self.node.replica_failed(info, f"{size} bytes on disk, not {info.size}")
                return False
            self.sendMessage(Op.FILE, {"size": info.size, "sha256": info.sha256})
            # Each chunk is read, hashed and framed in a thread while the
            # one before it is sent.
            reading: defer.Deferred[bytes] | None = reader.read(CHUNK_SIZE, encode_data)
            try:
                while True:
                    assert reading is not None
                    frame, reading = await reading, None
                    if not frame:
                        break
                    reading = reader.read(CHUNK_SIZE, encode_data)
                    self.sendFrame(frame)
                    await self.flow.wait()
            except ServerError as e:
                if e.code is ErrorCode.CORRUPT:
                    await self.node.replica_failed(info, str(e))
                raise
            finally:
                if reading is not None:
                    reading.addErrback(lambda _: None)
        finally:
            await defer.maybeDeferred(reader.close)
        self.sendMessage(Op.END, {"sha256": info.sha256})
        self._idle()
        return True

    async def _send_small(self, info: FileInfo) -> bool:
        """
        L{_send_local} for a file of one chunk: one thread job reads it
        whole, and one write sends the answer.
        """
        reader = self.node.storage.open_read(
            info.path, expect_sha256=info.sha256, expect_size=info.size
        )
        try:
            size, data = await reader.read_whole(CHUNK_SIZE)
        except NotFound:
            await self.node.replica_failed(info, "missing from disk")
            return False
        except ServerError as e:
            if e.code is ErrorCode.CORRUPT:
                await self.node.replica_failed(info, str(e))
            raise
        if data is None or size != info.size:
            await self.node.replica_failed(info, f"{size} bytes on disk, not {info.size}")
            return False
        meta = {"size": info.size, "sha256": info.sha256}
        frames = [encode_message(Op.FILE, meta)]
        if data:
            frames.append(encode_data(data))
        frames.append(encode_message(Op.END, {"sha256": info.sha256}))
        self.transport.write(b"".join(frames))
        self._idle()
        return True

    async def _send_from_peer(self, info: FileInfo) -> None:
        started = False
        errors = []

        def forward(chunk: bytes) -> defer.Deferred[None] | None:
            self.sendData(chunk)
            return self.flow.wait() if self.flow.paused else None

        for peer in self.node.peers_holding(info):
            try:
                conn = await self.node.peers.acquire(peer.address)
            except ConnectionFailed as e:
                errors.append(str(e))
                continue
            if not started:
                self.sendMessage(Op.FILE, {"size": info.size, "sha256": info.sha256})
                started = True
            try:
                await conn.get({"ns": info.namespace, "key": info.key, "local": True}, forward)
            except (ServerError, ConnectionFailed) as e:
                self.node.peers.release(peer.address, conn)
                if self.closing:
                    return
                # Bytes may have gone out: the client must start over.
                raise ServerError(ErrorCode.UNAVAILABLE, f"peer {peer.name} failed: {e}") from e
            self.node.peers.release(peer.address, conn)
            self.sendMessage(Op.END, {"sha256": info.sha256})
            self._idle()
            return
        raise ServerError(
            ErrorCode.UNAVAILABLE,
            f"no live server holds {info.key!r}" + (f": {'; '.join(errors)}" if errors else ""),
        )

    # -- PUT: the body streams into storage; the reply comes after END

    def _begin_put(self, msg: Message) -> None:
        try:
            put = self.node.begin_upload(msg["ns"], msg["key"], msg.get("size"))
        except KoboldError as e:
            self._refuse_put(e)
            return
        put.upload.registerProducer(self.transport, True)
        self._put = put
        self._state = _State.RECEIVING

    def _bodyFrame(self, frame: Frame) -> None:
        put = self._put
        assert put is not None
        if isinstance(frame, Data):
            try:
                put.upload.write(frame.payload)
            except KoboldError as e:
                self._abort_put()
                self._refuse_put(e)
        elif frame.op is Op.END:
            if frame.get("abort"):
                self._abort_put()
                self.sendError(ErrorCode.BAD_REQUEST, "upload aborted by the client")
                self._idle()
            elif "sha256" not in frame.fields:
                raise ProtocolError("END of a PUT needs sha256", ErrorCode.BAD_REQUEST)
            else:
                self._state = _State.BUSY
                defer.ensureDeferred(self._finish_put(put, frame["sha256"])).addErrback(
                    self._requestFailed, Op.PUT
                )
        else:
            raise ProtocolError(f"{frame.op.name} inside a PUT body", ErrorCode.BAD_REQUEST)

    async def _finish_put(self, put: PendingPut, sha256: str) -> None:
        try:
            info = await self.node.finish_upload(put, sha256)
        finally:
            put.upload.unregisterProducer()
            if not self.closing:
                self.transport.resumeProducing()
        self._reply(stat_fields(info))

    def _refuse_put(self, error: KoboldError) -> None:
        """
        Answer now, then drop the body the client may still be sending.
        """
        self.sendError(error.code, str(error))
        self._state = _State.DISCARDING
        self._put = None

    def _abort_put(self) -> None:
        put, self._put = self._put, None
        if put is not None and self._state is _State.RECEIVING:
            put.upload.unregisterProducer()
            put.upload.abort()
            if not self.closing:
                self.transport.resumeProducing()


class ServerFactory(Factory):
    def __init__(self, node: Node) -> None:
        self.node = node

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        return ServerProtocol(self.node)


class _ThreadPoolService(Service):
    """
    Runs a thread pool for as long as the server runs.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


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
    A whole server: thread pool, storage, metadata, listeners, heartbeat.

    Starting needs the database, so it is asynchronous: L{ready} fires once
    the server listens and is registered.  If start fails, the failure is
    logged and C{reactor.stop} is called, since a server that cannot reach
    its metadata or data directory cannot serve.
    """

    def __init__(self, config: ServerConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        io_pool = ThreadPool(minthreads=2, maxthreads=8, name="koboldfs-io")
        _ThreadPoolService(io_pool).setServiceParent(self)
        self.storage = Storage(config.data, reactor, io_pool)
        db = config.db or f"sqlite:///{config.data}/metadata.sqlite"
        self.store = store_from_url(db, reactor)
        self.peers = ConnectionPool(reactor)
        self.node = Node(config, self.storage, self.store, reactor, self.peers)
        self.replicator = Replicator(self.node, reactor, config.replicate_interval)
        self.scrubber = Scrubber(
            self.node, reactor, config.scrub_rate, rest=config.replicate_interval
        )
        self._ports: list[Any] = []
        self._beat = LoopingCall(lambda: defer.ensureDeferred(self._heartbeat()))
        self._beat.clock = reactor
        self.ready: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
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
        await self.storage.start()
        await self.store.start()
        port = await serverFromString(self.reactor, config.listen).listen(ServerFactory(self.node))
        self._ports.append(port)
        from koboldfs.web import make_site

        http = await serverFromString(self.reactor, config.http).listen(make_site(self.node))
        self._ports.append(http)
        public_url = config.public_url or f"http://{advertised_address(http)}"
        free, total = await self.storage.disk_usage()
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
        self._beat.start(config.heartbeat, now=False)
        self.replicator.start()
        self.scrubber.start()
        log.info(
            "KoboldFS server {name} on {address}, HTTP {url}, data {data}, metadata {db}",
            name=config.name,
            address=advertised_address(port),
            url=public_url,
            data=config.data,
            db=self.store.url,
        )

    async def _heartbeat(self) -> None:
        """
        Tell the cluster we are alive, and learn who else is.  Errors are
        logged, never raised: a raise would stop the LoopingCall for good.
        """
        try:
            free, total = await self.storage.disk_usage()
            await self.store.heartbeat(self.config.name, self.reactor.seconds(), free, total)
            await self.node.refresh_servers()
        except KoboldError as e:
            # The database is down: say so once a beat, without a traceback.
            log.warn("heartbeat of {name} failed: {error}", name=self.config.name, error=e)
        except Exception:
            log.failure("heartbeat of {name} failed", name=self.config.name)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if self._beat.running:
            self._beat.stop()
        replicating = self.replicator.stop()
        scrubbing = self.scrubber.stop()
        for port in self._ports:
            yield port.stopListening()
        self._ports = []
        # Closing the peer connections ends the replicator's copies.
        yield self.peers.close()
        yield replicating
        yield scrubbing
        yield self.store.stop()
        yield super().stopService()
