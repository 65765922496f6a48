"""
HTTP end to end: real C{twistd koboldfs} processes on loopback, reached by
a real HTTP client, directly and through a real nginx configured with
docs/nginx.conf whose root is the server's data directory.
"""

from __future__ import annotations

import http.client
import os
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from koboldfs.client import DeferredClient
from koboldfs.metadata.sqlstore import SQLAlchemyStore
from koboldfs.protocol import CHUNK_SIZE
from koboldfs.test.cluster import ClusterMixin, ServerProcess
from koboldfs.test.nginx import (
    EXAMPLE,
    EXAMPLE_HMAC,
    NGINX,
    NJS_MODULE,
    NO_NGINX,
    NO_NJS,
    NginxProcess,
)
from koboldfs.urls import nginx_key, signed_url
from koboldfs.test.support import sleep


def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """
    One request with a fresh connection, redirects not followed: status,
    headers (lower-cased names) and body.  Blocking: call it in a thread.
    """
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=10)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


class _HTTPMixin(ClusterMixin):
    timeout = 60

    async def startWithNginx(
        self, private: str | None = None, example: str = EXAMPLE
    ) -> tuple[ServerProcess, NginxProcess, str | None]:
        """
        A server whose --public-url is an nginx serving its data directory
        with the site C{example}; namespace C{private}, if given, is made
        private first, and its secret returned.
        """
        base = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(base)
        self.db = f"sqlite:///{base}/metadata.sqlite"
        keys = {}
        secret = None
        if private is not None:
            secret = await self.setPrivate(private)
            keys[private] = secret if example == EXAMPLE_HMAC else nginx_key(secret)
        # The server must know nginx's URL, and nginx the server's data.
        nginx = NginxProcess(os.path.join(base, "nginx"), base, keys, example=example)
        server = await self.startServer("s", db=self.db, extra=(f"--public-url={nginx.url}",))
        nginx.root = server.data
        nginx.launch()
        self.addCleanup(nginx.stop)  # type: ignore[attr-defined]
        while not nginx.listening():
            await sleep(0.02)
        return server, nginx, secret

    def client(self, server: ServerProcess, namespace: str = "demo") -> DeferredClient:
        client = DeferredClient(namespace, [server.address], reactor)
        self.addCleanup(client.close)  # type: ignore[attr-defined]
        return client

    async def setPrivate(self, namespace: str) -> str:
        """
        Make C{namespace} private through the metadata API, as an operator
        tool would; return its secret.
        """
        store = SQLAlchemyStore(self.db, reactor)
        await store.start()
        try:
            info = await store.set_namespace(namespace, private=True)
        finally:
            await store.stop()
        return info.secret  # type: ignore[no-any-return]


