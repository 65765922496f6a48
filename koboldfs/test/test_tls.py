"""
TLS end to end: real C{twistd koboldfs} servers on C{ssl:} endpoints, with
a CA and certificates made in the test run; and the cluster secret between
servers that require keys.
"""

from __future__ import annotations

import io
import os
import random
import signal
import ssl
import time
import urllib.request

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from koboldfs.client import DeferredClient
from koboldfs.errors import ErrorCode, Unavailable
from koboldfs.metadata.sqlstore import SQLAlchemyStore
from koboldfs.test.cluster import ServerProcess
from koboldfs.test.certs import TestCA
from koboldfs.test.support import eventually


class TLSTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        self.ca = TestCA(os.path.join(self.base, "ca"))
        self.db = f"sqlite:///{os.path.join(self.base, 'shared.sqlite')}"
        self.secret = os.path.join(self.base, "cluster.secret")
        with open(self.secret, "w") as f:
            f.write("a cluster secret of some length\n")

    async def start(self, name: str, pem: str, *extra: str) -> ServerProcess:
        server = ServerProcess(self.base, name, db=self.db)
        tls = f"privateKey={pem}:interface=127.0.0.1"
        server.extra = (
            f"--listen=ssl:{server.port}:{tls}",
            f"--http=ssl:{server.http_port}:{tls}",
            "--replicate-interval=0.5",
            *extra,
        )
        self.addCleanup(lambda: defer.ensureDeferred(server.stop()))
        await server.start()
        return server

    def client(self, *servers: ServerProcess, **options: object) -> DeferredClient:
        client = DeferredClient("demo", [s.address for s in servers], reactor, **options)
        self.addCleanup(client.close)
        return client

    async def key(self, readonly: bool = False) -> str:
        store = SQLAlchemyStore(self.db, reactor)
        await store.start()
        try:
            return await store.create_key("demo", readonly)
        finally:
            await store.stop()

    def test_putGet(self) -> defer.Deferred[None]:
        """
        With the right CA, put, get and the HTTPS URL of get_url work; a
        client without TLS, or trusting another CA, gets nothing.
        """

        async def run() -> None:
            a = await self.start("a", self.ca.server_pem("127.0.0.1"))
            client = self.client(a, tls=True, ca=self.ca.ca)
            body = os.urandom(2 * 1024 * 1024 + 3)
            self.assertTrue(await client.put("k.bin", body))
            out = io.BytesIO()
            self.assertTrue(await client.get("k.bin", out))
            self.assertEqual(out.getvalue(), body)
            url = await client.get_url("k.bin")
            self.assertTrue(url.startswith(f"https://127.0.0.1:{a.http_port}/files/"), url)
            context = ssl.create_default_context(cafile=self.ca.ca)

            def fetch() -> bytes:
                with urllib.request.urlopen(url, context=context, timeout=30) as response:
                    return response.read()

            self.assertEqual(await threads.deferToThread(fetch), body)
            for options in ({}, {"tls": True, "ca": TestCA(self.base + "/other").ca}):
                other = self.client(a, retries=0, connect_timeout=5, timeout=5, **options)
                with self.assertRaises(Unavailable):
                    await other.stat("k.bin")

        return defer.ensureDeferred(run())

    def test_nameMismatch(self) -> defer.Deferred[None]:
        """
        A certificate from the right CA but for another name is refused.
        """

        async def run() -> None:
            a = await self.start("a", self.ca.server_pem("kobold.example.com"))
            client = self.client(a, tls=True, ca=self.ca.ca, retries=0)
            with self.assertRaises(Unavailable) as caught:
                await client.put("k", b"body")
            self.assertIn("127.0.0.1", str(caught.exception))
            self.assertTrue(a.process.poll() is None)

        return defer.ensureDeferred(run())

    def test_replication(self) -> defer.Deferred[None]:
        """
        Two servers requiring keys, on TLS, with the CA (--tls-ca) and the
        cluster secret, copy each other's files; a third without the secret
        is refused by both, and gets no copy.
        """

        async def run() -> None:
            pem = self.ca.server_pem("127.0.0.1")
            common = ("--auth=keys", f"--tls-ca={self.ca.ca}")
            key = await self.key()
            a = await self.start("a", pem, *common, f"--secret-file={self.secret}")
            b = await self.start("b", pem, *common, f"--secret-file={self.secret}")
            c = await self.start("c", pem, *common)
            client = self.client(a, tls=True, ca=self.ca.ca, key=key)
            body = os.urandom(1024 * 1024 + 1)
            self.assertTrue(await client.put("k.bin", body))

            async def on_a_and_b() -> bool:
                stat = await client.stat("k.bin")
                return stat is not None and stat.servers == ("a", "b")

            await eventually(on_a_and_b, timeout=30, what="k.bin on a and b")
            out = io.BytesIO()
            on_b = self.client(b, tls=True, ca=self.ca.ca, key=key)
            self.assertTrue(await on_b.get("k.bin", out))
            self.assertEqual(out.getvalue(), body)

            # c's replicator asks a and b for the file, pass after pass, and
            # each refuses it: after several refusals, still no copy on c.
            def refusals() -> int:
                return sum(
                    "requires authentication" in line for line in c.tail(10_000).splitlines()
                )

            await eventually(lambda: refusals() >= 4, timeout=30, what="c refused by a and b")
            self.assertEqual((await client.stat("k.bin")).servers, ("a", "b"))
            # c asked for the file relays it from a peer, which refuses c.
            on_c = self.client(c, tls=True, ca=self.ca.ca, key=key, retries=0)
            with self.assertRaises(Unavailable) as caught:
                await on_c.get("k.bin", io.BytesIO())
            self.assertEqual(caught.exception.code, ErrorCode.UNAVAILABLE)
            # A client without a key is refused by every one of them.
            nokey = self.client(a, tls=True, ca=self.ca.ca)
            with self.assertRaises(Exception) as caught:
                await nokey.stat("k.bin")
            self.assertEqual(caught.exception.code, ErrorCode.AUTH_REQUIRED)

        return defer.ensureDeferred(run())

    def test_hung_server(self) -> defer.Deferred[None]:
        """
        With TLS and keys, the first listed server hung (SIGSTOP: TCP
        completes, TLS and the handshake never do): a get and a put of a
        client with default deadlines complete through the next server in
        under 6 s, and a put whose forward target is the hung server is
        acknowledged before the client's deadline.
        """

        async def run() -> None:
            pem = self.ca.server_pem("127.0.0.1")
            common = ("--auth=keys", f"--tls-ca={self.ca.ca}", f"--secret-file={self.secret}")
            key = await self.key()
            a = await self.start("a", pem, *common, "--down-after=120")
            b = await self.start("b", pem, *common, "--down-after=120")
            setup = self.client(b, tls=True, ca=self.ca.ca, key=key)
            body = os.urandom(1024 * 1024)
            self.assertTrue(await setup.put("k.bin", body))
            stat = await setup.stat("k.bin")
            self.assertEqual(stat and stat.servers, ("a", "b"))
            a.signal(signal.SIGSTOP)
            self.addCleanup(a.signal, signal.SIGCONT)
            self.patch(random, "randrange", lambda n: 0)
            client = self.client(a, b, tls=True, ca=self.ca.ca, key=key)
            out = io.BytesIO()
            start = time.monotonic()
            self.assertTrue(await client.get("k.bin", out))
            got = time.monotonic() - start
            self.assertEqual(out.getvalue(), body)
            client._next = 0
            start = time.monotonic()
            self.assertTrue(await client.put("again.bin", body))
            put = time.monotonic() - start
            print(
                f"\nTLS and keys, first listed server hung: get {got:.2f} s; put {put:.2f} s"
                " (through B, whose copy to hung A it gave up)"
            )
            self.assertLess(got, 6.0)
            # The client's 5 s for A, then B's 3 s for its copy to A.
            self.assertLess(put, 5.0 + 3.0 + 1.0)
            stat = await setup.stat("again.bin")
            self.assertEqual(stat and stat.servers, ("b",))

        return defer.ensureDeferred(run())
