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

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from koboldfs import auth, cli
from koboldfs.client import DeferredClient
from koboldfs.connection import ConnectionCache
from koboldfs.errors import Forbidden
from koboldfs.protocol import encode_data
from koboldfs.test.certs import TestCA
from koboldfs.test.cluster import ClusterMixin, ServerProcess
from koboldfs.test.test_cli import Result, _Stream, run_process

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
        self.secret = os.path.join(base, "cluster-secret")
        with open(self.secret, "w") as f:
            f.write("# the cluster secret\na cluster secret of some length\n")
        return await self.startServer(
            "a",
            db=self.db,
            extra=(
                "--auth=keys",
                f"--key-check-interval={KEY_CHECK:g}",
                f"--secret-file={self.secret}",
                *extra,
            ),
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

    async def admin_remote(self, *argv: str) -> Result:
        """
        C{koboldfs admin ARGV} in-process with no database named and no
        client config file.
        """
        config = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("KOBOLDFS_")}
        self.patch(os, "environ", {**environ, "XDG_CONFIG_HOME": config})  # type: ignore[attr-defined]
        out, err = _Stream(), _Stream()
        self.patch(sys, "stdout", out)  # type: ignore[attr-defined]
        self.patch(sys, "stderr", err)  # type: ignore[attr-defined]
        code = await cli.admin(reactor, list(argv))
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

    async def test_fsckAsPeer(self) -> None:
        """
        C{admin fsck} against servers that require keys checks their copies
        when given the cluster secret; without it, it says once that the
        server refused it and what to give, instead of a line per copy.
        """
        server = await self.keyed()
        client = DeferredClient("demo", [server.address], reactor, key=await self.new_key())
        self.addCleanup(client.close)
        for i in range(3):
            await client.put(f"f{i}", b"x" * i)
        r = await self.admin("fsck")
        self.assertEqual(r.code, cli.EXIT_UNAVAILABLE, r.err)
        self.assertIn("refused fsck", r.err)
        self.assertIn("--secret-file", r.err)
        self.assertNotIn("PROBLEM", r.out.decode())
        r = await self.admin("fsck", "--secret-file", self.secret)
        self.assertEqual(r.code, 0, r.out + r.err.encode())
        self.assertIn("3 files, 3 copies: 3 good, 0 bad", r.out.decode())

    async def test_statusThroughServers(self) -> None:
        """
        C{admin status} and C{admin servers} with the servers' addresses and
        the cluster secret, and no database, say what they say from the
        database; without the secret, or with a wrong one, they say so.
        """
        server = await self.keyed()
        client = DeferredClient("demo", [server.address], reactor, key=await self.new_key())
        self.addCleanup(client.close)
        await client.put("f", b"x")
        via = ("-s", server.address, "--secret-file", self.secret)

        def verdicts(r: Result) -> list[str]:
            # Without the servers' scrub lines, which move on between runs.
            return [line for line in r.out.decode().splitlines() if not line.startswith("  a:")]

        remote = await self.admin_remote("status", *via)
        self.assertEqual(remote.code, 0, remote.err)
        local = await self.admin("status")
        self.assertEqual(verdicts(remote), verdicts(local))
        self.assertIn("servers: 1 (1 alive)", remote.out.decode())
        self.assertIn("files: 1 (1 B)", remote.out.decode())
        self.assertIn("\n  a: scrub: ", remote.out.decode())

        def columns(r: Result) -> list[list[str]]:
            # Not the heartbeat's age: a second may pass between the two.
            return [line.split()[:4] + line.split()[-3:] for line in r.out.decode().splitlines()]

        remote = await self.admin_remote("servers", *via)
        self.assertEqual(remote.code, 0, remote.err)
        self.assertEqual(columns(remote), columns(await self.admin("servers")))
        self.assertIn(server.address, remote.out.decode())
        self.assertEqual(remote.out.decode().splitlines()[1].split()[-1], "1")  # files held

        r = await self.admin_remote("status", "-s", server.address)
        self.assertEqual(r.code, cli.EXIT_USAGE)
        self.assertIn("give the servers' cluster secret: --secret-file", r.err)
        wrong = os.path.join(os.path.dirname(self.secret), "wrong")
        with open(wrong, "w") as f:
            f.write("not the secret of this cluster\n")
        r = await self.admin_remote("status", "-s", server.address, "--secret-file", wrong)
        self.assertEqual(r.code, cli.EXIT_UNAVAILABLE)
        self.assertIn("refused the cluster secret", r.err)
        r = await self.admin_remote("status", "-s", "127.0.0.1:1", "--secret-file", self.secret)
        self.assertEqual(r.code, cli.EXIT_UNAVAILABLE)
        self.assertIn("no server answered CLUSTER_STATUS", r.err)

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


