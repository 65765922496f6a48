"""
Unit tests of client transactions: L{DeferredTransaction} against two
servers in memory (L{MemoryCluster}: the real request handling and
metadata, on one fake clock), and the data manager's place in the
C{transaction} package with a fake transaction on the wire side.
"""

from __future__ import annotations

import io
import os

import transaction
from transaction.interfaces import NoTransaction
from twisted.trial.unittest import SynchronousTestCase

from twisted.internet.task import Clock
from twisted.python.usage import UsageError

from koboldfs.errors import ErrorCode, TransactionError, Unavailable
from koboldfs.pool import ClientPool
from koboldfs.protocol import Op, check_fields
from koboldfs.replicator import Replicator
from koboldfs.config import ServerConfig
from koboldfs.tap import Options
from koboldfs.testing import InlineThreadPool, MemoryCluster, _MemoryEndpoint
from koboldfs.txnclient import DeferredTransaction, TransactionalClientPool, _DataManager
from koboldfs.txnhandler import TransactionSweeper, sweep_interval


class TransactionTests(SynchronousTestCase):
    """
    A transaction's life on two servers sharing metadata.
    """

    def setUp(self) -> None:
        self.cluster = MemoryCluster(os.path.abspath(self.mktemp()), ["a", "b"])
        self.addCleanup(self.cluster.stop)
        self.by_address = {s.address: s for s in self.cluster.servers.values()}

    def client(self, servers: list[str] | None = None) -> ClientPool:
        client = ClientPool(
            "ns",
            servers or sorted(self.by_address),
            self.cluster.reactor,
            endpoint_factory=lambda address: _MemoryEndpoint(self.by_address[address]),
            threadpool=InlineThreadPool(),
        )
        self.addCleanup(lambda: self.cluster.flush(client.close()))
        return client

    def begin(self, client: ClientPool) -> DeferredTransaction:
        return self.cluster.flush(DeferredTransaction.begin(client))

    def read(self, client: ClientPool, key: str, txn: DeferredTransaction | None = None) -> bytes:
        out = io.BytesIO()
        found = self.cluster.flush((txn or client).get(key, out))
        return out.getvalue() if found else b""

    def reclaim(self) -> None:
        """
        A replicator's pass on every server.
        """
        for server in self.cluster.servers.values():
            self.cluster.flush(Replicator(server.node, self.cluster.reactor, 10).sweep())

    def disk(self) -> list[str]:
        found = []
        for server in self.cluster.servers.values():
            for _dirpath, _, names in os.walk(os.path.join(server.storage.root, "files")):
                found += names
        return found

    def test_own_writes_only(self) -> None:
        """
        Pending uploads and deletes are seen by their transaction alone,
        through either server, and by everyone after commit.
        """
        client = self.client()
        flush = self.cluster.flush
        flush(client.put("old", b"old"))
        txn = self.begin(client)
        flush(txn.put("x", b"x1"))
        flush(txn.put("y", b"y1"))
        self.assertTrue(flush(txn.delete("old")))
        self.assertFalse(flush(txn.delete("never")))
        for _ in range(2):  # round robin: both servers answer
            self.assertEqual(self.read(client, "x"), b"")
            self.assertEqual(self.read(client, "x", txn), b"x1")
            self.assertEqual(self.read(client, "old"), b"old")
            self.assertEqual(self.read(client, "old", txn), b"")
        self.assertIsNone(flush(client.stat("y")))
        self.assertEqual(flush(txn.stat("y")).size, 2)
        self.assertEqual(flush(client.list()), ["old"])
        self.assertEqual(flush(txn.list()), ["x", "y"])
        self.assertEqual(flush(txn.list(limit=1)), ["x"])
        flush(txn.prepare())
        flush(txn.commit())
        self.assertEqual(flush(client.list()), ["x", "y"])
        self.assertEqual(self.read(client, "y"), b"y1")
        self.assertRaises(TransactionError, txn.put, "z", b"")

    def test_abort_leaves_nothing(self) -> None:
        """
        Abort removes the pending files' bytes where they are and their
        rows; nothing of them remains once the replicators ran.
        """
        client = self.client()
        flush = self.cluster.flush
        txn = self.begin(client)
        for key in ("a", "b", "c"):
            flush(txn.put(key, key.encode()))
        self.assertEqual(len(self.disk()), 3)
        flush(txn.abort())
        # The server that took the abort removed its copies at once; the
        # other's go at its replicator's next pass.
        self.assertLess(len(self.disk()), 3)
        self.reclaim()
        self.assertEqual(self.disk(), [])
        store = self.cluster.servers["a"].store
        self.assertEqual(flush(store.deleted_files("a", 0, 10)), [])
        self.assertEqual(flush(store.deleted_files("b", 0, 10)), [])
        self.assertEqual(flush(client.list()), [])

    def test_twophase(self) -> None:
        """
        A two-phase vote asks each holder, whose votes are stored; the
        prepared transaction then commits through either server.
        """
        client = self.client()
        flush = self.cluster.flush
        txn = self.begin(client)
        flush(txn.put("a", b"1"))
        flush(txn.put("b", b"2"))
        self.assertEqual(len({v for v in txn._keys.values()}), 2)
        flush(txn.prepare(twophase=True))
        self.assertEqual(txn.state, "prepared")
        store = self.cluster.servers["b"].store
        state, pending = flush(store.txn_pending(txn.id, self.cluster.reactor.seconds()))
        self.assertEqual((state, sorted(v for _, v in pending)), ("prepared", ["a", "b"]))
        self.assertRaises(TransactionError, txn.put, "c", b"")
        only_b = self.client([self.cluster.servers["b"].address])
        flush(DeferredTransaction(only_b, txn.id).commit(twophase=True))
        self.assertEqual(flush(client.list()), ["a", "b"])

    def test_vote_fails_on_missing_copy(self) -> None:
        """
        A pending copy lost from its disk fails the vote.
        """
        client = self.client()
        flush = self.cluster.flush
        txn = self.begin(client)
        flush(txn.put("a", b"1"))
        for name in self.disk():
            for server in self.cluster.servers.values():
                for dirpath, _, names in os.walk(server.storage.root):
                    if name in names:
                        os.remove(os.path.join(dirpath, name))
        error = self.assertRaises(TransactionError, flush, txn.prepare(twophase=True))
        self.assertEqual(error.code, ErrorCode.TXN_STATE)
        self.assertIn("missing", str(error))

    def test_expiry(self) -> None:
        """
        A transaction silent for longer than the pending timeout is
        aborted by the servers' sweep, bytes and rows.
        """
        client = self.client()
        flush = self.cluster.flush
        txn = self.begin(client)
        flush(txn.put("a", b"1"))
        timeout = self.cluster.servers["a"].config.pending_timeout
        self.cluster.reactor.advance(timeout / 2)
        for server in self.cluster.servers.values():
            self.assertEqual(flush(server.node.txns.sweep()), 0)
        self.cluster.reactor.advance(timeout)
        swept = sum(flush(s.node.txns.sweep()) for s in self.cluster.servers.values())
        self.assertEqual(swept, 1)
        self.reclaim()
        self.assertEqual(self.disk(), [])
        error = self.assertRaises(TransactionError, flush, txn.commit())
        self.assertEqual(error.code, ErrorCode.TXN_UNKNOWN)


