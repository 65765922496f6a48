"""
Tests of what the metadata stores keep for the S3 front end (object
attributes and entity tags, conditional writes, public-read namespaces,
the schema's upgrade to them; credentials; multipart uploads): one suite,
run against SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Generator

from sqlalchemy import text, update
from twisted.internet import reactor
from twisted.internet import task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from koboldfs.attributes import AttributesTooLarge, check_attributes
from koboldfs.auth import new_s3_credential, open_s3_secret, seal_s3_secret
from koboldfs.errors import MultipartError, PreconditionFailed, ServerError
from koboldfs.interfaces import (
    NO_EXTRAS,
    Extras,
    FileInfo,
    IMetadataStore,
    PartInfo,
    S3Credential,
    S3Grant,
    etag,
)
from koboldfs.metadata import store_from_url
from koboldfs.names import is_bucket_name
from koboldfs.metadata.schema import SCHEMA_VERSION, schema_version
from koboldfs.s3creds import S3Credentials
from koboldfs.test.pgcluster import PostgresMixin
from koboldfs.test.support import eventually
from koboldfs.test.test_cli import Result, run_process
from koboldfs.test.test_metadata import adminEngine

SHA = "ab" * 32
MD5 = "0123456789abcdef" * 2
T0 = 1_700_000_000.25
_POSTGRES_URL = os.environ.get("KOBOLDFS_TEST_POSTGRES_URL")

InlineTest = Generator[Deferred[Any], Any, None]

if TYPE_CHECKING:
    _Mixin = unittest.TestCase
else:
    _Mixin = object


class EntityTagTests(unittest.SynchronousTestCase):
    def test_forms(self) -> None:
        """
        A single-part object's tag is its MD5, a multipart one's S3's
        C{md5-N}; a file without an MD5 gets its SHA-256 and C{-0}, which
        is neither 32 hex digits nor a real multipart tag.
        """
        self.assertEqual(etag(SHA, MD5, None), MD5)
        self.assertEqual(etag(SHA, MD5, 3), f"{MD5}-3")
        self.assertEqual(etag(SHA, None, None), f"{SHA}-0")
        info = FileInfo(1, "f" * 32, "ns", "k", 10, SHA, T0, "p")
        self.assertEqual(info.etag, f"{SHA}-0")
        self.assertEqual((info.part_range(1), info.part_range(2)), ((0, 10), None))

    def test_partRanges(self) -> None:
        """
        A multipart object's parts are found by number when all but the
        last were of one size; not when their bounds were not kept.
        """
        info = FileInfo(1, "f" * 32, "ns", "k", 25, SHA, T0, "p", md5=MD5, parts=3, part_size=10)
        self.assertEqual(
            [info.part_range(n) for n in range(5)], [None, (0, 10), (10, 10), (20, 5), None]
        )
        unknown = FileInfo(1, "f" * 32, "ns", "k", 25, SHA, T0, "p", md5=MD5, parts=3)
        self.assertIsNone(unknown.part_range(1))


class AttributesTests(unittest.SynchronousTestCase):
    def test_userMetadataBound(self) -> None:
        """
        User metadata is bounded as S3 bounds it: 2 KiB of names (after
        the prefix) and values; exactly 2048 bytes pass.
        """
        name = "x-amz-meta-" + "n" * 48
        check_attributes({name: "v" * 2000})
        with self.assertRaises(AttributesTooLarge):
            check_attributes({name: "v" * 2001})
        with self.assertRaises(AttributesTooLarge):
            check_attributes({"content-type": "x" * 9000})

    def test_badNamesAndValues(self) -> None:
        """
        Names are lower-case printable ASCII without spaces; values hold no
        control character (a header could not carry it back).
        """
        for bad in ({"Content-Type": "a"}, {"a b": "c"}, {"x": "a\r\nb"}, {"": "a"}, {"x": 1}):
            with self.assertRaises(ServerError, msg=repr(bad)):
                check_attributes(bad)  # type: ignore[arg-type]
        self.assertIsNone(check_attributes({}))
        frozen = check_attributes({"content-type": "text/plain"})
        with self.assertRaises(TypeError):
            frozen["x"] = "y"  # type: ignore[index]


class BucketNameTests(unittest.SynchronousTestCase):
    def test_rules(self) -> None:
        """
        Namespaces whose names S3 allows as bucket names are buckets; the
        others (upper case, underscores, too short, IP-like, reserved)
        are not.
        """
        for good in ("abc", "my-bucket.2", "a" * 63, "1.2.3"):
            self.assertTrue(is_bucket_name(good), good)
        for bad in (
            "ab",
            "a" * 64,
            "Photos",
            "my_bucket",
            "-abc",
            "abc-",
            "a..b",
            "192.168.0.1",
            "xn--abc",
            "abc-s3alias",
            "default.",
        ):
            self.assertFalse(is_bucket_name(bad), bad)


CLUSTER_SECRET = b"a cluster secret of enough bytes"
OTHER_SECRET = b"another cluster secret, rotated in"


class SealingTests(unittest.SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """
        A sealed secret opens with its cluster secret (among others, as
        in a rotation), and shows nothing of the secret.
        """
        access_key, secret = new_s3_credential()
        self.assertRegex(access_key, r"\AKFS[A-Z2-7]{17}\Z")
        self.assertEqual(len(secret), 40)
        sealed = seal_s3_secret(CLUSTER_SECRET, access_key, secret)
        self.assertNotIn(secret, sealed)
        self.assertEqual(open_s3_secret((OTHER_SECRET, CLUSTER_SECRET), access_key, sealed), secret)
        self.assertNotEqual(sealed, seal_s3_secret(CLUSTER_SECRET, access_key, secret))

    def test_refused(self) -> None:
        """
        A sealed secret does not open without its cluster secret, under
        another access key (a row's secret copied to another), or changed
        by one character.
        """
        access_key, secret = new_s3_credential()
        other_key, _ = new_s3_credential()
        sealed = seal_s3_secret(CLUSTER_SECRET, access_key, secret)
        self.assertIsNone(open_s3_secret((OTHER_SECRET,), access_key, sealed))
        self.assertIsNone(open_s3_secret((CLUSTER_SECRET,), other_key, sealed))
        flipped = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
        self.assertIsNone(open_s3_secret((CLUSTER_SECRET,), access_key, flipped))
        for bad in ("", "s3seal1..", "nope", sealed.replace("s3seal1", "s3seal9")):
            self.assertIsNone(open_s3_secret((CLUSTER_SECRET,), access_key, bad))


class S3MetadataTestsMixin(_Mixin):
    """
    What every store keeps for S3, whatever its database.  C{self.url} is
    a fresh, empty database, set by the subclass.
    """

    url: str
    #: Whether one store hears of another's changes (LISTEN/NOTIFY).
    notifies: bool
    _fids = 0

    def makeStore(self) -> IMetadataStore:
        store = store_from_url(self.url, reactor)
        self.addCleanup(store.stop)
        return store

    @inlineCallbacks
    def startedStore(self) -> Generator[Deferred[Any], Any, IMetadataStore]:
        store = self.makeStore()
        yield store.start()
        return store

    def addFile(
        self, store: IMetadataStore, key: str, extras: Extras = NO_EXTRAS, namespace: str = "ns"
    ) -> Deferred[FileInfo]:
        self._fids += 1
        fid = f"{self._fids:032x}"
        return store.add_file(
            namespace, key, fid, f"data/{fid}", self._fids, SHA, T0, "s1", extras=extras
        )

    @inlineCallbacks
    def test_attributesKept(self) -> InlineTest:
        """
        A file's MD5, parts and attributes are recorded with it and
        returned by lookup, lookup_fid and list_files; a file put without
        them has none.
        """
        store = yield self.startedStore()
        attributes = check_attributes({"content-type": "text/plain", "x-amz-meta-a": "\u00e9"})
        added = yield self.addFile(store, "a", Extras(md5=MD5, attributes=attributes))
        multipart = yield self.addFile(store, "b", Extras(md5=MD5, parts=2, part_size=7))
        self.assertEqual((yield store.lookup("ns", "b")).part_size, 7)
        self.assertEqual(multipart.part_size, 7)
        yield self.addFile(store, "c")
        found = yield store.lookup("ns", "a")
        self.assertEqual(found, added)
        self.assertEqual((found.md5, found.parts, found.etag), (MD5, None, MD5))
        self.assertEqual(found.attributes, attributes)
        by_fid, _ = yield store.lookup_fid(added.fid)
        self.assertEqual(by_fid.attributes, attributes)
        listed = yield store.list_files("ns", "", None, 10)
        self.assertEqual([info.key for info in listed], ["a", "b", "c"])
        self.assertEqual([info.etag for info in listed], [MD5, f"{MD5}-2", f"{SHA}-0"])
        self.assertEqual(listed[0].attributes, attributes)
        self.assertIsNone(listed[2].attributes)
        self.assertEqual(
            [info.key for info in (yield store.list_files("ns", "b", None, 10))], ["b"]
        )
        self.assertEqual([info.key for info in (yield store.list_files("ns", "", "a", 1))], ["b"])
        self.assertEqual((yield store.list_files("nope", "", None, 10)), [])

    @inlineCallbacks
    def test_ifAbsent(self) -> InlineTest:
        """
        A put "if absent" is refused once the key has a live version, and
        the version stays; it succeeds again once the key is deleted.
        """
        store = yield self.startedStore()
        first = yield self.addFile(store, "k", Extras(if_absent=True))
        yield self.assertFailure(
            self.addFile(store, "k", Extras(if_absent=True)), PreconditionFailed
        )
        self.assertEqual((yield store.lookup("ns", "k")).fid, first.fid)
        yield store.delete("ns", "k", T0 + 1)
        again = yield self.addFile(store, "k", Extras(if_absent=True))
        self.assertEqual((yield store.lookup("ns", "k")).fid, again.fid)

    @inlineCallbacks
    def test_ifMatch(self) -> InlineTest:
        """
        A put "if match" replaces only the version of that entity tag: a
        missing key or another tag is refused.
        """
        store = yield self.startedStore()
        yield self.assertFailure(self.addFile(store, "k", Extras(if_match=MD5)), PreconditionFailed)
        yield self.addFile(store, "k", Extras(md5=MD5))
        other = "f" * 32
        yield self.assertFailure(
            self.addFile(store, "k", Extras(if_match=other)), PreconditionFailed
        )
        replaced = yield self.addFile(store, "k", Extras(md5=other, if_match=MD5))
        self.assertEqual((yield store.lookup("ns", "k")).fid, replaced.fid)

    @inlineCallbacks
    def test_publicRead(self) -> InlineTest:
        """
        A namespace is not public-read until set so, and the setting is
        a boolean.
        """
        store = yield self.startedStore()
        ns = yield store.namespace("b", create=True)
        self.assertFalse(ns.public_read)
        ns = yield store.set_namespace("b", public_read=True)
        self.assertTrue(ns.public_read)
        self.assertTrue((yield store.namespace("b")).public_read)
        yield self.assertFailure(store.set_namespace("b", public_read="yes"), ValueError)

    @inlineCallbacks
    def test_upgradeFromVersion2(self) -> InlineTest:
        """
        A database of schema version 2 (no S3 columns) is upgraded at
        start, its files kept: they read with no MD5 nor attributes, and
        new files record theirs.
        """
        store = yield self.startedStore()
        yield store.stop()
        engine = adminEngine(self.url)
        try:
            with engine.begin() as connection:
                for table, column in (
                    ("files", "md5"),
                    ("files", "parts"),
                    ("files", "part_size"),
                    ("files", "attributes"),
                    ("namespaces", "public_read"),
                ):
                    connection.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
                connection.execute(update(schema_version).values(version=2))
                connection.execute(
                    text("INSERT INTO namespaces (name, created, private) VALUES ('ns', 1, false)")
                )
                connection.execute(
                    text(
                        "INSERT INTO files (fid, namespace_id, key, size, sha256, created, path, "
                        "state) SELECT :fid, id, 'old', 3, :sha, 1, 'p', 'live' FROM namespaces"
                    ),
                    {"fid": "e" * 32, "sha": SHA},
                )
        finally:
            engine.dispose()
        store = yield self.startedStore()
        old = yield store.lookup("ns", "old")
        self.assertEqual((old.md5, old.attributes, old.etag), (None, None, f"{SHA}-0"))
        self.assertFalse((yield store.namespace("ns")).public_read)
        attributes = check_attributes({"cache-control": "no-cache"})
        yield self.addFile(store, "new", Extras(md5=MD5, attributes=attributes))
        self.assertEqual((yield store.lookup("ns", "new")).attributes, attributes)
        engine = adminEngine(self.url)
        try:
            with engine.connect() as connection:
                versions = connection.execute(text("SELECT version FROM kobold_schema")).all()
        finally:
            engine.dispose()
        self.assertEqual(versions, [(SCHEMA_VERSION,)])

    @inlineCallbacks
    def test_credentials(self) -> InlineTest:
        """
        A credential is stored with its grants and its secret sealed: the
        database alone does not give the secret, the cluster secret
        opens it.  It is listed, its use recorded, and revoked once.
        """
        store = yield self.startedStore()
        grants = (S3Grant("photos", True), S3Grant("logs", False))
        access_key, secret = yield store.create_s3_credential(grants, CLUSTER_SECRET)
        admin_key, _ = yield store.create_s3_credential((S3Grant(None, True),), CLUSTER_SECRET)
        info = yield store.s3_credential(access_key)
        self.assertEqual(info.grants, (S3Grant("logs", False), S3Grant("photos", True)))
        self.assertNotIn(secret, info.sealed)
        self.assertNotIn(secret, repr(info))
        self.assertEqual(open_s3_secret((CLUSTER_SECRET,), access_key, info.sealed), secret)
        self.assertIsNone(info.last_used)
        yield store.touch_s3_credential(access_key, T0)
        self.assertEqual((yield store.s3_credential(access_key)).last_used, T0)
        listed = yield store.s3_credentials()
        self.assertEqual(
            sorted((i.access_key, i.grants) for i in listed),
            sorted([(access_key, info.grants), (admin_key, (S3Grant(None, True),))]),
        )
        self.assertTrue((yield store.revoke_s3_credential(access_key)))
        self.assertFalse((yield store.revoke_s3_credential(access_key)))
        self.assertIsNone((yield store.s3_credential(access_key)))
        self.assertEqual([i.access_key for i in (yield store.s3_credentials())], [admin_key])

    @inlineCallbacks
    def test_credentialRefused(self) -> InlineTest:
        """
        A credential with no grant, or a grant of a bad namespace name, is
        not made.
        """
        store = yield self.startedStore()
        yield self.assertFailure(store.create_s3_credential((), CLUSTER_SECRET), ValueError)
        yield self.assertFailure(
            store.create_s3_credential((S3Grant("no/slash", True),), CLUSTER_SECRET), ValueError
        )
        self.assertEqual((yield store.s3_credentials()), [])

    @inlineCallbacks
    def test_cacheRevokedAtOnce(self) -> InlineTest:
        """
        A server's cache of credentials answers from memory until its TTL
        passes, and forgets a credential revoked through its store at
        once.
        """
        store = yield self.startedStore()
        clock = task.Clock()
        cache = S3Credentials(store, (CLUSTER_SECRET,), clock)
        access_key, secret = yield store.create_s3_credential(
            (S3Grant("b", False),), CLUSTER_SECRET
        )
        first, joined = cache.lookup(access_key), cache.lookup(access_key)
        found = yield first
        self.assertEqual(found, S3Credential(access_key, secret, (S3Grant("b", False),)))
        self.assertEqual((yield joined), found)
        self.assertIsNone((yield cache.lookup("KFS" + "A" * 17)))
        self.assertIsNone((yield cache.lookup("not a key")))
        # Its use is recorded (once a minute at most).
        yield eventually(
            lambda: store.s3_credential(access_key).addCallback(lambda i: i.last_used is not None)
        )
        yield store.revoke_s3_credential(access_key)
        self.assertIsNone((yield cache.lookup(access_key)))

    @inlineCallbacks
    def test_cacheTTL(self) -> InlineTest:
        """
        A revoke this server does not hear of (another process's, on
        SQLite) takes effect once the cached entry is older than the TTL.
        A credential sealed with a secret this server lacks is refused.
        """
        store = yield self.startedStore()
        other = yield self.startedStore()
        clock = task.Clock()
        cache = S3Credentials(store, (CLUSTER_SECRET,), clock)
        access_key, _ = yield store.create_s3_credential((S3Grant("b", True),), CLUSTER_SECRET)
        self.assertIsNotNone((yield cache.lookup(access_key)))
        yield other.revoke_s3_credential(access_key)
        if not self.notifies:
            self.assertIsNotNone((yield cache.lookup(access_key)))
            clock.advance(cache.ttl)
            self.assertIsNone((yield cache.lookup(access_key)))
        else:
            yield eventually(
                lambda: cache.lookup(access_key).addCallback(lambda c: c is None),
                what="the revoke heard through NOTIFY",
            )
        foreign, _ = yield store.create_s3_credential((S3Grant("b", True),), OTHER_SECRET)
        self.assertIsNone((yield cache.lookup(foreign)))

    @inlineCallbacks
    def test_adminCommands(self) -> InlineTest:
        """
        C{koboldfs admin s3 credential create} prints the access key id and
        the secret once; C{list} shows grants and never the secret;
        C{revoke} revokes, and a second revoke exits 1.
        """
        yield self.startedStore()
        secret_file = os.path.abspath(self.mktemp())
        with open(secret_file, "wb") as f:
            f.write(CLUSTER_SECRET + b"\n")

        def admin(*argv: str) -> Deferred[Result]:
            return deferToThread(
                run_process, ["admin", "--db", self.url, "s3", "credential", *argv]
            )

        r = yield admin("create", "--ns", "photos", "--ns", "logs:ro", "--secret-file", secret_file)
        self.assertEqual(r.code, 0, r.err)
        lines = dict(line.split(":", 1) for line in r.out.decode().splitlines())
        access_key, secret = lines["access key id"].strip(), lines["secret access key"].strip()
        store = yield self.startedStore()
        info = yield store.s3_credential(access_key)
        self.assertEqual(open_s3_secret((CLUSTER_SECRET,), access_key, info.sealed), secret)
        self.assertEqual(info.grants, (S3Grant("logs", False), S3Grant("photos", True)))
        r = yield admin("create", "--cluster", "--secret-file", secret_file)
        self.assertEqual(r.code, 0, r.err)
        r = yield admin("create", "--secret-file", secret_file)
        self.assertEqual(r.code, 2, r.err)
        r = yield admin("create", "--ns", "x")
        self.assertEqual(r.code, 2, r.err)
        self.assertIn("--secret-file", r.err)
        r = yield admin("list")
        self.assertEqual(r.code, 0, r.err)
        self.assertIn(f"{access_key}", r.out.decode())
        self.assertIn("logs:ro, photos", r.out.decode())
        self.assertIn("cluster", r.out.decode())
        self.assertNotIn(secret, r.out.decode())
        r = yield admin("revoke", access_key)
        self.assertEqual(r.code, 0, r.err)
        self.assertIsNone((yield store.s3_credential(access_key)))
        r = yield admin("revoke", access_key)
        self.assertEqual(r.code, 1, r.err)

    def addPart(
        self, store: IMetadataStore, upload_id: str, number: int, size: int = 10
    ) -> Deferred[PartInfo]:
        self._fids += 1
        fid = f"{self._fids:032x}"
        return store.add_part(
            upload_id, number, fid, f"data/{fid}", size, SHA, f"{self._fids:032x}", T0, "s1"
        )

    @inlineCallbacks
    def test_multipart(self) -> InlineTest:
        """
        An upload's parts are file rows of their own, invisible to readers
        and listed by number with their holders; a part uploaded again
        replaces the first, whose file is discarded.  Completing publishes
        the object with the upload's attributes and the parts' MD5 of MD5s,
        discards every part and closes the upload.
        """
        store = yield self.startedStore()
        attributes = check_attributes({"content-type": "video/mp4"})
        upload = yield store.create_upload("u" * 32, "ns", "big.mp4", attributes)
        self.assertEqual((yield store.find_upload(upload.upload_id)), upload)
        one = yield self.addPart(store, upload.upload_id, 1)
        first_two = yield self.addPart(store, upload.upload_id, 2)
        two = yield self.addPart(store, upload.upload_id, 2)
        parts = yield store.upload_parts(upload.upload_id, 0, 100)
        self.assertEqual(
            [(p.number, p.file.fid) for p in parts], [(1, one.file.fid), (2, two.file.fid)]
        )
        self.assertEqual(parts[0].file.replicas, ("s1",))
        self.assertEqual(parts[1].etag, two.file.md5)
        self.assertEqual(
            [p.number for p in (yield store.upload_parts(upload.upload_id, 1, 100))], [2]
        )
        self.assertEqual((yield store.find_part(upload.upload_id, 2)), parts[1])
        self.assertIsNone((yield store.find_part(upload.upload_id, 3)))
        self.assertIsNone((yield store.lookup("ns", "big.mp4")))
        self.assertEqual((yield store.list_files("ns", "", None, 10)), [])
        deleted = yield store.deleted_files("s1", 0, 10)
        self.assertEqual([info.fid for info in deleted], [first_two.file.fid])
        # Completing with a part that was since replaced is refused.
        chosen = [(1, one.file.id), (2, first_two.file.id)]
        error = yield self.assertFailure(
            store.complete_upload(upload.upload_id, chosen, "f" * 32, "p", 20, SHA, T0, "s1"),
            MultipartError,
        )
        self.assertEqual(error.s3_code, "InvalidPart")
        chosen = [(1, one.file.id), (2, two.file.id)]
        extras = Extras(md5=MD5, parts=2)
        info = yield store.complete_upload(
            upload.upload_id, chosen, "f" * 32, "p", 20, SHA, T0, "s1", ("s2",), extras
        )
        self.assertEqual(
            (info.etag, info.attributes, info.replicas), (f"{MD5}-2", attributes, ("s1", "s2"))
        )
        self.assertEqual((yield store.lookup("ns", "big.mp4")), info)
        self.assertIsNone((yield store.find_upload(upload.upload_id)))
        deleted = yield store.deleted_files("s1", 0, 10)
        self.assertEqual(
            sorted(i.fid for i in deleted), sorted(p.file.fid for p in (one, first_two, two))
        )
        error = yield self.assertFailure(
            store.upload_parts(upload.upload_id, 0, 10), MultipartError
        )
        self.assertEqual(error.s3_code, "NoSuchUpload")
        error = yield self.assertFailure(self.addPart(store, upload.upload_id, 3), MultipartError)
        self.assertEqual(error.s3_code, "NoSuchUpload")

    @inlineCallbacks
    def test_uploadsListedAbortedExpired(self) -> InlineTest:
        """
        Uploads are listed by key and id, from a prefix, after a marker;
        aborting one discards its parts; the sweep aborts those begun before
        its bound, and only those.
        """
        store = yield self.startedStore()
        made = []
        for key, upload_id in (
            ("b", "2" * 32),
            ("a", "3" * 32),
            ("b", "1" * 32),
            ("c/x", "4" * 32),
        ):
            made.append((yield store.create_upload(upload_id, "ns", key, None)))
        listed = yield store.uploads("ns", "", None, 10)
        self.assertEqual(
            [(u.key, u.upload_id) for u in listed],
            [("a", "3" * 32), ("b", "1" * 32), ("b", "2" * 32), ("c/x", "4" * 32)],
        )
        after = yield store.uploads("ns", "", ("b", "1" * 32), 2)
        self.assertEqual(
            [(u.key, u.upload_id) for u in after], [("b", "2" * 32), ("c/x", "4" * 32)]
        )
        self.assertEqual([u.key for u in (yield store.uploads("ns", "c/", None, 10))], ["c/x"])
        self.assertEqual((yield store.uploads("other", "", None, 10)), [])
        part = yield self.addPart(store, "3" * 32, 1)
        self.assertEqual((yield store.abort_upload("3" * 32, T0)), 1)
        error = yield self.assertFailure(store.abort_upload("3" * 32, T0), MultipartError)
        self.assertEqual(error.s3_code, "NoSuchUpload")
        self.assertEqual([i.fid for i in (yield store.deleted_files("s1", 0, 10))], [part.file.fid])
        # The three left were made "now" (the store's clock): a bound before
        # them expires none, one after them all.
        self.assertEqual((yield store.expire_uploads(made[0].created - 1, T0, 10)), [])
        expired = yield store.expire_uploads(made[-1].created + 1, T0, 10)
        self.assertEqual(sorted(expired), ["1" * 32, "2" * 32, "4" * 32])
        self.assertEqual((yield store.uploads("ns", "", None, 10)), [])

    @inlineCallbacks
    def test_deleteNamespace(self) -> InlineTest:
        """
        A namespace with a live file or an upload under way is not
        removed; once empty it is, with its keys, while its deleted
        files stay for the replicators to reclaim.  The name may then be
        used afresh; the hidden namespace they wait in is never listed.
        """
        store = yield self.startedStore()
        self.assertEqual((yield store.delete_namespace("nope")), "missing")
        old = yield self.addFile(store, "k", namespace="b")
        yield store.create_key("b")
        self.assertEqual((yield store.delete_namespace("b")), "not-empty")
        yield store.delete("b", "k", T0)
        upload = yield store.create_upload("9" * 32, "b", "k", None)
        self.assertEqual((yield store.delete_namespace("b")), "not-empty")
        yield store.abort_upload(upload.upload_id, T0)
        self.assertEqual((yield store.delete_namespace("b")), "deleted")
        self.assertIsNone((yield store.namespace("b")))
        self.assertEqual((yield store.namespaces()), [])
        self.assertEqual([i.fid for i in (yield store.deleted_files("s1", 0, 10))], [old.fid])
        yield store.remove_replica(old.id, "s1")
        self.assertTrue((yield store.purge_file(old.id)))
        again = yield self.addFile(store, "k", namespace="b")
        self.assertEqual((yield store.lookup("b", "k")).fid, again.fid)
        self.assertEqual([ns.name for ns in (yield store.namespaces())], ["b"])
        self.assertEqual((yield store.keys("b")), [])


class SQLiteS3MetadataTests(S3MetadataTestsMixin, unittest.TestCase):
    notifies = False

    def setUp(self) -> None:
        self.url = f"sqlite:///{os.path.abspath(self.mktemp())}.sqlite"


class PostgresS3MetadataTests(PostgresMixin, S3MetadataTestsMixin, unittest.TestCase):
    notifies = True
    if _POSTGRES_URL is None:
        skip = "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL"

    @inlineCallbacks
    def setUp(self) -> InlineTest:  # type: ignore[override]
        assert _POSTGRES_URL is not None
        self.url = yield self.freshDatabase(_POSTGRES_URL)
