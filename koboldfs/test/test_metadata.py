"""
Tests for the metadata stores: one suite, run against every database.
"""

from __future__ import annotations

import os
import sqlite3
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Callable, Generator, cast

import psycopg2
from psycopg2.extensions import parse_dsn
from sqlalchemy import Engine, create_engine, delete, func, select, update
from sqlalchemy.engine import make_url
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, inlineCallbacks
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from koboldfs.errors import ErrorCode, Unavailable
from koboldfs.interfaces import FileInfo, IMetadataStore, ServerInfo
from koboldfs.metadata import store_from_url
from koboldfs.metadata.events import StoreListeners
from koboldfs.metadata.pgstore import (
    DEAD_PEER_DEFAULTS,
    POOL_SIZE,
    SCHEMA_LOCK,
    PostgresStore,
    libpq_dsn,
)
from koboldfs.metadata.health import Health
from koboldfs.metadata.schema import (
    SCHEMA_VERSION,
    NewerSchema,
    copy_queue,
    file_counts,
    files,
    metadata,
    replicas,
    schema_version,
)
from koboldfs.metadata.sqlstore import SQLAlchemyStore
from koboldfs.metadata.txpostgres_overrides import CHECKED_WITH
from koboldfs.test import pgcluster
from koboldfs.test.pgcluster import PostgresCluster, PostgresMixin
from koboldfs.test.support import free_port, sleep, until_available

SHA = "ab" * 32
T0 = 1_700_000_000.25

InlineTest = Generator[Deferred[Any], Any, None]


