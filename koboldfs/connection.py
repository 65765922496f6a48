"""
The connection layer every KoboldFS client side shares: the client end of
the wire (L{ClientProtocol}: handshake, then one request at a time), the
open connections kept for reuse (L{ConnectionCache}), server addresses and
TLS trust.

The Deferred client, its pools, a server's connections to its peers and the
command line's fsck all talk to servers through this module; it knows
nothing of them.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from koboldfs.version import __version__
from koboldfs.auth import Credentials
from koboldfs.errors import (
    AuthRequired,
    ConnectionFailed,
    ErrorCode,
    Forbidden,
    ProtocolError,
    ServerError,
    error_for_code,
)
from koboldfs.protocol import VERSION, Data, Frame, FrameProtocol, Message, Op


def parse_address(address: str) -> tuple[str, int]:
    """
    Split C{host:port} (C{[v6]:port} for IPv6) into its parts.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"server address {address!r} is not host:port")
    return host.strip("[]"), int(port)


class _State(Enum):
    CONNECTING = "connecting"
    IDLE = "idle"
    REQUEST = "request"  # waiting for OK or ERROR
    GET = "get"  # waiting for FILE, DATA, END or ERROR
    CLOSED = "closed"


#: Defaults of the deadlines (seconds): a connection's TCP connect, TLS
#: and handshake together; a reply's first frame; the silence allowed
#: once a reply (or a put's body) is under way.
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 5.0
STALL_TIMEOUT = 30.0
#: A put is answered once the server has fsynced the body (and its peers
#: theirs): the deadline of that answer grows by a second for every this
#: many bytes sent, so that a large file on a slow disk is not cut.
SYNC_RATE = 32 * 1024 * 1024


