"""
The Deferred-returning KoboldFS client, for Twisted applications (named
L{koboldfs.client.DeferredClient}, its public place).

L{DeferredClient} holds all of the client logic (server choice, failover,
retries, checksums); the pools (L{koboldfs.pool}), the blocking
L{koboldfs.blocking.Client} and the client transactions
(L{koboldfs.txnclient}) are built on it rather than repeating it.  It talks
to servers through L{koboldfs.connection} (one request at a time per
connection, connections kept for reuse), and imports none of the modules
built on it.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from koboldfs.auth import Credentials
from koboldfs.connection import (
    CONNECT_TIMEOUT,
    REPLY_TIMEOUT,
    STALL_TIMEOUT,
    ClientProtocol,
    ConnectionCache,
    parse_address,
)
from koboldfs.errors import (
    AuthRequired,
    ChecksumMismatch,
    ConnectionFailed,
    ErrorCode,
    Forbidden,
    KoboldError,
    NotFound,
    ServerError,
    Unavailable,
)
from koboldfs.names import check_key, check_namespace
from koboldfs.protocol import CHUNK_SIZE, Message, Op, encode_data

T = TypeVar("T")
log = Logger()

#: Chunks smaller than this are hashed on the calling thread: the hop to a
#: worker thread would cost more than the hash.
INLINE_HASH = 64 * 1024
#: Bytes of a download waiting for the disk before reading pauses, and resumes.
SINK_HIGH = 4 * CHUNK_SIZE
SINK_LOW = CHUNK_SIZE


@dataclass(frozen=True)
class Stat:
    """
    What the cluster knows of a stored file.

    @ivar content_type: as stored with it through S3, or None.
    """

    key: str
    size: int
    sha256: str
    created: float
    servers: tuple[str, ...]
    content_type: str | None = None

    @classmethod
    def from_reply(cls, reply: Message) -> Stat:
        """
        The file a STAT reply describes.
        """
        return cls(
            key=reply["key"],
            size=reply["size"],
            sha256=reply["sha256"],
            created=reply["created"],
            servers=tuple(reply["servers"]),
            content_type=reply.get("content_type"),
        )


# -- bodies in and out


class _Source:
    """
    A put's body, read in chunks and hashed as it is read.

    Reads of files happen in the thread pool, and the hash of each chunk is
    computed and its DATA frame built in the same trip, so none of it holds
    up the reactor.
    """

    size: int | None = None

    def __init__(self, reactor: Any, threadpool: Any) -> None:
        self._reactor = reactor
        self._pool = threadpool
        self.sha256 = hashlib.sha256()

    def _inThread(self, f: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def read_frame(self, n: int) -> defer.Deferred[bytes]:
        """
        The next chunk of at most C{n} bytes as an encoded DATA frame, or
        C{b""} at the end.
        """
        raise NotImplementedError

    def rewind(self) -> bool:
        """
        Start again from the beginning, for a retry; False if impossible.
        """
        return False

    async def close(self) -> None:
        pass


def _thdHashFrame(hasher: Any, chunk: Any) -> bytes:
    hasher.update(chunk)
    return encode_data(chunk)


class _BytesSource(_Source):
    def __init__(self, reactor: Any, threadpool: Any, data: bytes) -> None:
        super().__init__(reactor, threadpool)
        self._data = memoryview(data).cast("B")
        self.size = len(self._data)
        self._offset = 0

    def read_frame(self, n: int) -> defer.Deferred[bytes]:
        chunk = self._data[self._offset : self._offset + n]
        self._offset += len(chunk)
        if not chunk:
            return defer.succeed(b"")
        if len(chunk) >= INLINE_HASH:
            return self._inThread(_thdHashFrame, self.sha256, chunk)
        return defer.succeed(_thdHashFrame(self.sha256, chunk))

    def rewind(self) -> bool:
        self._offset = 0
        self.sha256 = hashlib.sha256()
        return True


def _thdReadHashFrame(f: Any, hasher: Any, n: int) -> bytes:
    chunk = f.read(n)
    if not isinstance(chunk, bytes):
        raise TypeError(f"source file returned {type(chunk).__name__}, not bytes")
    if not chunk:
        return b""
    return _thdHashFrame(hasher, chunk)


class _FileSource(_Source):
    """
    A binary file object.  Seekable ones can be re-sent on another server.
    """

    def __init__(self, reactor: Any, threadpool: Any, f: Any, own: bool = False) -> None:
        super().__init__(reactor, threadpool)
        self._file = f
        self._own = own
        try:
            self._start: int | None = f.tell() if f.seekable() else None
        except (AttributeError, OSError):
            self._start = None
        if self._start is not None:
            try:
                self.size = os.fstat(f.fileno()).st_size - self._start
            except (AttributeError, OSError, io.UnsupportedOperation):
                self.size = None

    def read_frame(self, n: int) -> defer.Deferred[bytes]:
        return self._inThread(_thdReadHashFrame, self._file, self.sha256, n)

    def rewind(self) -> bool:
        if self._start is None:
            return False
        self._file.seek(self._start)
        self.sha256 = hashlib.sha256()
        return True

    async def close(self) -> None:
        if self._own:
            await self._inThread(self._file.close)


async def _open_source(reactor: Any, threadpool: Any, source: Any) -> _Source:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _BytesSource(reactor, threadpool, source)
    if isinstance(source, (str, os.PathLike)):
        f = await deferToThreadPool(reactor, threadpool, open, source, "rb")
        return _FileSource(reactor, threadpool, f, own=True)
    if hasattr(source, "read"):
        return _FileSource(reactor, threadpool, source)
    raise TypeError(f"cannot put {type(source).__name__}: give a path, bytes or a binary file")


class _Sink:
    """
    Where a get's body goes: an output file object, written in the thread
    pool (it may be a real file or a pipe), and hashed on the way.

    Chunks are written strictly in order by one job at a time.  While more
    than L{SINK_HIGH} bytes wait, L{write} returns a Deferred that fires
    once the backlog is under L{SINK_LOW}, so the connection stops reading
    from the server instead of buffering the file in memory.
    """

    def __init__(self, reactor: Any, threadpool: Any, output: Any) -> None:
        self._reactor = reactor
        self._pool = threadpool
        self._output = output
        self._inline = isinstance(output, io.BytesIO)
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._draining = False
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []
        self._error: Failure | None = None
        self.sha256 = hashlib.sha256()
        self.written = 0
        try:
            self._start: int | None = output.tell() if output.seekable() else None
        except (AttributeError, OSError):
            self._start = None

    def write(self, chunk: bytes) -> defer.Deferred[None] | None:
        if self._error is not None:
            return defer.fail(self._error)
        self.written += len(chunk)
        if self._inline and not self._draining and len(chunk) < INLINE_HASH:
            self._thdWrite(chunk)
            return None
        self._queue.append(chunk)
        self._queued += len(chunk)
        if not self._draining:
            self._draining = True
            defer.ensureDeferred(self._drain())
        if self._queued > SINK_HIGH:
            return self._below(SINK_LOW)
        return None

    def _below(self, level: int) -> defer.Deferred[None]:
        """
        A Deferred that fires once at most C{level} bytes wait, or fails
        with the error that stopped the writes.
        """
        if self._error is not None:
            return defer.fail(self._error)
        if self._queued <= level and (level or not self._draining):
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((level, waiter))
        return waiter

    async def _drain(self) -> None:
        try:
            while self._queue:
                chunk = self._queue[0]
                await deferToThreadPool(self._reactor, self._pool, self._thdWrite, chunk)
                self._queue.popleft()
                self._queued -= len(chunk)
                self._wake()
        except Exception:
            self._error = Failure()
            self._queue.clear()
            self._queued = 0
        self._draining = False
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiters = self._waiters, []
        for level, waiter in waiting:
            if self._error is not None:
                waiter.errback(self._error)
            elif self._queued <= level and (level or not self._draining):
                waiter.callback(None)
            else:
                self._waiters.append((level, waiter))

    def _thdWrite(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self._output.write(chunk)

    def flush(self) -> defer.Deferred[None]:
        """
        Wait until every chunk received is written and hashed.
        """
        return self._below(0)

    async def rewind(self) -> bool:
        """
        Undo a failed download before trying another server.
        """
        try:
            await self.flush()
        except Exception:
            return False
        if self.written == 0:
            return True
        if self._start is None:
            return False
        self._output.seek(self._start)
        self._output.truncate()
        self.sha256 = hashlib.sha256()
        self.written = 0
        return True


class DeferredClient:
    """
    A client of one namespace of a KoboldFS cluster; every method returns
    a Deferred.

    Requests go to the listed servers in turn; a server that cannot be
    reached, or answers with a retryable error, is skipped for the next.
    When every server failed, the whole round is retried after a backoff
    (C{retries} times) before the request fails with L{Unavailable}.

    Beside the methods of the file store, the request layer they are built
    on is public, for code that speaks more of the protocol through the
    same server choice, failover and retries (the client transactions of
    L{koboldfs.txnclient}): L{run}, L{request}, L{request_or_none},
    L{request_on}, L{upload}, L{download} and L{Stat.from_reply}.

    @param servers: C{host:port} addresses of any servers of the cluster.
    @param reactor: the reactor; the global one when None.
    @param threadpool: where file reads, writes and hashing run; the
        reactor's own pool when None.
    @param endpoint_factory: makes the client endpoint for an address;
        TCP when None.  Tests connect in memory (L{koboldfs.testing}).
    @param key: this namespace's key (C{kfs1....}), for servers that
        require one; a read-only key cannot put or delete.
    @param tls: speak TLS, and check that each server's certificate names
        the host of its address; C{ca} is a PEM file of the certificates
        to trust (the system's when None).
    @param connect_timeout: seconds a server has to take a new
        connection: TCP connect, TLS and handshake (and AUTH) together.
    @param reply_timeout: seconds a server has to begin its reply to a
        request (for a put, once its body is sent; a large one gets a
        second more per 32 MiB, the time for the server to fsync it).
    @param timeout: seconds a reply under way, or a put's body being
        sent, may go without a frame.  A server past any of these is
        skipped for the next: a hung one costs C{connect_timeout} or
        C{reply_timeout}, not C{timeout}, unless it hung in the middle of
        a body.
    """

    def __init__(
        self,
        namespace: str,
        servers: list[str] | tuple[str, ...],
        reactor: Any = None,
        *,
        timeout: float = STALL_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        reply_timeout: float = REPLY_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.2,
        threadpool: Any = None,
        endpoint_factory: Callable[[str], Any] | None = None,
        key: str | None = None,
        tls: bool = False,
        ca: str | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # noqa: F811 - the documented default
        self.namespace = check_namespace(namespace)
        if isinstance(servers, str) or not servers:
            raise ValueError("servers is a non-empty list of 'host:port' strings")
        for address in servers:
            parse_address(address)
        self.servers = list(servers)
        self._reactor = reactor
        self._threadpool = threadpool if threadpool is not None else reactor.getThreadPool()
        self._pool = ConnectionCache(
            reactor,
            timeout,
            connect_timeout,
            endpoint_factory=endpoint_factory,
            credentials=None if key is None else Credentials(self.namespace, key),
            tls=tls,
            ca=ca,
            reply_timeout=reply_timeout,
        )
        #: Rounds of requests to every server after the first, and the
        #: seconds before the first of them (doubled for each next one).
        self.retries = retries
        self.backoff = backoff
        self._next = random.randrange(len(self.servers))

    # -- the public surface

    def ping(self) -> defer.Deferred[bool]:
        """
        Fire with True when a server answers, False when none does.
        """

        async def ping() -> bool:
            try:
                await self.request(Op.PING, {}, retries=0)
            except (AuthRequired, Forbidden):
                raise
            except KoboldError:
                return False
            return True

        return defer.ensureDeferred(ping())

    def put(self, key: str, source: Any) -> defer.Deferred[bool]:
        """
        Store C{source} (a path, bytes, or a binary file object) under
        C{key}; fire with True once the cluster has it durably.
        """
        return self.upload(key, source).addCallback(lambda _: True)

    def get(self, key: str, output: Any) -> defer.Deferred[bool]:
        """
        Write the file's bytes to C{output} (a binary file object); fire
        with True, or False if there is no such key.

        @raise ChecksumMismatch: the bytes received were not the file's.
        """
        return self.download(key, output)

    def get_url(self, key: str, expires: int | None = None) -> defer.Deferred[str | None]:
        """
        Fire with an HTTP URL of a live replica, or None if there is no
        such key.
        """
        fields = {"ns": self.namespace, "key": check_key(key), "expires": expires}

        async def get_url() -> str | None:
            reply = await self.request_or_none(Op.GET_URL, fields)
            return None if reply is None else reply["url"]

        return defer.ensureDeferred(get_url())

    def delete(self, key: str) -> defer.Deferred[bool]:
        """
        Delete C{key}; fire with True, or False if there was no such key.
        """
        fields = {"ns": self.namespace, "key": check_key(key)}

        async def delete() -> bool:
            return await self.request_or_none(Op.DELETE, fields) is not None

        return defer.ensureDeferred(delete())

    def stat(self, key: str) -> defer.Deferred[Stat | None]:
        """
        Fire with the file's L{Stat}, or None if there is no such key.
        """
        fields = {"ns": self.namespace, "key": check_key(key)}

        async def stat() -> Stat | None:
            reply = await self.request_or_none(Op.STAT, fields)
            return None if reply is None else Stat.from_reply(reply)

        return defer.ensureDeferred(stat())

    def list(
        self, prefix: str = "", after: str | None = None, limit: int = 1000
    ) -> defer.Deferred[list[str]]:
        """
        Fire with up to C{limit} keys starting with C{prefix}, in code-point
        order, after C{after}; page by passing the last key as C{after}.
        """
        if not isinstance(prefix, str) or (after is not None and not isinstance(after, str)):
            raise TypeError("prefix and after are str")
        if not isinstance(limit, int) or limit < 0:
            raise ValueError("limit is a non-negative int")
        return defer.ensureDeferred(self._list(prefix, after, limit))

    def close(self) -> defer.Deferred[Any]:
        """
        Close every connection; fire when they are closed.
        """
        return self._pool.close()

    # -- the request layer

    def run(
        self,
        what: str,
        attempt: Callable[[ClientProtocol], Awaitable[T]],
        *,
        retries: int | None = None,
    ) -> defer.Deferred[T]:
        """
        Run C{attempt} on a connection to each server in turn until one
        succeeds, in rounds with backoff; fire with its result.

        An attempt that fails with a retryable error (L{KoboldError.retryable})
        passes the request to the next server; any other error ends it at
        once, as it would be repeated everywhere.  A connection is given
        back after the attempt, and closed if the attempt left it in the
        middle of an exchange.

        @param what: the request's name, for the error message.
        @param retries: rounds after the first (L{retries} when None).
        @raise Unavailable: every round failed on every server; its message
            says what the last servers said, its code is the last error's.
        """
        return defer.ensureDeferred(self._run(what, attempt, retries))

    def request(
        self, op: Op, fields: dict[str, Any], *, retries: int | None = None
    ) -> defer.Deferred[Message]:
        """
        Send a request answered by one OK frame to any server (as L{run});
        fire with the reply.
        """
        return self.run(op.name.lower(), lambda conn: conn.request(op, fields), retries=retries)

    def request_or_none(self, op: Op, fields: dict[str, Any]) -> defer.Deferred[Message | None]:
        """
        L{request}, firing with None when the server answers NOT_FOUND (a
        missing key is missing on every server: no other is asked).
        """

        async def request_or_none() -> Message | None:
            try:
                return await self.request(op, fields)
            except NotFound:
                return None

        return defer.ensureDeferred(request_or_none())

    def request_on(self, address: str, op: Op, fields: dict[str, Any]) -> defer.Deferred[Message]:
        """
        Send a request answered by one OK frame to the server at
        C{address} and no other, with no retry: for what only that server
        can answer (a transaction's vote on the uploads it holds).

        @raise ConnectionFailed: the server could not be reached.
        """

        async def request_on() -> Message:
            conn = await self._pool.acquire(address)
            try:
                return await conn.request(op, fields)
            finally:
                self._pool.release(address, conn)

        return defer.ensureDeferred(request_on())

    def upload(
        self, key: str, source: Any, fields: dict[str, Any] | None = None
    ) -> defer.Deferred[tuple[Message, str]]:
        """
        L{put} with C{fields} added to the PUT request (a transaction's
        id); fire with the server's reply and the address of the server
        that took the file.
        """
        return defer.ensureDeferred(self._put(check_key(key), source, fields))

    def download(
        self, key: str, output: Any, fields: dict[str, Any] | None = None
    ) -> defer.Deferred[bool]:
        """
        L{get} with C{fields} added to the GET request (a transaction's id).
        """
        return defer.ensureDeferred(self._get(check_key(key), output, fields))

    # -- the logic behind it

    async def _put(
        self, key: str, source: Any, extra: dict[str, Any] | None = None
    ) -> tuple[Message, str]:
        body = await _open_source(self._reactor, self._threadpool, source)
        sent = False

        async def attempt(conn: ClientProtocol) -> tuple[Message, str]:
            nonlocal sent
            if sent and not body.rewind():
                raise _Final(ConnectionFailed("upload failed and its source cannot be re-read"))
            sent = True
            return await self._send_body(conn, key, body, extra), conn.address

        try:
            return await self.run("put", attempt)
        finally:
            await body.close()

    async def _send_body(
        self, conn: ClientProtocol, key: str, body: _Source, extra: dict[str, Any] | None = None
    ) -> Message:
        fields = {"ns": self.namespace, "key": key, "size": body.size, **(extra or {})}
        reply = conn.begin_put(fields)
        early: list[Any] = []
        reply.addBoth(lambda r: early.append(r) or r)
        # The next chunk is read and hashed while this one is sent.
        reading: defer.Deferred[bytes] | None = body.read_frame(CHUNK_SIZE)
        try:
            while not early:
                assert reading is not None
                frame, reading = await reading, None
                if not frame:
                    break
                reading = body.read_frame(CHUNK_SIZE)
                conn.send_frame(frame)
                await conn.flow.wait()
        except ConnectionFailed:
            pass  # the reply Deferred carries the reason
        except BaseException:
            if not conn.closing:
                conn.end_put(None, abort=True)
            reply.addErrback(lambda _: None)
            await _settle(reading)
            raise
        # Nothing may read the source once we return (a retry rewinds it).
        await _settle(reading)
        if not conn.closing:
            if early:
                conn.end_put(None, abort=True)
            else:
                conn.end_put(body.sha256.hexdigest())
        return await reply

    async def _get(self, key: str, output: Any, extra: dict[str, Any] | None = None) -> bool:
        sink = _Sink(self._reactor, self._threadpool, output)
        fields = {"ns": self.namespace, "key": key, **(extra or {})}

        async def attempt(conn: ClientProtocol) -> Message:
            if not await sink.rewind():
                raise _Final(ConnectionFailed("download failed and the output cannot be rewound"))
            meta = await conn.get(fields, sink.write)
            await sink.flush()
            digest = sink.sha256.hexdigest()
            if sink.written != meta["size"] or digest != meta["sha256"]:
                # A bad copy on that server: try another.
                raise ServerError(
                    ErrorCode.CORRUPT,
                    f"{conn.server} sent {sink.written} bytes with SHA-256 {digest}, "
                    f"expected {meta['size']} bytes with {meta['sha256']}",
                )
            return meta

        try:
            await self.run("get", attempt)
        except NotFound:
            return False
        except Unavailable as e:
            if e.code is ErrorCode.CORRUPT:
                raise ChecksumMismatch(ErrorCode.CHECKSUM_MISMATCH, str(e)) from None
            raise
        return True

    async def _list(self, prefix: str, after: str | None, limit: int) -> list[str]:
        keys: list[str] = []
        while len(keys) < limit:
            fields = {
                "ns": self.namespace,
                "prefix": prefix,
                "after": after,
                "limit": limit - len(keys),
            }
            reply = await self.request(Op.LIST, fields)
            page = reply["keys"]
            keys.extend(page)
            if not reply.get("truncated") or not page:
                break
            after = page[-1]
        return keys

    def _order(self) -> list[str]:
        """
        The servers, starting from the next in turn, to spread the load.
        """
        n = len(self.servers)
        start, self._next = self._next, (self._next + 1) % n
        return [self.servers[(start + i) % n] for i in range(n)]

    async def _run(
        self,
        what: str,
        attempt: Callable[[ClientProtocol], Awaitable[T]],
        retries: int | None,
    ) -> T:
        errors: list[str] = []
        rounds = (self.retries if retries is None else retries) + 1
        last: KoboldError | None = None
        for round_ in range(rounds):
            if round_:
                await deferLater(self._reactor, self.backoff * 2 ** (round_ - 1), lambda: None)
            for address in self._order():
                try:
                    conn = await self._pool.acquire(address)
                except ConnectionFailed as e:
                    errors.append(str(e))
                    last = e
                    continue
                try:
                    result = await attempt(conn)
                except _Final as e:
                    self._pool.release(address, conn)
                    raise e.error from None
                except (ServerError, ConnectionFailed) as e:
                    self._pool.release(address, conn)
                    if not e.retryable:
                        raise
                    errors.append(f"{address}: {e}")
                    last = e
                    continue
                except BaseException:
                    conn.close()
                    raise
                self._pool.release(address, conn)
                return result
        code = last.code if last is not None else ErrorCode.UNAVAILABLE
        raise Unavailable(code, f"{what} failed on every server: " + "; ".join(errors[-6:]))


async def _settle(d: defer.Deferred[Any] | None) -> None:
    """
    Wait for C{d}, whatever its outcome: it is no longer wanted, but what
    it does must be over.
    """
    if d is not None:
        try:
            await d
        except Exception:
            pass


class _Final(Exception):
    """
    Wraps an error that ends a request at once, without trying elsewhere.
    """

    def __init__(self, error: KoboldError) -> None:
        self.error = error