class CredentialTests(KeysMixin, TestCase):
    """
    The file commands' key and TLS settings, from options, the environment
    and the client config file, and what they say when those are wrong:
    against a real server on TLS whose certificate names C{localhost}
    only, and one without TLS.
    """

    async def start(self) -> None:
        """
        The servers, the CA and a key of C{demo}; a home with no config.
        """
        base = os.path.abspath(self.mktemp())
        self.ca = TestCA(os.path.join(base, "ca"))
        pem = self.ca.server_pem("localhost")
        self.server = await self.keyed()
        self.plain = self.server  # requires keys, no TLS
        tls = ServerProcess(base, "t", db=self.db)
        ssl = f"privateKey={pem}:interface=127.0.0.1"
        tls.extra = (
            "--auth=keys",
            f"--listen=ssl:{tls.port}:{ssl}",
            f"--http=ssl:{tls.http_port}:{ssl}",
        )
        self.addCleanup(lambda: defer.ensureDeferred(tls.stop()))
        await tls.start()
        self.tls = tls
        self.by_name = f"localhost:{tls.port}"
        self.key = await self.new_key()
        self.home = os.path.join(base, "home")
        os.makedirs(self.home)
        # No config file of the user running the tests is read.
        self.env = {"HOME": self.home, "XDG_CONFIG_HOME": "", "KOBOLDFS_CONFIG": ""}

    def koboldfs(self, *argv: str, stdin: bytes = b"", **env: str) -> defer.Deferred[Result]:
        """
        The command as its own process, with no config file but the
        test's.
        """
        return threads.deferToThread(run_process, list(argv), stdin, {**self.env, **env})

    async def test_options(self) -> None:
        """
        C{--key} with C{--ca} (which implies TLS) puts and gets through the
        server's name; the key from C{KOBOLDFS_KEY} and C{--key-file} too.
        """
        await self.start()
        common = ("-n", "demo", "-s", self.by_name, "--ca", self.ca.ca)
        r = await self.koboldfs(*common, "--key", self.key, "put", "k", "-", stdin=b"hello")
        self.assertEqual(r.code, 0, r.err)
        r = await self.koboldfs(*common, "cat", "k", KOBOLDFS_KEY=self.key)
        self.assertEqual((r.code, r.out), (0, b"hello"), r.err)
        path = os.path.join(self.home, "demo.key")
        with open(path, "w") as f:
            f.write(f"# the demo key\n{self.key}\n")
        r = await self.koboldfs(*common, "--key-file", path, "ls")
        self.assertEqual((r.code, r.out), (0, b"k\n"), r.err)
        r = await self.koboldfs(*common, "ping", KOBOLDFS_KEY=self.key)
        self.assertIn(f"{self.by_name}: answered in", r.out.decode())

    async def test_configFile(self) -> None:
        """
        The client config file in the user's config directory sets the
        servers, namespace, key file and CA, relative paths from its own
        directory; C{KOBOLDFS_CONFIG} names another; options win over it.
        """
        await self.start()
        directory = os.path.join(self.home, ".config", "koboldfs")
        os.makedirs(directory)
        with open(os.path.join(directory, "demo.key"), "w") as f:
            f.write(self.key + "\n")
        with open(os.path.join(directory, "client.ini"), "w") as f:
            f.write(
                "[koboldfs]\n"
                f"servers = {self.by_name}\n"
                "namespace = demo\n"
                "key_file = demo.key\n"
                f"ca = {self.ca.ca}\n"
            )
        r = await self.koboldfs("put", "conf", "-", stdin=b"from the config")
        self.assertEqual(r.code, 0, r.err)
        r = await self.koboldfs("cat", "conf")
        self.assertEqual((r.code, r.out), (0, b"from the config"), r.err)
        r = await self.koboldfs("-n", "other", "ls")  # the option wins: not demo's key
        self.assertEqual(r.code, cli.EXIT_UNAVAILABLE)
        self.assertIn("refused the key", r.err)

        other = os.path.join(self.home, "other.ini")
        with open(other, "w") as f:
            f.write("[koboldfs]\nservers = 127.0.0.1:1\nbogus = 1\n")
        r = await self.koboldfs("ls", KOBOLDFS_CONFIG=other)
        self.assertEqual(r.code, cli.EXIT_USAGE)
        self.assertIn("unknown setting(s) bogus", r.err)
        r = await self.koboldfs("ls", KOBOLDFS_CONFIG=other + ".missing")
        self.assertEqual(r.code, cli.EXIT_USAGE)
        self.assertIn("no config file", r.err)

    async def test_errors(self) -> None:
        """
        Each way of getting the credentials wrong is said as such, with
        what to do, and exits 3 (2 for a malformed key).
        """
        await self.start()
        ca = ("--ca", self.ca.ca)
        key = ("--key", self.key)
        wrong = f"kfs1.{auth.parse_key(self.key)[0]}.{auth.parse_key(auth.new_key().key)[1]}"
        cases = [
            # (argv, exit status, what stderr says)
            ((self.by_name, *ca), 3, "require a key of namespace 'demo'"),
            ((self.by_name, *ca, "--key", wrong), 3, "refused the key"),
            ((self.by_name, *ca, "--key", "kfs1.bad"), 2, "--key: not a KoboldFS key"),
            ((self.by_name, *key), 3, "if the servers listen with TLS (ssl:), give --tls"),
            ((self.by_name, "--tls", *key), 3, "not signed by a CA you trust: give --ca"),
            ((self.tls.address, *ca, *key), 3, "does not name the host given in --servers"),
            ((self.plain.address, *ca, *key), 3, "do not speak TLS there: drop --tls"),
        ]
        results = await defer.gatherResults(
            [self.koboldfs("-n", "demo", "-s", *argv, "ls") for argv, _, _ in cases]
        )
        for (argv, code, said), r in zip(cases, results, strict=True):
            self.assertEqual(r.code, code, (argv, r.err))
            self.assertIn(said, r.err, argv)
            self.assertNotIn("Traceback", r.err, argv)
        self.assertNotIn(auth.parse_key(self.key)[1], "".join(r.err for r in results))
        # Without TLS, the key alone works on the server that has none.
        r = await self.koboldfs("-n", "demo", "-s", self.plain.address, *key, "ls")
        self.assertEqual(r.code, 0, r.err)