class ClientProtocol(FrameProtocol, TimeoutMixin):
    """
    The client end of one connection: handshake, then one request at a time.

    Two deadlines bound what a hung server (say, stopped with SIGSTOP: its
    kernel still takes the bytes) can cost: a request's reply must begin
    within C{reply_timeout} seconds of the request being sent (for a put,
    of its END, plus a second per L{SYNC_RATE} bytes of body); once it has
    begun, and while a put's body is sent, C{timeout} seconds may pass
    between frames, so that a large file moving slowly is not cut.  Either
    fails the request with L{ConnectionFailed}, which the clients take as
    a reason to try the next server, and closes the connection.  The
    handshake's deadline is its L{ConnectionCache}'s.
    """

    def __init__(
        self,
        clock: Any,
        timeout: float = STALL_TIMEOUT,
        agent: str = "",
        reply_timeout: float = REPLY_TIMEOUT,
    ) -> None:
        self.callLater = clock.callLater
        self._timeout = timeout
        self._reply_timeout = reply_timeout
        self._agent = agent or f"koboldfs/{__version__}"
        #: Bytes of the current put's body sent so far.
        self._sent = 0
        self._state = _State.CONNECTING
        self._reply: defer.Deferred[Message] | None = None
        self._sink: Callable[[bytes], defer.Deferred[None] | None] | None = None
        self._file: Message | None = None
        #: Whether the current request waits for its reply to begin.
        self._waiting = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.server = ""
        #: The C{host:port} this connection was made to, as the caller gave it.
        self.address = ""

    # -- lifecycle

    def handshake(self) -> defer.Deferred[Message]:
        """
        Send HELLO; fire with the server's WELCOME.
        """
        self.sendMessage(
            Op.HELLO,
            {"versions": [VERSION], "agent": self._agent, "max_payload": self.max_payload},
        )
        return self._expect(_State.REQUEST, None)

    @property
    def reusable(self) -> bool:
        """
        Whether this connection may take another request.
        """
        return self._state is _State.IDLE and not self.closing

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        self.setTimeout(None)
        self._state = _State.CLOSED
        why = "" if reason is None or reason.check(ConnectionDone) else f": {reason.value}"
        self._fail(ConnectionFailed(f"connection to {self.server or 'server'} lost{why}"))
        self.lost.callback(None)

    def timeoutConnection(self) -> None:
        waited = self.timeOut
        what = "began no reply" if self._waiting else "went silent"
        self._fail(
            ConnectionFailed(f"{self.server or 'server'} {what} for {waited:g} s: given up")
        )
        self.transport.abortConnection()

    # -- requests

    def request(self, op: Op, fields: dict[str, Any]) -> defer.Deferred[Message]:
        """
        Send a request that is answered by one OK frame; fire with it.
        """
        d = self._expect(_State.REQUEST, self._reply_timeout)
        self.sendMessage(op, fields)
        return d

    def get(
        self, fields: dict[str, Any], sink: Callable[[bytes], defer.Deferred[None] | None]
    ) -> defer.Deferred[Message]:
        """
        Send GET and hand each chunk of the body to C{sink}; fire with the
        FILE frame when the END frame arrives.  While a Deferred returned by
        C{sink} is pending, reading from the server pauses.
        """
        d = self._expect(_State.GET, self._reply_timeout)
        self._sink = sink
        self._file = None
        self.sendMessage(Op.GET, fields)
        return d

    def begin_put(self, fields: dict[str, Any]) -> defer.Deferred[Message]:
        """
        Send PUT; the caller then sends DATA frames and L{end_put}.  The
        returned Deferred fires with the server's reply, which may come
        early (an error) while the body is still being sent.
        """
        d = self._expect(_State.REQUEST, self._timeout, body=True)
        self.sendMessage(Op.PUT, fields)
        return d

    def begin_replica_put(self, fields: dict[str, Any]) -> defer.Deferred[Message]:
        """
        Send REPLICA_PUT (server to server: koboldfs.forwarding); then as
        L{begin_put}.
        """
        d = self._expect(_State.REQUEST, self._timeout, body=True)
        self.sendMessage(Op.REPLICA_PUT, fields)
        return d

    def send_chunk(self, chunk: bytes) -> None:
        self.resetTimeout()
        self._sent += len(chunk)
        self.sendData(chunk)

    def send_frame(self, frame: bytes) -> None:
        """
        Send a DATA frame built by L{encode_data}.
        """
        self.resetTimeout()
        self._sent += len(frame)
        self.sendFrame(frame)

    def end_put(self, sha256: str | None, abort: bool = False) -> None:
        """
        End a put's body; its answer is now due (unless it came early).
        Without C{sha256} (its client gave none), the peer answers with the
        digest of what it stored, for the origin to compare.
        """
        fields: dict[str, Any] = {"abort": True} if abort else {}
        if sha256 is not None:
            fields["sha256"] = sha256
        self.sendMessage(Op.END, fields)
        if self._reply is not None:
            self._waiting = True
            self.setTimeout(self._reply_timeout + self._sent / SYNC_RATE)

    # -- frames in

    def frameReceived(self, frame: Frame) -> None:
        if self._reply is not None:
            # The reply has begun: from now on only silence is limited.
            self._waiting = False
            self.setTimeout(self._timeout)
        state = self._state
        if state is _State.GET:
            self._getFrame(frame)
        elif state is _State.REQUEST and isinstance(frame, Message):
            if frame.op in (Op.OK, Op.WELCOME):
                if frame.op is Op.WELCOME:
                    self.server = frame["server"]
                self._finish(frame)
            elif frame.op is Op.ERROR:
                self._finish(error_for_code(frame["code"], frame["message"]))
            else:
                raise ProtocolError(f"unexpected {frame.op.name} frame", ErrorCode.BAD_REQUEST)
        elif isinstance(frame, Message) and frame.op is Op.ERROR:
            # An error outside a request: the server is about to close.
            self._fail(error_for_code(frame["code"], frame["message"]))
        else:
            raise ProtocolError(f"unexpected {frame.op.name} frame", ErrorCode.BAD_REQUEST)

    def _getFrame(self, frame: Frame) -> None:
        if isinstance(frame, Data):
            if self._file is None:
                raise ProtocolError("DATA before FILE", ErrorCode.BAD_REQUEST)
            assert self._sink is not None
            waiting = self._sink(frame.payload)
            if waiting is not None:
                self.transport.pauseProducing()
                waiting.addCallbacks(self._sinkReady, self._sinkFailed)
        elif frame.op is Op.FILE and self._file is None:
            self._file = frame
        elif frame.op is Op.END and self._file is not None:
            self._finish(self._file)
        elif frame.op is Op.ERROR:
            self._finish(error_for_code(frame["code"], frame["message"]))
        else:
            raise ProtocolError(f"unexpected {frame.op.name} frame", ErrorCode.BAD_REQUEST)

    def _sinkReady(self, _: object) -> None:
        if not self.closing:
            self.transport.resumeProducing()

    def _sinkFailed(self, failure: Failure) -> None:
        # The output could not take the bytes: this download is over, and
        # the connection is mid-stream, so it cannot be reused.
        self._fail(failure)
        self.transport.abortConnection()

    def protocolViolation(self, error: ProtocolError) -> None:
        super().protocolViolation(error)
        self._fail(error)

    # -- request bookkeeping

    def _expect(
        self, state: _State, timeout: float | None, body: bool = False
    ) -> defer.Deferred[Message]:
        """
        Wait for the answer to a request, under C{timeout}: the reply's
        deadline, or (C{body}: a put, whose body goes first) the limit of
        silence while it is sent.
        """
        if self._state not in (_State.IDLE, _State.CONNECTING) or self.closing:
            return defer.fail(ConnectionFailed("connection is not idle"))
        self._state = state
        self._reply = defer.Deferred()
        self._waiting = not body
        self._sent = 0
        self.setTimeout(timeout)
        return self._reply

    def _finish(self, result: Message | Exception) -> None:
        reply, self._reply = self._reply, None
        self._sink = None
        self.setTimeout(None)
        if self._state is not _State.CLOSED:
            self._state = _State.IDLE
        if reply is not None:
            if isinstance(result, Exception):
                reply.errback(Failure(result))
            else:
                reply.callback(result)

    def _fail(self, error: Exception | Failure) -> None:
        reply, self._reply = self._reply, None
        self._sink = None
        self._state = _State.CLOSED if self.closing else self._state
        if reply is not None:
            reply.errback(error if isinstance(error, Failure) else Failure(error))


