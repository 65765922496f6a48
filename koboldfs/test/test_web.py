"""
Tests of the built-in HTTP server and of the URLs C{get_url} hands out, in
memory: the real L{Site} over a L{StringTransport}, on a
L{koboldfs.testing.MemoryServer}.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.errors import DataLost, ErrorCode, ServerError
from koboldfs.interfaces import FileInfo, ServerInfo
from koboldfs.protocol import CHUNK_SIZE
from koboldfs.testing import HTTPResponse, MemoryServer, parse_response
from koboldfs.urls import (
    DEFAULT_EXPIRES,
    check_signature,
    check_template,
    fill_template,
    nginx_key,
    nginx_token,
    signature,
)
from koboldfs.web import PUBLIC_CACHE, Unsatisfiable, make_site, parse_range

BODY = b"hello, kobold\n"


class _WebMixin:
    def setUp(self) -> None:
        self.server = MemoryServer(os.path.abspath(self.mktemp()))
        self.server.start()
        self.addCleanup(self.server.stop)
        self.client = self.server.client("ns")
        self.addCleanup(lambda: self.server.flush(self.client.close()))

    def put(self, key: str, body: bytes, namespace: str = "ns") -> FileInfo:
        client = self.client if namespace == "ns" else self.server.client(namespace)
        self.server.flush(client.put(key, body))
        info = self.server.flush(self.server.store.lookup(namespace, key))
        assert isinstance(info, FileInfo)
        return info

    def get_url(self, key: str, namespace: str = "ns", **kwargs: Any) -> str:
        return self.server.flush(self.server.node.get_url(namespace, key, **kwargs))

    def get(self, target: str, **headers: str) -> HTTPResponse:
        """
        GET C{target} (a path, or a URL get_url gave).
        """
        return self.http("GET", target, **headers)

    def http(self, method: str, target: str, **headers: str) -> HTTPResponse:
        target = target.removeprefix("http://memory")
        return self.server.http(
            method, target, {k.replace("_", "-"): v for k, v in headers.items()}
        )

    def disk(self, info: FileInfo) -> str:
        return self.server.storage.abspath(info.path)


class ServingTests(_WebMixin, SynchronousTestCase):
    """
    GET and HEAD of public files: status codes and headers.
    """

    def test_get(self) -> None:
        """
        A stored file comes back whole with the headers a cache and a
        browser need: validators from the checksum and creation time, a
        type from the key's extension, and a year of caching, since the
        bytes under a URL never change.
        """
        info = self.put("notes/motd.txt", BODY)
        response = self.get(self.get_url("notes/motd.txt"))
        self.assertEqual((response.status, response.body), (200, BODY))
        headers = response.headers
        self.assertEqual(headers["etag"], f'"{hashlib.sha256(BODY).hexdigest()}"')
        self.assertEqual(headers["last-modified"], "Thu, 01 Jan 1970 00:00:00 GMT")
        self.assertEqual(headers["content-length"], str(len(BODY)))
        self.assertEqual(headers["content-type"], "text/plain")
        self.assertEqual(headers["cache-control"], PUBLIC_CACHE.decode())
        self.assertEqual(headers["accept-ranges"], "bytes")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertFalse(response.aborted)
        self.assertEqual(info.size, len(BODY))

    def test_contentType(self) -> None:
        """
        The type is guessed from the stored extension; with none, the body
        is only bytes.
        """
        for key, expected in [
            ("a.JPG", "image/jpeg"),
            ("b.png", "image/png"),
            ("c.pdf", "application/pdf"),
            ("noext", "application/octet-stream"),
        ]:
            self.put(key, b"x")
            self.assertEqual(self.get(self.get_url(key)).headers["content-type"], expected, key)

    def test_head(self) -> None:
        """
        HEAD gives GET's status and headers, and no body.
        """
        self.put("a.txt", BODY)
        url = self.get_url("a.txt")
        head, get = self.http("HEAD", url), self.get(url)
        self.assertEqual((head.status, head.body), (200, b""))
        for name in ("etag", "last-modified", "content-length", "content-type", "cache-control"):
            self.assertEqual(head.headers[name], get.headers[name], name)

    def test_range(self) -> None:
        """
        One byte range is answered with 206 and just those bytes, however
        it is written; a range past the end is clipped to it.
        """
        self.put("a.txt", BODY)
        url = self.get_url("a.txt")
        size = len(BODY)
        for spec, first, last in [
            ("bytes=0-4", 0, 4),
            ("bytes=7-", 7, size - 1),
            ("bytes=-3", size - 3, size - 1),
            ("bytes=-1000", 0, size - 1),
            ("bytes=5-1000", 5, size - 1),
        ]:
            response = self.get(url, Range=spec)
            self.assertEqual(response.status, 206, spec)
            self.assertEqual(response.body, BODY[first : last + 1], spec)
            self.assertEqual(response.headers["content-range"], f"bytes {first}-{last}/{size}")
            self.assertEqual(response.headers["content-length"], str(last - first + 1))
        head = self.http("HEAD", url, Range="bytes=0-4")
        self.assertEqual((head.status, head.headers["content-length"], head.body), (206, "5", b""))

    def test_rangeIgnored(self) -> None:
        """
        Several ranges, a malformed one, another unit, or an If-Range that
        names another version get the whole file, as HTTP allows.
        """
        self.put("a.txt", BODY)
        url = self.get_url("a.txt")
        for headers in [
            {"Range": "bytes=0-1,4-5"},
            {"Range": "bytes=5-2"},
            {"Range": "bytes=x-"},
            {"Range": "bytes=+1-2"},
            {"Range": "items=0-1"},
            {"Range": "bytes=0-1", "If-Range": '"another"'},
            {"Range": "bytes=0-1", "If-Range": "Fri, 01 Jan 2100 00:00:00 GMT"},
        ]:
            response = self.get(url, **headers)
            self.assertEqual((response.status, response.body), (200, BODY), headers)
        etag = self.get(url).headers["etag"]
        self.assertEqual(self.get(url, Range="bytes=0-1", If_Range=etag).status, 206)

    def test_unsatisfiable(self) -> None:
        """
        A range that selects no byte is 416, with the file's size.
        """
        self.put("a.txt", BODY)
        self.put("empty.txt", b"")
        for key, spec, size in [
            ("a.txt", f"bytes={len(BODY)}-", len(BODY)),
            ("a.txt", "bytes=-0", len(BODY)),
            ("empty.txt", "bytes=0-", 0),
            ("empty.txt", "bytes=-5", 0),
        ]:
            response = self.get(self.get_url(key), Range=spec)
            self.assertEqual(response.status, 416, spec)
            self.assertEqual(response.headers["content-range"], f"bytes */{size}")
            self.assertEqual(response.body, b"")

    def test_emptyFile(self) -> None:
        """
        An empty file is a 200 with no body.
        """
        self.put("empty.txt", b"")
        response = self.get(self.get_url("empty.txt"))
        self.assertEqual((response.status, response.body), (200, b""))
        self.assertEqual(response.headers["content-length"], "0")

    def test_notModified(self) -> None:
        """
        A client that has this version is told so (304, no body): by its
        ETag, in any If-None-Match list, weak or not; or, without one, by
        date.
        """
        self.put("a.txt", BODY)
        url = self.get_url("a.txt")
        etag = self.get(url).headers["etag"]
        for headers in [
            {"If-None-Match": etag},
            {"If-None-Match": f'"other", W/{etag}'},
            {"If-None-Match": "*"},
            {"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"},
            {"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"},
        ]:
            response = self.get(url, **headers)
            self.assertEqual((response.status, response.body), (304, b""), headers)
            self.assertEqual(response.headers["etag"], etag)
            self.assertNotIn("content-length", response.headers)
        for headers in [
            {"If-None-Match": '"other"'},
            {"If-None-Match": '"other"', "If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"},
            {"If-Modified-Since": "not a date"},
        ]:
            self.assertEqual(self.get(url, **headers).status, 200, headers)
        self.server.reactor.advance(10)
        self.put("b.txt", BODY)
        stale = {"If-Modified-Since": "Thu, 01 Jan 1970 00:00:05 GMT"}
        self.assertEqual(self.get(self.get_url("b.txt"), **stale).status, 200)

    def test_largeFileStreamed(self) -> None:
        """
        A file of several chunks streams whole and verified.
        """
        body = os.urandom(3 * CHUNK_SIZE + 5)
        self.put("big.bin", body)
        response = self.get(self.get_url("big.bin"))
        self.assertEqual((response.status, response.body), (200, body))

    def test_backpressure(self) -> None:
        """
        A client that stops reading stops the reads from disk: no more than
        a chunk waits in memory, and the rest follows once it reads again.
        """
        body = os.urandom(3 * CHUNK_SIZE)
        self.put("big.bin", body)
        path = self.get_url("big.bin").removeprefix("http://memory")
        transport = StringTransport()
        channel = make_site(self.server.node).buildProtocol(None)
        channel.makeConnection(transport)
        # The first write fills the "socket".
        original = transport.write

        def write(data: bytes) -> None:
            original(data)
            if transport.producer is not None and len(transport.value()) > CHUNK_SIZE:
                transport.producer.pauseProducing()

        transport.write = write  # type: ignore[method-assign]
        channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: memory\r\n\r\n".encode())
        self.assertLess(len(transport.value()), CHUNK_SIZE + 1000)
        transport.write = original  # type: ignore[method-assign]
        transport.producer.resumeProducing()
        response = parse_response(transport.value())
        self.assertEqual((response.status, response.body), (200, body))
        channel.connectionLost(None)

    def test_clientGone(self) -> None:
        """
        A client that disconnects mid-body ends the stream quietly: reads
        stop, the file is closed, nothing is logged as an error.
        """
        body = os.urandom(3 * CHUNK_SIZE)
        self.put("big.bin", body)
        path = self.get_url("big.bin").removeprefix("http://memory")
        transport = StringTransport()
        channel = make_site(self.server.node).buildProtocol(None)
        channel.makeConnection(transport)
        original = transport.write

        def write(data: bytes) -> None:
            original(data)
            if transport.producer is not None:
                transport.producer.pauseProducing()

        transport.write = write  # type: ignore[method-assign]
        closed = []
        open_read = self.server.storage.open_read

        def tracked(*args: Any, **kwargs: Any) -> Any:
            reader = open_read(*args, **kwargs)
            close = reader.close
            reader.close = lambda: close().addCallback(closed.append)  # type: ignore[method-assign]
            return reader

        self.server.storage.open_read = tracked  # type: ignore[method-assign]
        channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: memory\r\n\r\n".encode())
        self.assertEqual(closed, [])
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(closed, [None])
        self.assertLess(len(transport.value()), 2 * CHUNK_SIZE)


class RefusalTests(_WebMixin, SynchronousTestCase):
    """
    Nothing but a live file this server holds is ever served.
    """

    def test_onlyStoredFiles(self) -> None:
        """
        Paths that are not exactly a stored file's are 404, whatever lies
        on disk there: the database, temp uploads, quarantine, directories,
        escapes of any kind.  Other methods are refused.
        """
        info = self.put("a.txt", BODY)
        fid = info.fid
        shutil.copy(self.disk(info), os.path.join(self.server.storage.root, "quarantine", fid))
        good = "/" + info.path
        for target in [
            "/",
            "/metadata.sqlite",
            "/tmp/",
            f"/quarantine/{fid}",
            "/files/",
            f"/files/{fid[:2]}/",
            f"/files/{fid[:2]}/{fid[2:4]}/",
            f"/files/{fid[:2]}/{fid[2:4]}/{fid}",  # no extension
            f"/files/{fid[:2]}/{fid[2:4]}/{fid}.TXT",
            f"/files/00/00/{fid}.txt",  # wrong directories
            f"/files/{fid[:2]}/{fid[2:4]}/../../../metadata.sqlite",
            f"/files/{fid[:2]}%2F{fid[2:4]}%2F{fid}.txt",
            f"/files/{fid[:2]}/{fid[2:4]}/%2E%2E/{fid}.txt",
            f"/files/{fid[:2]}/{fid[2:4]}/{fid}%2Etxt",
            f"/private/ns/{fid[:2]}/{fid[2:4]}/{fid}.txt",
            good + "/",
            "/x" + good,
        ]:
            self.assertEqual(self.get(target).status, 404, target)
        self.assertEqual(self.get(good).status, 200)
        self.assertEqual(self.http("POST", good).status, 405)
        # Twisted answers methods it does not know with 501.
        self.assertEqual(self.http("DELETE", good).status, 501)

    def test_deleted(self) -> None:
        """
        A deleted file is 404 at once, and the server that deleted it has
        removed its copy, so a web server serving the data directory stops
        serving it too.
        """
        info = self.put("a.txt", BODY)
        url = self.get_url("a.txt")
        self.assertTrue(self.server.flush(self.client.delete("a.txt")))
        self.assertEqual(self.get(url).status, 404)
        self.assertFalse(os.path.exists(self.disk(info)))

    def test_overwritten(self) -> None:
        """
        The URL of a replaced version is 404, though its bytes are still on
        disk (for the replicator to reclaim): only the metadata decides.
        """
        old = self.put("a.txt", BODY)
        old_url = self.get_url("a.txt")
        self.put("a.txt", b"new")
        self.assertTrue(os.path.exists(self.disk(old)))
        self.assertEqual(self.get(old_url).status, 404)
        self.assertEqual(self.get(self.get_url("a.txt")).body, b"new")

    def test_orphan(self) -> None:
        """
        A file on disk that no row names (a crash between rename and
        commit) is 404.
        """
        info = self.put("a.txt", BODY)
        orphan = f"files/ff/ff/{'f' * 32}.txt"
        os.makedirs(os.path.dirname(self.server.storage.abspath(orphan)))
        shutil.copy(self.disk(info), self.server.storage.abspath(orphan))
        self.assertEqual(self.get("/" + orphan).status, 404)

    def test_corruptNeverServedWhole(self) -> None:
        """
        A copy whose bytes changed on disk is never a complete 200: the
        connection is cut before the last chunk, whose checksum fails, and
        the copy is quarantined and no longer offered.
        """
        for body in (BODY, os.urandom(2 * CHUNK_SIZE + 7)):
            info = self.put("a.bin", body)
            url = self.get_url("a.bin")
            with open(self.disk(info), "r+b") as f:
                f.seek(len(body) - 1)
                f.write(bytes([body[-1] ^ 1]))
            response = self.get(url)
            self.assertTrue(response.aborted)
            self.assertIn(response.status, (0, 200))
            self.assertLess(len(response.body), len(body))
            self.assertFalse(os.path.exists(self.disk(info)))
            quarantined = os.path.join(self.server.storage.root, "quarantine", info.fid + ".bin")
            self.assertTrue(os.path.exists(quarantined))
            self.assertEqual(
                self.server.flush(self.server.store.lookup("ns", "a.bin")).replicas, ()
            )
            # No good copy left anywhere: lost, not an outage.
            self.assertEqual(self.get(url).status, 410)

    def test_rangeOfCorruptCopy(self) -> None:
        """
        A copy of the wrong size is caught even by a range request, which
        cannot check the checksum.
        """
        info = self.put("a.txt", BODY)
        url = self.get_url("a.txt")
        with open(self.disk(info), "ab") as f:
            f.write(b"extra")
        self.assertEqual(self.get(url, Range="bytes=0-1").status, 410)
        self.assertFalse(os.path.exists(self.disk(info)))

    def test_missingCopy(self) -> None:
        """
        A copy gone from disk is forgotten; it was the only one, so the
        client is told the file is lost (410, not an outage's 503).
        """
        info = self.put("a.txt", BODY)
        os.unlink(self.disk(info))
        response = self.get(self.get_url("a.txt"))
        self.assertEqual(response.status, 410)
        self.assertEqual(response.headers["x-koboldfs-error"], "DATA_LOST")
        self.assertEqual(response.headers["cache-control"], "no-store")
        self.assertEqual(self.server.flush(self.server.store.lookup("ns", "a.txt")).replicas, ())

    def test_symlink(self) -> None:
        """
        A symlink in place of a stored file is not followed.
        """
        info = self.put("a.txt", BODY)
        secret = os.path.join(self.server.storage.root, "secret.txt")
        with open(secret, "wb") as f:
            f.write(BODY)
        os.unlink(self.disk(info))
        os.symlink(secret, self.disk(info))
        self.assertEqual(self.get(self.get_url("a.txt")).status, 410)

    def test_redirectToHolder(self) -> None:
        """
        A server with no copy sends the client to a live one that has one.
        """
        info = self.put("a.txt", BODY)
        url = self.get_url("a.txt")
        store = self.server.store
        now = self.server.reactor.seconds()
        self.server.flush(
            store.register_server(ServerInfo("other", "h2", "h2:1", "http://other/", heartbeat=now))
        )
        self.server.flush(store.add_replica(info.id, "other", now))
        self.server.flush(store.remove_replica(info.id, "memory"))
        self.server.flush(self.server.node.refresh_servers())
        response = self.get(url)
        self.assertEqual(response.status, 307)
        self.assertEqual(response.headers["location"], f"http://other/{info.path}")
        self.assertEqual(response.headers["cache-control"], "no-store")


class PrivateTests(_WebMixin, SynchronousTestCase):
    """
    Files of a private namespace are served only with a valid signature.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ns = self.server.flush(self.server.store.set_namespace("secret", private=True))
        self.info = self.put("a.jpg", BODY, namespace="secret")

    def test_storedApart(self) -> None:
        """
        Its files are published under private/<namespace>/.
        """
        fid = self.info.fid
        self.assertEqual(self.info.path, f"private/secret/{fid[:2]}/{fid[2:4]}/{fid}.jpg")

    def test_signedURL(self) -> None:
        """
        get_url signs for an hour by default, or as long as asked; the
        signed URL is served, with caching bounded by its expiry.
        """
        now = self.server.reactor.seconds()
        for kwargs, lifetime in [({}, DEFAULT_EXPIRES), ({"expires": 60}, 60)]:
            url = self.get_url("a.jpg", namespace="secret", **kwargs)
            query = parse_qs(urlsplit(url).query)
            self.assertEqual(sorted(query), ["e", "m", "s"])
            self.assertEqual(int(query["e"][0]), now + lifetime)
            response = self.get(url)
            self.assertEqual((response.status, response.body), (200, BODY))
            self.assertEqual(response.headers["cache-control"], f"private, max-age={lifetime}")

    def test_refused(self) -> None:
        """
        No signature, a tampered one, another file's, one made with another
        secret, or an expired one: 403.
        """
        url = self.get_url("a.jpg", namespace="secret", expires=60)
        base, _, query = url.partition("?")
        args = {k: v[0] for k, v in parse_qs(query).items()}
        other = self.put("b.jpg", BODY, namespace="secret")
        other_args = parse_qs(urlsplit(self.get_url("b.jpg", namespace="secret")).query)
        e = int(args["e"])
        path = "/" + self.info.path
        # The last character changed: to one that differs from it.
        tampered = args["s"][:-1] + ("A" if args["s"][-1] != "A" else "E")
        for target in [
            base,
            f"{base}?e={e}",
            f"{base}?s={args['s']}",
            f"{base}?e={e + 1}&s={args['s']}",
            f"{base}?e={e}&s={tampered}",
            f"{base}?e={e}&s={other_args['s'][0]}",
            f"{base}?e={e}&s={signature('another secret' * 3, path, e)}",
            f"{base}?e=-{e}&s={args['s']}",
        ]:
            self.assertEqual(self.get(target).status, 403, target)
        self.assertNotEqual(other.fid, self.info.fid)
        self.assertEqual(self.get(url).status, 200)
        self.server.reactor.advance(61)
        self.assertEqual(self.get(url).status, 403)

    def test_badExpiry(self) -> None:
        """
        get_url refuses lifetimes that are not a positive number of seconds
        up to ten years.
        """
        for expires in (0, -5, 10 * 365 * 86400 + 1):
            with self.assertRaises(ServerError) as caught:
                self.get_url("a.jpg", namespace="secret", expires=expires)
            self.assertEqual(caught.exception.code, ErrorCode.BAD_REQUEST)

    def test_publicIgnoresExpiry(self) -> None:
        """
        A public file's URL carries no signature, expiry or not.
        """
        self.put("p.txt", BODY)
        self.assertNotIn("?", self.get_url("p.txt", expires=60))

    def test_nginxToken(self) -> None:
        """
        The URL's m= token is the one nginx's secure_link_md5 computes for
        "$secure_link_expires$uri <nginx key>", with the derived key.
        """
        url = self.get_url("a.jpg", namespace="secret", expires=60)
        args = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        uri = urlsplit(url).path
        key = nginx_key(self.ns.secret)
        self.assertNotEqual(key, self.ns.secret)
        digest = hashlib.md5(f"{args['e']}{uri} {key}".encode()).digest()
        expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        self.assertEqual(args["m"], expected)
        self.assertEqual(nginx_token(self.ns.secret, uri, int(args["e"])), expected)


class GetURLTests(_WebMixin, SynchronousTestCase):
    """
    Which URL get_url hands out.
    """

    def addServer(self, name: str, info: FileInfo, state: str = "alive", age: float = 0) -> None:
        store = self.server.store
        now = self.server.reactor.seconds()
        server = ServerInfo(name, name, f"{name}:1", f"http://{name}/", state, now - age)
        self.server.flush(store.register_server(server))
        self.server.flush(store.set_server_state(name, state))
        self.server.flush(store.add_replica(info.id, name, now))

    def test_spreadOverLiveReplicas(self) -> None:
        """
        URLs go to every live server holding a copy, and never to one that
        is down (silent too long) or dead.
        """
        info = self.put("a.txt", BODY)
        self.addServer("two", info)
        self.addServer("readonly", info, state="readonly")
        self.addServer("down", info, age=self.server.config.down_after + 1)
        self.addServer("dead", info, state="dead")
        self.server.flush(self.server.node.refresh_servers())
        hosts = {urlsplit(self.get_url("a.txt")).netloc for _ in range(200)}
        self.assertEqual(hosts, {"memory", "two", "readonly"})

    def test_missing(self) -> None:
        """
        No such key is NOT_FOUND, which the clients turn into None.
        """
        self.assertIsNone(self.server.flush(self.client.get_url("nope")))
        self.put("a.txt", BODY)
        self.server.flush(self.client.delete("a.txt"))
        self.assertIsNone(self.server.flush(self.client.get_url("a.txt")))

    def test_noLiveReplica(self) -> None:
        """
        A file whose holders are all down is UNAVAILABLE, which clients
        retry elsewhere or later.
        """
        info = self.put("a.txt", BODY)
        self.addServer("down", info, age=self.server.config.down_after + 1)
        self.server.flush(self.server.store.remove_replica(info.id, "memory"))
        self.server.flush(self.server.node.refresh_servers())
        with self.assertRaises(ServerError) as caught:
            self.get_url("a.txt")
        self.assertEqual(caught.exception.code, ErrorCode.UNAVAILABLE)

    def test_noGoodCopy(self) -> None:
        """
        A file with no good copy left anywhere is DATA_LOST, which clients
        do not retry: its bytes are gone, not out of reach.
        """
        info = self.put("a.txt", BODY)
        self.server.flush(self.server.store.quarantine_replica(info.id, "memory"))
        with self.assertRaises(DataLost) as caught:
            self.get_url("a.txt")
        self.assertEqual(caught.exception.code, ErrorCode.DATA_LOST)
        self.assertFalse(caught.exception.retryable)

    def test_template(self) -> None:
        """
        A namespace's template builds its URLs from the server, the
        namespace, the stored path and the key; a private one's are signed
        over the stored path whatever the template.
        """
        info = self.put("dir/a b?.txt", BODY)
        template = "https://cdn.example/{server}/{namespace}/{path}?k={key}&f={fid}&p={public_url}"
        self.server.flush(self.server.store.set_namespace("ns", url_template=template))
        fid = info.fid
        self.assertEqual(
            self.get_url("dir/a b?.txt"),
            f"https://cdn.example/memory/ns/{info.path}?k=dir/a%20b%3F.txt&f={fid}&p=http://memory",
        )
        self.server.flush(
            self.server.store.set_namespace("secret", private=True, url_template="//{fid}")
        )
        private = self.put("b", BODY, namespace="secret")
        url = self.get_url("b", namespace="secret", expires=5)
        self.assertTrue(url.startswith(f"//{private.fid}?e="), url)
        args = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        secret = self.server.flush(self.server.store.namespace("secret")).secret
        self.assertTrue(check_signature(secret, private.path, args["e"], args["s"], 0))


class URLFunctionTests(SynchronousTestCase):
    """
    The pure functions behind URLs and signatures.
    """

    def test_checkTemplate(self) -> None:
        """
        Templates use only the documented fields, plainly, and name the
        file somehow.
        """
        self.assertEqual(check_template("{public_url}/{path}"), "{public_url}/{path}")
        for bad in ["", "{public_url}", "{path!r}", "{path:>9}", "{path.upper}", "{0}", "{", "}"]:
            self.assertRaises(ValueError, check_template, bad)

    def test_fillTemplate(self) -> None:
        """
        The default template is the server's public URL and the path; keys
        are url-quoted, slashes kept.
        """
        fields = dict(server="s", namespace="n", path="files/p", key="a/é", fid="f")
        self.assertEqual(
            fill_template(None, public_url="http://h:1/base/", **fields), "http://h:1/base/files/p"
        )
        self.assertEqual(fill_template("/{key}", public_url="x", **fields), "/a/%C3%A9")

    def test_checkSignature(self) -> None:
        """
        A signature is valid for its path until its expiry, inclusive.
        """
        s = signature("k" * 20, "/files/p", 100)
        self.assertTrue(check_signature("k" * 20, "files/p", "100", s, 100))
        self.assertFalse(check_signature("k" * 20, "files/p", "100", s, 100.5))
        self.assertFalse(check_signature("k" * 20, "files/q", "100", s, 0))
        self.assertFalse(check_signature("k" * 20, "files/p", "100", "é", 0))
        self.assertFalse(check_signature("k" * 20, "files/p", None, s, 0))

    def test_parseRange(self) -> None:
        """
        Single ranges, the three forms; None for what is ignored.
        """
        self.assertEqual(parse_range(b"bytes=0-0", 10), (0, 0))
        self.assertEqual(parse_range(b"bytes=9-", 10), (9, 9))
        self.assertEqual(parse_range(b"bytes=-20", 10), (0, 9))
        self.assertIsNone(parse_range(None, 10))
        self.assertIsNone(parse_range(b"bytes=-", 10))
        self.assertIsNone(parse_range(b"bytes=1-2, 3-4", 10))
        self.assertRaises(Unsatisfiable, parse_range, b"bytes=10-", 10)
        self.assertRaises(Unsatisfiable, parse_range, b"bytes=-0", 10)
