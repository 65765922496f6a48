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
from typing import Any, Awaitable, Callable

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.threadpool import ThreadPool

from koboldfs import forwarding
from koboldfs.auth import (
    OPEN,
    Credentials,
    Grant,
    auth_message,
    check_cluster_proof,
    check_key_proof,
    is_local_endpoint,
    new_nonce,
)
from koboldfs.config import ServerConfig
from koboldfs.connection import ConnectionCache
from koboldfs.errors import (
    Busy,
    ConnectionFailed,
    ErrorCode,
    Forbidden,
    KoboldError,
    NotFound,
    ProtocolError,
    ServerError,
)
from koboldfs.interfaces import FileInfo, IMetadataStore, NamespaceInfo, ServerInfo, ServerState
from koboldfs.metadata import store_from_url
from koboldfs.metrics import Metrics
from koboldfs.names import check_key, check_namespace
from koboldfs.protocol import (
    CHUNK_SIZE,
    MAX_PAYLOAD,
    REQUESTS,
    VERSION,
    Data,
    Frame,
    HEADER,
    FrameProtocol,
    Message,
    Op,
    encode_data,
    encode_message,
)
from koboldfs.orphans import OrphanSweeper
from koboldfs.replicator import Replicator, Scrubber
from koboldfs.status import Status
from koboldfs.storage import Storage, Upload, new_fid, relpath_for, relpath_names
from koboldfs.txnhandler import TransactionHandler, TransactionSweeper, sweep_interval
from koboldfs.urls import DEFAULT_EXPIRES, MAX_EXPIRES, fill_template, signed_url

log = Logger()

#: Requests that change a namespace: refused to read-only keys.
WRITES = frozenset({Op.PUT, Op.DELETE, Op.BEGIN})

#: Largest frame taken before the handshake is done: HELLO and AUTH are
#: small, and a stranger must not make us buffer megabytes.
PREAUTH_PAYLOAD = 64 * 1024

#: Seconds a timed-out connection has to take its error and close before
#: it is cut.
ABORT_AFTER = 5.0

