"""
The blocking KoboldFS client, for scripts and threaded web applications.

L{Client} is a view of L{koboldfs.client.DeferredClient}: every call is run
on a reactor in a daemon thread with C{blockingCallFromThread}, so server
choice, failover, retries and checksums exist once.  Reads from the caller's
source file and writes to its output happen in the reactor's thread pool
while the calling thread waits.  One Client may be shared by many threads.
See docs/clients.md for why this design, with measurements.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread
from twisted.python import threadable

from koboldfs.deferredclient import DeferredClient, Stat
from koboldfs.pool import ClientPool as DeferredClientPool
from koboldfs.protocol import Message, Op

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _reactor() -> Any:
    """
    The global reactor, running: started in a daemon thread on first use
    unless the application already runs it.
    """
    global _thread
    from twisted.internet import reactor

    with _lock:
        if not reactor.running and _thread is None:
            _thread = threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="koboldfs-reactor",
                daemon=True,
            )
            _thread.start()
            atexit.register(_stop, reactor)
    if reactor.running and threadable.isInIOThread():
        raise RuntimeError("koboldfs.Client blocks: in the reactor thread, use DeferredClient")
    return reactor


def _stop(reactor: Any) -> None:
    if reactor.running:
        reactor.callFromThread(reactor.stop)
        if _thread is not None:
            _thread.join(5)


class Client:
    """
    A blocking client of one namespace: the methods of
    L{DeferredClient} with their results returned instead of Deferreds.
    """

    #: The Deferred client this one is a view of.
    _factory: Any = DeferredClient

    def __init__(self, namespace: str, servers: list[str] | tuple[str, ...], **options: Any):
        self._reactor = _reactor()
        self._client: DeferredClient = self._call(
            lambda: defer.succeed(self._factory(namespace, servers, self._reactor, **options))
        )
        self.namespace = namespace
        self.servers = list(servers)

    def _call(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        return blockingCallFromThread(self._reactor, f, *args, **kwargs)

    def ping(self) -> bool:
        """True when a server answers."""
        return self._call(self._client.ping)

    def put(self, key: str, source: Any) -> bool:
        """Store C{source} (a path, bytes, or a binary file) under C{key}."""
        return self._call(self._client.put, key, source)

    def get(self, key: str, output: Any) -> bool:
        """Write the file to C{output}; False if there is no such key."""
        return self._call(self._client.get, key, output)

    def get_url(self, key: str, expires: int | None = None) -> str | None:
        """An HTTP URL of a live replica, or None if there is no such key."""
        return self._call(self._client.get_url, key, expires)

    def delete(self, key: str) -> bool:
        """Delete C{key}; False if there was no such key."""
        return self._call(self._client.delete, key)

    def stat(self, key: str) -> Stat | None:
        """Size, checksum, creation time and holders; None if absent."""
        return self._call(self._client.stat, key)

    def list(self, prefix: str = "", after: str | None = None, limit: int = 1000) -> list[str]:
        """Up to C{limit} keys starting with C{prefix}, after C{after}."""
        return self._call(self._client.list, prefix, after, limit)

    def request(self, op: Op, fields: dict[str, Any], retries: int | None = None) -> Message:
        """
        L{DeferredClient.request}: a request answered by one OK frame, to
        any server; the reply.
        """
        return self._call(self._client.request, op, fields, retries=retries)

    def close(self) -> None:
        """Close this client's connections."""
        self._call(self._client.close)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClientPool(Client):
    """
    The blocking twin of L{koboldfs.pool.ClientPool}, for threaded web
    applications: every worker thread shares one bounded, health-checked
    set of connections per server (all requests run on the reactor thread,
    which serialises the pool's bookkeeping).  Options as
    L{koboldfs.pool.ClientPool}: C{max_connections}, C{check_after},
    C{down_for}, and those of L{DeferredClient}.
    """

    _factory = DeferredClientPool