def trust_root(ca: str | None) -> Any:
    """
    The certificates a TLS client trusts: those of PEM file C{ca}, or the
    system's.
    """
    if ca is None:
        return platformTrust()
    with open(ca, "rb") as f:
        pem = f.read()
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, flags=re.DOTALL
    )
    if not blocks:
        raise ValueError(f"no certificate in {ca}")
    return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])


class ConnectionCache:
    """
    Open connections to servers, kept for reuse (not a pool of clients:
    L{koboldfs.client.ClientPool} is that).

    A connection goes back to the pool only when it finished its request
    cleanly; anything else (an error mid-stream, a timeout) closes it.
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float = STALL_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_idle: int = 8,
        endpoint_factory: Callable[[str], Any] | None = None,
        credentials: Credentials | None = None,
        tls: bool = False,
        ca: str | None = None,
        reply_timeout: float = REPLY_TIMEOUT,
    ) -> None:
        """
        @param timeout: seconds a reply under way, or a put's body, may go
            without a frame (L{ClientProtocol}).
        @param connect_timeout: seconds a new connection has for its TCP
            connect, TLS handshake, HELLO and AUTH together; then the
            server is taken for unreachable (L{ConnectionFailed}).
        @param reply_timeout: seconds a request's reply has to begin.
        @param credentials: what to prove to servers that require
            authentication (a namespace key, or a server's cluster secret).
        @param tls: connect with TLS, verifying that the server's
            certificate names the host of its address.
        @param ca: a PEM file of the certificates to trust for TLS (the
            system's when None).
        """
        self._reactor = reactor
        self._credentials = credentials
        self._trust = trust_root(ca) if tls else None
        if ca is not None and not tls:
            raise ValueError("ca= is for tls=True")
        self._endpoint = endpoint_factory or self._tcp
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._max_idle = max_idle
        self._idle: dict[str, list[ClientProtocol]] = {}
        self._all: set[ClientProtocol] = set()

    async def acquire(self, address: str) -> ClientProtocol:
        """
        An idle connection to C{address}, or a new one after its handshake.

        @raise ConnectionFailed: the server could not be reached.
        """
        idle = self._idle.get(address, [])
        while idle:
            conn = idle.pop()
            if conn.reusable:
                return conn
        proto = ClientProtocol(self._reactor, self._timeout, reply_timeout=self._reply_timeout)
        proto.address = address
        connecting = defer.maybeDeferred(lambda: connectProtocol(self._endpoint(address), proto))
        expired = False

        def expire() -> None:
            # A hung server's kernel still completes the TCP handshake:
            # the deadline covers TLS, HELLO and AUTH too.
            nonlocal expired
            expired = True
            if not connecting.called:
                connecting.cancel()
            elif proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]

        deadline = self._reactor.callLater(self._connect_timeout, expire)
        try:
            return await self._handshake(address, proto, connecting)
        except ConnectionFailed:
            if expired:
                raise ConnectionFailed(
                    f"{address} did not complete its handshake in {self._connect_timeout:g} s"
                ) from None
            raise
        finally:
            if deadline.active():
                deadline.cancel()

    async def _handshake(
        self, address: str, proto: ClientProtocol, connecting: defer.Deferred[Any]
    ) -> ClientProtocol:
        try:
            await connecting
        except Exception as e:
            raise ConnectionFailed(f"cannot connect to {address}: {e}") from None
        self._all.add(proto)
        proto.lost.addCallback(lambda _: self._all.discard(proto))
        try:
            try:
                welcome = await proto.handshake()
            except ConnectionFailed as e:
                raise ConnectionFailed(f"{address}: {e}") from None
            if welcome.get("auth"):
                await self._authenticate(proto, welcome)
        except (AuthRequired, Forbidden):
            # The same key would be refused by every server: no failover.
            proto.close()
            raise
        except ServerError as e:
            proto.close()
            raise ConnectionFailed(f"{address} refused the handshake: {e}") from None
        except ConnectionFailed:
            proto.close()
            raise
        return proto

    async def _authenticate(self, proto: ClientProtocol, welcome: Message) -> None:
        """
        Answer the server's challenge (docs/security.md).
        """
        credentials = self._credentials
        if credentials is None:
            raise AuthRequired(
                ErrorCode.AUTH_REQUIRED,
                f"server {proto.server} requires authentication: pass key= "
                "(made by `koboldfs admin key create NAMESPACE`)",
            )
        nonce = welcome.get("nonce")
        if not isinstance(nonce, str) or len(nonce) < 32:
            raise ProtocolError("WELCOME asks for AUTH with no nonce", ErrorCode.BAD_REQUEST)
        await proto.request(Op.AUTH, credentials.fields(nonce, proto.server))

    def _tcp(self, address: str) -> Any:
        host, port = parse_address(address)
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._connect_timeout)
        if self._trust is None:
            return endpoint
        return wrapClientTLS(optionsForClientTLS(host, trustRoot=self._trust), endpoint)

    def release(self, address: str, conn: ClientProtocol) -> None:
        """
        Give a connection back after a request.
        """
        idle = self._idle.setdefault(address, [])
        if conn.reusable and len(idle) < self._max_idle:
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> defer.Deferred[Any]:
        """
        Close every connection; fire when all are closed.
        """
        self._idle.clear()
        lost = [conn.lost for conn in self._all]
        for conn in list(self._all):
            conn.close()
        return defer.DeferredList(lost)