#: Most keys one LIST reply carries, whatever the client asks.
MAX_LIST = 1000


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
        peers: ConnectionCache,
    ) -> None:
        self.config = config
        self.name = config.name
        self.storage = storage
        self.store = store
        self.clock = clock
        self.peers = peers
        self._servers: dict[str, ServerInfo] = {}
        #: Counts and logs every request (koboldfs.metrics).
        self.metrics = Metrics(config.name, clock)
        #: Called with a file whose copy here was found bad or missing and
        #: set aside, so that it is made again (the replicator sets it).
        self.on_replica_lost: Callable[[FileInfo], None] | None = None
        #: Open client connections by peer address, and PUTs under way.
        self.connections: dict[str, int] = {}
        self.uploads = 0

        #: Client transactions (koboldfs/txnhandler.py).
        self.txns = TransactionHandler(self)

    # -- limits

    def admit(self, address: str) -> str | None:
        """
        Count a new connection from C{address}; None if it is welcome, else
        why it is refused (and it is not counted).
        """
        config = self.config
        if sum(self.connections.values()) >= config.max_connections:
            return f"server {self.name} is at its limit of {config.max_connections} connections"
        if self.connections.get(address, 0) >= config.max_connections_per_ip:
            return (
                f"too many connections from {address} "
                f"(limit {config.max_connections_per_ip} per address)"
            )
        self.connections[address] = self.connections.get(address, 0) + 1
        return None

    def leave(self, address: str) -> None:
        left = self.connections[address] - 1
        if left:
            self.connections[address] = left
        else:
            del self.connections[address]

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
    def open(self) -> bool:
        """
        Whether clients may do anything without a key.
        """
        auth = self.config.auth
        return auth == "open" or (auth == "auto" and is_local_endpoint(self.config.listen))

    async def authenticate(self, fields: dict[str, Any], server_nonce: str) -> Grant:
        """
        Check an AUTH frame's proof against this connection's nonce; return
        what it grants.

        @raise Forbidden: a wrong or unknown key or secret.
        """
        method, client_nonce, proof = fields["method"], fields["cnonce"], fields["proof"]
        if method == "cluster":
            peer = fields.get("peer", "")
            message = auth_message("cluster", server_nonce, client_nonce, self.name, peer)
            secrets = self.config.cluster_secrets
            if secrets and check_cluster_proof(secrets, message, proof):
                return Grant(None, True, peer=True)
            raise Forbidden(ErrorCode.FORBIDDEN, "wrong cluster secret")
        if method == "key":
            ns, key_id = fields.get("ns"), fields.get("key_id")
            if not isinstance(ns, str) or not isinstance(key_id, str):
                raise ProtocolError("AUTH by key needs ns and key_id", ErrorCode.BAD_REQUEST)
            check_namespace(ns)
            found = await self.store.find_key(ns, key_id)
            message = auth_message("key", server_nonce, client_nonce, self.name, f"{ns}/{key_id}")
            if found is None or not check_key_proof(found.stored_key, message, proof):
                raise Forbidden(ErrorCode.FORBIDDEN, f"wrong key for namespace {ns!r}")
            return Grant(ns, not found.readonly)
        raise ProtocolError(f"unknown AUTH method {method!r}", ErrorCode.BAD_REQUEST)

    @property
    def readonly(self) -> bool:
        me = self._servers.get(self.name)
        return me is not None and me.state != ServerState.ALIVE

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
        """
        namespace = await self.place(put)
        if put.forward is None:
            try:
                forwarding.check_alone(namespace, put.ns)
            except BaseException:
                await put.upload.abort()
                raise
        size, digest = await put.upload.finish(sha256, put.size, put.path)
        return await self.publish(
            put,
            lambda: self.store.add_file(
                put.ns, put.key, put.fid, put.path, size, digest, self.clock.seconds(), self.name
            ),
            lambda: self.store.lookup(put.ns, put.key),
        )

    async def place(self, put: PendingPut) -> NamespaceInfo | None:
        """
        Look up the namespace of C{put} and fire with it, its path set
        where its files go: a private namespace's are published apart
        (docs/storage.md).  On failure the upload is given up.
        """
        try:
            namespace = await self.store.namespace(put.ns)
            if namespace is not None and namespace.private:
                put.path = relpath_for(put.fid, put.key, private=namespace.name)
        except BaseException:
            await put.upload.abort()
            raise
        return namespace

    async def publish(
        self,
        put: PendingPut,
        record: Callable[[], Awaitable[FileInfo]],
        lookup: Callable[[], Awaitable[FileInfo | None]],
        not_recorded: tuple[type[Exception], ...] = (),
    ) -> FileInfo:
        """
        Record C{put}, whose bytes are durable at its path, with C{record};
        if that fails, remove the bytes, unless they may have been recorded
        after all.

        The commit may have happened with only its answer lost (the
        database went away): C{lookup} is asked before the bytes are
        removed, and if even that fails they are kept: an orphan file costs
        disk space (the orphan sweep reclaims it), a removed published one
        would be a lost file.  Errors in C{not_recorded}, from either, say
        for sure that nothing was recorded.
        """
        try:
            return await record()
        except not_recorded:
            await self.storage.remove(put.path)
            raise
        except Exception as error:
            try:
                found = await lookup()
            except not_recorded:
                await self.storage.remove(put.path)
                raise error from None
            except Exception:
                raise error from None
            if found is not None and found.fid == put.fid:
                return found
            await self.storage.remove(put.path)
            raise

    def begin_replica(self, fid: str, path: str, size: int | None) -> PendingPut:
        """
        A peer's REPLICA_PUT (koboldfs.forwarding): the bytes of a put
        another server is taking, written at the path it gave; recorded by
        that server, not here.
        """
        if self.readonly:
            raise ServerError(ErrorCode.READONLY, f"server {self.name} takes no new files")
        if relpath_names(path) != fid:
            raise ServerError(ErrorCode.BAD_REQUEST, f"{path!r} is not a stored path of {fid!r}")
        limit = self.config.max_file_size
        if limit is not None and size is not None and size > limit:
            raise ServerError(
                ErrorCode.TOO_LARGE, f"{size} bytes is over this server's limit of {limit}"
            )
        upload = self.storage.open_upload(path, limit)
        return PendingPut("", "", fid, path, size, upload, replica=True)

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
        await self.store.quarantine_replica(info.id, self.name)
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
    #: Its copies on the way to peers, if the cluster has several hosts.
    forward: forwarding.Forward | None = None
    #: A peer's copy (REPLICA_PUT): stored, not recorded.
    replica: bool = False
    #: The client transaction this upload is part of, if any.
    txn: str | None = None


class _State(Enum):
    HANDSHAKE = "handshake"  # waiting for HELLO
    AUTH = "auth"  # waiting for AUTH
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

    #: What this connection may do once authenticated (None before): the
    #: one thing request handlers check, through L{authorize}.
    grant: Grant | None = None

    def __init__(self, node: Node) -> None:
        self.node = node
        self.callLater = node.clock.callLater
        self._state = _State.HANDSHAKE
        self._put: PendingPut | None = None
        self._nonce = new_nonce()
        self._address: str | None = None  # as counted by Node.admit
        self._upload = False  # holds one of Node.uploads
        self._timer = ""  # which timeout runs: handshake, frame or idle
        self._abort: Any = None

    def authorize(self, namespace: str, write: bool = False) -> str:
        """
        Return C{namespace} if this connection may read it (and write it,
        if C{write}).

        @raise Forbidden: it may not.
        """
        grant = self.grant
        if grant is None or not grant.allows(namespace, write):
            if grant is not None and grant.allows(namespace, False):
                raise Forbidden(ErrorCode.FORBIDDEN, "this key is read-only: no put or delete")
            raise Forbidden(
                ErrorCode.FORBIDDEN, f"this connection is not authenticated for {namespace!r}"
            )
        return namespace

    def connectionMade(self) -> None:
        super().connectionMade()
        self._track = self.node.metrics.connection()
        self._decoder.max_payload = PREAUTH_PAYLOAD
        address = getattr(self.transport.getPeer(), "host", None) or "local"
        refused = self.node.admit(address)
        if refused is not None:
            self.sendError(ErrorCode.BUSY, refused)
            self.close()
            return
        self._address = address
        self._timer = "handshake"
        self.setTimeout(self.node.config.handshake_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.setTimeout(None)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort_put()
        self._release_upload()
        if self._address is not None:
            self.node.leave(self._address)
            self._address = None
        self._track.lost()

    # Every request is timed from its frame to its answer, for metrics and
    # the request log: begun in _request, ended in _idle.

    def sendData(self, chunk: bytes) -> None:
        self._track.sent(len(chunk))
        super().sendData(chunk)

    def sendFrame(self, frame: bytes) -> None:
        # A DATA frame encoded in a worker thread: its body is all but the
        # header.
        self._track.sent(len(frame) - HEADER.size)
        super().sendFrame(frame)

    def sendError(self, code: ErrorCode, message: str) -> None:
        self._track.failed(code.name)
        super().sendError(code, message)

    def timeoutConnection(self) -> None:
        config = self.node.config
        message = {
            "handshake": f"no handshake within {config.handshake_timeout:g} s",
            "frame": f"a frame took over {config.frame_timeout:g} s to arrive",
        }.get(self._timer, f"idle for over {config.idle_timeout:g} s")
        self.sendError(ErrorCode.TIMEOUT, message)
        # Close after the error is sent; a client that does not read it
        # either is cut off soon after.
        self.close()
        self._abort = self.callLater(ABORT_AFTER, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # A frame begun while idle must now arrive in frame_timeout: a
        # byte-a-second client does not hold the connection for long.
        if self._timer == "idle" and self._decoder.buffered and not self.closing:
            self._rearm()

    def _rearm(self) -> None:
        """
        Restart the timeout that fits the connection's state.
        """
        if self.grant is None or self.closing:
            return  # the handshake's deadline does not move
        config = self.node.config
        if self._state in (_State.RECEIVING, _State.DISCARDING) or self._decoder.buffered:
            self._timer, timeout = "frame", config.frame_timeout
        else:
            self._timer, timeout = "idle", config.idle_timeout
        self.setTimeout(timeout)

    def frameReceived(self, frame: Frame) -> None:
        self._frame(frame)
        self._rearm()

    def _frame(self, frame: Frame) -> None:
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
        elif state is _State.AUTH and frame.op is Op.AUTH:
            assert isinstance(frame, Message)
            self._state = _State.BUSY
            defer.ensureDeferred(self._auth(frame)).addErrback(self._authFailed)
        elif state is _State.AUTH and frame.op in REQUESTS:
            raise ProtocolError(
                "this server requires authentication: send AUTH with a namespace key",
                ErrorCode.AUTH_REQUIRED,
            )
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
        open_ = self.node.open
        self.sendMessage(
            Op.WELCOME,
            {
                "version": VERSION,
                "server": self.node.name,
                "max_payload": self.node.config.max_frame_size,
                "nonce": self._nonce,
                "auth": not open_,
            },
        )
        if open_:
            self.grant = OPEN
            self._idle()
        else:
            self._state = _State.AUTH

    async def _auth(self, msg: Message) -> None:
        self.grant = await self.node.authenticate(msg.fields, self._nonce)
        self._reply({"ns": self.grant.namespace, "write": self.grant.write})

    def _authFailed(self, failure: Any) -> None:
        """
        A refused AUTH ends the connection: a client gets one try per nonce.
        """
        error = failure.value
        if not isinstance(error, KoboldError):
            log.failure("AUTH failed", failure)
            error = ServerError(ErrorCode.INTERNAL, f"internal error: {error!r}")
        if not self.closing:
            self.sendError(error.code, str(error.args[0] if error.args else error))
            self.close()

    def _idle(self) -> None:
        if self.grant is not None:
            self._decoder.max_payload = self.node.config.max_frame_size
        self._state = _State.IDLE
        self._put = None
        self._track.end()
        self._release_upload()
        self._rearm()

    def _release_upload(self) -> None:
        if self._upload:
            self._upload = False
            self.node.uploads -= 1

    # -- requests

    def _request(self, msg: Message) -> None:
        self._track.begin(msg.op.name.lower(), msg.get("ns"), msg.get("key"))
        if "ns" in msg.fields:
            try:
                self.authorize(msg["ns"], write=msg.op in WRITES)
            except KoboldError as e:
                if msg.op is Op.PUT:
                    self._refuse_put(e)
                else:
                    self.sendError(e.code, str(e.args[0]))
                return
        if msg.op is Op.REPLICA_PUT and not (self.node.open or self.grant.peer):
            self._refuse_put(
                Forbidden(ErrorCode.FORBIDDEN, "REPLICA_PUT is for the cluster's servers only")
            )
            return
        if msg.op is Op.PUT or msg.op is Op.REPLICA_PUT:
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
            Op.BEGIN: self._txn,
            Op.PREPARE: self._txn,
            Op.COMMIT: self._txn,
            Op.ABORT: self._txn,
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
        self._reply(stat_fields(await self._lookup(msg)))

    async def _delete(self, msg: Message) -> None:
        if msg.get("txn") is not None:
            await self.node.txns.delete(msg["ns"], msg["key"], msg["txn"])
        else:
            await self.node.delete(msg["ns"], msg["key"])
        self._reply({})

    async def _lookup(self, msg: Message) -> FileInfo:
        """
        The file a request names, as its transaction (if any) sees it.
        """
        if msg.get("txn") is not None:
            return await self.node.txns.lookup(msg["ns"], msg["key"], msg["txn"])
        return await self.node.lookup(msg["ns"], msg["key"])

    async def _txn(self, msg: Message) -> None:
        self._reply(await self.node.txns.handle(msg))

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
        info = await self._lookup(msg)
        if node.name in info.replicas and await self._send_local(info):
            return
        if msg.get("local"):
            raise NotFound(ErrorCode.NOT_FOUND, f"{node.name} holds no copy of {info.key!r}")
        await self._send_from_peer(info, msg.get("txn"))

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
        self._track.sent(len(data))
        self._idle()
        return True

    async def _send_from_peer(self, info: FileInfo, txn: str | None = None) -> None:
        started = False
        errors = []

        def forward(chunk: bytes) -> defer.Deferred[None] | None:
            self.sendData(chunk)
            return self.flow.wait() if self.flow.paused else None

        for peer in self.node.peers_holding(info):
            try:
                conn = await self.node.peers.acquire(peer.address)
            except KoboldError as e:  # unreachable, or refused our cluster secret
                errors.append(str(e))
                continue
            if not started:
                self.sendMessage(Op.FILE, {"size": info.size, "sha256": info.sha256})
                started = True
            try:
                fields = {"ns": info.namespace, "key": info.key, "local": True}
                if txn is not None:
                    fields["txn"] = txn
                await conn.get(fields, forward)
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
        node = self.node
        if node.uploads >= node.config.max_uploads:
            self._refuse_put(
                Busy(
                    ErrorCode.BUSY,
                    f"server {node.name} is at its limit of {node.config.max_uploads} uploads",
                )
            )
            return
        try:
            if msg.op is Op.REPLICA_PUT:
                put = node.begin_replica(msg["fid"], msg["path"], msg.get("size"))
            else:
                put = node.begin_upload(msg["ns"], msg["key"], msg.get("size"))
        except KoboldError as e:
            self._refuse_put(e)
            return
        node.uploads += 1
        self._upload = True
        put.txn = msg.get("txn")
        self._put = put
        self._state = _State.RECEIVING
        self._rearm()
        # A put in a client transaction is not forwarded: it is published at
        # the commit, and copied by the replicators then.
        if not put.replica and put.txn is None and forwarding.several_hosts(node):
            self._forward_put(put)
        else:
            put.upload.registerProducer(self.transport, True)

    def _forward_put(self, put: PendingPut) -> None:
        """
        Stream this put's body to peers as it arrives too (write
        durability); the client is paused while the disk or a peer lags.
        """
        gate = forwarding.Gate(self.transport)
        put.upload.registerProducer(gate.side("disk"), True)

        def failed(error: KoboldError) -> None:
            if self._put is put and self._state is _State.RECEIVING:
                self._abort_put()
                self._refuse_put(error)

        put.forward = forwarding.Forward(self.node, put, gate, failed)
        put.forward.start()

    def _bodyFrame(self, frame: Frame) -> None:
        put = self._put
        assert put is not None
        if isinstance(frame, Data):
            self._track.received(len(frame.payload))
            try:
                put.upload.write(frame.payload)
            except KoboldError as e:
                self._abort_put()
                self._refuse_put(e)
                return
            if put.forward is not None:
                put.forward.write(frame.payload)
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
            if put.replica:
                size, digest = await put.upload.finish(sha256, put.size)
                fields = {"size": size, "sha256": digest}
            elif put.txn is not None:
                fields = stat_fields(await self.node.txns.finish_upload(put, put.txn, sha256))
            elif put.forward is not None:
                fields = stat_fields(await put.forward.finish(sha256))
            else:
                fields = stat_fields(await self.node.finish_upload(put, sha256))
        finally:
            put.upload.unregisterProducer()
            if not self.closing:
                self.transport.resumeProducing()
        self._reply(fields)

    def _refuse_put(self, error: KoboldError) -> None:
        """
        Answer now, then drop the body the client may still be sending.
        """
        self.sendError(error.code, str(error.args[0] if error.args else error))
        self._state = _State.DISCARDING
        self._put = None
        self._release_upload()
        self._rearm()

    def _abort_put(self) -> None:
        put, self._put = self._put, None
        if put is not None and self._state is _State.RECEIVING:
            if put.forward is not None:
                put.forward.abort()
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
        self.peers = ConnectionCache(
            reactor,
            timeout=config.peer_timeout,
            credentials=Credentials(cluster_secret=config.cluster_secrets[0], name=config.name)
            if config.cluster_secrets
            else None,
            tls=config.tls_ca is not None,
            ca=config.tls_ca,
        )
        self.node = Node(config, self.storage, self.store, reactor, self.peers)
        self.replicator = Replicator(self.node, reactor, config.replicate_interval)
        self.scrubber = Scrubber(
            self.node, reactor, config.scrub_rate, rest=config.replicate_interval
        )
        self.orphans = OrphanSweeper(self.node, reactor)
        self.status = Status(self.node, self.replicator, self.scrubber, reactor)
        self.node.metrics.snapshot = self.status.snapshot
        self.txn_sweeper = TransactionSweeper(
            self.node.txns, reactor, sweep_interval(config.pending_timeout)
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
        from koboldfs.web import guarded, make_site

        http = await serverFromString(self.reactor, config.http).listen(
            guarded(self.node, make_site(self.node, self.status, self.node.metrics))
        )
        self._ports.append(http)
        scheme = "https" if config.http.startswith("ssl:") else "http"
        public_url = config.public_url or f"{scheme}://{advertised_address(http)}"
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
        self.orphans.start()
        self.status.start()
        self.txn_sweeper.start()
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
        self.status.stop()
        replicating = self.replicator.stop()
        scrubbing = self.scrubber.stop()
        yield self.txn_sweeper.stop()
        sweeping = self.orphans.stop()
        for port in self._ports:
            yield port.stopListening()
        self._ports = []
        # Closing the peer connections ends the replicator's copies.
        yield self.peers.close()
        yield replicating
        yield scrubbing
        yield sweeping
        yield self.store.stop()
        yield super().stopService()