class ProtocolTests(SynchronousTestCase):
    def test_schemas(self) -> None:
        """
        The transaction requests carry a transaction id; PUT takes one.
        """
        from koboldfs.errors import ProtocolError

        self.assertRaises(ProtocolError, check_fields, Op.COMMIT, {})
        check_fields(Op.PUT, {"ns": "n", "key": "k", "txn": "0" * 32})
        self.assertRaises(ProtocolError, check_fields, Op.PUT, {"ns": "n", "key": "k", "txn": 1})


class _FakeRemote:
    """
    Stands for a L{DeferredTransaction}: records what the data manager
    asked of it.
    """

    def __init__(self, fail_vote: bool = False) -> None:
        self.id = "f" * 32
        self.state = "open"
        self.calls: list[str] = []
        self.fail_vote = fail_vote

        class client:
            namespace = "ns"

        self.client = client

    def prepare(self, twophase: bool) -> None:
        self.calls.append(f"prepare {twophase}")
        if self.fail_vote:
            raise TransactionError(ErrorCode.TXN_STATE, "no")

    def commit(self, twophase: bool) -> None:
        self.calls.append(f"commit {twophase}")
        self.state = "committed"

    def abort(self) -> None:
        self.calls.append("abort")
        self.state = "aborted"


class _FakePool:
    twophase = True

    def __init__(self) -> None:
        self.manager = transaction.TransactionManager()

    def _call(self, f, *args):
        return f(*args)


