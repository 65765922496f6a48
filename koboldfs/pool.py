"""
Client pools: clients whose connections are bounded and health-checked per
server.

L{ClientPool} is a L{DeferredClient} whose connections are held in a
L{ConnectionLimiter}: at most C{max_connections} per server at once (further
requests wait their turn instead of opening more), idle connections reused
and pinged before reuse once they have been idle for C{check_after}
seconds, and servers that refused a connection put at the back of the
order for C{down_for} seconds so that requests stop paying their connect
timeout.  The blocking twin is L{koboldfs.blocking.ClientPool}.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer

from koboldfs.deferredclient import DeferredClient
from koboldfs.connection import ClientProtocol, ConnectionCache
from koboldfs.errors import ConnectionFailed, KoboldError
from koboldfs.protocol import Op


class ConnectionLimiter:
    """
    The connections of a L{ClientPool}: wraps a L{ConnectionCache} (which
    makes and keeps the connections) with a limit per server, a liveness
    check of stale idle connections, and a record of which servers are
    unreachable.  Not a pool of clients: L{ClientPool} is that.

    A slot is taken by L{acquire} and given back by L{release}, or when a
    checked-out connection is lost (a request that fails mid-stream closes
    its connection without releasing it).
    """

    def __init__(
        self,
        inner: ConnectionCache,
        clock: Any,
        *,
        max_connections: int = 8,
        check_after: float = 30.0,
        down_for: float = 5.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._inner = inner
        self._clock = clock
        self.max_connections = max_connections
        self._check_after = check_after
        self._down_for = down_for
        self._busy: dict[str, int] = {}
        self._waiting: dict[str, deque[defer.Deferred[None]]] = {}
        self._out: dict[ClientProtocol, str] = {}
        self._used: dict[ClientProtocol, float] = {}
        self._known: set[ClientProtocol] = set()
        self._down_until: dict[str, float] = {}
        self._closed = False

    # -- what the client asks

    def healthy(self, address: str) -> bool:
        """
        Whether C{address} accepted its last connection attempt (or was
        refused more than C{down_for} seconds ago).
        """
        return self._clock.seconds() >= self._down_until.get(address, 0.0)

    def in_use(self, address: str) -> int:
        """
        Slots of C{address} taken: connections out and being made.
        """
        return self._busy.get(address, 0)

    async def acquire(self, address: str) -> ClientProtocol:
        """
        A connection to C{address} once a slot is free: an idle one (pinged
        first if stale) or a new one.

        @raise ConnectionFailed: the server could not be reached.
        """
        if self._closed:
            raise ConnectionFailed("the pool is closed")
        await self._slot(address)
        try:
            conn = await self._connection(address)
        except BaseException:
            self._free(address)
            raise
        self._out[conn] = address
        return conn

    def release(self, address: str, conn: ClientProtocol) -> None:
        """
        Give a connection back after a request, and its slot.
        """
        self._used[conn] = self._clock.seconds()
        self._inner.release(address, conn)
        # Then wake the next in line, who finds this connection idle.
        if self._out.pop(conn, None) is not None:
            self._free(address)

    def close(self) -> defer.Deferred[Any]:
        """
        Close every connection and fail every waiting request.
        """
        self._closed = True
        for waiters in self._waiting.values():
            while waiters:
                waiters.popleft().errback(ConnectionFailed("the pool is closed"))
        return self._inner.close()

    # -- slots

    def _slot(self, address: str) -> defer.Deferred[None]:
        busy = self._busy.get(address, 0)
        if busy < self.max_connections:
            self._busy[address] = busy + 1
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.setdefault(address, deque()).append(d)
        return d

    def _free(self, address: str) -> None:
        waiters = self._waiting.get(address)
        if waiters:
            # The slot passes straight to the next in line.
            waiters.popleft().callback(None)
        else:
            self._busy[address] -= 1

    # -- connections

    async def _connection(self, address: str) -> ClientProtocol:
        while True:
            try:
                conn = await self._inner.acquire(address)
            except ConnectionFailed:
                self._down_until[address] = self._clock.seconds() + self._down_for
                raise
            self._down_until.pop(address, None)
            if conn not in self._known:
                self._known.add(conn)
                conn.lost.addCallback(lambda _, conn=conn: self._lost(conn))
                return conn
            idle_since = self._used.get(conn)
            if idle_since is None or self._clock.seconds() - idle_since < self._check_after:
                return conn
            # Idle for long: the server or a middlebox may have dropped it
            # without a word.  A ping costs one round trip; a dead
            # connection would cost the request's whole timeout.
            try:
                await conn.request(Op.PING, {})
            except KoboldError:
                conn.close()
                continue
            return conn

    def _lost(self, conn: ClientProtocol) -> None:
        self._known.discard(conn)
        self._used.pop(conn, None)
        address = self._out.pop(conn, None)
        if address is not None:
            self._free(address)


class ClientPool(DeferredClient):
    """
    A L{DeferredClient} for applications that make many requests at once:
    its connections are bounded per server, reused, checked when stale,
    and unreachable servers are tried last for a while.

    Idempotent requests (get, stat, list, delete, get_url) fail over to the
    next server and are retried in rounds with exponential backoff, as with
    L{DeferredClient}; a put is re-sent only while its source can be read
    again.

    @param max_connections: most connections open to one server at once;
        more concurrent requests wait for one to be free.
    @param check_after: seconds after which an idle connection is pinged
        before it is used again.
    @param down_for: seconds a server that refused a connection is tried
        only after the others.
    """

    def __init__(
        self,
        namespace: str,
        servers: list[str] | tuple[str, ...],
        reactor: Any = None,
        *,
        max_connections: int = 8,
        check_after: float = 30.0,
        down_for: float = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(namespace, servers, reactor, **options)
        self._pool = ConnectionLimiter(  # type: ignore[assignment]
            self._pool,
            self._reactor,
            max_connections=max_connections,
            check_after=check_after,
            down_for=down_for,
        )

    @property
    def connections(self) -> ConnectionLimiter:
        """
        The pool's connections, for introspection (slots in use, health).
        """
        return self._pool  # type: ignore[return-value]

    def _order(self) -> list[str]:
        """
        The servers in turn, those found unreachable lately last.
        """
        order = super()._order()
        pool = self.connections
        return [a for a in order if pool.healthy(a)] + [a for a in order if not pool.healthy(a)]