def adminEngine(url: str) -> Engine:
    """
    An engine of the test's own on a store's database.  PostgreSQL URLs get
    psycopg2, the driver txpostgres brings (SQLAlchemy 2.1 would pick
    psycopg 3).
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return create_engine(parsed)


class MetadataStoreTestsMixin:
    """
    What every L{IMetadataStore} must do, whatever its database.  Each test
    gets a fresh, empty database at C{self.url}, set by the subclass.
    """

    url: str
    _fids = 0

    def makeStore(self) -> IMetadataStore:
        """
        A new store, not started, on this test's database; stopped when the
        test ends.  Two of them stand for two server processes.
        """
        raise NotImplementedError

    @inlineCallbacks
    def startedStore(self) -> Generator[Deferred[Any], Any, IMetadataStore]:
        store = self.makeStore()
        yield store.start()
        return store

    def addFile(
        self,
        store: IMetadataStore,
        key: str,
        namespace: str = "ns",
        created: float = T0,
        server: str = "s1",
    ) -> Deferred[FileInfo]:
        """
        Add a version of C{key} with a fid of its own.
        """
        self._fids += 1
        fid = f"{self._fids:032x}"
        return store.add_file(
            namespace, key, fid, f"data/{fid}", 100 + self._fids, SHA, created, server
        )

    @inlineCallbacks
    def test_interface(self) -> InlineTest:
        """
        The store provides everything the servers will call on it.
        """
        store = yield self.startedStore()
        self.assertTrue(verifyObject(IMetadataStore, store))

    @inlineCallbacks
    def test_startTwice(self) -> InlineTest:
        """
        Starting again, or starting a second store on a database that has
        the schema and data (a server restarting), keeps both: creating the
        schema is idempotent.
        """
        store = yield self.startedStore()
        version = yield store.start()
        self.assertEqual(version, SCHEMA_VERSION)
        yield self.addFile(store, "k")
        other = yield self.startedStore()
        found = yield other.lookup("ns", "k")
        self.assertEqual(found.key, "k")

    @inlineCallbacks
    def test_startAtOnce(self) -> InlineTest:
        """
        Servers of a cluster starting together on an empty database all
        start: they do not trip over each other creating the schema.
        """
        stores = [self.makeStore() for _ in range(3)]
        versions = yield gatherResults([store.start() for store in stores])
        self.assertEqual(versions, [SCHEMA_VERSION] * 3)

    @inlineCallbacks
    def test_newerSchemaRefused(self) -> InlineTest:
        """
        A database upgraded by a newer KoboldFS is refused at start, with a
        message saying so, rather than used with tables this code does not
        know.
        """
        store = yield self.startedStore()
        yield store.stop()
        engine = adminEngine(self.url)
        try:
            with engine.begin() as connection:
                connection.execute(update(schema_version).values(version=SCHEMA_VERSION + 1))
        finally:
            engine.dispose()
        error = yield self.assertFailure(self.makeStore().start(), NewerSchema)
        self.assertIn(f"schema version {SCHEMA_VERSION + 1}", str(error))

    @inlineCallbacks
    def test_notStarted(self) -> InlineTest:
        """
        Calls on a store that is not (or no longer) started fail with
        L{Unavailable} instead of waiting forever on a stopped pool.
        """
        store = self.makeStore()
        yield self.assertFailure(store.lookup("ns", "k"), Unavailable)
        yield store.start()
        yield store.stop()
        yield self.assertFailure(store.lookup("ns", "k"), Unavailable)

    @inlineCallbacks
    def test_restart(self) -> InlineTest:
        """
        A stopped store can be started again, with new connections (and,
        on SQLite, its thread pool).
        """
        store = yield self.startedStore()
        yield self.addFile(store, "k")
        yield store.stop()
        yield store.start()
        self.assertEqual((yield store.list_keys("ns", "", None, 10)), ["k"])

    @inlineCallbacks
    def test_stopWaitsForCalls(self) -> InlineTest:
        """
        Stopping lets the calls in progress finish rather than failing them
        by closing their connections.
        """
        store = yield self.startedStore()
        added = self.addFile(store, "k")
        yield store.stop()
        self.assertEqual((yield added).key, "k")

    @inlineCallbacks
    def test_namespace(self) -> InlineTest:
        """
        The first file of a namespace creates it, dated like the file; a
        namespace is only created on request, and then only once.
        """
        store = yield self.startedStore()
        self.assertIsNone((yield store.namespace("ns")))
        yield self.addFile(store, "k")
        ns = yield store.namespace("ns")
        self.assertEqual((ns.name, ns.created), ("ns", T0))
        self.assertEqual((ns.replicas, ns.min_copies, ns.url_template), (None,) * 3)
        self.assertIsNone((yield store.namespace("other", create=False)))
        created = yield store.namespace("other", create=True)
        again = yield store.namespace("other", create=True)
        self.assertEqual(created, again)
        self.assertNotEqual(created.id, ns.id)

    @inlineCallbacks
    def test_setNamespace(self) -> InlineTest:
        """
        Settings are stored and read back, on an existing namespace or one
        created for them; making a namespace private gives it a secret that
        later changes keep; privacy is fixed once the namespace has files,
        since their paths on disk depend on it; bad settings change nothing.
        """
        store = yield self.startedStore()
        made = yield store.set_namespace("fresh", url_template="https://cdn/{namespace}/{path}")
        self.assertEqual(made, (yield store.namespace("fresh")))
        self.assertEqual((made.private, made.secret), (False, None))
        private = yield store.set_namespace("fresh", private=True, replicas=3)
        self.assertTrue(private.private)
        self.assertGreaterEqual(len(private.secret), 32)
        self.assertNotIn(private.secret, repr(private))
        kept = yield store.set_namespace("fresh", min_copies=2)
        self.assertEqual(kept, (yield store.namespace("fresh")))
        self.assertEqual(
            (kept.secret, kept.replicas, kept.min_copies, kept.url_template),
            (private.secret, 3, 2, made.url_template),
        )
        rotated = yield store.set_namespace("fresh", secret="s" * 40)
        self.assertEqual(rotated.secret, "s" * 40)
        yield self.addFile(store, "k", namespace="fresh")
        yield self.addFile(store, "k", namespace="public")
        for name, settings in [
            ("fresh", {"private": False}),
            ("public", {"private": True}),
            ("fresh", {"colour": "red"}),
            ("fresh", {"url_template": "https://cdn/{nope}/{path}"}),
            ("fresh", {"url_template": "https://cdn/same-for-all"}),
            ("fresh", {"replicas": 0}),
            ("fresh", {"private": "yes"}),
            ("fresh", {"secret": "short"}),
            ("..", {"private": True}),
        ]:
            with self.assertRaises(ValueError, msg=f"{name} {settings}"):
                yield store.set_namespace(name, **settings)
        self.assertEqual((yield store.namespace("fresh")), rotated)
        self.assertFalse((yield store.namespace("public")).private)
        self.assertIsNone((yield store.namespace("..")))

    @inlineCallbacks
    def test_lookupFid(self) -> InlineTest:
        """
        A live file is found by its fid, with its replicas and namespace;
        a deleted or unknown one is not.
        """
        store = yield self.startedStore()
        yield store.set_namespace("ns", private=True)
        info = yield self.addFile(store, "k")
        yield store.add_replica(info.id, "s2", T0)
        found, ns = yield store.lookup_fid(info.fid)
        self.assertEqual(found, (yield store.lookup("ns", "k")))
        self.assertEqual(found.replicas, ("s1", "s2"))
        self.assertEqual(ns, (yield store.namespace("ns")))
        self.assertTrue(ns.private)
        yield store.delete("ns", "k", T0 + 1)
        self.assertIsNone((yield store.lookup_fid(info.fid)))
        self.assertIsNone((yield store.lookup_fid("0" * 32)))

    @inlineCallbacks
    def test_addFileLookup(self) -> InlineTest:
        """
        Every field of a file comes back from the database as stored,
        float dates included, with the server holding it.
        """
        store = yield self.startedStore()
        added = yield store.add_file("ns", "dir/k", "f" * 32, "aa/bb/fff", 2**40, SHA, T0, "s1")
        self.assertEqual(
            added,
            FileInfo(
                id=added.id,
                fid="f" * 32,
                namespace="ns",
                key="dir/k",
                size=2**40,
                sha256=SHA,
                created=T0,
                path="aa/bb/fff",
                replicas=("s1",),
            ),
        )
        self.assertEqual((yield store.lookup("ns", "dir/k")), added)

    @inlineCallbacks
    def test_lookupMissing(self) -> InlineTest:
        """
        Neither an unknown key nor an unknown namespace is an error.
        """
        store = yield self.startedStore()
        yield self.addFile(store, "k")
        self.assertIsNone((yield store.lookup("ns", "other")))
        self.assertIsNone((yield store.lookup("nowhere", "k")))

    @inlineCallbacks
    def test_overwrite(self) -> InlineTest:
        """
        A new version of a key gets a new, greater id and replaces the old
        one for readers; the old one is left for the replicator.
        """
        store = yield self.startedStore()
        first = yield self.addFile(store, "k", server="s1")
        second = yield self.addFile(store, "k", created=T0 + 1, server="s2")
        self.assertGreater(second.id, first.id)
        self.assertEqual((yield store.lookup("ns", "k")), second)
        self.assertEqual((yield store.list_keys("ns", "", None, 10)), ["k"])

    @inlineCallbacks
    def test_delete(self) -> InlineTest:
        """
        Deleting tells whether there was a live version, hides the key, and
        leaves it free for a new version.
        """
        store = yield self.startedStore()
        yield self.addFile(store, "k")
        self.assertTrue((yield store.delete("ns", "k", T0 + 1)))
        self.assertFalse((yield store.delete("ns", "k", T0 + 2)))
        self.assertFalse((yield store.delete("nowhere", "k", T0 + 2)))
        self.assertIsNone((yield store.lookup("ns", "k")))
        self.assertEqual((yield store.list_keys("ns", "", None, 10)), [])
        again = yield self.addFile(store, "k")
        self.assertEqual((yield store.lookup("ns", "k")), again)

    @inlineCallbacks
    def test_listKeysOrder(self) -> InlineTest:
        """
        Keys come in code-point order, which is UTF-8 byte order, whatever
        the database's locale.
        """
        store = yield self.startedStore()
        keys = ["\U0001f600", "日本", "é", "b", "a", "B", "a b", "ab"]
        for key in keys:
            yield self.addFile(store, key)
        listed = yield store.list_keys("ns", "", None, 100)
        self.assertEqual(listed, sorted(keys))
        self.assertEqual(listed, ["B", "a", "a b", "ab", "b", "é", "日本", "\U0001f600"])

    @inlineCallbacks
    def test_listKeysPrefix(self) -> InlineTest:
        """
        A prefix selects exactly the keys that start with it, non-ASCII and
        highest code point prefixes included.
        """
        store = yield self.startedStore()
        keys = ["a", "a/1", "a/2", "a0", "b/1", "日本/x", "日本語", "日", "\U0010ffffz"]
        for key in keys:
            yield self.addFile(store, key)
        cases = {
            "a/": ["a/1", "a/2"],
            "a": ["a", "a/1", "a/2", "a0"],
            "日本": ["日本/x", "日本語"],
            "\U0010ffff": ["\U0010ffffz"],
            "zzz": [],
        }
        for prefix, expected in cases.items():
            listed = yield store.list_keys("ns", prefix, None, 100)
            self.assertEqual(listed, expected, prefix)

    @inlineCallbacks
    def test_listKeysPaging(self) -> InlineTest:
        """
        Listing page by page, each page starting after the last key of the
        one before, gives every key once.
        """
        store = yield self.startedStore()
        keys = [f"p/{n:02d}" for n in range(25)]
        for key in reversed(keys):
            yield self.addFile(store, key)
        yield self.addFile(store, "q")
        pages = []
        after = None
        while True:
            page = yield store.list_keys("ns", "p/", after, 10)
            if not page:
                break
            pages.append(page)
            after = page[-1]
        self.assertEqual([len(page) for page in pages], [10, 10, 5])
        self.assertEqual(sum(pages, []), keys)
        self.assertEqual((yield store.list_keys("ns", "p/", None, 0)), [])

    @inlineCallbacks
    def test_namespacesIsolated(self) -> InlineTest:
        """
        The same key in two namespaces is two files.
        """
        store = yield self.startedStore()
        one = yield self.addFile(store, "k", namespace="one")
        two = yield self.addFile(store, "k", namespace="two")
        yield self.addFile(store, "only-two", namespace="two")
        self.assertEqual((yield store.lookup("one", "k")), one)
        self.assertEqual((yield store.lookup("two", "k")), two)
        self.assertEqual((yield store.list_keys("one", "", None, 10)), ["k"])
        self.assertTrue((yield store.delete("one", "k", T0)))
        self.assertEqual((yield store.lookup("two", "k")), two)

    @inlineCallbacks
    def test_registerServer(self) -> InlineTest:
        """
        Registering inserts a server, then updates its address and disk; an
        operator's readonly or drain survives the server's restart, but a
        dead server that registers again is alive.
        """
        store = yield self.startedStore()
        first = ServerInfo("s1", "h1", "h1:7500", "http://h1/", heartbeat=T0)
        self.assertEqual((yield store.register_server(first)), first)
        yield store.register_server(ServerInfo("s0", "h0", "h0:7500", "http://h0/"))
        moved = ServerInfo(
            "s1", "h2", "h2:7500", "http://h2/", heartbeat=T0 + 1, disk_free=5, disk_total=9
        )
        for state in ("readonly", "drain"):
            yield store.set_server_state("s1", state)
            stored = yield store.register_server(moved)
            self.assertEqual(stored.state, state)
        yield store.set_server_state("s1", "dead")
        self.assertEqual((yield store.register_server(moved)).state, "alive")
        listed = yield store.servers()
        self.assertEqual([server.name for server in listed], ["s0", "s1"])
        self.assertEqual(listed[1], moved)

    @inlineCallbacks
    def test_heartbeat(self) -> InlineTest:
        """
        A heartbeat records time and disk space, and says whether the
        server is registered (so that an unknown one registers).
        """
        store = yield self.startedStore()
        yield store.register_server(ServerInfo("s1", "h", "h:1", "http://h/"))
        self.assertTrue((yield store.heartbeat("s1", T0, 10, 20)))
        self.assertFalse((yield store.heartbeat("nobody", T0, 10, 20)))
        (server,) = yield store.servers()
        self.assertEqual((server.heartbeat, server.disk_free, server.disk_total), (T0, 10, 20))

    @inlineCallbacks
    def test_setServerState(self) -> InlineTest:
        """
        States are checked before anything is stored, and an unknown server
        is reported rather than created.
        """
        store = yield self.startedStore()
        yield store.register_server(ServerInfo("s1", "h", "h:1", "http://h/"))
        self.assertFalse((yield store.set_server_state("nobody", "drain")))
        yield self.assertFailure(store.set_server_state("s1", "down"), ValueError)
        yield self.assertFailure(
            store.register_server(ServerInfo("s2", "h", "h:1", "http://h/", state="x")),
            ValueError,
        )
        self.assertTrue((yield store.set_server_state("s1", "readonly")))
        self.assertEqual([s.state for s in (yield store.servers())], ["readonly"])

    @inlineCallbacks
    def test_namespaces(self) -> InlineTest:
        """
        Every namespace is listed with its settings, in code-point order
        whatever the database's collation ("B" before "a"), including one
        created empty.
        """
        store = yield self.startedStore()
        self.assertEqual((yield store.namespaces()), [])
        yield self.addFile(store, "k", namespace="a")
        yield store.namespace("B", create=True)
        yield store.set_namespace("_x", replicas=2, url_template="https://cdn/{path}")
        listed = yield store.namespaces()
        self.assertEqual([ns.name for ns in listed], ["B", "_x", "a"])
        self.assertEqual(listed[1], (yield store.namespace("_x")))
        self.assertEqual((listed[1].replicas, listed[1].url_template), (2, "https://cdn/{path}"))

    @inlineCallbacks
    def test_filesHeld(self) -> InlineTest:
        """
        Each server's count of live files it holds a good copy of: deleted
        versions and quarantined copies do not count, and a server holding
        nothing is not listed.
        """
        store = yield self.startedStore()
        self.assertEqual((yield store.files_held()), {})
        one = yield self.addFile(store, "one", server="s1")
        yield store.add_replica(one.id, "s2", T0)
        yield self.addFile(store, "two", namespace="other", server="s1")
        yield self.addFile(store, "gone", server="s3")
        yield store.delete("ns", "gone", T0)
        yield self.addFile(store, "new", server="s2")
        yield self.addFile(store, "new", server="s1")
        self.assertEqual((yield store.files_held()), {"s1": 3, "s2": 1})
        engine = adminEngine(self.url)
        try:
            with engine.begin() as connection:
                connection.execute(
                    update(replicas)
                    .where(replicas.c.file_id == one.id, replicas.c.server == "s2")
                    .values(state="quarantined")
                )
        finally:
            engine.dispose()
        self.assertEqual((yield store.files_held()), {"s1": 3})

    @inlineCallbacks
    def test_addReplica(self) -> InlineTest:
        """
        Recording a copy twice is harmless (the replicator may verify a copy
        again), and a file that is gone is reported, not an error.
        """
        store = yield self.startedStore()
        info = yield self.addFile(store, "k", server="s2")
        self.assertTrue((yield store.add_replica(info.id, "s1", T0)))
        self.assertTrue((yield store.add_replica(info.id, "s1", T0 + 1)))
        self.assertFalse((yield store.add_replica(info.id + 1000, "s1", T0)))
        found = yield store.lookup("ns", "k")
        self.assertEqual(found.replicas, ("s1", "s2"))

    @inlineCallbacks
    def test_removeReplica(self) -> InlineTest:
        """
        A removed copy is no longer offered to readers.
        """
        store = yield self.startedStore()
        info = yield self.addFile(store, "k", server="s1")
        yield store.add_replica(info.id, "s2", T0)
        self.assertTrue((yield store.remove_replica(info.id, "s1")))
        self.assertFalse((yield store.remove_replica(info.id, "s1")))
        self.assertEqual((yield store.lookup("ns", "k")).replicas, ("s2",))

    @inlineCallbacks
    def test_subscribe(self) -> InlineTest:
        """
        Listeners hear of committed changes, not of changes that changed
        nothing, and nothing once unsubscribed.
        """
        store = yield self.startedStore()
        events: list[tuple[str, dict]] = []
        unsubscribe = store.subscribe(lambda event, payload: events.append((event, payload)))
        info = yield self.addFile(store, "k")
        yield store.delete("ns", "k", T0)
        yield store.delete("ns", "k", T0)
        yield store.register_server(ServerInfo("s1", "h", "h:1", "http://h/"))
        yield store.set_server_state("s1", "drain")
        yield store.set_server_state("nobody", "drain")
        file = {"id": info.id, "namespace": "ns", "key": "k"}
        self.assertEqual(
            events,
            [
                ("file_added", file),
                ("file_deleted", file),
                ("server_changed", {"name": "s1"}),
                ("server_changed", {"name": "s1"}),
            ],
        )
        unsubscribe()
        unsubscribe()
        yield self.addFile(store, "k2")
        self.assertEqual(len(events), 4)

    @inlineCallbacks
    def test_quarantineAnnounced(self) -> InlineTest:
        """
        A copy quarantined is announced as its file added again, so that
        every replicator looks back at it and the copy is made again at
        once; quarantining a copy that is not there announces nothing.
        """
        store = yield self.startedStore()
        info = yield self.addFile(store, "k", server="s1")
        events: list[tuple[str, dict]] = []
        store.subscribe(lambda event, payload: events.append((event, payload)))
        self.assertTrue((yield store.quarantine_replica(info.id, "s1")))
        self.assertFalse((yield store.quarantine_replica(info.id, "s2")))
        self.assertEqual(events, [("file_added", {"id": info.id})])

    @inlineCallbacks
    def test_raisingListener(self) -> InlineTest:
        """
        A listener that raises is logged, and neither fails the change nor
        keeps later listeners from hearing of it.
        """
        store = yield self.startedStore()
        heard: list[str] = []

        def broken(event: str, payload: dict) -> None:
            raise ZeroDivisionError("a listener's bug")

        store.subscribe(broken)
        store.subscribe(lambda event, payload: heard.append(payload["key"]))
        yield self.addFile(store, "k")
        self.assertEqual(heard, ["k"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    @inlineCallbacks
    def test_concurrentOverwrite(self) -> InlineTest:
        """
        Servers storing the same key at once all succeed, and the last
        writer wins: exactly one version stays live, the newest.
        """
        store = yield self.startedStore()
        added = yield gatherResults([self.addFile(store, "k", server=f"s{n}") for n in range(10)])
        self.assertEqual(len({info.id for info in added}), 10)
        found = yield store.lookup("ns", "k")
        self.assertEqual(found.id, max(info.id for info in added))
        self.assertEqual((yield store.list_keys("ns", "", None, 10)), ["k"])

    @inlineCallbacks
    def test_concurrentNamespaceCreation(self) -> InlineTest:
        """
        The first files of a namespace, stored at once, create it once.
        """
        store = yield self.startedStore()
        yield gatherResults([self.addFile(store, f"k{n}", namespace="fresh") for n in range(10)])
        self.assertEqual(len((yield store.list_keys("fresh", "", None, 100))), 10)

    @inlineCallbacks
    def test_twoStores(self) -> InlineTest:
        """
        Two stores on one database, as two server processes, write and read
        at once without either failing (on SQLite: no SQLITE_BUSY).
        """
        one = yield self.startedStore()
        two = yield self.startedStore()
        adds = []
        others = []
        for n in range(20):
            for store in (one, two):
                adds.append(self.addFile(store, "shared"))
                adds.append(self.addFile(store, f"k{n}", namespace=f"ns{n % 3}"))
                others.append(store.lookup("ns", "shared"))
                others.append(store.heartbeat("s1", T0 + n, n, 100))
        added, _ = yield gatherResults([gatherResults(adds), gatherResults(others)])
        self.assertEqual(len({info.id for info in added}), 80)
        found = yield two.lookup("ns", "shared")
        self.assertEqual(found, (yield one.lookup("ns", "shared")))

    @inlineCallbacks
    def test_missingReplicas(self) -> InlineTest:
        """
        A server's replicator is given the live files it lacks a copy of, by
        id from its cursor, each with the servers to copy it from; the limit
        counts files, however many copies each has.
        """
        store = yield self.startedStore()
        one = yield self.addFile(store, "one", server="s1")
        yield self.addFile(store, "held", server="s2")
        two = yield self.addFile(store, "two", server="s1")
        yield store.add_replica(two.id, "s3", T0)
        three = yield self.addFile(store, "three", server="s3")
        gone = yield self.addFile(store, "gone", server="s1")
        yield store.delete("ns", "gone", T0)
        found = yield store.missing_replicas("s2", 0, 10)
        self.assertEqual([info.id for info in found], [one.id, two.id, three.id])
        self.assertEqual((found[1].path, found[1].sha256), (two.path, two.sha256))
        page = yield store.missing_replicas("s2", 0, 2)
        self.assertEqual(
            [(i.key, i.replicas) for i in page], [("one", ("s1",)), ("two", ("s1", "s3"))]
        )
        rest = yield store.missing_replicas("s2", page[-1].id, 2)
        self.assertEqual([info.key for info in rest], ["three"])
        self.assertEqual((yield store.missing_replicas("s2", gone.id, 2)), [])

    @inlineCallbacks
    def test_deletedFiles(self) -> InlineTest:
        """
        A server's replicator is given the deleted files it still holds,
        and those nobody holds (for any server to purge), not those only
        other servers hold.
        """
        store = yield self.startedStore()
        both = yield self.addFile(store, "both", server="s1")
        yield store.add_replica(both.id, "s2", T0)
        theirs = yield self.addFile(store, "theirs", server="s2")
        yield self.addFile(store, "live", server="s1")
        nobody = yield self.addFile(store, "nobody", server="s1")
        yield store.remove_replica(nobody.id, "s1")
        for key in ("both", "theirs", "nobody"):
            yield store.delete("ns", key, T0)
        mine = yield store.deleted_files("s1", 0, 10)
        self.assertEqual(
            [(i.id, i.replicas) for i in mine], [(both.id, ("s1", "s2")), (nobody.id, ())]
        )
        self.assertEqual(mine[0].path, both.path)
        others = yield store.deleted_files("s2", 0, 10)
        self.assertEqual([i.id for i in others], [both.id, theirs.id, nobody.id])
        self.assertEqual([i.id for i in (yield store.deleted_files("s2", both.id, 1))], [theirs.id])

    @inlineCallbacks
    def test_maxFileId(self) -> InlineTest:
        """
        The highest stored file id, deleted files included; 0 with none.
        """
        store = yield self.startedStore()
        self.assertEqual((yield store.max_file_id()), 0)
        yield self.addFile(store, "one", server="s1")
        two = yield self.addFile(store, "two", server="s1")
        yield store.delete("ns", "two", T0)
        self.assertEqual((yield store.max_file_id()), two.id)

    @inlineCallbacks
    def test_heldFiles(self) -> InlineTest:
        """
        A server's scrubber is given the live files it holds a good copy
        of, by id from its cursor, and not deleted ones.
        """
        store = yield self.startedStore()
        one = yield self.addFile(store, "one", server="s1")
        yield self.addFile(store, "theirs", server="s2")
        two = yield self.addFile(store, "two", server="s2")
        yield store.add_replica(two.id, "s1", T0)
        yield self.addFile(store, "gone", server="s1")
        yield store.delete("ns", "gone", T0)
        found = yield store.held_files("s1", 0, 10)
        self.assertEqual(
            [(i.id, i.replicas) for i in found], [(one.id, ("s1",)), (two.id, ("s1", "s2"))]
        )
        self.assertEqual(found[1].sha256, two.sha256)
        self.assertEqual([i.id for i in (yield store.held_files("s1", one.id, 10))], [two.id])
        self.assertEqual([i.id for i in (yield store.held_files("s1", 0, 1))], [one.id])

    @inlineCallbacks
    def test_deadServersForgotten(self) -> InlineTest:
        """
        A deleted file whose only copy is on a dead server is anybody's to
        purge, and its dead replica row goes with it; a live file's rows on
        a dead server stay (it may come back), and a server that is only
        down or draining still keeps its deleted copies' rows waiting.
        """
        store = yield self.startedStore()
        for name in ("s1", "s2", "s3"):
            yield store.register_server(ServerInfo(name, "h", f"{name}:1", "http://h/"))
        yield store.set_server_state("s2", "dead")
        yield store.set_server_state("s3", "drain")
        dead = yield self.addFile(store, "dead", server="s2")
        draining = yield self.addFile(store, "draining", server="s3")
        live = yield self.addFile(store, "live", server="s2")
        for key in ("dead", "draining"):
            yield store.delete("ns", key, T0)
        self.assertEqual([i.id for i in (yield store.deleted_files("s1", 0, 10))], [dead.id])
        self.assertFalse((yield store.purge_file(draining.id)))
        self.assertTrue((yield store.purge_file(dead.id)))
        self.assertEqual([i.id for i in (yield store.deleted_files("s3", 0, 10))], [draining.id])
        self.assertEqual((yield store.lookup("ns", "live")).replicas, ("s2",))
        self.assertEqual([i.id for i in (yield store.missing_replicas("s1", 0, 10))], [live.id])

    @inlineCallbacks
    def test_namespaceReplicas(self) -> InlineTest:
        """
        A namespace's replica count is stored, read back, and cleared to
        None (every server) again; nonsense is refused.
        """
        store = yield self.startedStore()
        yield self.addFile(store, "k", namespace="two")
        self.assertEqual((yield store.set_namespace("two", replicas=2)).replicas, 2)
        self.assertEqual((yield store.namespace("two")).replicas, 2)
        self.assertIsNone((yield store.set_namespace("two", replicas=None)).replicas)
        self.assertIsNone((yield store.namespace("two")).replicas)
        yield self.assertFailure(store.set_namespace("two", replicas=0), ValueError)

    @inlineCallbacks
    def test_purgeFile(self) -> InlineTest:
        """
        A deleted file's row goes once no copy is left, never before, and
        never a live one's; its id is not given to a later file, so the
        replicators' cursors never skip one.
        """
        store = yield self.startedStore()
        yield self.addFile(store, "live")
        old = yield self.addFile(store, "k", server="s1")
        new = yield self.addFile(store, "k", server="s1")
        self.assertFalse((yield store.purge_file(old.id)))
        self.assertFalse((yield store.purge_file(new.id)))
        yield store.delete("ns", "k", T0)
        yield store.remove_replica(old.id, "s1")
        yield store.remove_replica(new.id, "s1")
        self.assertTrue((yield store.purge_file(old.id)))
        self.assertTrue((yield store.purge_file(new.id)))
        self.assertFalse((yield store.purge_file(new.id)))
        self.assertEqual((yield store.deleted_files("s1", 0, 10)), [])
        self.assertFalse((yield store.add_replica(new.id, "s2", T0)))
        later = yield self.addFile(store, "k")
        self.assertGreater(later.id, new.id)

    @inlineCallbacks
    def test_health(self) -> InlineTest:
        """
        The operators' counts: files short of their namespace's count (all
        alive servers when it has none) on servers whose copies count, the
        copies they lack, those with none, deleted files not yet
        reclaimed, and quarantined copies.
        """
        store = yield self.startedStore()
        self.assertEqual((yield store.health()), Health())
        for name, state in (("s1", "alive"), ("s2", "alive"), ("s3", "drain")):
            yield store.register_server(ServerInfo(name, name, f"{name}:1", f"http://{name}/"))
            yield store.set_server_state(name, state)
        yield store.set_namespace("one", replicas=1)
        full = yield self.addFile(store, "full")
        yield store.add_replica(full.id, "s2", T0)
        yield self.addFile(store, "half")  # on s1 only: one copy short
        drained = yield self.addFile(store, "drained", server="s3")  # two short
        enough = yield self.addFile(store, "k", namespace="one")
        gone = yield self.addFile(store, "gone")
        yield store.delete("ns", "gone", T0)
        health = yield store.health()
        self.assertEqual(health.files, 4)
        self.assertEqual(health.bytes, sum(f.size for f in (full, drained, enough)) + 100 + 2)
        self.assertEqual((health.under_replicated, health.missing_copies), (2, 3))
        self.assertEqual((health.lost, health.deleted, health.quarantined), (0, 1, 0))
        self.assertEqual(health.oldest_short, T0)
        # A quarantined copy is neither served nor counted, until made again.
        self.assertTrue((yield store.quarantine_replica(full.id, "s1")))
        self.assertFalse((yield store.quarantine_replica(full.id, "s3")))
        self.assertEqual((yield store.lookup("ns", "full")).replicas, ("s2",))
        self.assertEqual((yield store.missing_replicas("s1", 0, 10))[0].key, "full")
        yield store.quarantine_replica(enough.id, "s1")
        health = yield store.health()
        self.assertEqual((health.under_replicated, health.missing_copies), (4, 5))
        self.assertEqual((health.lost, health.quarantined), (1, 2))
        yield store.add_replica(full.id, "s1", T0)
        self.assertEqual((yield store.lookup("ns", "full")).replicas, ("s1", "s2"))
        self.assertEqual((yield store.health()).quarantined, 1)
        self.assertEqual(gone.key, "gone")
        # A server whose disk was replaced: every copy it held is bad.
        self.assertEqual((yield store.quarantine_server("s2")), 1)
        self.assertEqual((yield store.quarantine_server("s2")), 0)
        self.assertEqual((yield store.lookup("ns", "full")).replicas, ("s1",))
        self.assertEqual((yield store.health()).quarantined, 2)

    @inlineCallbacks
    def test_liveFiles(self) -> InlineTest:
        """
        fsck's walk: every live file by id, in pages, with its good copies,
        of one namespace or all.
        """
        store = yield self.startedStore()
        a = yield self.addFile(store, "a")
        b = yield self.addFile(store, "b", namespace="other", server="s2")
        c = yield self.addFile(store, "c")
        yield self.addFile(store, "d")
        yield store.delete("ns", "d", T0)
        page = yield store.live_files(None, 0, 2)
        self.assertEqual([(f.key, f.replicas) for f in page], [("a", ("s1",)), ("b", ("s2",))])
        self.assertEqual([f.id for f in (yield store.live_files(None, b.id, 10))], [c.id])
        self.assertEqual([f.id for f in (yield store.live_files("ns", 0, 10))], [a.id, c.id])
        self.assertEqual((yield store.live_files("nonesuch", 0, 10)), [])

    @inlineCallbacks
    def test_clientKeys(self) -> InlineTest:
        """
        A key is made once, kept only hashed, found by namespace and id
        (from another store: another server), and revoked.
        """
        from koboldfs.auth import parse_key

        store = yield self.startedStore()
        other = yield self.startedStore()
        key = yield store.create_key("keyed")
        readonly = yield store.create_key("keyed", readonly=True)
        key_id, secret = parse_key(key)
        found = yield other.find_key("keyed", key_id)
        self.assertEqual((found.namespace, found.readonly), ("keyed", False))
        self.assertNotIn(secret, repr(found))
        self.assertIsNone((yield other.find_key("other", key_id)))
        listed = yield other.keys("keyed")
        self.assertEqual(
            sorted((k.key_id, k.readonly) for k in listed),
            sorted([(key_id, False), (parse_key(readonly)[0], True)]),
        )
        self.assertTrue((yield other.revoke_key("keyed", key_id)))
        self.assertFalse((yield store.revoke_key("keyed", key_id)))
        self.assertIsNone((yield store.find_key("keyed", key_id)))
        with self.assertRaises(ValueError):
            yield store.create_key("no/such")


if TYPE_CHECKING:
    _Checked = unittest.TestCase
else:
    _Checked = object


class CountsTestsMixin(MetadataStoreTestsMixin, _Checked):
    """
    What the counters (schema.file_counts) and the replication queue hold,
    after every kind of change, whatever the database.
    """

    def rows(self, statement: Any) -> list[tuple]:
        engine = adminEngine(self.url)
        try:
            with engine.begin() as connection:
                return [tuple(row) for row in connection.execute(statement)]
        finally:
            engine.dispose()

    def counts(self) -> dict[tuple[int, str], tuple[int, ...]]:
        """
        file_counts summed over stripes, by namespace and server, zeros left out.
        """
        c = file_counts.c
        found = self.rows(
            select(
                c.namespace_id,
                c.server,
                func.sum(c.files),
                func.sum(c.bytes),
                func.sum(c.deleted),
                func.sum(c.quarantined),
            ).group_by(c.namespace_id, c.server)
        )
        return {(ns, server): tuple(map(int, v)) for ns, server, *v in found if any(v)}

    def countedFromRows(self) -> dict[tuple[int, str], tuple[int, ...]]:
        """
        What file_counts must hold, computed here from every row.
        """
        found: dict[tuple[int, str], list[int]] = {}
        by_id = {}
        for file_id, ns, state, size in self.rows(
            select(files.c.id, files.c.namespace_id, files.c.state, files.c.size)
        ):
            by_id[file_id] = (ns, state, size)
            live, deleted = int(state == "live"), int(state == "deleted")
            row = found.setdefault((ns, ""), [0, 0, 0, 0])
            row[0], row[1], row[2] = row[0] + live, row[1] + live * size, row[2] + deleted
        for file_id, server, state in self.rows(
            select(replicas.c.file_id, replicas.c.server, replicas.c.state)
        ):
            ns, file_state, size = by_id[file_id]
            good = int(state == "ok" and file_state == "live")
            row = found.setdefault((ns, server), [0, 0, 0, 0])
            row[0] += good
            row[1] += good * size
            row[2] += int(file_state == "deleted")
            row[3] += int(state == "quarantined")
        return {key: tuple(v) for key, v in found.items() if any(v)}

    async def _churn(self, store: Any) -> None:
        """
        Every kind of change to files and replicas, client transactions
        included.
        """
        for name in ("s1", "s2", "s3"):
            await store.register_server(ServerInfo(name, name, f"{name}:1", f"http://{name}/"))
        await store.set_namespace("two", replicas=2)
        one = await self.addFile(store, "one")
        await self.addFile(store, "one")  # overwritten
        two = await self.addFile(store, "two", namespace="two")
        await store.add_replica(two.id, "s2", T0)
        await store.add_replica(two.id, "s3", T0)
        await store.remove_replica(two.id, "s3")
        await store.quarantine_replica(two.id, "s2")
        await store.add_replica(two.id, "s2", T0)
        await store.quarantine_replica(two.id, "s1")
        gone = await self.addFile(store, "gone", server="s2")
        await store.delete("ns", "gone", T0)
        await store.remove_replica(gone.id, "s2")
        self.assertTrue(await store.purge_file(gone.id))
        await store.add_replica(one.id, "s3", T0)
        await self.addFile(store, "three", server="s3")
        self.assertGreater(await store.quarantine_server("s3"), 0)
        await store.set_server_state("s2", "drain")
        await store.begin_txn("t1", "ns", T0, T0 + 100)
        await store.txn_put("t1", "ns", "t", "f" * 32, "p/t", 7, SHA, T0, "s1", T0 + 100)
        await store.txn_delete("t1", "ns", "one", T0, T0 + 100)
        await store.txn_commit("t1", T0, T0 + 100, False)
        await store.begin_txn("t2", "ns", T0, T0 + 100)
        await store.txn_put("t2", "ns", "u", "e" * 32, "p/u", 9, SHA, T0, "s1", T0 + 100)
        await store.txn_abort("t2", T0)

    def test_countsKeptWithRows(self) -> Deferred[None]:
        """
        The counters that health reads are, after every kind of change,
        what the rows themselves add up to.
        """

        async def check() -> None:
            store = await ensureDeferred(self.startedStore())
            await self._churn(store)
            self.assertEqual(self.counts(), self.countedFromRows())
            health = await store.health()
            self.assertEqual(
                health.files, sum(v[0] for (_, s), v in self.counts().items() if not s)
            )
            # s1: the published "t" ("two"'s copy there is quarantined); s2:
            # "two" (draining, still held).
            self.assertEqual(await store.files_held(), {"s1": 1, "s2": 1})

        return ensureDeferred(check())

    def test_upgradeCounts(self) -> Deferred[None]:
        """
        A database of schema version 1 (no counters, no queue) gets both at
        start, counted from its rows.
        """

        async def check() -> None:
            store = await ensureDeferred(self.startedStore())
            await self._churn(store)
            await store.stop()
            counted = self.counts()
            # Deleted files' rows wait for their purge; live ones are work.
            live_queued = (
                select(copy_queue.c.file_id)
                .join(files, files.c.id == copy_queue.c.file_id)
                .where(files.c.state == "live")
                .order_by(copy_queue.c.file_id)
            )
            queued = self.rows(live_queued)
            self.assertTrue(queued)
            engine = adminEngine(self.url)
            try:
                with engine.begin() as connection:
                    connection.execute(delete(file_counts))
                    connection.execute(delete(copy_queue))
                    connection.execute(update(schema_version).values(version=1))
            finally:
                engine.dispose()
            self.assertEqual(self.counts(), {})
            self.assertEqual(await self.makeStore().start(), SCHEMA_VERSION)
            self.assertEqual(self.counts(), counted)
            self.assertEqual(
                self.rows(select(copy_queue.c.file_id).order_by(copy_queue.c.file_id)), queued
            )

        return ensureDeferred(check())

    @inlineCallbacks
    def test_maxHeld(self) -> InlineTest:
        """
        The highest file id a server has a replica row of, 0 when none.
        """
        store = yield self.startedStore()
        self.assertEqual((yield store.max_held("s1")), 0)
        one = yield self.addFile(store, "one")
        yield self.addFile(store, "two", server="s2")
        self.assertEqual((yield store.max_held("s1")), one.id)

    @inlineCallbacks
    def test_replicationQueue(self) -> InlineTest:
        """
        A file a change leaves short of copies is queued in the same
        database transaction, and leaves the queue once it has them.
        """
        store = yield self.startedStore()
        for name in ("s1", "s2"):
            yield store.register_server(ServerInfo(name, name, f"{name}:1", f"http://{name}/"))
        yield store.set_namespace("ns", replicas=2)
        short = yield self.addFile(store, "short")  # one copy of two
        full = yield store.add_file("ns", "full", "f" * 32, "p/f", 1, SHA, T0, "s1", ("s2",))
        self.assertEqual([f.id for f in (yield store.queued_files("s2", 0, 10))], [short.id])
        self.assertEqual((yield store.queued_files("s1", 0, 10)), [])  # s1 has it
        self.assertEqual((yield store.health()).queued, 1)
        yield store.add_replica(short.id, "s2", T0)
        self.assertEqual((yield store.health()).queued, 0)
        yield store.quarantine_replica(full.id, "s2")
        page = yield store.queued_files("s2", 0, 10)
        self.assertEqual([(f.id, f.replicas) for f in page], [(full.id, ("s1",))])
        yield store.add_replica(full.id, "s2", T0)
        # A draining server's copies stop counting: its files are work.
        yield store.set_server_state("s2", "drain")
        self.assertEqual((yield store.health()).queued, 2)
        yield store.set_server_state("s2", "alive")
        yield store.settle(short.id)
        self.assertEqual([f.id for f in (yield store.queued_files("s1", 0, 10))], [])
        self.assertEqual((yield store.health()).queued, 1)
        # A deleted file leaves the queue at its purge at the latest.
        yield store.quarantine_replica(full.id, "s2")
        yield store.delete("ns", "full", T0)
        self.assertEqual((yield store.queued_files("s2", 0, 10)), [])
        yield store.remove_replica(full.id, "s1")
        yield store.remove_replica(full.id, "s2")
        self.assertTrue((yield store.purge_file(full.id)))
        self.assertEqual(self.rows(select(copy_queue.c.file_id)), [])


class SQLiteMetadataStoreTests(CountsTestsMixin, unittest.TestCase):
    """
    The metadata suite on SQLite, each test in a new file in a directory
    that the store has to create.
    """

    def setUp(self) -> None:
        self.path = os.path.join(os.path.abspath(self.mktemp()), "meta.sqlite")
        self.url = f"sqlite:///{self.path}"

    def makeStore(self) -> IMetadataStore:
        store = store_from_url(self.url, reactor)
        self.addCleanup(store.stop)
        return store

    @inlineCallbacks
    def test_pragmas(self) -> InlineTest:
        """
        The file is in WAL mode and each connection waits for locks, syncs
        fully (an acknowledged upload survives a power cut) and checks
        foreign keys.
        """
        store = yield self.startedStore()
        with store._engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")
            }
        self.assertEqual(
            pragmas,
            {"journal_mode": "wal", "busy_timeout": 30000, "synchronous": 2, "foreign_keys": 1},
        )

    @inlineCallbacks
    def test_unavailable(self) -> InlineTest:
        """
        A database that cannot be opened fails with the retryable
        L{Unavailable}, naming the cause.
        """
        os.makedirs(self.path)
        error = yield self.assertFailure(self.makeStore().start(), Unavailable)
        self.assertEqual(error.code, ErrorCode.UNAVAILABLE)
        self.assertTrue(error.retryable)
        self.assertIn("unable to open database file", str(error))

    @inlineCallbacks
    def test_sharedThreadPool(self) -> InlineTest:
        """
        A store given a thread pool uses it and leaves it running when it
        stops, for its owner to stop.
        """
        pool = ThreadPool(minthreads=1, maxthreads=2)
        pool.start()
        self.addCleanup(pool.stop)
        store = SQLAlchemyStore(self.url, reactor, threadpool=pool)
        self.addCleanup(store.stop)
        yield store.start()
        yield self.addFile(store, "k")
        yield store.stop()
        self.assertTrue(pool.started)

    def test_storeFromURL(self) -> None:
        """
        SQLite goes to the thread-pool store.
        """
        self.assertIsInstance(self.makeStore(), SQLAlchemyStore)

    def test_urlHidesPassword(self) -> None:
        """
        The URL a store shows, in logs and status pages, has no password.
        """
        store = SQLAlchemyStore("postgresql+psycopg2://kobold:s3cret@db.example/meta", reactor)
        self.assertEqual(store.url, "postgresql+psycopg2://kobold:***@db.example/meta")

    def test_inMemoryRefused(self) -> None:
        """
        An in-memory SQLite database would be a different one in each pool
        thread, so it is refused at once.
        """
        for url in ("sqlite://", "sqlite:///:memory:"):
            self.assertRaises(ValueError, SQLAlchemyStore, url, reactor)

    @inlineCallbacks
    def test_fileReadableBySQLite(self) -> InlineTest:
        """
        The file is plain SQLite, with the schema version recorded, for
        operators' tools.
        """
        store = yield self.startedStore()
        yield store.stop()
        connection = sqlite3.connect(self.path)
        try:
            rows = connection.execute("SELECT version FROM kobold_schema").fetchall()
        finally:
            connection.close()
        self.assertEqual(rows, [(SCHEMA_VERSION,)])


class ListenersTests(unittest.TestCase):
    """
    Tests for L{StoreListeners}, which every store uses for its own changes.
    """

    def test_payloadCopied(self) -> None:
        """
        A listener that changes its payload does not change the next one's.
        """
        listeners = StoreListeners()
        seen: list[dict] = []
        listeners.subscribe(lambda event, payload: payload.clear())
        listeners.subscribe(lambda event, payload: seen.append(payload))
        listeners.notify("file_added", {"id": 1})
        self.assertEqual(seen, [{"id": 1}])

    def test_unsubscribeWhileNotifying(self) -> None:
        """
        A listener may unsubscribe itself when called, without making the
        next one miss the event.
        """
        listeners = StoreListeners()
        seen: list[str] = []

        def once(event: str, payload: dict) -> None:
            unsubscribe()

        unsubscribe = listeners.subscribe(once)
        listeners.subscribe(lambda event, payload: seen.append(event))
        listeners.notify("a", {})
        listeners.notify("b", {})
        self.assertEqual(seen, ["a", "b"])


_POSTGRES_URL = os.environ.get("KOBOLDFS_TEST_POSTGRES_URL")


@inlineCallbacks
def waitFor(
    condition: Callable[[], bool],
    poke: Callable[[], Deferred[Any]] | None = None,
    timeout: float = 30.0,
) -> InlineTest:
    """
    Wait for C{condition()}, calling C{poke} again every second meanwhile.

    @raise AssertionError: C{condition()} is still false after C{timeout}.
    """
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        if poke is not None:
            yield until_available(poke)
        for _ in range(20):
            if condition():
                return
            yield sleep(0.05)
    raise AssertionError(f"still waiting after {timeout} s")


def blocked(connection: Any) -> int:
    """
    How many sessions wait for a lock, through psycopg2 C{connection}: a
    store's call has reached the server and waits there.
    """
    cursor = connection.cursor()
    cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
    return cursor.fetchone()[0]  # type: ignore[no-any-return]


class PostgresMetadataStoreTests(PostgresMixin, CountsTestsMixin, unittest.TestCase):
    """
    The metadata suite on PostgreSQL, each test in a new database on the
    cluster of C{KOBOLDFS_TEST_POSTGRES_URL} (so that trial's workers do
    not meet); and what only PostgreSQL does: notifying other processes,
    and riding out a restart of the server (on a cluster of the test's
    own, since stopping the shared one would disturb the other worker).
    """

    if _POSTGRES_URL is None:
        skip = "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL"

    @inlineCallbacks
    def setUp(self) -> InlineTest:
        assert _POSTGRES_URL is not None
        self.url = yield self.freshDatabase(_POSTGRES_URL)

    @inlineCallbacks
    def ownCluster(self) -> Generator[Deferred[Any], Any, PostgresCluster]:
        """
        A throwaway cluster for a test that stops PostgreSQL; the test's
        stores use a database on it from now on.
        """
        cluster = yield self.throwawayCluster()
        # Not dropped at cleanup: the cluster may be down then, and goes.
        self.url = yield ensureDeferred(pgcluster.create_database(cluster.url()))
        return cluster

    def dropAll(self) -> None:
        """
        Empty the database: drop every table of the schema.
        """
        engine = adminEngine(self.url)
        try:
            metadata.drop_all(engine)
        finally:
            engine.dispose()

    def makeStore(self, url: str | None = None) -> IMetadataStore:
        store = store_from_url(url or self.url, reactor)
        self.addCleanup(store.stop)
        return store

    def adminConnection(self, autocommit: bool = True) -> Any:
        """
        A blocking connection of the test's own, closed when it ends.
        """
        connection = psycopg2.connect(libpq_dsn(self.url))
        connection.autocommit = autocommit
        self.addCleanup(connection.close)
        return connection

    def test_storeFromURL(self) -> None:
        """
        PostgreSQL goes to the txpostgres store.
        """
        self.assertIsInstance(self.makeStore(), PostgresStore)

    @inlineCallbacks
    def test_unreachable(self) -> InlineTest:
        """
        A database that cannot be reached fails start with the retryable
        L{Unavailable}, naming the cause, and leaves nothing open.
        """
        url = f"postgresql://postgres@127.0.0.1:{free_port()}/koboldfs_test"
        store = self.makeStore(url)
        error = yield self.assertFailure(store.start(), Unavailable)
        self.assertTrue(error.retryable)
        self.assertIn("Connection refused", str(error))
        yield self.assertFailure(store.lookup("ns", "k"), Unavailable)

    @inlineCallbacks
    def test_multiHost(self) -> InlineTest:
        """
        A multi-host URL reaches libpq whole: the first host is down, so the
        store connects to the second, the one that takes writes.
        """
        params = parse_dsn(libpq_dsn(self.url))
        url = (
            f"postgresql://{params['user']}@127.0.0.1:{free_port()},"
            f"{params['host']}:{params['port']}/{params['dbname']}"
            "?target_session_attrs=read-write"
        )
        store = self.makeStore(url)
        yield store.start()
        yield self.addFile(store, "k")
        self.assertEqual((yield store.list_keys("ns", "", None, 10)), ["k"])

    @inlineCallbacks
    def test_startAtOnceRepeatedly(self) -> InlineTest:
        """
        Two servers starting at once on an empty database both start, and
        the schema is created once, however their statements interleave.
        """
        for _ in range(5):
            self.dropAll()
            one, two = self.makeStore(), self.makeStore()
            versions = yield gatherResults([one.start(), two.start()])
            self.assertEqual(versions, [SCHEMA_VERSION] * 2)
            engine = adminEngine(self.url)
            try:
                with engine.connect() as connection:
                    rows = connection.execute(select(schema_version.c.version)).all()
            finally:
                engine.dispose()
            self.assertEqual(rows, [(SCHEMA_VERSION,)])
            yield gatherResults([one.stop(), two.stop()])

    @inlineCallbacks
    def test_schemaLock(self) -> InlineTest:
        """
        The schema is created holding an advisory lock, so that a server
        starting waits for another one creating or upgrading it.
        """
        admin = self.adminConnection()
        admin.cursor().execute(f"SELECT pg_advisory_lock({SCHEMA_LOCK})")
        started = self.makeStore().start()
        while not blocked(admin):
            yield sleep(0.01)
        self.assertNoResult(started)
        admin.cursor().execute(f"SELECT pg_advisory_unlock({SCHEMA_LOCK})")
        self.assertEqual((yield started), SCHEMA_VERSION)

    @inlineCallbacks
    def test_notifiedByOtherStore(self) -> InlineTest:
        """
        A store hears, through LISTEN, of the changes another store (another
        server process) commits, each once; and each store hears of its own
        changes once, not again when their notifications come back.
        """
        one = yield self.startedStore()
        two = yield self.startedStore()
        heardByOne: list[tuple[str, dict]] = []
        heardByTwo: list[tuple[str, dict]] = []
        one.subscribe(lambda event, payload: heardByOne.append((event, payload)))
        two.subscribe(lambda event, payload: heardByTwo.append((event, payload)))
        info = yield self.addFile(two, "k")
        yield two.delete("ns", "k", T0)
        yield two.delete("ns", "k", T0)
        yield two.register_server(ServerInfo("s2", "h", "h:1", "http://h/"))
        yield two.set_server_state("s2", "drain")
        yield two.heartbeat("s2", T0, 1, 2)
        file = {"id": info.id, "namespace": "ns", "key": "k"}
        byTwo = [
            ("file_added", file),
            ("file_deleted", file),
            ("server_changed", {"name": "s2"}),
            ("server_changed", {"name": "s2"}),
        ]
        yield waitFor(lambda: len(heardByOne) == len(byTwo))
        self.assertEqual(heardByOne, byTwo)
        # Notifications arrive in commit order: once two hears of this one,
        # it has had (and skipped) the echoes of all of its own.
        yield one.register_server(ServerInfo("s1", "h", "h:1", "http://h/"))
        byOne = ("server_changed", {"name": "s1"})
        yield waitFor(lambda: byOne in heardByTwo)
        self.assertEqual(heardByTwo, byTwo + [byOne])
        self.assertEqual(heardByOne, byTwo + [byOne])

    @inlineCallbacks
    def test_withoutListen(self) -> InlineTest:
        """
        With C{?kobold_listen=off} (a database without LISTEN/NOTIFY) a
        store opens no listening connection and hears only its own
        changes; another store's are found by polling its pages.
        """
        sep = "&" if "?" in self.url else "?"
        polled = store_from_url(f"{self.url}{sep}kobold_listen=off", reactor)
        self.addCleanup(polled.stop)
        yield polled.start()
        self.assertFalse(polled.listening)  # type: ignore[attr-defined]
        self.assertEqual(len(polled._connections), POOL_SIZE)  # type: ignore[attr-defined]
        other = yield self.startedStore()
        heard: list[str] = []
        polled.subscribe(lambda event, payload: heard.append(event))
        for name in ("s1", "s2"):
            yield other.register_server(ServerInfo(name, name, f"{name}:1", f"http://{name}/"))
        info = yield self.addFile(other, "k")
        yield self.addFile(polled, "mine")
        self.assertEqual(heard, ["file_added"])
        self.assertEqual([f.id for f in (yield polled.queued_files("s2", 0, 10))][:1], [info.id])
        yield sleep(0.5)
        self.assertEqual(heard, ["file_added"])
        maybe = f"{self.url}{sep}kobold_listen=maybe"
        self.assertRaises(ValueError, store_from_url, maybe, reactor)

    @inlineCallbacks
    def test_postgresRestart(self) -> InlineTest:
        """
        When PostgreSQL restarts, a call in progress and calls made while it
        is down fail with the retryable L{Unavailable}; once it is back, the
        stores reconnect by themselves: calls succeed, and a store hears
        again of another's changes (its LISTEN is issued again).
        """
        cluster = yield self.ownCluster()
        logged: list[dict] = []
        observer = cast(ILogObserver, logged.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        one = yield self.startedStore()
        two = yield self.startedStore()
        heard: list[dict] = []
        one.subscribe(lambda event, payload: heard.append(payload))
        yield self.addFile(one, "before")

        # A call in progress: waiting for a lock, when the server stops.
        admin = self.adminConnection(autocommit=False)
        admin.cursor().execute("LOCK TABLE servers")
        inProgress = one.servers()
        watcher = self.adminConnection()
        while not blocked(watcher):
            yield sleep(0.01)
        # Immediate: a fast stop ends the sessions in no set order, and the
        # lock holder's going first would let the call run and succeed.
        yield ensureDeferred(cluster.stop("immediate"))
        error = yield self.assertFailure(inProgress, Unavailable)
        self.assertTrue(error.retryable)
        yield self.assertFailure(one.lookup("ns", "before"), Unavailable)
        yield self.assertFailure(self.addFile(two, "down"), Unavailable)

        yield ensureDeferred(cluster.start())
        added = yield until_available(lambda: self.addFile(two, "after"))
        self.assertEqual((yield until_available(lambda: one.lookup("ns", "after"))), added)
        self.assertEqual(
            (yield until_available(lambda: one.list_keys("ns", "", None, 10))),
            ["after", "before"],
        )
        # Notifications sent before one's LISTEN is back are lost: keep
        # changing until one hears of a change.
        servers = iter(range(1000))
        yield waitFor(
            lambda: bool(heard) and "name" in heard[-1],
            poke=lambda: two.register_server(
                ServerInfo(f"s{next(servers)}", "h", "h:1", "http://h/")
            ),
        )
        # The call in progress could not be rolled back: logged as the lost
        # connection it is, not as an error.
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertIn(
            "metadata database transaction ended by a lost connection",
            [event.get("log_format", "").split(" (")[0] for event in logged],
        )

    @inlineCallbacks
    def test_stopWhileDown(self) -> InlineTest:
        """
        A store stops cleanly while PostgreSQL is down and its connections
        are trying to reconnect: nothing is left retrying.
        """
        cluster = yield self.ownCluster()
        store = yield self.startedStore()
        yield ensureDeferred(cluster.stop("immediate"))
        yield self.assertFailure(store.servers(), Unavailable)
        # Past the first attempts: the next one is waiting for its time.
        detectors = [connection.detector for connection in store._connections]
        yield waitFor(lambda: all(detector.waiting for detector in detectors))
        yield store.stop()
        self.assertFalse(any(detector.waiting for detector in detectors))
        # Rolling back on a connection not yet known to be dead fails, and
        # is no error.
        self.assertEqual(self.flushLoggedErrors(), [])

    if pgcluster.SKIP is not None:
        test_postgresRestart.skip = pgcluster.SKIP  # type: ignore[attr-defined]
        test_stopWhileDown.skip = pgcluster.SKIP  # type: ignore[attr-defined]


class PostgresURLTests(unittest.SynchronousTestCase):
    """
    Tests for how L{PostgresStore} reads its URL, which needs no server.
    """

    def test_multiHost(self) -> None:
        """
        libpq's multi-host URLs, which SQLAlchemy cannot parse, reach libpq
        whole, query parameters included.
        """
        url = "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write"
        self.assertEqual(
            parse_dsn(libpq_dsn(url)),
            {
                "user": "u",
                "host": "h1,h2",
                "port": "5432,5433",
                "dbname": "db",
                "target_session_attrs": "read-write",
                **DEAD_PEER_DEFAULTS,
            },
        )
        self.assertIsInstance(store_from_url(url, reactor), PostgresStore)

    def test_driverDropped(self) -> None:
        """
        A SQLAlchemy driver in the scheme is dropped, and escapes decoded.
        """
        dsn = libpq_dsn("postgresql+psycopg2://u:p%40ss%20word@[::1]:6543/my%20db")
        self.assertEqual(
            parse_dsn(dsn),
            {
                "user": "u",
                "password": "p@ss word",
                "host": "::1",
                "port": "6543",
                "dbname": "my db",
                **DEAD_PEER_DEFAULTS,
            },
        )

    def test_deadPeerDefaults(self) -> None:
        """
        Unless the URL sets them, libpq is told to give up on a host that
        stopped answering within seconds; settings in the URL win.
        """
        params = parse_dsn(libpq_dsn("postgresql://h/db?tcp_user_timeout=2000"))
        self.assertEqual(params["tcp_user_timeout"], "2000")
        self.assertEqual(params["keepalives_idle"], DEAD_PEER_DEFAULTS["keepalives_idle"])

    def test_refused(self) -> None:
        """
        A URL that is not PostgreSQL's, or that libpq refuses, is refused
        when the store is made, not at its first connection.
        """
        for url in (
            "sqlite:///meta.sqlite",
            "postgresql://h/db?no_such_parameter=1",
        ):
            self.assertRaises(ValueError, PostgresStore, url, reactor)

    def test_urlHidesPassword(self) -> None:
        """
        The URL a store shows, in logs and status pages, has no password,
        wherever the password was.
        """
        cases = {
            "postgresql+psycopg2://kobold:s3cret@db.example/meta": "postgresql+psycopg2://kobold:***@db.example/meta",
            "postgresql://kobold:s3cret@h1:5432,h2:5433/meta?target_session_attrs=read-write": "postgresql://kobold:***@h1:5432,h2:5433/meta?target_session_attrs=read-write",
            "postgresql://h/meta?user=kobold&password=s3cret": "postgresql://h/meta?user=kobold&password=***",
            "postgresql://kobold@h/meta": "postgresql://kobold@h/meta",
            "postgresql:///meta?host=/run/postgresql": "postgresql:///meta?host=/run/postgresql",
        }
        for url, shown in cases.items():
            self.assertEqual(PostgresStore(url, reactor).url, shown)


class TxpostgresOverridesTests(unittest.SynchronousTestCase):
    """
    Tests for L{koboldfs.metadata.txpostgres_overrides}, whose classes
    reach into txpostgres's internals.
    """

    def test_checkedVersion(self) -> None:
        """
        The installed txpostgres is the one the overrides were checked
        against: after an upgrade, read them against the new txpostgres,
        then move L{CHECKED_WITH} on.
        """
        self.assertEqual(version("txpostgres"), CHECKED_WITH)