class BuiltinHTTPTests(_HTTPMixin, TestCase):
    """
    The built-in server, through a real socket.
    """

    def test_serve(self) -> defer.Deferred[None]:
        """
        GET, HEAD, Range, 304, 404 and the headers, as a browser sees them.
        """

        async def run() -> None:
            server = await self.startServer("s")
            client = self.client(server)
            body = os.urandom(100_000)
            await client.put("pics/cat.PNG", body)
            url = await client.get_url("pics/cat.PNG")
            self.assertTrue(url.startswith(server.http + "/files/"), url)
            self.assertTrue(url.endswith(".png"), url)
            status, headers, got = await deferToThread(fetch, url)
            self.assertEqual((status, got), (200, body))
            self.assertEqual(headers["content-type"], "image/png")
            self.assertEqual(headers["content-length"], str(len(body)))
            self.assertIn("immutable", headers["cache-control"])
            self.assertIn("last-modified", headers)
            status, head_headers, got = await deferToThread(fetch, url, "HEAD")
            self.assertEqual((status, got, head_headers["etag"]), (200, b"", headers["etag"]))
            status, _, got = await deferToThread(fetch, url, headers={"Range": "bytes=10-19"})
            self.assertEqual((status, got), (206, body[10:20]))
            status, _, _ = await deferToThread(fetch, url, headers={"Range": "bytes=100000-"})
            self.assertEqual(status, 416)
            status, _, got = await deferToThread(
                fetch, url, headers={"If-None-Match": headers["etag"]}
            )
            self.assertEqual((status, got), (304, b""))
            # "/" is the status page (koboldfs.status); no other path
            # outside the stored files' is served.
            for path in ("/metadata.sqlite", "/tmp/", "/quarantine/", "/status.json/x"):
                self.assertEqual((await deferToThread(fetch, server.http + path))[0], 404, path)
            await client.delete("pics/cat.PNG")
            self.assertEqual((await deferToThread(fetch, url))[0], 404)

        return defer.ensureDeferred(run())

    def test_corruptCut(self) -> defer.Deferred[None]:
        """
        A copy corrupted on disk is never received whole: the connection
        is cut short of the announced length, and the copy is set aside.
        """

        async def run() -> None:
            server = await self.startServer("s")
            client = self.client(server)
            body = os.urandom(3 * CHUNK_SIZE)
            await client.put("big.bin", body)
            url = await client.get_url("big.bin")
            path = os.path.join(server.data, urlsplit(url).path.lstrip("/"))
            with open(path, "r+b") as f:
                f.seek(len(body) - 1)
                f.write(bytes([body[-1] ^ 0xFF]))
            with self.assertRaises((http.client.IncompleteRead, ConnectionResetError)):
                await deferToThread(fetch, url)
            # The connection is cut first, the copy set aside just after.
            for _ in range(100):
                if not os.path.exists(path):
                    break
                await sleep(0.05)
            self.assertFalse(os.path.exists(path))
            self.assertEqual(len(os.listdir(os.path.join(server.data, "quarantine"))), 1)
            # That was the only copy: lost, which is not an outage's 503.
            self.assertEqual((await deferToThread(fetch, url))[0], 410)

        return defer.ensureDeferred(run())


