"""
The cluster's shared metadata: namespaces, files, replicas and servers.

L{store_from_url} picks the store for a database URL.  The operations
themselves are written once, as units (L{koboldfs.metadata.units}) kept
with the tables they work on; each store is only a driver that runs them.
L{Listeners} is the in-process notification that every store uses for its
own changes.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger

from koboldfs.interfaces import IMetadataStore, Listener

#: The events passed to L{IMetadataStore.subscribe} listeners.
FILE_ADDED = "file_added"
FILE_DELETED = "file_deleted"
SERVER_CHANGED = "server_changed"

_log = Logger()


class Listeners:
    """
    The listeners subscribed to a store, called on the reactor thread.  One
    that raises is logged and does not keep the others from being called,
    nor fails the change that it was told about.
    """

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """
        Call C{listener(event, payload)} from now on; return a callable that
        stops it (calling it again does nothing).
        """
        self._listeners.append(listener)
        subscribed = True

        def unsubscribe() -> None:
            nonlocal subscribed
            if subscribed:
                subscribed = False
                self._listeners.remove(listener)

        return unsubscribe

    def notify(self, event: str, payload: dict[str, Any]) -> None:
        """
        Tell every listener about C{event}.  Each gets its own copy of
        C{payload}, so that one changing it cannot mislead the next.
        """
        for listener in list(self._listeners):
            try:
                listener(event, dict(payload))
            except Exception:
                _log.failure(
                    "metadata listener {listener!r} failed on {event}",
                    listener=listener,
                    event=event,
                )


def store_from_url(url: str, reactor: Any) -> IMetadataStore:
    """
    The metadata store for database C{url}, not yet started: PostgreSQL
    gets its own store (asynchronous, and notifying other processes'
    changes); anything else SQLAlchemy knows, SQLite above all, is run in
    threads by L{SQLAlchemyStore<koboldfs.metadata.sqlstore.SQLAlchemyStore>}.

    @param reactor: provides C{IReactorTime} and C{IReactorFromThreads}.
    """
    # The scheme, read by hand: make_url refuses libpq's multi-host URLs.
    if url.partition(":")[0].partition("+")[0] in ("postgresql", "postgres"):
        # PostgreSQL: the txpostgres store, running the same queries.
        from koboldfs.metadata.pgstore import PostgresStore

        return PostgresStore(url, reactor)
    from koboldfs.metadata.sqlstore import SQLAlchemyStore

    return SQLAlchemyStore(url, reactor)
