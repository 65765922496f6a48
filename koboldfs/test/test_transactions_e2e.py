"""
End-to-end tests of client transactions: real C{twistd koboldfs}
processes on loopback, the blocking L{TransactionalClientPool} in the
C{transaction} package's transactions, beside a SQLAlchemy session.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import threading
from typing import Any

import transaction
from sqlalchemy import create_engine, text
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from koboldfs.client import TransactionalClientPool
from koboldfs.errors import TransactionError
from koboldfs.test.cluster import CHECKOUT, POSTGRES_URL, ClusterMixin, ServerProcess
from koboldfs.test.pgcluster import create_database, drop_database
from koboldfs.test.test_end_to_end import files_on_disk
from koboldfs.test.support import eventually


class _KillOnVote:
    """
    A participant voting after KoboldFS (its sort key is later) that kills
    a server while voting: the crash between vote and finish.
    """

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.transaction_manager = transaction.manager

    def abort(self, txn: object) -> None:
        pass

    tpc_begin = commit = tpc_finish = tpc_abort = abort

    def tpc_vote(self, txn: object) -> None:
        self.server.kill()

    def sortKey(self) -> str:
        return "zzz-kill-on-vote"


class TransactionsMixin(ClusterMixin):
    """
    The tests, on the metadata database that L{database} makes.
    """

    timeout = 180

    async def database(self) -> str:
        raise NotImplementedError

    async def cluster(self, *names: str, extra: tuple[str, ...] = ()) -> list[ServerProcess]:
        self.db = await self.database()
        return [await self.startServer(name, db=self.db, extra=extra) for name in names]

    def rows(self, table: str) -> int:
        engine = _engine(self.db)
        try:
            with engine.connect() as connection:
                return connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
        finally:
            engine.dispose()

    async def pool(
        self, servers: list[ServerProcess], **options: object
    ) -> TransactionalClientPool:
        # Made in a thread: a blocking client refuses the reactor's.
        addresses = [s.address for s in servers]
        pool = await deferToThread(TransactionalClientPool, "demo", addresses, **options)
        self.addCleanup(lambda: deferToThread(pool.close))
        return pool

    async def test_commit_publishes_at_once(self) -> None:
        """
        A reader polling while a transaction commits six files sees none
        of them, then all: never some.
        """
        servers = await self.cluster("a", "b")
        pool = await self.pool(servers)
        seen: list[int] = []
        done = threading.Event()

        def reader() -> None:
            while not done.is_set():
                seen.append(len(pool.list("batch/")))
            seen.append(len(pool.list("batch/")))

        def writer() -> None:
            try:
                with transaction.manager:
                    for i in range(6):
                        pool.put(f"batch/{i}", f"file {i}".encode())
                    self.assertEqual(pool.list("batch/"), [f"batch/{i}" for i in range(6)])
            finally:
                done.set()

        await defer.gatherResults([deferToThread(reader), deferToThread(writer)])
        self.assertEqual(set(seen) - {0, 6}, set())
        self.assertEqual(seen[-1], 6)
        self.assertEqual(self.rows("transactions"), 1)  # kept, committed, for retries

    async def test_abort_leaves_nothing(self) -> None:
        """
        An aborted transaction leaves no file, no row and no bytes on any
        disk once the servers cleaned up.
        """
        servers = await self.cluster("a", "b", extra=("--replicate-interval=1",))
        pool = await self.pool(servers)

        def work() -> None:
            with self.assertRaises(ZeroDivisionError):
                with transaction.manager:
                    for i in range(4):
                        pool.put(f"gone/{i}", b"x" * 1000)
                    self.assertEqual(len(pool.list("gone/")), 4)
                    1 / 0  # noqa: B018 - the application fails mid-transaction
            self.assertEqual(pool.list("gone/"), [])

        await deferToThread(work)
        self.assertEqual(self.rows("transactions"), 0)
        await eventually(
            lambda: not any(files_on_disk(s) for s in servers) and self.rows("files") == 0,
            what="discarded uploads reclaimed",
        )
        self.assertEqual(self.rows("txn_keys") + self.rows("replicas"), 0)

    async def test_concurrent_same_keys(self) -> None:
        """
        Two transactions writing the same two keys at once: one wins both,
        and a reader never sees one key from each.
        """
        servers = await self.cluster("a", "b")
        pool = await self.pool(servers)
        bodies = {tag: tag.encode() * 100 for tag in ("one", "two")}
        tags = {hashlib.sha256(body).hexdigest(): tag for tag, body in bodies.items()}
        uploaded = threading.Barrier(2)
        done = threading.Event()
        mixtures: list[tuple[str, str]] = []

        def writer(tag: str) -> None:
            with transaction.manager:
                pool.put("pair/1", bodies[tag])
                pool.put("pair/2", bodies[tag])
                uploaded.wait(60)

        def version(key: str) -> str | None:
            found = pool.stat(key)
            return None if found is None else tags[found.sha256]

        def reader() -> None:
            while not done.is_set():
                first, second, again = version("pair/1"), version("pair/2"), version("pair/1")
                # pair/1 unchanged around the read of pair/2: both were of
                # the same committed state.
                if first == again and first != second:
                    mixtures.append((first, second))

        reading = deferToThread(reader)
        try:
            await defer.gatherResults(
                [deferToThread(writer, "one"), deferToThread(writer, "two")], consumeErrors=True
            )
        finally:
            done.set()
            await reading
        self.assertEqual(mixtures, [])
        final = await deferToThread(lambda: (version("pair/1"), version("pair/2")))
        self.assertIn(final, [("one", "one"), ("two", "two")])

    async def test_server_killed_between_vote_and_finish(self) -> None:
        """
        Two-phase: a server holding pending uploads dies after the votes;
        the commit completes through the other, and once back, the dead
        one serves its files.
        """
        a, b = await self.cluster("a", "b")
        pool = await self.pool([a, b], twophase=True)
        bodies = {f"doc/{i}": f"document {i}".encode() * 50 for i in range(4)}

        def work() -> None:
            with transaction.manager:
                for key, body in bodies.items():
                    pool.put(key, body)
                transaction.get().join(_KillOnVote(a))
            self.assertEqual(pool.list("doc/"), sorted(bodies))

        await deferToThread(work)
        self.assertIsNotNone(a.process.poll())  # type: ignore[union-attr]
        held = await deferToThread(lambda: {k: pool.stat(k).servers for k in bodies})
        self.assertIn(("a",), held.values())  # the dead one held some
        await a.start()

        def read_all() -> dict[str, bytes]:
            found = {}
            for key in bodies:
                out = io.BytesIO()
                self.assertTrue(pool.get(key, out))
                found[key] = out.getvalue()
            return found

        self.assertEqual(await deferToThread(read_all), bodies)


class OnceTestsMixin(TransactionsMixin):
    """
    Tests that depend on the database no more than the metadata suite
    (test_txn_metadata) checks on every store: run on SQLite only.
    """

    async def test_client_killed(self) -> None:
        """
        A client killed in mid-transaction leaves pending files that the
        server collects after its --pending-timeout.
        """
        (server,) = await self.cluster("a", extra=("--pending-timeout=2",))
        script = (
            "import sys, time\n"
            "from koboldfs.client import TransactionalClientPool\n"
            "pool = TransactionalClientPool('demo', servers=[sys.argv[1]])\n"
            "pool.put('orphan', b'x' * 100000)\n"
            "print('uploaded', flush=True)\n"
            "time.sleep(600)\n"
        )
        client = subprocess.Popen(
            [sys.executable, "-c", script, server.address],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": CHECKOUT},
        )
        self.addCleanup(client.wait)
        self.addCleanup(client.kill)
        line = await deferToThread(client.stdout.readline)  # type: ignore[union-attr]
        client.stdout.close()  # type: ignore[union-attr]
        self.assertEqual(line, b"uploaded\n")
        self.assertEqual(len(files_on_disk(server)), 1)
        self.assertEqual(self.rows("files"), 1)
        client.kill()

        def collected() -> bool:
            rows = self.rows("files") + self.rows("transactions") + self.rows("txn_keys")
            return not files_on_disk(server) and rows == 0

        await eventually(collected, what="the pending upload collected")

    async def test_sqlalchemy_session(self) -> None:
        """
        A SQLAlchemy session in the same transaction commits or aborts
        with the files; a failed KoboldFS vote keeps the row out too.
        """
        from sqlalchemy import Column, Integer, String
        from sqlalchemy.orm import declarative_base, sessionmaker
        from zope.sqlalchemy import register

        servers = await self.cluster("a")
        pool = await self.pool(servers)
        base = declarative_base()

        class Row(base):  # type: ignore[misc,valid-type]
            __tablename__ = "rows"
            id = Column(Integer, primary_key=True)
            key = Column(String, unique=True)

        engine = create_engine(f"sqlite:///{os.path.abspath(self.mktemp())}.sqlite")
        base.metadata.create_all(engine)
        make_session = sessionmaker(bind=engine)

        def store(key: str) -> None:
            session = make_session()
            register(session)
            session.add(Row(key=key))
            pool.put(key, key.encode())

        def keys() -> list[str]:
            with engine.connect() as connection:
                return sorted(connection.execute(text("SELECT key FROM rows")).scalars())

        def work() -> None:
            with transaction.manager:
                store("kept")
            with self.assertRaises(RuntimeError):
                with transaction.manager:
                    store("dropped")
                    raise RuntimeError("the view failed")
            # The vote fails: the pending copy is gone from the disk.
            with self.assertRaises(TransactionError):
                with transaction.manager:
                    store("unvouched")
                    _remove_pending(servers[0], self.db, "unvouched")
            self.assertEqual(keys(), ["kept"])
            self.assertEqual(pool.list(), ["kept"])

        try:
            await deferToThread(work)
        finally:
            engine.dispose()


def _engine(url: str) -> Any:
    """
    An engine on the servers' metadata database, with the driver they use.
    """
    return create_engine(re.sub(r"^postgresql://", "postgresql+psycopg2://", url))


def _remove_pending(server: ServerProcess, db: str, key: str) -> None:
    """
    Delete the bytes of C{key}'s pending upload from C{server}'s disk.
    """
    engine = _engine(db)
    try:
        with engine.connect() as connection:
            path = connection.execute(
                text("SELECT path FROM files WHERE key = :key AND state = 'pending'"), {"key": key}
            ).scalar_one()
    finally:
        engine.dispose()
    os.remove(os.path.join(server.data, path))


class SQLiteTransactionsTests(OnceTestsMixin, TestCase):
    async def database(self) -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        return f"sqlite:///{base}/shared.sqlite"


class PostgresTransactionsTests(TransactionsMixin, TestCase):
    if POSTGRES_URL is None:
        skip = "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL"

    async def database(self) -> str:
        assert POSTGRES_URL is not None
        url = await create_database(POSTGRES_URL)
        self.addCleanup(lambda: defer.ensureDeferred(drop_database(url)))
        return url


class DocsExampleTests(ClusterMixin, TestCase):
    """
    The example of docs/transactions.md runs as printed (against a server
    on a free port instead of 9876) and prints what the page says.
    """

    timeout = 120

    async def test_example(self) -> None:
        server = await self.startServer("a")
        with open(os.path.join(CHECKOUT, "docs", "transactions.md")) as f:
            page = f.read()
        code = re.search(r"```python\n(.*?)```", page, re.DOTALL).group(1)  # type: ignore[union-attr]
        expected = re.search(r"It prints:\n\n```\n(.*?)```", page, re.DOTALL).group(1)  # type: ignore[union-attr]
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        result = await deferToThread(
            subprocess.run,
            [sys.executable, "-c", code.replace("127.0.0.1:9876", server.address)],
            cwd=workdir,
            env={**os.environ, "PYTHONPATH": CHECKOUT},
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        self.assertEqual(result.stdout.decode(), expected)