class NginxTests(_HTTPMixin, TestCase):
    """
    docs/nginx.conf, run by a real nginx over a real server's data
    directory, answers the URLs get_url hands out as the server would.
    """

    if not NGINX:
        skip = NO_NGINX

    def test_public(self) -> defer.Deferred[None]:
        """
        The same bytes as the built-in server, HEAD and Range included;
        nothing but stored files reachable; 404 once deleted.
        """

        async def run() -> None:
            server, nginx, _ = await self.startWithNginx()
            client = self.client(server)
            body = os.urandom(300_000)
            await client.put("docs/report.pdf", body)
            url = await client.get_url("docs/report.pdf")
            self.assertTrue(url.startswith(nginx.url + "/files/"), url)
            builtin = server.http + urlsplit(url).path
            for base in (url, builtin):
                status, headers, got = await deferToThread(fetch, base)
                self.assertEqual((status, got), (200, body), base)
                self.assertEqual(headers["content-type"], "application/pdf")
                self.assertEqual(headers["cache-control"], "public, max-age=31536000, immutable")
                status, headers, got = await deferToThread(fetch, base, "HEAD")
                self.assertEqual((status, headers["content-length"], got), (200, "300000", b""))
                for spec, part in [
                    ("bytes=0-99", body[:100]),
                    ("bytes=299990-", body[-10:]),
                    ("bytes=-7", body[-7:]),
                ]:
                    status, headers, got = await deferToThread(fetch, base, headers={"Range": spec})
                    self.assertEqual((status, got), (206, part), (base, spec))
                status, _, _ = await deferToThread(fetch, base, headers={"Range": "bytes=400000-"})
                self.assertEqual(status, 416)
            fid_path = urlsplit(url).path
            quarantined = os.path.join(server.data, "quarantine", os.path.basename(fid_path))
            with open(quarantined, "wb") as f:
                f.write(b"bad copy")
            for path in (
                "/metadata.sqlite",
                "/s/data/metadata.sqlite",
                "/tmp/",
                "/quarantine/" + os.path.basename(fid_path),
                "/files/",
                os.path.dirname(fid_path) + "/",
                "/files/../metadata.sqlite",
                fid_path.replace("/files/", "/files%2F"),
            ):
                status, _, _ = await deferToThread(fetch, nginx.url + path)
                self.assertEqual(status, 404, path)
            await client.delete("docs/report.pdf")
            self.assertEqual((await deferToThread(fetch, url))[0], 404)
            self.assertEqual((await deferToThread(fetch, builtin))[0], 404)

        return defer.ensureDeferred(run())

    def test_private(self) -> defer.Deferred[None]:
        """
        A private namespace's signed URL is served by nginx (checking its
        MD5 token with secure_link) and by the server alike; without its
        signature, tampered, or expired: 403.
        """
        return defer.ensureDeferred(self._private(EXAMPLE))

    def test_privateHMAC(self) -> defer.Deferred[None]:
        """
        The same, with nginx checking the HMAC-SHA256 signature in njs
        (docs/nginx-hmac.conf).
        """
        return defer.ensureDeferred(self._private(EXAMPLE_HMAC))

    if not os.path.exists(NJS_MODULE):
        test_privateHMAC.skip = NO_NJS

    async def _private(self, example: str) -> None:
        server, nginx, secret = await self.startWithNginx(private="vault", example=example)
        assert secret is not None
        client = self.client(server, "vault")
        body = os.urandom(50_000)
        await client.put("deed.jpg", body)
        url = await client.get_url("deed.jpg", 300)
        parts = urlsplit(url)
        self.assertTrue(parts.path.startswith("/private/vault/"), url)
        args = {k: v[0] for k, v in parse_qs(parts.query).items()}
        builtin = server.http + parts.path
        for base_url in (nginx.url + parts.path, builtin):
            status, headers, got = await deferToThread(fetch, f"{base_url}?{parts.query}")
            self.assertEqual((status, got), (200, body), base_url)
            self.assertTrue(headers["cache-control"].startswith("private"))
            status, _, got = await deferToThread(
                fetch, f"{base_url}?{parts.query}", headers={"Range": "bytes=5-9"}
            )
            self.assertEqual((status, got), (206, body[5:10]))
            tampered = [
                "",
                f"?e={args['e']}",
                f"?e={int(args['e']) + 1}&s={args['s']}&m={args['m']}",
                f"?e={args['e']}&s={args['s'][::-1]}&m={args['m'][::-1]}",
            ]
            for query in tampered:
                status, _, _ = await deferToThread(fetch, base_url + query)
                self.assertEqual(status, 403, base_url + query)
        # Each checks the signature it can: the built-in server s, nginx the
        # m token, or s with njs.
        own = f"s={args['s']}" if example == EXAMPLE_HMAC else f"m={args['m']}"
        status, _, _ = await deferToThread(fetch, f"{nginx.url}{parts.path}?e={args['e']}&{own}")
        self.assertEqual(status, 200)
        status, _, _ = await deferToThread(fetch, f"{builtin}?e={args['e']}&m={args['m']}")
        self.assertEqual(status, 403)
        # Correctly signed, but expired.
        path = parts.path.lstrip("/")
        expired = signed_url(parts.path, secret, path, int(reactor.seconds()) - 1)
        for origin in (nginx.url, server.http):
            self.assertEqual((await deferToThread(fetch, origin + expired))[0], 403, origin)
        # The public tree does not serve it, whatever the path.
        public = nginx.url + parts.path.replace("/private/vault/", "/files/")
        self.assertEqual((await deferToThread(fetch, public))[0], 404)
        await client.delete("deed.jpg")
        self.assertEqual((await deferToThread(fetch, url))[0], 404)
