"""
The metadata of client transactions (L{ITransactionStore}), one suite run
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
import uuid

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from koboldfs.errors import ErrorCode, TransactionError
from koboldfs.interfaces import ITransactionStore
from koboldfs.metadata import store_from_url
from koboldfs.metadata.events import FILE_ADDED
from koboldfs.test.pgcluster import PostgresMixin

_POSTGRES_URL = os.environ.get("KOBOLDFS_TEST_POSTGRES_URL")


class TransactionStoreTestsMixin:
    """
    What every store does with transactions.  Times are made up: the
    store takes them as given.
    """

    url: str

    async def store(self) -> ITransactionStore:
        store = store_from_url(self.url, reactor)
        self.addCleanup(store.stop)  # type: ignore[attr-defined]
        await store.start()
        return store  # type: ignore[return-value]

    async def put(self, store, txn, key, now=10.0, server="a", expires=100.0):
        fid = uuid.uuid4().hex
        info, discarded = await store.txn_put(
            txn, "ns", key, fid, f"p/{fid}", 3, "0" * 64, now, server, expires
        )
        return info, discarded

    async def begin(self, store, now=1.0, expires=100.0) -> str:
        txn = uuid.uuid4().hex
        await store.begin_txn(txn, "ns", now, expires)
        return txn

    async def assertRefused(self, code: ErrorCode, d) -> None:
        try:
            await d
        except TransactionError as e:
            self.assertEqual(e.code, code)  # type: ignore[attr-defined]
        else:
            self.fail(f"not refused with {code.name}")  # type: ignore[attr-defined]

    async def test_interface(self) -> None:
        store = await self.store()
        self.assertTrue(verifyObject(ITransactionStore, store))  # type: ignore[attr-defined]

    async def test_commit_publishes_at_once(self) -> None:
        """
        Pending files are invisible until commit, which publishes them all,
        retires the versions they replace and applies the deletes.
        """
        store = await self.store()
        old = await store.add_file("ns", "a", "f" * 32, "p/old", 1, "1" * 64, 1.0, "a")
        await store.add_file("ns", "gone", "e" * 32, "p/gone", 1, "1" * 64, 1.0, "a")
        txn = await self.begin(store)
        a, _ = await self.put(store, txn, "a")
        b, _ = await self.put(store, txn, "b")
        self.assertEqual(await store.txn_delete(txn, "ns", "gone", 10.0, 100.0), (True, []))
        self.assertEqual(await store.txn_delete(txn, "ns", "never", 10.0, 100.0), (False, []))
        self.assertEqual((await store.lookup("ns", "a")).fid, old.fid)
        self.assertIsNone(await store.lookup("ns", "b"))
        self.assertEqual(await store.list_keys("ns", "", None, 10), ["a", "gone"])
        # The transaction sees its own writes.
        self.assertEqual((await store.txn_lookup(txn, "ns", "b")).fid, b.fid)
        self.assertEqual((await store.txn_lookup(txn, "ns", "b")).replicas, ("a",))
        self.assertIsNone(await store.txn_lookup(txn, "ns", "gone"))
        later = await store.add_file("ns", "later", "d" * 32, "p/later", 1, "1" * 64, 15.0, "a")
        heard = []
        store.subscribe(lambda event, payload: heard.append((event, payload["id"])))
        commit = await store.txn_commit(txn, 20.0, 200.0, False)
        self.assertEqual(len(commit.published), 2)
        self.assertEqual(len(commit.retired), 2)
        self.assertEqual(heard, [(FILE_ADDED, min(commit.published))])
        published = await store.lookup("ns", "a")
        self.assertEqual((published.fid, published.replicas), (a.fid, ("a",)))
        # Published under new ids, after every file live before: replicator
        # cursors that did not hear of the commit still reach them.
        b_id = (await store.lookup("ns", "b")).id
        self.assertEqual(sorted(commit.published), [published.id, b_id])
        self.assertGreater(min(commit.published), later.id)
        missing = await store.missing_replicas("b", later.id, 10)
        self.assertEqual(sorted(f.key for f in missing), ["a", "b"])
        self.assertEqual(await store.list_keys("ns", "", None, 10), ["a", "b", "later"])
        # Retried after a lost answer: done already.
        self.assertTrue((await store.txn_commit(txn, 21.0, 200.0, False)).already)
        # The retired version waits for the replicator, as after a put.
        self.assertIn(old.id, [f.id for f in await store.deleted_files("a", 0, 10)])

    async def test_put_again_discards(self) -> None:
        """
        A second put of a key in one transaction discards the first's
        pending file; a delete after a put discards it too.
        """
        store = await self.store()
        txn = await self.begin(store)
        first, _ = await self.put(store, txn, "k")
        second, discarded = await self.put(store, txn, "k")
        self.assertEqual([f.id for f in discarded], [first.id])
        found, discarded = await store.txn_delete(txn, "ns", "k", 10.0, 100.0)
        self.assertTrue(found)
        self.assertEqual([f.id for f in discarded], [second.id])
        deleted = {f.id for f in await store.deleted_files("a", 0, 10)}
        self.assertEqual(deleted, {first.id, second.id})
        await store.txn_commit(txn, 20.0, 200.0, False)
        self.assertIsNone(await store.lookup("ns", "k"))

    async def test_abort(self) -> None:
        """
        Abort turns pending files into deleted ones, for reclaiming, and
        forgets the transaction: it can no longer commit; aborting again
        does nothing.
        """
        store = await self.store()
        txn = await self.begin(store)
        a, _ = await self.put(store, txn, "a")
        discarded = await store.txn_abort(txn, 30.0)
        self.assertEqual([(f.id, f.replicas) for f in discarded], [(a.id, ("a",))])
        self.assertEqual(await store.txn_abort(txn, 31.0), [])
        await self.assertRefused(ErrorCode.TXN_UNKNOWN, store.txn_commit(txn, 32.0, 200.0, False))
        self.assertIsNone(await store.lookup("ns", "a"))
        # Reclaimed like any deleted file: then no row is left.
        await store.remove_replica(a.id, "a")
        self.assertTrue(await store.purge_file(a.id))

    async def test_votes(self) -> None:
        """
        A transaction is prepared once every pending file is vouched for;
        then it takes no more changes, and only then does a two-phase
        commit go through.
        """
        store = await self.store()
        txn = await self.begin(store)
        a, _ = await self.put(store, txn, "a", server="a")
        b, _ = await self.put(store, txn, "b", server="b")
        await self.assertRefused(ErrorCode.TXN_STATE, store.txn_commit(txn, 20.0, 200.0, True))
        state, pending = await store.txn_pending(txn, 11.0)
        self.assertEqual((state, sorted(f.id for f, _ in pending)), ("open", sorted([a.id, b.id])))
        vote = await store.txn_vote(txn, "a", [a.id], 12.0, 500.0)
        self.assertEqual((vote.state, vote.remaining), ("open", 1))
        vote = await store.txn_vote(txn, "b", [b.id], 12.0, 500.0)
        self.assertEqual((vote.state, vote.remaining), ("prepared", 0))
        state, pending = await store.txn_pending(txn, 13.0)
        self.assertEqual(sorted(voted for _, voted in pending), ["a", "b"])
        await self.assertRefused(ErrorCode.TXN_STATE, self.put(store, txn, "c"))
        # Prepared: past the open expiry, it is kept until its own.
        self.assertEqual(await store.expire_txns(150.0, 10), [])
        commit = await store.txn_commit(txn, 160.0, 900.0, True)
        self.assertEqual(len(commit.published), 2)

    async def test_concurrent_votes(self) -> None:
        """
        Two servers voting at the same moment, each on its own store: the
        later vote sees the earlier, and the transaction is prepared.
        """
        store, other = await self.store(), await self.store()
        for _ in range(3):
            txn = await self.begin(store)
            a, _ = await self.put(store, txn, "a", server="a")
            b, _ = await self.put(store, txn, "b", server="b")
            votes = await gatherResults(
                [
                    ensureDeferred(store.txn_vote(txn, "a", [a.id], 12.0, 500.0)),
                    ensureDeferred(other.txn_vote(txn, "b", [b.id], 12.0, 500.0)),
                ]
            )
            self.assertEqual(sorted(v.remaining for v in votes), [0, 1])
            state, _ = await store.txn_pending(txn, 13.0)
            self.assertEqual(state, "prepared")

    async def test_expiry(self) -> None:
        """
        An open transaction past its expiry is refused and collected; a
        committed one is forgotten at its own.
        """
        store = await self.store()
        silent = await self.begin(store)
        s, _ = await self.put(store, silent, "s", expires=50.0)
        done = await self.begin(store)
        await self.put(store, done, "d")
        await store.txn_commit(done, 20.0, 80.0, False)
        await self.assertRefused(ErrorCode.TXN_UNKNOWN, self.put(store, silent, "t", now=60.0))
        discarded = await store.expire_txns(60.0, 10)
        self.assertEqual([f.id for f in discarded], [s.id])
        await self.assertRefused(ErrorCode.TXN_UNKNOWN, store.txn_lookup(silent, "ns", "s"))
        self.assertEqual(await store.expire_txns(90.0, 10), [])
        await self.assertRefused(ErrorCode.TXN_UNKNOWN, store.txn_commit(done, 91.0, 99.0, False))
        self.assertIsNotNone(await store.lookup("ns", "d"))

    async def test_concurrent_commits(self) -> None:
        """
        Two transactions writing the same keys: the last commit wins every
        key, and each commit is whole.
        """
        store = await self.store()
        one, two = await self.begin(store), await self.begin(store)
        mine = {}
        for txn in (one, two):
            for key in ("x", "y"):
                info, _ = await self.put(store, txn, key)
                mine[txn, key] = info.fid
        await store.txn_commit(two, 20.0, 200.0, False)
        await store.txn_commit(one, 21.0, 200.0, False)
        for key in ("x", "y"):
            self.assertEqual((await store.lookup("ns", key)).fid, mine[one, key])


class SQLiteTransactionStoreTests(TransactionStoreTestsMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.url = f"sqlite:///{os.path.abspath(self.mktemp())}/meta.sqlite"


class PostgresTransactionStoreTests(PostgresMixin, TransactionStoreTestsMixin, unittest.TestCase):
    if _POSTGRES_URL is None:
        skip = "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL"

    async def setUp(self) -> None:  # type: ignore[override]
        assert _POSTGRES_URL is not None
        self.url = await self.freshDatabase(_POSTGRES_URL)
