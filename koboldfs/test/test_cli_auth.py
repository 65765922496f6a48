"""
The C{koboldfs} command against real servers that require keys: keys made,
listed and revoked from the command line (and how a revocation reaches
connections already open).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from koboldfs import auth, cli
from koboldfs.client import DeferredClient
from koboldfs.connection import ConnectionCache
from koboldfs.errors import Forbidden
from koboldfs.protocol import encode_data
from koboldfs.test.cluster import ClusterMixin, ServerProcess
from koboldfs.test.test_cli import Result, _Stream

#: How often the servers of these tests look for revoked keys.
KEY_CHECK = 1.0


class KeysMixin(ClusterMixin):
    timeout = 180

    async def keyed(self, *extra: str) -> ServerProcess:
        """
        A server on loopback that requires keys anyway.
        """
        base = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(base)
        self.db = f"sqlite:///{base}/shared.sqlite"
        return await self.startServer(
            "a",
            db=self.db,
            extra=("--auth=keys", f"--key-check-interval={KEY_CHECK:g}", *extra),
        )

    async def admin(self, *argv: str) -> Result:
        """
        C{koboldfs admin --db DB ARGV} in-process, on the test's reactor.
        """
        out, err = _Stream(), _Stream()
        self.patch(sys, "stdout", out)  # type: ignore[attr-defined]
        self.patch(sys, "stderr", err)  # type: ignore[attr-defined]
        code = await cli.admin(reactor, ["--db", self.db, *argv])
        return Result(code, out.bytes(), err.bytes().decode())

    async def new_key(self, namespace: str = "demo", *options: str) -> str:
        r = await self.admin("key", "create", namespace, *options)
        self.assertEqual(r.code, 0, r.err)  # type: ignore[attr-defined]
        return r.out.decode().strip()


class KeyCommandTests(KeysMixin, TestCase):
    """
    C{koboldfs admin key create | list | revoke}.
    """

    async def test_createListRevoke(self) -> None:
        """
        C{create} prints a working key once; C{list} shows its id, namespace,
        access and creation, never the secret; C{revoke} takes the id or
        the whole key, and a revoked key is refused on a new connection at
        once.
        """
        server = await self.keyed()
        r = await self.admin("key", "create", "demo")
        self.assertEqual(r.code, 0, r.err)
        key = r.out.decode().strip()
        key_id, secret = auth.parse_key(key)
        self.assertIn("not shown again", r.err)
        self.assertIn("namespace 'demo' did not exist", r.err)
        readonly = await self.new_key("demo", "--readonly")
        other = await self.new_key("other")

        listed = await self.admin("key", "list", "demo")
        self.assertEqual(listed.code, 0, listed.err)
        lines = listed.out.decode().splitlines()
        self.assertEqual(lines[0].split(), ["KEY", "ID", "NAMESPACE", "ACCESS", "CREATED"])
        self.assertEqual(
            [line.split()[:3] for line in lines[1:]],
            [
                [key_id, "demo", "read-write"],
                [auth.parse_key(readonly)[0], "demo", "read-only"],
            ],
        )
        everything = (await self.admin("key", "list")).out.decode()
        self.assertIn(auth.parse_key(other)[0], everything)
        for shown in (listed.out.decode(), everything):
            for k in (key, readonly, other):
                self.assertNotIn(auth.parse_key(k)[1], shown)
        self.assertNotIn(secret, r.err)

        client = DeferredClient("demo", [server.address], reactor, key=key)
        self.addCleanup(client.close)
        self.assertTrue(await client.put("a", b"body"))
        ro = DeferredClient("demo", [server.address], reactor, key=readonly)
        self.addCleanup(ro.close)
        with self.assertRaises(Forbidden):
            await ro.put("b", b"body")

        r = await self.admin("key", "revoke", "demo", key)  # the whole key works too
        self.assertEqual(r.code, 0, r.err)
        self.assertIn(f"demo/{key_id}: revoked", r.out.decode())
        fresh = DeferredClient("demo", [server.address], reactor, key=key)
        self.addCleanup(fresh.close)
        with self.assertRaises(Forbidden):
            await fresh.stat("a")
        self.assertEqual((await self.admin("key", "revoke", "demo", key_id)).code, 1)
        self.assertEqual((await self.admin("key", "revoke", "demo", "kfs1.nope")).code, 2)
        self.assertEqual((await self.admin("key", "list", "nosuch")).code, 1)
        self.assertEqual((await self.admin("key", "create", "bad/name")).code, 2)
        self.assertNotIn(key_id, (await self.admin("key", "list", "demo")).out.decode())

    async def test_revokedWhileOpen(self) -> None:
        """
        Connections opened with a key before it was revoked end within the
        server's --key-check-interval (plus its query): an upload under
        way is refused with FORBIDDEN saying so, and an idle connection is
        closed; the server goes on serving other keys.
        """
        server = await self.keyed()
        key, other = await self.new_key(), await self.new_key()
        pool = ConnectionCache(reactor, credentials=auth.Credentials("demo", key))
        self.addCleanup(pool.close)
        idle = await pool.acquire(server.address)
        uploading = await pool.acquire(server.address)
        reply: defer.Deferred[Any] = uploading.begin_put(
            {"ns": "demo", "key": "slow", "size": 1 << 20}
        )
        reply.addErrback(lambda failure: failure.value)  # looked at below
        uploading.send_frame(encode_data(b"x" * 1000))

        r = await self.admin("key", "revoke", "demo", auth.parse_key(key)[0])
        self.assertEqual(r.code, 0, r.err)
        revoked = time.monotonic()
        error = await reply
        ended = time.monotonic() - revoked
        self.assertIsInstance(error, Forbidden)
        self.assertIn("was revoked", str(error))
        await idle.lost
        # The bound: one check interval, with room for a loaded machine.
        self.assertLess(ended, KEY_CHECK + 5.0)
        self.assertIn("ended 2 connections of revoked keys", server.tail())

        client = DeferredClient("demo", [server.address], reactor, key=other)
        self.addCleanup(client.close)
        self.assertIsNone(await client.stat("slow"))
        self.assertTrue(await client.put("after", b"x"))
