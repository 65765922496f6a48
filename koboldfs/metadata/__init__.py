"""
The cluster's shared metadata: namespaces, files, replicas and servers.

L{store_from_url} picks the store for a database URL.  The operations
themselves are written once, as units (L{koboldfs.metadata.units}) kept
with the tables they work on; each store is only a driver that runs them.
What stores tell their listeners is in L{koboldfs.metadata.events}.
"""

from __future__ import annotations

from typing import Any

from koboldfs.interfaces import IMetadataStore

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