class DataManagerTests(SynchronousTestCase):
    """
    The data manager's part in the C{transaction} package's protocol.
    """

    def join(self, remote: _FakeRemote) -> tuple[_FakePool, _DataManager]:
        pool = _FakePool()
        manager = _DataManager(pool, remote)  # type: ignore[arg-type]
        pool.manager.get().join(manager)
        return pool, manager

    def test_commit(self) -> None:
        remote = _FakeRemote()
        pool, _ = self.join(remote)
        pool.manager.commit()
        self.assertEqual(remote.calls, ["prepare True", "commit True"])

    def test_failed_vote_aborts(self) -> None:
        remote = _FakeRemote(fail_vote=True)
        pool, _ = self.join(remote)
        self.assertRaises(TransactionError, pool.manager.commit)
        self.assertEqual(remote.calls, ["prepare True", "abort"])

    def test_abort(self) -> None:
        remote = _FakeRemote()
        pool, _ = self.join(remote)
        pool.manager.abort()
        self.assertEqual(remote.calls, ["abort"])

    def test_savepoint_refused(self) -> None:
        """
        A savepoint is refused, naming our data manager; an optimistic
        one (which never rolls back) is allowed.
        """
        remote = _FakeRemote()
        pool, _ = self.join(remote)
        error = self.assertRaises(TypeError, pool.manager.savepoint)
        self.assertIn("savepoints are not supported", repr(error.args))
        pool.manager.abort()
        self.assertEqual(remote.calls, ["abort"])
        remote = _FakeRemote()
        pool.manager.get().join(_DataManager(pool, remote))  # type: ignore[arg-type]
        pool.manager.savepoint(optimistic=True)
        pool.manager.commit()
        self.assertEqual(remote.calls, ["prepare True", "commit True"])

    def test_failed_finish_not_undone(self) -> None:
        """
        A commit that fails after every vote was yes is tried again, never
        turned into an abort, when the application aborts after it.
        """
        remote = _FakeRemote()
        failures = [TransactionError(ErrorCode.UNAVAILABLE, "every server down")]

        def commit(twophase: bool) -> None:
            remote.calls.append(f"commit {twophase}")
            if failures:
                raise failures.pop()
            remote.state = "committed"

        remote.commit = commit  # type: ignore[method-assign]
        pool, _ = self.join(remote)
        self.assertRaises(TransactionError, pool.manager.commit)
        pool.manager.abort()
        self.assertEqual(remote.calls, ["prepare True", "commit True", "commit True"])
        self.assertEqual(remote.state, "committed")

    def test_explicit_manager(self) -> None:
        """
        With an explicit manager and no transaction begun, reads are plain
        reads, and writes are refused by the manager.
        """
        pool = TransactionalClientPool.__new__(TransactionalClientPool)
        pool.manager = transaction.TransactionManager(explicit=True)
        self.assertIsNone(pool._current())
        self.assertRaises(NoTransaction, pool._joined)

    def test_sorts_before_sqlalchemy(self) -> None:
        _, manager = self.join(_FakeRemote())
        self.assertLess(manager.sortKey(), "~sqlalchemy:1")


class _FlakyHandler:
    def __init__(self) -> None:
        self.calls = 0

    async def sweep(self) -> int:
        self.calls += 1
        if self.calls == 1:
            raise Unavailable(ErrorCode.UNAVAILABLE, "metadata database unavailable")
        if self.calls == 2:
            raise RuntimeError("a bug")
        return 0


class SweeperTests(SynchronousTestCase):
    def test_errors_do_not_stop_it(self) -> None:
        """
        A sweep that fails (database down, or a bug) is logged, and the
        next one runs on time.
        """
        clock = Clock()
        handler = _FlakyHandler()
        sweeper = TransactionSweeper(handler, clock, sweep_interval(8))  # type: ignore[arg-type]
        sweeper.startService()
        for _ in range(3):
            clock.advance(2)
        self.assertEqual(handler.calls, 3)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.successResultOf(sweeper.stopService())
        clock.advance(10)
        self.assertEqual(handler.calls, 3)

    def test_interval(self) -> None:
        """
        A quarter of the timeout, within bounds.
        """
        self.assertEqual(sweep_interval(8), 2)
        self.assertEqual(sweep_interval(3600), 60)
        self.assertEqual(sweep_interval(0.1), 0.25)


class TimeoutOptionTests(SynchronousTestCase):
    """
    C{--pending-timeout} and C{--prepared-timeout}: positive seconds, on
    the command line or in the ini file.
    """

    def config(self, *argv: str) -> ServerConfig:
        options = Options()
        options.parseOptions(["--data", self.mktemp(), *argv])
        return options.server_config

    def test_defaults(self) -> None:
        config = self.config()
        self.assertEqual((config.pending_timeout, config.prepared_timeout), (3600, 7 * 86400))

    def test_set(self) -> None:
        config = self.config("--pending-timeout", "2", "--prepared-timeout", "60.5")
        self.assertEqual((config.pending_timeout, config.prepared_timeout), (2, 60.5))
        ini = self.mktemp()
        with open(ini, "w") as f:
            f.write("[koboldfs]\npending_timeout = 30\n")
        self.assertEqual(self.config("--config", ini).pending_timeout, 30)

    def test_bad(self) -> None:
        for bad in ("0", "-1", "soon"):
            self.assertRaises(UsageError, self.config, "--pending-timeout", bad)
            self.assertRaises(UsageError, self.config, "--prepared-timeout", bad)
