"""
Metadata operations per second on PostgreSQL: the store against a bare
txpostgres loop doing the same SQL on the same server, in the same run.

  - put: what a put commits (find the namespace, retire the key's live
    version, insert the file row and its replica row), one transaction;
  - stat: what a stat reads (namespace, live file row, its replicas).

The bare loop sends hand-written SQL with the same statements and round
trips through a txpostgres ConnectionPool of the same size; the store adds
what it is for: SQLAlchemy statements and result processing, retries,
reconnection, and a pg_notify per put (sent with its COMMIT) so other
servers hear of it.

    bash .ci/postgres.sh .venv/bin/python benchmarks/metadata.py
    python benchmarks/metadata.py --url postgresql://user@host/db

Each figure is the median of --repeat runs of --ops operations with
--concurrency operations in flight.  Output: a table, then a JSON line per
figure with its ratio to the bare loop.  The database given is used only to
create and drop a scratch database.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from functools import partial
from typing import Any, Awaitable, Callable

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)

import psycopg2  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from txpostgres.txpostgres import ConnectionPool  # noqa: E402

from koboldfs.metadata.pgstore import PostgresStore, libpq_dsn  # noqa: E402

SHA = "0" * 64

PUT_SQL = (
    (
        "SELECT id, name, created, replicas, min_copies, url_template FROM namespaces"
        " WHERE name = %(ns)s"
    ),
    (
        "UPDATE files SET state = 'deleted', deleted = %(now)s WHERE namespace_id = %(ns_id)s"
        " AND key = %(key)s AND state = 'live' RETURNING id"
    ),
    "SELECT id FROM files WHERE namespace_id = %(ns_id)s AND key = %(key)s AND state = 'live'",
    (
        "INSERT INTO files (fid, namespace_id, key, size, sha256, created, path, state)"
        " VALUES (%(fid)s, %(ns_id)s, %(key)s, 4096, %(sha)s, %(now)s, %(path)s, 'live')"
        " RETURNING id"
    ),
    (
        "INSERT INTO replicas (file_id, server, state, created)"
        " VALUES (%(file_id)s, 'bench', 'ok', %(now)s)"
    ),
)
STAT_SQL = (
    PUT_SQL[0],
    (
        "SELECT id, fid, key, size, sha256, created, path FROM files"
        " WHERE namespace_id = %(ns_id)s AND key = %(key)s AND state = 'live'"
    ),
    "SELECT server FROM replicas WHERE file_id = %(file_id)s AND state = 'ok'",
)


def bare_put(cursor: Any, ns: str, ns_id: int, key: str) -> Any:
    return _steps(
        cursor,
        PUT_SQL,
        {
            "ns": ns,
            "ns_id": ns_id,
            "key": key,
            "now": time.time(),
            "fid": uuid.uuid4().hex,
            "sha": SHA,
            "path": "files/00/00/x",
        },
    )


def bare_stat(cursor: Any, ns: str, ns_id: int, key: str) -> Any:
    return _steps(cursor, STAT_SQL, {"ns": ns, "ns_id": ns_id, "key": key})


@defer.inlineCallbacks
def _steps(cursor: Any, statements: tuple[str, ...], params: dict[str, Any]) -> Any:
    for sql in statements:
        yield cursor.execute(sql, params)
        if cursor.description is not None:
            rows = cursor.fetchall()
            if "RETURNING id" in sql and rows:
                params["file_id"] = rows[0][0]
            elif sql.startswith("SELECT id, fid") and rows:
                params["file_id"] = rows[0][0]


async def store_put(store: PostgresStore, ns: str, i: int) -> Any:
    return await store.add_file(
        ns, f"k{i}", uuid.uuid4().hex, "files/00/00/x", 4096, SHA, time.time(), "bench"
    )


async def store_stat(store: PostgresStore, ns: str, i: int) -> Any:
    return await store.lookup(ns, f"k{i}")


async def pool_put(pool: ConnectionPool, ns: str, ns_id: int, i: int) -> Any:
    return await pool.runInteraction(bare_put, ns, ns_id, f"k{i}")


async def pool_stat(pool: ConnectionPool, ns: str, ns_id: int, i: int) -> Any:
    return await pool.runInteraction(bare_stat, ns, ns_id, f"k{i}")


async def rate(op: Callable[[int], Awaitable[Any]], ops: int, concurrency: int) -> float:
    """
    Operations per second running C{op(0..ops-1)}, C{concurrency} at once.
    """
    numbers = iter(range(ops))

    async def worker() -> None:
        for i in numbers:
            await op(i)

    start = time.perf_counter()
    await defer.gatherResults(
        [defer.ensureDeferred(worker()) for _ in range(concurrency)], consumeErrors=True
    )
    return ops / (time.perf_counter() - start)


async def bench(reactor: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    admin = psycopg2.connect(libpq_dsn(args.url))
    admin.autocommit = True
    scratch = f"kobold_bench_{os.getpid()}"
    admin.cursor().execute(f"CREATE DATABASE {scratch}")
    base = args.url.split("?")[0].rsplit("/", 1)[0]
    url = f"{base}/{scratch}"
    store = PostgresStore(url, reactor, poolSize=args.pool)
    bare = ConnectionPool(None, libpq_dsn(url), min=args.pool)
    results: dict[str, list[float]] = {}
    try:
        await store.start()
        await bare.start()
        for round_ in range(args.repeat):
            ns_store, ns_bare = f"s{round_}", f"b{round_}"
            await store.namespace(ns_store, time.time())
            ns_id = (await store.namespace(ns_bare, time.time())).id

            ops = {
                "put": (
                    partial(store_put, store, ns_store),
                    partial(pool_put, bare, ns_bare, ns_id),
                ),
                "stat": (
                    partial(store_stat, store, ns_store),
                    partial(pool_stat, bare, ns_bare, ns_id),
                ),
            }
            # Alternate which goes first, so neither always meets a warmer server.
            for name, (ours, theirs) in ops.items():
                order = [("store", ours), ("bare", theirs)]
                for who, op in order if round_ % 2 == 0 else order[::-1]:
                    results.setdefault(f"{name} {who}", []).append(
                        await rate(op, args.ops, args.concurrency)
                    )
    finally:
        await store.stop()
        bare.close()
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {scratch}")
        admin.close()
    figures = []
    for name in ("put", "stat"):
        ours = statistics.median(results[f"{name} store"])
        theirs = statistics.median(results[f"{name} bare"])
        figures.append(
            {
                "figure": f"metadata {name}",
                "unit": "ops/s",
                "store": ours,
                "bare_txpostgres": theirs,
                "ratio": ours / theirs,
                "pool": args.pool,
                "concurrency": args.concurrency,
            }
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("KOBOLDFS_TEST_POSTGRES_URL"))
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not args.url:
        parser.error("no --url, and KOBOLDFS_TEST_POSTGRES_URL is not set")

    async def run(reactor: Any) -> None:
        report(await bench(reactor, args))

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


def report(figures: list[dict[str, Any]]) -> None:
    print(f"{'figure':<18}{'store':>10}{'bare':>10}{'ratio':>8}  unit")
    for fig in figures:
        print(
            f"{fig['figure']:<18}{fig['store']:>10.0f}{fig['bare_txpostgres']:>10.0f}"
            f"{fig['ratio']:>8.2f}  {fig['unit']}"
        )
    for fig in figures:
        print(json.dumps(fig))


if __name__ == "__main__":
    main()
