"""
The KoboldFS wire format: a sans-IO codec, shared by every side.

A connection is a stream of frames.  Each frame is a 5-byte header (payload
length as an unsigned 32-bit big-endian integer, then a one-byte opcode)
followed by the payload.  DATA frames carry raw file bytes; every other
frame carries a JSON object whose fields are checked against the opcode's
schema when it is decoded.  Nothing here does I/O: L{FrameDecoder} turns
bytes into frames and the C{encode_*} functions turn frames into bytes, so
the server, the Twisted client and the blocking client share one codec.

The full specification, with the request flows, is docs/protocol.md.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Union

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from koboldfs.errors import ConnectionFailed, ErrorCode, ProtocolError

#: The protocol version this code speaks.  HELLO lists the versions a client
#: accepts; WELCOME names the one the server chose.
VERSION = 1

HEADER = struct.Struct(">IB")

#: Default largest payload a peer accepts: room for 1 MiB DATA frames and
#: for a LIST reply; a peer announces its own limit in HELLO/WELCOME.
MAX_PAYLOAD = 4 * 1024 * 1024

#: Size of the DATA frames that senders cut bodies into.
CHUNK_SIZE = 1024 * 1024

#: How much a connection reads from its socket at once (Twisted's default
#: is 64 KiB): fewer, larger reads for bodies.  It is also the send buffer
#: size over which Twisted pauses a producer.
SOCKET_BUFFER = 256 * 1024

#: Largest integer field accepted (sizes, offsets): 2**63 - 1, no 4 GiB limit.
MAX_INT = 2**63 - 1


class Op(IntEnum):
    """
    Frame opcodes.  0x20-0x2F are kept for transactions, 0x30-0x3F for
    server-to-server requests.
    """

    HELLO = 0x01
    WELCOME = 0x02
    AUTH = 0x03
    PING = 0x10
    PUT = 0x11
    GET = 0x12
    GET_URL = 0x13
    DELETE = 0x14
    STAT = 0x15
    LIST = 0x16
    BEGIN = 0x20
    PREPARE = 0x21
    COMMIT = 0x22
    ABORT = 0x23
    #: Server to server: a copy of a put's body, streamed while the put
    #: arrives, for write durability (koboldfs.forwarding).
    REPLICA_PUT = 0x30
    #: To a server, from an operator proving the cluster secret: the
    #: registered servers and the cluster's health, as the metadata has
    #: them (C{koboldfs admin status} without the database).
    CLUSTER_STATUS = 0x31
    DATA = 0x40
    END = 0x41
    OK = 0x50
    FILE = 0x51
    ERROR = 0x5F


#: The transaction requests (docs/transactions.md).
TXN_REQUESTS = frozenset({Op.BEGIN, Op.PREPARE, Op.COMMIT, Op.ABORT})
#: Requests a client may send once the handshake is done.
REQUESTS = (
    frozenset(
        {
            Op.PING,
            Op.PUT,
            Op.GET,
            Op.GET_URL,
            Op.DELETE,
            Op.STAT,
            Op.LIST,
            Op.REPLICA_PUT,
            Op.CLUSTER_STATUS,
        }
    )
    | TXN_REQUESTS
)


def _is_int(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_INT


def _is_sha256(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "bool": lambda v: isinstance(v, bool),
    "sha256": _is_sha256,
    "number": lambda v: type(v) in (int, float),
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "int_list": lambda v: isinstance(v, list) and all(_is_int(i) for i in v),
    "str_or_null": lambda v: v is None or isinstance(v, str),
    "int_or_null": lambda v: v is None or _is_int(v),
}

_NAME = {"ns": ("str", True), "key": ("str", True)}
#: A request inside a client transaction carries its id.
_TXN = {"txn": ("str", False)}

#: For each JSON opcode, its fields: name -> (type, required).  Fields not
#: named are ignored, so later versions may add optional ones.
SCHEMAS: dict[Op, dict[str, tuple[str, bool]]] = {
    Op.HELLO: {
        "versions": ("int_list", True),
        "agent": ("str", False),
        "max_payload": ("int", False),
    },
    Op.WELCOME: {
        "version": ("int", True),
        "server": ("str", True),
        "max_payload": ("int", True),
        "nonce": ("str", False),
        # True: the client must send AUTH before any request.
        "auth": ("bool", False),
    },
    Op.AUTH: {
        "method": ("str", True),  # "key" or "cluster"
        "cnonce": ("str", True),
        "proof": ("str", True),
        "ns": ("str", False),
        "key_id": ("str", False),
        "peer": ("str", False),
    },
    Op.PING: {},
    Op.PUT: {**_NAME, "size": ("int_or_null", False), **_TXN},
    # fid: peers only, for a stored file that is not the key's live version
    # (a part of a multipart upload).
    Op.GET: {**_NAME, "local": ("bool", False), "fid": ("str", False), **_TXN},
    Op.GET_URL: {**_NAME, "expires": ("int_or_null", False)},
    Op.DELETE: {**_NAME, **_TXN},
    Op.STAT: {**_NAME, **_TXN},
    Op.LIST: {
        "ns": ("str", True),
        "prefix": ("str", False),
        "after": ("str_or_null", False),
        "limit": ("int", False),
    },
    Op.BEGIN: {"ns": ("str", True)},
    Op.PREPARE: {"txn": ("str", True), "record": ("bool", False)},
    Op.COMMIT: {"txn": ("str", True), "prepared": ("bool", False)},
    Op.ABORT: {"txn": ("str", True)},
    Op.REPLICA_PUT: {"fid": ("str", True), "path": ("str", True), "size": ("int_or_null", False)},
    Op.CLUSTER_STATUS: {"held": ("bool", False)},
    Op.END: {"sha256": ("sha256", False), "abort": ("bool", False)},
    Op.OK: {},
    Op.FILE: {"size": ("int", True), "sha256": ("sha256", True)},
    Op.ERROR: {"code": ("int", True), "message": ("str", True)},
}


@dataclass(frozen=True)
class Message:
    """
    A frame whose payload is a JSON object.
    """

    op: Op
    fields: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


@dataclass(frozen=True)
class Data:
    """
    A DATA frame: a slice of a file body.
    """

    payload: bytes
    op = Op.DATA


Frame = Union[Message, Data]


def check_fields(op: Op, fields: object) -> dict[str, Any]:
    """
    Return C{fields} if they fit C{op}'s schema.

    @raise ProtocolError: with L{ErrorCode.BAD_REQUEST}, naming the field.
    """
    if not isinstance(fields, dict):
        raise ProtocolError(f"{op.name} payload is not a JSON object", ErrorCode.BAD_REQUEST)
    for name, (kind, required) in SCHEMAS[op].items():
        if name not in fields:
            if required:
                raise ProtocolError(f"{op.name} lacks field {name!r}", ErrorCode.BAD_REQUEST)
            continue
        if not _CHECKS[kind](fields[name]):
            raise ProtocolError(
                f"{op.name} field {name!r} is not a valid {kind}",
                ErrorCode.BAD_REQUEST,
            )
    return fields


def encode_message(op: Op, fields: dict[str, Any] | None = None) -> bytes:
    """
    Encode a JSON frame.
    """
    payload = json.dumps(fields or {}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return HEADER.pack(len(payload), op) + payload


def encode_data_header(length: int) -> bytes:
    """
    The header of a DATA frame of C{length} bytes, so senders can write the
    header and the chunk separately instead of copying the chunk.
    """
    return HEADER.pack(length, Op.DATA)


def encode_data(payload: bytes) -> bytes:
    """
    A whole DATA frame.  One copy, made with the GIL released when it is
    large, so a worker thread can build frames while the reactor runs.
    """
    return b"".join((encode_data_header(len(payload)), payload))


def encode_error(code: ErrorCode, message: str) -> bytes:
    return encode_message(Op.ERROR, {"code": int(code), "message": message})


def encode(frame: Frame) -> bytes:
    """
    Encode any frame; the inverse of L{FrameDecoder.feed}.
    """
    if isinstance(frame, Data):
        return encode_data(frame.payload)
    return encode_message(frame.op, frame.fields)


class FrameDecoder:
    """
    Turns a byte stream into frames, holding at most one frame's bytes.

    A payload is gathered as views of the pieces it arrived in and joined
    once, when complete: a 1 MiB DATA frame that arrives in 64 KiB reads
    is copied once, not once per read.

    After it raises L{ProtocolError} the decoder is poisoned: the stream has
    lost its framing and every later call raises the same error, so the
    owner must send an ERROR frame and close the connection.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self.max_payload = max_payload
        self._head = bytearray()  # a header that arrived in pieces
        self._op: Op | None = None  # the frame whose payload is arriving
        self._need = 0  # payload bytes still to come
        self._parts: list[memoryview] = []
        self._failure: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """
        Bytes held that do not yet make a whole frame.
        """
        return len(self._head) + sum(len(p) for p in self._parts)

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add received bytes; return the frames they complete, in order.
        """
        if self._failure is not None:
            raise self._failure
        if type(data) is not bytes:
            # Views of it are kept: it must not change under them.
            data = bytes(data)
        view = memoryview(data)
        frames: list[Frame] = []
        try:
            while True:
                if self._op is None:
                    if not view:
                        break
                    if not self._head and len(view) >= HEADER.size:
                        length, opcode = HEADER.unpack_from(view)
                        view = view[HEADER.size :]
                    else:
                        take = HEADER.size - len(self._head)
                        self._head += view[:take]
                        view = view[take:]
                        if len(self._head) < HEADER.size:
                            break
                        length, opcode = HEADER.unpack(self._head)
                        self._head = bytearray()
                    self._op, self._need = self._check_header(length, opcode), length
                if self._need:
                    if not view:
                        break
                    piece = view[: self._need]
                    view = view[len(piece) :]
                    self._parts.append(piece)
                    self._need -= len(piece)
                    if self._need:
                        break
                op, parts = self._op, self._parts
                self._op, self._parts = None, []
                frames.append(self._frame(op, b"".join(parts)))
        except ProtocolError as e:
            self._failure = e
            self._head, self._parts, self._op, self._need = bytearray(), [], None, 0
            raise
        return frames

    def _check_header(self, length: int, opcode: int) -> Op:
        if length > self.max_payload:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_payload}")
        try:
            return Op(opcode)
        except ValueError:
            raise ProtocolError(
                f"unknown opcode 0x{opcode:02x}", ErrorCode.UNKNOWN_OPCODE
            ) from None

    @staticmethod
    def _frame(op: Op, payload: bytes) -> Frame:
        if op is Op.DATA:
            return Data(payload)
        try:
            fields = json.loads(payload)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise ProtocolError(f"{op.name} payload is not JSON", ErrorCode.BAD_REQUEST) from None
        if b"\\u" in payload:
            # A \ud800 escape is valid JSON but no text: a string holding it
            # cannot be encoded again (a path, a log line, a reply).
            try:
                json.dumps(fields, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError(
                    f"{op.name} payload holds an unpaired surrogate", ErrorCode.BAD_REQUEST
                ) from None
        return Message(op, check_fields(op, fields))


# -- Twisted adapters: thin pieces both ends of a connection share. --------


@implementer(IPushProducer)
class WriteFlow:
    """
    Tracks whether a transport wants more bytes.

    Registered as the transport's streaming producer, it is paused when the
    transport's send buffer is full; senders wait on L{wait} before writing
    the next chunk, so a slow reader never makes us buffer a whole file.
    """

    def __init__(self) -> None:
        self.paused = False
        self._waiting: list[defer.Deferred[None]] = []
        self._lost: Failure | None = None

    def wait(self) -> defer.Deferred[None]:
        """
        Fire when writing may go on; fail if the connection is lost first.
        """
        if self._lost is not None:
            return defer.fail(self._lost)
        if not self.paused:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def stopProducing(self) -> None:
        self.lost(Failure(ConnectionFailed("connection closed while sending")))

    def lost(self, reason: Failure) -> None:
        """
        The connection is gone: fail every waiter, now and later.
        """
        if self._lost is None:
            self._lost = reason
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(reason)


class FrameProtocol(Protocol):
    """
    A connection that exchanges frames: decodes what arrives, encodes what
    leaves, and closes with an ERROR frame on any protocol violation.

    Subclasses implement L{frameReceived}; raising L{ProtocolError} there
    closes the connection the same way a malformed frame does.
    """

    max_payload = MAX_PAYLOAD
    closing = False

    def connectionMade(self) -> None:
        # Requests and replies are small frames written one after another:
        # with Nagle's algorithm, the last frame of an answer would wait
        # for the peer's delayed ACK (40 ms on Linux).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = SOCKET_BUFFER
        self._decoder = FrameDecoder(self.max_payload)
        self.flow = WriteFlow()
        self.transport.registerProducer(self.flow, True)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            for frame in self._decoder.feed(data):
                self.frameReceived(frame)
                if self.closing:
                    return
        except ProtocolError as e:
            self.protocolViolation(e)

    def frameReceived(self, frame: Frame) -> None:
        raise NotImplementedError

    def protocolViolation(self, error: ProtocolError) -> None:
        """
        Tell the peer what it did wrong, then drop it.
        """
        self.sendError(error.code, str(error))
        self.close()

    def close(self) -> None:
        """
        Close after what was written is sent, and stop reading meanwhile.
        """
        if not self.closing:
            self.closing = True
            # TLS does not start its shutdown while a producer is registered.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closing = True
        self.flow.lost(Failure(ConnectionFailed("connection lost")))

    def sendMessage(self, op: Op, fields: dict[str, Any] | None = None) -> None:
        self.transport.write(encode_message(op, fields))

    def sendError(self, code: ErrorCode, message: str) -> None:
        self.transport.write(encode_error(code, message))

    def sendData(self, chunk: bytes) -> None:
        self.transport.writeSequence([encode_data_header(len(chunk)), chunk])

    def sendFrame(self, frame: bytes) -> None:
        """
        Write a frame already encoded (by L{encode_data} in a worker
        thread): the reactor thread then copies nothing.
        """
        self.transport.write(frame)
