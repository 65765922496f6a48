"""
The binary protocol's server end: a thin adapter that turns frames into
calls on the server core (L{koboldfs.interfaces.INode}) and answers back
in frames (docs/protocol.md).

What is the wire's is here: the handshake and its deadlines, the frame
limits, the connection's state machine, authorization by the grant of
its AUTH, and the metrics of its requests; what a request does is the
core's.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from koboldfs.auth import OPEN, Grant, new_nonce
from koboldfs.errors import (
    ErrorCode,
    Forbidden,
    KoboldError,
    NotFound,
    ProtocolError,
    ServerError,
)
from koboldfs.interfaces import FileInfo, IBodySink, INode
from koboldfs.metrics import Metrics
from koboldfs.node import MAX_LIST, CopyStream, PutStream
from koboldfs.protocol import (
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
)

log = Logger()

#: Requests that change a namespace: refused to read-only keys.
WRITES = frozenset({Op.PUT, Op.DELETE, Op.BEGIN})

#: Largest frame taken before the handshake is done: HELLO and AUTH are
#: small, and a stranger must not make us buffer megabytes.
PREAUTH_PAYLOAD = 64 * 1024

#: Seconds a timed-out connection has to take its error and close before
#: it is cut.
ABORT_AFTER = 5.0


def stat_fields(info: FileInfo) -> dict[str, Any]:
    """
    A file's metadata as the fields of an OK reply to STAT and PUT, with
    its content type if it was stored with one (through S3).
    """
    fields: dict[str, Any] = {
        "key": info.key,
        "size": info.size,
        "sha256": info.sha256,
        "created": info.created,
        "servers": list(info.replicas),
    }
    content_type = (info.attributes or {}).get("content-type")
    if content_type is not None:
        fields["content_type"] = content_type
    return fields


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

    def __init__(
        self, node: INode, metrics: Metrics, connections: set[ServerProtocol] | None = None
    ) -> None:
        """
        @param connections: where this connection is kept while it is
            open (its factory's), if anywhere.
        """
        self.node = node
        self.metrics = metrics
        self._connections = connections if connections is not None else set()
        self.callLater = node.clock.callLater
        self._state = _State.HANDSHAKE
        self._put: PutStream | CopyStream | None = None
        self._nonce = new_nonce()
        self._address: str | None = None  # as counted by INode.admit
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
        self._connections.add(self)
        self._track = self.metrics.connection()
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
        self._connections.discard(self)
        self.setTimeout(None)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort_put()
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
        self._end(ErrorCode.TIMEOUT, message)

    def revoke(self) -> None:
        """
        The key this connection authenticated with was revoked: whatever
        it is doing (an upload too) ends now.
        """
        grant = self.grant
        assert grant is not None and grant.key_id is not None
        if self.closing:
            return
        self._abort_put()
        self._end(
            ErrorCode.FORBIDDEN,
            f"key {grant.key_id} of namespace {grant.namespace!r} was revoked",
        )

    def _end(self, code: ErrorCode, message: str) -> None:
        """
        Send an error and close; a client that does not read it either is
        cut off soon after.
        """
        self.sendError(code, message)
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
        self._rearm()

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
        peer = self.node.open or (self.grant is not None and self.grant.peer)
        if msg.op is Op.REPLICA_PUT and not peer:
            self._refuse_put(
                Forbidden(ErrorCode.FORBIDDEN, "REPLICA_PUT is for the cluster's servers only")
            )
            return
        if msg.op is Op.CLUSTER_STATUS and not peer:
            self.sendError(
                ErrorCode.FORBIDDEN,
                "CLUSTER_STATUS is for holders of the cluster secret (--secret-file)",
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
            Op.CLUSTER_STATUS: self._cluster_status,
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
        await self.node.delete(msg["ns"], msg["key"], msg.get("txn"))
        self._reply({})

    async def _lookup(self, msg: Message) -> FileInfo:
        """
        The file a request names, as its transaction (if any) sees it.
        """
        info: FileInfo = await self.node.lookup(msg["ns"], msg["key"], msg.get("txn"))
        return info

    async def _stored(self, msg: Message) -> FileInfo:
        """
        The stored file a peer's GET names by its fid (a part of a
        multipart upload, which is no key's live version).
        """
        grant = self.grant
        if not (self.node.open or (grant is not None and grant.peer)):
            raise Forbidden(ErrorCode.FORBIDDEN, "only peers GET by fid")
        info = await self.node.store.stored_file(msg["fid"])
        if info is None or (info.namespace, info.key) != (msg["ns"], msg["key"]):
            raise NotFound(ErrorCode.NOT_FOUND, f"no stored file {msg['fid']} of {msg['key']!r}")
        return info

    async def _txn(self, msg: Message) -> None:
        node = self.node
        if msg.op is Op.BEGIN:
            fields = await node.begin_txn(msg["ns"])
        elif msg.op is Op.PREPARE:
            fields = await node.prepare_txn(msg["txn"], bool(msg.get("record")))
        elif msg.op is Op.COMMIT:
            fields = await node.commit_txn(msg["txn"], bool(msg.get("prepared")))
        else:
            fields = await node.abort_txn(msg["txn"])
        self._reply(fields)

    async def _get_url(self, msg: Message) -> None:
        self._reply({"url": await self.node.get_url(msg["ns"], msg["key"], msg.get("expires"))})

    async def _cluster_status(self, msg: Message) -> None:
        self._reply(await self.node.cluster_status(bool(msg.get("held"))))

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

    # -- GET: the core's body source, written as FILE, DATA..., END

    async def _get(self, msg: Message) -> None:
        if "fid" in msg.fields:
            info = await self._stored(msg)
        else:
            info = await self._lookup(msg)
        body = await self.node.get(info, local=bool(msg.get("local")), txn=msg.get("txn"))
        await body.send(_FrameSink(self, info))
        if not self.closing:
            self.sendMessage(Op.END, {"sha256": info.sha256})
            self._idle()

    # -- PUT: the body streams into the core's put; the reply comes after END

    def _begin_put(self, msg: Message) -> None:
        node = self.node
        stream: PutStream | CopyStream
        try:
            if msg.op is Op.REPLICA_PUT:
                stream = node.replica_put(msg["fid"], msg["path"], msg.get("size"), self.transport)
            else:
                stream = node.put(
                    msg["ns"],
                    msg["key"],
                    msg.get("size"),
                    self.transport,
                    txn=msg.get("txn"),
                    failed=lambda error: self._putFailed(stream, error),
                )
        except KoboldError as e:
            self._refuse_put(e)
            return
        self._put = stream
        self._state = _State.RECEIVING
        self._rearm()

    def _putFailed(self, stream: PutStream | CopyStream, error: KoboldError) -> None:
        """
        The put failed while its body arrives (a peer's copy failed): the
        core gave it up; answer now.
        """
        if self._put is stream and self._state is _State.RECEIVING:
            self._put = None
            if not self.closing:
                self.transport.resumeProducing()
            self._refuse_put(error)

    def _bodyFrame(self, frame: Frame) -> None:
        stream = self._put
        assert stream is not None
        if isinstance(frame, Data):
            self._track.received(len(frame.payload))
            try:
                stream.write(frame.payload)
            except KoboldError as e:
                self._abort_put()
                self._refuse_put(e)
        elif frame.op is Op.END:
            if frame.get("abort"):
                self._abort_put()
                self.sendError(ErrorCode.BAD_REQUEST, "upload aborted by the client")
                self._idle()
            elif "sha256" not in frame.fields and not isinstance(stream, CopyStream):
                # A peer's copy may come without one (its client gave none,
                # as S3 clients may not): the peer checks our digest.
                raise ProtocolError("END of a PUT needs sha256", ErrorCode.BAD_REQUEST)
            else:
                self._state = _State.BUSY
                defer.ensureDeferred(self._finish_put(stream, frame.get("sha256"))).addErrback(
                    self._requestFailed, Op.PUT
                )
        else:
            raise ProtocolError(f"{frame.op.name} inside a PUT body", ErrorCode.BAD_REQUEST)

    async def _finish_put(self, stream: PutStream | CopyStream, sha256: str | None) -> None:
        try:
            if isinstance(stream, CopyStream):
                size, digest = await stream.finish(sha256)
                fields = {"size": size, "sha256": digest}
            else:
                fields = stat_fields(await stream.finish(sha256))
        finally:
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
        self._rearm()

    def _abort_put(self) -> None:
        stream, self._put = self._put, None
        if stream is not None and self._state is _State.RECEIVING:
            stream.abort()
            if not self.closing:
                self.transport.resumeProducing()


@implementer(IBodySink)
class _FrameSink:
    """
    A GET's body as DATA frames on a connection, framed where the bytes
    are read; FILE goes first.
    """

    frame = staticmethod(encode_data)

    def __init__(self, protocol: ServerProtocol, info: FileInfo) -> None:
        self._protocol = protocol
        self._info = info

    @property
    def gone(self) -> bool:
        return bool(self._protocol.closing)

    def begin(self) -> None:
        self._protocol.sendMessage(Op.FILE, {"size": self._info.size, "sha256": self._info.sha256})

    def write(self, data: bytes) -> defer.Deferred[None] | None:
        protocol = self._protocol
        protocol.sendFrame(data)
        return protocol.flow.wait() if protocol.flow.paused else None

    def abort(self) -> None:
        # The ERROR frame that follows says so.
        pass


class ServerFactory(Factory):
    """
    Makes the server end of each binary protocol connection, and keeps
    the open ones, so that a revoked key's connections can be ended
    (L{check_keys}).
    """

    def __init__(self, node: INode, metrics: Metrics) -> None:
        self.node = node
        self.metrics = metrics
        self.connections: set[ServerProtocol] = set()

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        return ServerProtocol(self.node, self.metrics, self.connections)

    async def check_keys(self) -> int:
        """
        End every open connection whose key was revoked since it
        authenticated; return how many.  The server runs this every
        C{--key-check-interval} seconds: the bound on how long a revoked
        key keeps an open connection (new ones are refused at once).
        """
        keyed = [c for c in self.connections if c.grant is not None and c.grant.key_id]
        if not keyed:
            return 0
        revoked = await self.node.revoked({c.grant for c in keyed})
        ended = [c for c in keyed if c.grant in revoked and c in self.connections]
        for connection in ended:
            connection.revoke()
        if ended:
            keys = {f"{grant.namespace}/{grant.key_id}" for grant in revoked}
            log.info(
                "ended {n} connections of revoked keys: {keys}",
                n=len(ended),
                keys=", ".join(sorted(keys)),
            )
        return len(ended)
